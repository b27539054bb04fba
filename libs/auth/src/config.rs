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
    /// How long after its last successful fetch an issuer's JWKS may still be
    /// used while fetching it fails, in seconds. Past that its tokens are
    /// refused (`UNAVAILABLE`) until a fetch succeeds: a key the issuer has
    /// revoked must not be trusted forever because its JWKS is unreachable.
    pub max_key_staleness_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            issuers: Vec::new(),
            leeway_secs: 30,
            jwks_cache_secs: 300,
            jwks_min_refetch_secs: 10,
            verified_token_cache: 10_000,
            max_key_staleness_secs: 3600,
        }
    }
}

/// One trusted issuer: its `iss`, the audience it must name, the tenants it
/// may speak for, and where its keys are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` claim.
    pub issuer: String,
    /// Required: tokens must carry this `aud` (a token minted for another
    /// service of the same identity provider is refused).
    #[serde(default)]
    pub audience: Option<String>,
    /// Required: the tenants whose tokens this issuer may mint. A token whose
    /// `tenant` claim is not listed is refused. `["*"]` trusts the issuer for
    /// every tenant (one identity provider for the whole platform).
    #[serde(default)]
    pub tenants: Vec<String>,
    /// JWKS URL: `https://`, or `http://` on a loopback address only.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// JWKS file on disk (used when no URL is set).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
}
