//! Shared state the service checks during verification: replay and revocation.

use std::future::Future;

/// Why a single-use token could not be consumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The `jti` was consumed before.
    #[error("token {jti} was already used")]
    Replayed {
        /// The token id.
        jti: String,
    },
    /// The replay store could not be reached; the call must not proceed.
    #[error("replay store unavailable: {0}")]
    Unavailable(String),
}

/// The revocation list could not be read; the call must not proceed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revocation list unavailable: {0}")]
pub struct RevocationError(pub String);

/// Records consumed single-use `jti`s, shared by every replica (the service
/// backs it with a unique insert in the database).
pub trait ReplayGuard: Send + Sync {
    /// Atomically records `jti` as consumed, or fails with
    /// [`ReplayError::Replayed`] if it was consumed before. `exp` (seconds
    /// since the epoch) bounds how long the record matters: keep it until
    /// `exp` plus the verifier's leeway has passed, after which the token is
    /// rejected as expired before it gets here.
    fn check_and_consume(
        &self,
        jti: &str,
        exp: i64,
    ) -> impl Future<Output = Result<(), ReplayError>> + Send;

    /// Whether `jti` was consumed, without consuming it (a dry check).
    fn is_consumed(&self, jti: &str) -> impl Future<Output = Result<bool, ReplayError>> + Send;
}

/// Revoked tokens, by `jti` or by run.
pub trait RevocationList: Send + Sync {
    /// Whether the token `jti`, or every token of run `run`, was revoked.
    fn is_revoked(
        &self,
        jti: &str,
        run: &str,
    ) -> impl Future<Output = Result<bool, RevocationError>> + Send;
}
