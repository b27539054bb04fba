//! Minting tokens.

use std::time::Duration;

use anumate_crypto::{KeyPair, KeyRing};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::pkcs8::DecodePrivateKey as _;

use crate::claims::{Capability, Claims, ClaimsRef, HeaderOut, is_json_pointer};
use crate::{ALG, DEFAULT_TTL_SECS, MAX_TTL_SECS, TYP};

/// Why a token was not issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// The requested lifetime is zero or above 300 s.
    #[error("ttl of {requested_secs} s is outside 1..={max_secs} s")]
    InvalidTtl {
        /// Requested lifetime, whole seconds.
        requested_secs: u64,
        /// The cap.
        max_secs: i64,
    },
    /// A required field is empty or badly formed.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The key could not sign.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Signs the JWS signing input with an ES256 key.
pub trait TokenSigner {
    /// The key id written into the header.
    fn kid(&self) -> &str;
    /// The 64-byte `r || s` ES256 signature of `msg`.
    fn sign_es256(&self, msg: &[u8]) -> Result<[u8; 64], IssueError>;
}

impl TokenSigner for KeyPair {
    fn kid(&self) -> &str {
        KeyPair::kid(self)
    }

    fn sign_es256(&self, msg: &[u8]) -> Result<[u8; 64], IssueError> {
        self.sign(msg)
            .as_slice()
            .try_into()
            .map_err(|_| IssueError::Signing("signature is not 64 bytes".into()))
    }
}

/// A key ring signs with its active key.
impl TokenSigner for KeyRing {
    fn kid(&self) -> &str {
        self.active().kid()
    }

    fn sign_es256(&self, msg: &[u8]) -> Result<[u8; 64], IssueError> {
        self.active().sign_es256(msg)
    }
}

/// Signs with the pure-Rust `p256` crate (deterministic RFC 6979 nonces)
/// instead of `ring`; several times slower, kept for comparison and for
/// platforms without `ring`.
#[derive(Clone)]
pub struct P256Signer {
    key: p256::ecdsa::SigningKey,
    kid: String,
}

impl std::fmt::Debug for P256Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("P256Signer")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl P256Signer {
    /// The same key as `pair`, signing through `p256`.
    pub fn from_key_pair(pair: &KeyPair) -> Result<Self, IssueError> {
        let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&pair.to_pkcs8_pem())
            .map_err(|e| IssueError::Signing(format!("decoding key: {e}")))?;
        Ok(P256Signer {
            key,
            kid: pair.kid().to_owned(),
        })
    }
}

impl TokenSigner for P256Signer {
    fn kid(&self) -> &str {
        &self.kid
    }

    fn sign_es256(&self, msg: &[u8]) -> Result<[u8; 64], IssueError> {
        use p256::ecdsa::signature::Signer as _;
        let sig: p256::ecdsa::Signature = self
            .key
            .try_sign(msg)
            .map_err(|e| IssueError::Signing(e.to_string()))?;
        Ok(sig.to_bytes().into())
    }
}

/// The arguments a token is bound to.
#[derive(Debug, Clone, Copy)]
pub enum ArgsBinding<'a> {
    /// The arguments themselves; hashed as RFC 8785 JSON.
    Args(&'a serde_json::Value),
    /// A precomputed SHA-256 of their RFC 8785 JSON: `sha256:<hex>`, or
    /// `sha256-<hex>` or bare lowercase hex (the claim is always
    /// `sha256:<hex>`).
    Sha256(&'a str),
}

/// One call to mint a token for.
#[derive(Debug, Clone, Copy)]
pub struct IssueRequest<'a> {
    /// `sub`: principal that started the run.
    pub subject: &'a str,
    /// `aud`: the connector or tool the call is for.
    pub audience: &'a str,
    /// `tenant`.
    pub tenant: &'a str,
    /// `run`.
    pub run: &'a str,
    /// `step`.
    pub step: &'a str,
    /// `plan_hash` (`sha256:…`).
    pub plan_hash: &'a str,
    /// The call's arguments.
    pub args: ArgsBinding<'a>,
    /// What the token allows.
    pub capability: &'a Capability,
    /// Lifetime; `None` is 60 s; at most 300 s.
    pub ttl: Option<Duration>,
    /// Whether the `jti` can be consumed only once.
    pub single_use: bool,
    /// Issue time, seconds since the epoch; `None` is the system clock.
    pub now: Option<i64>,
}

/// A freshly minted token.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedToken {
    /// The compact JWS.
    pub token: String,
    /// Its `jti`.
    pub jti: String,
    /// Its `exp`, seconds since the epoch.
    pub exp: i64,
    /// The key id that signed it.
    pub kid: String,
    /// Its claims.
    pub claims: Claims,
}

/// Mints tokens under one issuer name (`iss`).
#[derive(Debug, Clone)]
pub struct Issuer {
    iss: String,
}

impl Issuer {
    /// An issuer writing `iss` into every token (the service's URL).
    pub fn new(iss: impl Into<String>) -> Self {
        Issuer { iss: iss.into() }
    }

    /// The `iss` claim of this issuer's tokens.
    pub fn iss(&self) -> &str {
        &self.iss
    }

    /// Mints a token for `request`, signed by `signer`.
    pub fn issue<S: TokenSigner + ?Sized>(
        &self,
        signer: &S,
        request: IssueRequest<'_>,
    ) -> Result<IssuedToken, IssueError> {
        let ttl = match request.ttl {
            None => DEFAULT_TTL_SECS,
            Some(ttl) => {
                let secs = ttl.as_secs();
                // Sub-second parts round up: a token never outlives its request.
                let secs = secs.saturating_add(u64::from(ttl.subsec_nanos() > 0));
                match i64::try_from(secs) {
                    Ok(s) if (1..=MAX_TTL_SECS).contains(&s) => s,
                    _ => {
                        return Err(IssueError::InvalidTtl {
                            requested_secs: secs,
                            max_secs: MAX_TTL_SECS,
                        });
                    }
                }
            }
        };
        validate(&request)?;
        let args_sha256 = match request.args {
            ArgsBinding::Args(args) => {
                crate::args_sha256(args).ok_or_else(|| IssueError::InvalidArgument {
                    field: "args",
                    reason: "no canonical JSON form".into(),
                })?
            }
            ArgsBinding::Sha256(text) => anumate_crypto::parse_digest("args_sha256", text)
                .map_err(|_| IssueError::InvalidArgument {
                    field: "args_sha256",
                    reason: "not a SHA-256 digest (`sha256:` and 64 lowercase hex digits)".into(),
                })?,
        };
        let now = request.now.unwrap_or_else(crate::unix_now);
        let exp = now.saturating_add(ttl);
        let jti = uuid::Uuid::now_v7().to_string();
        let kid = signer.kid();

        let header = serde_json::to_vec(&HeaderOut {
            alg: ALG,
            typ: TYP,
            kid,
        })
        .map_err(|e| IssueError::Signing(format!("encoding header: {e}")))?;
        let claims = serde_json::to_vec(&ClaimsRef {
            iss: &self.iss,
            sub: request.subject,
            aud: request.audience,
            tenant: request.tenant,
            run: request.run,
            step: request.step,
            plan_hash: request.plan_hash,
            args_sha256: &args_sha256,
            cap: request.capability,
            iat: now,
            nbf: now,
            exp,
            jti: &jti,
            single_use: request.single_use,
        })
        .map_err(|e| IssueError::Signing(format!("encoding claims: {e}")))?;

        let mut token = String::with_capacity((header.len() + claims.len() + 64) * 4 / 3 + 8);
        URL_SAFE_NO_PAD.encode_string(&header, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&claims, &mut token);
        let sig = signer.sign_es256(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(sig, &mut token);

        Ok(IssuedToken {
            token,
            exp,
            kid: kid.to_owned(),
            claims: Claims {
                iss: self.iss.clone(),
                sub: request.subject.to_owned(),
                aud: request.audience.to_owned(),
                tenant: request.tenant.to_owned(),
                run: request.run.to_owned(),
                step: request.step.to_owned(),
                plan_hash: request.plan_hash.to_owned(),
                args_sha256,
                cap: request.capability.clone(),
                iat: now,
                nbf: now,
                exp,
                jti: jti.clone(),
                single_use: request.single_use,
            },
            jti,
        })
    }
}

fn validate(request: &IssueRequest<'_>) -> Result<(), IssueError> {
    let required = [
        ("subject", request.subject),
        ("audience", request.audience),
        ("tenant", request.tenant),
        ("run", request.run),
        ("step", request.step),
        ("plan_hash", request.plan_hash),
        ("capability.tool", request.capability.tool.as_str()),
    ];
    for (field, value) in required {
        if value.is_empty() {
            return Err(IssueError::InvalidArgument {
                field,
                reason: "required".into(),
            });
        }
    }
    let cap = request.capability;
    if cap.actions.is_empty() || cap.actions.iter().any(String::is_empty) {
        return Err(IssueError::InvalidArgument {
            field: "capability.actions",
            reason: "at least one non-empty action is required".into(),
        });
    }
    for (path, constraint) in &cap.constraints {
        let invalid = |reason: String| IssueError::InvalidArgument {
            field: "capability.constraints",
            reason,
        };
        if !is_json_pointer(path) {
            return Err(invalid(format!(
                "{path:?} is not a JSON Pointer (\"/amount\")"
            )));
        }
        if *constraint == crate::Constraint::default() {
            return Err(invalid(format!("{path:?} has no limit")));
        }
        if let (Some(min), Some(max)) = (&constraint.min, &constraint.max)
            && min.as_f64() > max.as_f64()
        {
            return Err(invalid(format!("{path:?}: min {min} is above max {max}")));
        }
        if constraint.one_of.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(format!("{path:?}: one_of is empty")));
        }
        if constraint.prefix.as_ref().is_some_and(String::is_empty) {
            return Err(invalid(format!("{path:?}: prefix is empty")));
        }
    }
    Ok(())
}
