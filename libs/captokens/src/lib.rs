//! Capability tokens: compact JWS (ES256) minted for exactly one tool call.
//!
//! A token binds one call — tenant, run, step, plan, audience (the connector),
//! the hash of the call's arguments and a capability (tool, actions,
//! constraints) — for at most five minutes. [`Issuer`] mints tokens with a
//! [`TokenSigner`] (a [`KeyPair`](anumate_crypto::KeyPair) or
//! [`KeyRing`](anumate_crypto::KeyRing) through `ring`, or [`P256Signer`]);
//! [`Verifier`] checks them against an [`Expectation`] in the order of the
//! contract (`anumate.captokens.v1`) and names the first failed check as a
//! [`Reason`] that maps one-to-one onto the proto's `TokenVerdict`.
//!
//! Replay and revocation need shared state; this crate defines the
//! [`ReplayGuard`] and [`RevocationList`] traits and
//! [`Verifier::verify_with`] runs them at their place in the check order.
#![forbid(unsafe_code)]

mod claims;
mod constraints;
mod guard;
mod issue;
mod verify;

#[cfg(any(test, feature = "test-util"))]
pub mod memory;

pub use claims::{Capability, Claims, Constraint};
pub use guard::{ReplayError, ReplayGuard, RevocationError, RevocationList};
pub use issue::{
    ArgsBinding, IssueError, IssueRequest, IssuedToken, Issuer, P256Signer, TokenSigner,
};
pub use verify::{
    Backend, CapabilityFailure, Expectation, Failure, KeyError, Reason, Rejection, VerifiedToken,
    Verifier, VerifyError,
};

/// The only accepted JWS `alg`.
pub const ALG: &str = "ES256";
/// The JWS `typ` header of every token, as the contract specifies.
pub const TYP: &str = "JWT";
/// Longest lifetime of a token (`exp - iat`), in seconds.
pub const MAX_TTL_SECS: i64 = 300;
/// Lifetime of a token when the request names none, in seconds.
pub const DEFAULT_TTL_SECS: i64 = 60;
/// Default clock leeway of a verifier, in seconds.
pub const DEFAULT_LEEWAY_SECS: i64 = 5;

/// `sha256:` + lowercase hex SHA-256 of the RFC 8785 canonical JSON of
/// `args`: the `args_sha256` claim of a token for a call with these
/// arguments (the platform's one digest format). `None` only when the
/// arguments have no canonical form (never for a `Value` today).
pub fn args_sha256(args: &serde_json::Value) -> Option<String> {
    let canonical = anumate_crypto::canonical_json(args).ok()?;
    Some(anumate_crypto::digest(canonical.as_bytes()))
}

/// Seconds since the Unix epoch (a JWT NumericDate).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
