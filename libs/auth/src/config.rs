//! Authentication settings (one section of the layered config).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which issuers are trusted and how their keys are cached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Trusted token issuers.
    pub issuers: Vec<IssuerConfig>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// How long a fetched JWKS is used before it is fetched again, in seconds.
    pub jwks_cache_secs: u64,
    /// Least time between two fetches of one issuer's JWKS (unknown `kid`s refetch), in seconds.
    pub jwks_min_refetch_secs: u64,
    /// Tokens remembered after a successful verification (keyed by their
    /// SHA-256), so a client reusing its token is not re-verified on every
    /// call; 0 turns the cache off. An entry is used only until the token's
    /// `exp` (plus leeway) and only while the issuer's key set it was verified
    /// with is the current one — a JWKS refresh or key removal drops it.
    pub verified_token_cache: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuers: Vec::new(),
            leeway_secs: 30,
            jwks_cache_secs: 300,
            jwks_min_refetch_secs: 10,
            verified_token_cache: 10_000,
        }
    }
}

/// One trusted issuer: its `iss`, the audience it must name, and where its keys are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` claim.
    pub issuer: String,
    /// When set, tokens must carry this `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// JWKS URL (http or https).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// JWKS file on disk (used when no URL is set).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
}
