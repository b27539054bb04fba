//! Verifying tokens, in the contract's order of checks.

use anumate_crypto::{Jwks, KeyRing};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

use crate::claims::{Claims, Header};
use crate::guard::{ReplayError, ReplayGuard, RevocationList};
use crate::{ALG, DEFAULT_LEEWAY_SECS, TYP};

/// Longest token accepted, in bytes; anything longer is malformed before
/// any decoding work is spent on it.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// The first failed check, one-to-one with the proto's `TokenVerdict`
/// (`anumate.captokens.v1.TokenVerdict`, without `UNSPECIFIED` and `VALID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `TOKEN_VERDICT_MALFORMED`.
    Malformed,
    /// `TOKEN_VERDICT_UNSUPPORTED_ALGORITHM`.
    UnsupportedAlgorithm,
    /// `TOKEN_VERDICT_UNKNOWN_KEY`.
    UnknownKey,
    /// `TOKEN_VERDICT_BAD_SIGNATURE`.
    BadSignature,
    /// `TOKEN_VERDICT_EXPIRED`.
    Expired,
    /// `TOKEN_VERDICT_NOT_YET_VALID`.
    NotYetValid,
    /// `TOKEN_VERDICT_REVOKED`.
    Revoked,
    /// `TOKEN_VERDICT_WRONG_AUDIENCE`.
    WrongAudience,
    /// `TOKEN_VERDICT_WRONG_TENANT`.
    WrongTenant,
    /// `TOKEN_VERDICT_BINDING_MISMATCH`.
    BindingMismatch,
    /// `TOKEN_VERDICT_CAPABILITY_MISMATCH`.
    CapabilityMismatch,
    /// `TOKEN_VERDICT_ARGS_MISMATCH`.
    ArgsMismatch,
    /// `TOKEN_VERDICT_REPLAYED`.
    Replayed,
    /// `TOKEN_VERDICT_CONSTRAINT_VIOLATED`: the arguments break a constraint of the
    /// capability (checked with the capability, so it sits between
    /// [`Reason::CapabilityMismatch`] and [`Reason::ArgsMismatch`] in check
    /// order).
    ConstraintViolated,
}

impl Reason {
    /// Every reason, in check order.
    pub const ALL: [Reason; 14] = [
        Reason::Malformed,
        Reason::UnsupportedAlgorithm,
        Reason::UnknownKey,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::Revoked,
        Reason::WrongAudience,
        Reason::WrongTenant,
        Reason::BindingMismatch,
        Reason::CapabilityMismatch,
        Reason::ConstraintViolated,
        Reason::ArgsMismatch,
        Reason::Replayed,
    ];

    /// The proto `TokenVerdict` number.
    pub fn verdict_number(self) -> i32 {
        match self {
            Reason::Malformed => 2,
            Reason::UnsupportedAlgorithm => 3,
            Reason::UnknownKey => 4,
            Reason::BadSignature => 5,
            Reason::Expired => 6,
            Reason::NotYetValid => 7,
            Reason::Revoked => 8,
            Reason::WrongAudience => 9,
            Reason::WrongTenant => 10,
            Reason::BindingMismatch => 11,
            Reason::CapabilityMismatch => 12,
            Reason::ArgsMismatch => 13,
            Reason::Replayed => 14,
            Reason::ConstraintViolated => 15,
        }
    }

    /// The proto `TokenVerdict` name (`TOKEN_VERDICT_EXPIRED`, …).
    pub fn verdict_name(self) -> &'static str {
        match self {
            Reason::Malformed => "TOKEN_VERDICT_MALFORMED",
            Reason::UnsupportedAlgorithm => "TOKEN_VERDICT_UNSUPPORTED_ALGORITHM",
            Reason::UnknownKey => "TOKEN_VERDICT_UNKNOWN_KEY",
            Reason::BadSignature => "TOKEN_VERDICT_BAD_SIGNATURE",
            Reason::Expired => "TOKEN_VERDICT_EXPIRED",
            Reason::NotYetValid => "TOKEN_VERDICT_NOT_YET_VALID",
            Reason::Revoked => "TOKEN_VERDICT_REVOKED",
            Reason::WrongAudience => "TOKEN_VERDICT_WRONG_AUDIENCE",
            Reason::WrongTenant => "TOKEN_VERDICT_WRONG_TENANT",
            Reason::BindingMismatch => "TOKEN_VERDICT_BINDING_MISMATCH",
            Reason::CapabilityMismatch => "TOKEN_VERDICT_CAPABILITY_MISMATCH",
            Reason::ArgsMismatch => "TOKEN_VERDICT_ARGS_MISMATCH",
            Reason::Replayed => "TOKEN_VERDICT_REPLAYED",
            Reason::ConstraintViolated => "TOKEN_VERDICT_CONSTRAINT_VIOLATED",
        }
    }
}

/// How a capability fails to cover a call: `CAPABILITY_MISMATCH` for the
/// tool and action, `CONSTRAINT_VIOLATED` for the arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityFailure {
    /// `cap.tool` is another tool.
    #[error("token is for tool {allowed:?}, not {requested:?}")]
    Tool {
        /// `cap.tool`.
        allowed: String,
        /// The tool being called.
        requested: String,
    },
    /// The action is not in `cap.actions`.
    #[error("action {requested:?} is not among {allowed:?}")]
    Action {
        /// `cap.actions`.
        allowed: Vec<String>,
        /// The action being performed.
        requested: String,
    },
    /// A constrained argument is absent from the call.
    #[error("argument {path} is constrained but missing")]
    MissingArgument {
        /// JSON Pointer of the argument.
        path: String,
    },
    /// An argument breaks a constraint.
    #[error("argument {path} breaks constraint {constraint}: {detail}")]
    Constraint {
        /// JSON Pointer of the argument.
        path: String,
        /// The constraint: `max`, `min`, `one_of` or `prefix`.
        constraint: &'static str,
        /// What the value was and why it fails.
        detail: String,
    },
}

/// Why a token was rejected, with details for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// Not a compact JWS of the expected shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` is not `ES256`.
    #[error("unsupported algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// No key with this `kid`.
    #[error("unknown key id {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` passed (beyond leeway).
    #[error("expired at {exp}, now {now}")]
    Expired {
        /// `exp`.
        exp: i64,
        /// The verifier's time.
        now: i64,
    },
    /// `nbf` or `iat` is in the future (beyond leeway).
    #[error("not valid before {not_before}, now {now}")]
    NotYetValid {
        /// The later of `nbf` and `iat`.
        not_before: i64,
        /// The verifier's time.
        now: i64,
    },
    /// Revoked by `jti` or with its run.
    #[error("token revoked")]
    Revoked,
    /// `aud` is not the verifier's audience.
    #[error("audience is {actual:?}, expected {expected:?}")]
    WrongAudience {
        /// Expected.
        expected: String,
        /// `aud`.
        actual: String,
    },
    /// `tenant` is not the caller's.
    #[error("tenant is {actual:?}, expected {expected:?}")]
    WrongTenant {
        /// Expected.
        expected: String,
        /// `tenant`.
        actual: String,
    },
    /// `plan_hash`, `run` or `step` differs.
    #[error("{claim} is {actual:?}, expected {expected:?}")]
    BindingMismatch {
        /// `plan_hash`, `run` or `step`.
        claim: &'static str,
        /// Expected.
        expected: String,
        /// The claim.
        actual: String,
    },
    /// The capability does not cover the call.
    #[error("capability mismatch: {0}")]
    CapabilityMismatch(CapabilityFailure),
    /// `args_sha256` is not the hash of the call's arguments.
    #[error("args_sha256 is {actual}, the call's arguments hash to {expected}")]
    ArgsMismatch {
        /// Hash of the call's arguments.
        expected: String,
        /// `args_sha256`.
        actual: String,
    },
    /// The call named neither its arguments nor their hash: every token is
    /// bound to the hash of its arguments, so there is nothing to match.
    #[error(
        "the call names no arguments (args or args_sha256); the token is bound to args_sha256 {actual}"
    )]
    ArgsMissing {
        /// `args_sha256`.
        actual: String,
    },
    /// A single-use token already consumed.
    #[error("token already used")]
    Replayed,
}

impl Failure {
    /// The verdict this failure maps to.
    pub fn reason(&self) -> Reason {
        match self {
            Failure::Malformed(_) => Reason::Malformed,
            Failure::UnsupportedAlgorithm(_) => Reason::UnsupportedAlgorithm,
            Failure::UnknownKey(_) => Reason::UnknownKey,
            Failure::BadSignature => Reason::BadSignature,
            Failure::Expired { .. } => Reason::Expired,
            Failure::NotYetValid { .. } => Reason::NotYetValid,
            Failure::Revoked => Reason::Revoked,
            Failure::WrongAudience { .. } => Reason::WrongAudience,
            Failure::WrongTenant { .. } => Reason::WrongTenant,
            Failure::BindingMismatch { .. } => Reason::BindingMismatch,
            Failure::CapabilityMismatch(
                CapabilityFailure::Constraint { .. } | CapabilityFailure::MissingArgument { .. },
            ) => Reason::ConstraintViolated,
            Failure::CapabilityMismatch(_) => Reason::CapabilityMismatch,
            Failure::ArgsMismatch { .. } | Failure::ArgsMissing { .. } => Reason::ArgsMismatch,
            Failure::Replayed => Reason::Replayed,
        }
    }
}

/// A rejected token: the failure, plus the claims when they could be decoded
/// (for the audit log). Claims of a token rejected at or before the signature
/// check are unauthenticated: `authenticated` is false.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{failure}")]
pub struct Rejection {
    /// What failed.
    pub failure: Failure,
    /// The decoded claims, if decoding got that far.
    pub claims: Option<Box<Claims>>,
    /// Whether the signature over `claims` was verified.
    pub authenticated: bool,
}

impl Rejection {
    /// The verdict.
    pub fn reason(&self) -> Reason {
        self.failure.reason()
    }

    fn bare(failure: Failure) -> Self {
        Rejection {
            failure,
            claims: None,
            authenticated: false,
        }
    }
}

/// Verification could not complete: a verdict, or an outage of shared state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    /// The token was rejected.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The replay store or revocation list failed; the call must not proceed.
    #[error("{0}")]
    Unavailable(String),
}

/// A key could not be loaded into a verifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {kid:?}: {reason}")]
pub struct KeyError {
    /// The key id (may be empty).
    pub kid: String,
    /// What is wrong.
    pub reason: String,
}

/// Which ECDSA implementation checks signatures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Backend {
    /// `ring` (assembly-optimised; the default).
    #[default]
    Ring,
    /// Pure-Rust `p256` (`p256::ecdsa::VerifyingKey`).
    P256,
}

/// What the verifier expects of the call. `audience`, `tenant` and `tool`
/// are always checked, and so are the arguments: without `args` or
/// `args_sha256` the verdict is an arguments mismatch (a token is never valid
/// for a call whose arguments are unknown). The other optional fields are
/// checked only when set.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    /// The verifier's audience; must equal `aud`.
    pub audience: &'a str,
    /// The caller's tenant; must equal `tenant`.
    pub tenant: &'a str,
    /// Tool about to be called; must equal `cap.tool`.
    pub tool: &'a str,
    /// Action about to be performed; must be in `cap.actions`.
    pub action: Option<&'a str>,
    /// The call's arguments: checked against `cap.constraints`, and their
    /// RFC 8785 hash against `args_sha256`. With only `args_sha256` the
    /// constraints are not checked: the hash binds the exact arguments the
    /// token was issued for.
    pub args: Option<&'a serde_json::Value>,
    /// Hash of the arguments, when the caller has it instead of (or as well
    /// as) the arguments; must equal `args_sha256` (`sha256:<hex>`;
    /// `sha256-<hex>` and bare hex compare as that form).
    pub args_sha256: Option<&'a str>,
    /// Expected `plan_hash`.
    pub plan_hash: Option<&'a str>,
    /// Expected `run`.
    pub run: Option<&'a str>,
    /// Expected `step`.
    pub step: Option<&'a str>,
    /// The verifier's time, seconds since the epoch.
    pub now: i64,
}

impl<'a> Expectation<'a> {
    /// Expects `audience`, `tenant` and `tool`, at the system clock's time.
    pub fn new(audience: &'a str, tenant: &'a str, tool: &'a str) -> Self {
        Expectation {
            audience,
            tenant,
            tool,
            action: None,
            args: None,
            args_sha256: None,
            plan_hash: None,
            run: None,
            step: None,
            now: crate::unix_now(),
        }
    }

    /// Also expects `action`.
    #[must_use]
    pub fn action(mut self, action: &'a str) -> Self {
        self.action = Some(action);
        self
    }

    /// Also checks the call's arguments (constraints and hash).
    #[must_use]
    pub fn args(mut self, args: &'a serde_json::Value) -> Self {
        self.args = Some(args);
        self
    }

    /// Also checks the arguments' hash.
    #[must_use]
    pub fn args_sha256(mut self, hex: &'a str) -> Self {
        self.args_sha256 = Some(hex);
        self
    }

    /// Also expects this plan, run and step.
    #[must_use]
    pub fn binding(mut self, plan_hash: &'a str, run: &'a str, step: &'a str) -> Self {
        self.plan_hash = Some(plan_hash);
        self.run = Some(run);
        self.step = Some(step);
        self
    }

    /// Verifies as of `now` (seconds since the epoch) instead of the system clock.
    #[must_use]
    pub fn at(mut self, now: i64) -> Self {
        self.now = now;
        self
    }
}

/// A token that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// Its claims.
    pub claims: Claims,
    /// The key that signed it.
    pub kid: String,
    /// Whether this verification consumed its single-use `jti`.
    pub consumed: bool,
}

struct VerifyKey {
    kid: String,
    ring: UnparsedPublicKey<[u8; 65]>,
    p256: p256::ecdsa::VerifyingKey,
}

/// Verifies tokens against a set of public keys, parsed once.
pub struct Verifier {
    keys: Vec<VerifyKey>,
    backend: Backend,
    leeway: i64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("kids", &self.kids().collect::<Vec<_>>())
            .field("backend", &self.backend)
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl Verifier {
    /// A verifier for every key of `ring` (active and retired).
    pub fn from_key_ring(ring: &KeyRing) -> Result<Self, KeyError> {
        Self::from_jwks(&ring.jwks())
    }

    /// A verifier for every key of a JWKS; each must be an EC P-256 key with
    /// a `kid`, and `alg`, when present, must be `ES256`.
    pub fn from_jwks(jwks: &Jwks) -> Result<Self, KeyError> {
        let mut keys: Vec<VerifyKey> = Vec::with_capacity(jwks.keys.len());
        for jwk in &jwks.keys {
            let kid = jwk.kid.clone().unwrap_or_default();
            let error = |reason: &str| KeyError {
                kid: kid.clone(),
                reason: reason.to_owned(),
            };
            if kid.is_empty() {
                return Err(error("no kid"));
            }
            if jwk.alg.as_deref().is_some_and(|alg| alg != ALG) {
                return Err(error("alg is not ES256"));
            }
            let point = jwk
                .p256_sec1()
                .ok_or_else(|| error("not an EC P-256 public key"))?;
            let p256 = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                .map_err(|_| error("not a point on P-256"))?;
            if keys.iter().any(|k| k.kid == kid) {
                return Err(error("duplicate kid"));
            }
            keys.push(VerifyKey {
                kid,
                ring: UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point),
                p256,
            });
        }
        Ok(Verifier {
            keys,
            backend: Backend::Ring,
            leeway: DEFAULT_LEEWAY_SECS,
        })
    }

    /// Uses `backend` for signatures.
    #[must_use]
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Allows `leeway` seconds of clock skew on `exp`, `nbf` and `iat` (default 5).
    #[must_use]
    pub fn with_leeway(mut self, leeway_secs: u32) -> Self {
        self.leeway = i64::from(leeway_secs);
        self
    }

    /// Stops accepting tokens signed by `kid` (a fully retired key).
    pub fn remove_key(&mut self, kid: &str) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.kid != kid);
        self.keys.len() != before
    }

    /// The key ids this verifier accepts.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    /// Verifies `token` for the call `expected`, without revocation or replay
    /// (for offline verifiers; the service uses [`Verifier::verify_with`]).
    pub fn verify(
        &self,
        token: &str,
        expected: &Expectation<'_>,
    ) -> Result<VerifiedToken, Rejection> {
        let (claims, kid) = self.authenticate(token, expected.now)?;
        check_call(claims, expected).map(|claims| VerifiedToken {
            claims,
            kid: kid.to_owned(),
            consumed: false,
        })
    }

    /// Verifies `token` for the call `expected` with every check of the
    /// contract, in order: format, algorithm, key, signature, time,
    /// revocation, audience, tenant, binding, capability, arguments and, for
    /// a single-use token, replay. With `consume` a valid single-use token's
    /// `jti` is consumed; without it the token is checked (including whether
    /// it was consumed before) but left usable.
    pub async fn verify_with<R, G>(
        &self,
        token: &str,
        expected: &Expectation<'_>,
        revocations: &R,
        replay: &G,
        consume: bool,
    ) -> Result<VerifiedToken, VerifyError>
    where
        R: RevocationList + ?Sized,
        G: ReplayGuard + ?Sized,
    {
        let (claims, kid) = self.authenticate(token, expected.now)?;
        let kid = kid.to_owned();
        match revocations.is_revoked(&claims.jti, &claims.run).await {
            Ok(false) => {}
            Ok(true) => return Err(authenticated(Failure::Revoked, claims).into()),
            Err(e) => return Err(VerifyError::Unavailable(e.to_string())),
        }
        let claims = check_call(claims, expected)?;
        let mut consumed = false;
        if claims.single_use {
            let outcome = if consume {
                replay.check_and_consume(&claims.jti, claims.exp).await
            } else {
                match replay.is_consumed(&claims.jti).await {
                    Ok(true) => Err(ReplayError::Replayed {
                        jti: claims.jti.clone(),
                    }),
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                }
            };
            match outcome {
                Ok(()) => consumed = consume,
                Err(ReplayError::Replayed { .. }) => {
                    return Err(authenticated(Failure::Replayed, claims).into());
                }
                Err(e @ ReplayError::Unavailable(_)) => {
                    return Err(VerifyError::Unavailable(e.to_string()));
                }
            }
        }
        Ok(VerifiedToken {
            claims,
            kid,
            consumed,
        })
    }

    /// Format, algorithm, key, signature and time: everything that needs no
    /// knowledge of the call.
    fn authenticate(&self, token: &str, now: i64) -> Result<(Claims, &str), Rejection> {
        let malformed = |why: &str| Rejection::bare(Failure::Malformed(why.to_owned()));
        if token.len() > MAX_TOKEN_LEN {
            return Err(malformed("token too long"));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated segments"));
        };
        let signing_input = &token[..header_b64.len() + 1 + claims_b64.len()];

        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| malformed("header is not base64url"))?;
        let header: Header<'_> =
            serde_json::from_slice(&header_json).map_err(|e| malformed(&format!("header: {e}")))?;
        let claims_json = URL_SAFE_NO_PAD
            .decode(claims_b64)
            .map_err(|_| malformed("claims are not base64url"))?;
        let claims: Claims =
            serde_json::from_slice(&claims_json).map_err(|e| malformed(&format!("claims: {e}")))?;
        // From here on the claims go with the rejection, unauthenticated.
        let reject = |failure: Failure, claims: Claims| Rejection {
            failure,
            claims: Some(Box::new(claims)),
            authenticated: false,
        };
        let mut sig = [0u8; 64];
        let sig_len = match URL_SAFE_NO_PAD.decode_slice(sig_b64, &mut sig) {
            Ok(len) => len,
            // Longer than 64 bytes decodes into no 64-byte buffer.
            Err(base64::DecodeSliceError::OutputSliceTooSmall) => sig.len() + 1,
            Err(_) => {
                return Err(reject(
                    Failure::Malformed("signature is not base64url".into()),
                    claims,
                ));
            }
        };
        if let Some(why) = header_shape_error(&header) {
            return Err(reject(Failure::Malformed(why), claims));
        }
        if let Some(why) = claims.shape_error() {
            return Err(reject(Failure::Malformed(why), claims));
        }

        if header.alg != ALG {
            let alg = header.alg.into_owned();
            return Err(reject(Failure::UnsupportedAlgorithm(alg), claims));
        }
        if sig_len != sig.len() {
            let why = format!("ES256 signature must be 64 bytes, got {sig_len}");
            return Err(reject(Failure::Malformed(why), claims));
        }
        let kid = header.kid.as_deref().unwrap_or_default();
        let Some(key) = self.keys.iter().find(|k| k.kid == kid) else {
            let kid = kid.to_owned();
            return Err(reject(Failure::UnknownKey(kid), claims));
        };
        let valid = match self.backend {
            Backend::Ring => key.ring.verify(signing_input.as_bytes(), &sig).is_ok(),
            Backend::P256 => verify_p256(&key.p256, signing_input.as_bytes(), &sig),
        };
        if !valid {
            return Err(reject(Failure::BadSignature, claims));
        }

        if now >= claims.exp.saturating_add(self.leeway) {
            let exp = claims.exp;
            return Err(authenticated(Failure::Expired { exp, now }, claims));
        }
        let not_before = claims.nbf.max(claims.iat);
        if not_before > now.saturating_add(self.leeway) {
            return Err(authenticated(
                Failure::NotYetValid { not_before, now },
                claims,
            ));
        }
        Ok((claims, &key.kid))
    }
}

fn header_shape_error(header: &Header<'_>) -> Option<String> {
    if header.typ.as_deref().is_some_and(|typ| typ != TYP) {
        return Some(format!("typ must be {TYP:?}"));
    }
    if header.crit.is_some() {
        return Some("crit header parameters are not supported".into());
    }
    if header.kid.as_deref().is_none_or(str::is_empty) {
        return Some("no kid".into());
    }
    None
}

fn verify_p256(key: &p256::ecdsa::VerifyingKey, msg: &[u8], sig: &[u8; 64]) -> bool {
    use p256::ecdsa::signature::Verifier as _;
    match p256::ecdsa::Signature::from_slice(sig) {
        Ok(sig) => key.verify(msg, &sig).is_ok(),
        Err(_) => false,
    }
}

fn authenticated(failure: Failure, claims: Claims) -> Rejection {
    Rejection {
        failure,
        claims: Some(Box::new(claims)),
        authenticated: true,
    }
}

/// Audience, tenant, binding, capability and arguments.
fn check_call(claims: Claims, expected: &Expectation<'_>) -> Result<Claims, Rejection> {
    match first_call_failure(&claims, expected) {
        None => Ok(claims),
        Some(failure) => Err(authenticated(failure, claims)),
    }
}

fn first_call_failure(claims: &Claims, expected: &Expectation<'_>) -> Option<Failure> {
    if claims.aud != expected.audience {
        return Some(Failure::WrongAudience {
            expected: expected.audience.to_owned(),
            actual: claims.aud.clone(),
        });
    }
    if claims.tenant != expected.tenant {
        return Some(Failure::WrongTenant {
            expected: expected.tenant.to_owned(),
            actual: claims.tenant.clone(),
        });
    }
    let bindings = [
        ("plan_hash", expected.plan_hash, &claims.plan_hash),
        ("run", expected.run, &claims.run),
        ("step", expected.step, &claims.step),
    ];
    for (claim, want, actual) in bindings {
        if let Some(want) = want
            && want != actual
        {
            return Some(Failure::BindingMismatch {
                claim,
                expected: want.to_owned(),
                actual: actual.clone(),
            });
        }
    }
    let cap = &claims.cap;
    if cap.tool != expected.tool {
        return Some(Failure::CapabilityMismatch(CapabilityFailure::Tool {
            allowed: cap.tool.clone(),
            requested: expected.tool.to_owned(),
        }));
    }
    if let Some(action) = expected.action
        && !cap.actions.iter().any(|a| a == action)
    {
        return Some(Failure::CapabilityMismatch(CapabilityFailure::Action {
            allowed: cap.actions.clone(),
            requested: action.to_owned(),
        }));
    }
    if let Some(args) = expected.args
        && let Err(failure) = crate::constraints::check(&cap.constraints, args)
    {
        return Some(Failure::CapabilityMismatch(failure));
    }
    if let Some(text) = expected.args_sha256 {
        // Any accepted spelling of the digest compares by its wire form.
        let expected =
            anumate_crypto::parse_digest("args_sha256", text).unwrap_or_else(|_| text.to_owned());
        if expected != claims.args_sha256 {
            return Some(Failure::ArgsMismatch {
                expected,
                actual: claims.args_sha256.clone(),
            });
        }
    }
    if expected.args.is_none() && expected.args_sha256.is_none() {
        return Some(Failure::ArgsMissing {
            actual: claims.args_sha256.clone(),
        });
    }
    if let Some(args) = expected.args {
        let hash = crate::args_sha256(args).unwrap_or_default();
        if hash != claims.args_sha256 {
            return Some(Failure::ArgsMismatch {
                expected: hash,
                actual: claims.args_sha256.clone(),
            });
        }
    }
    None
}
