//! The capability token service (SPEC §8): issues, verifies, refreshes and
//! revokes the single-call tokens of `anumate-captokens`, with the replay
//! store and the revocation list in the database (shared by every replica),
//! and an audit log plus outbox events for every issue, verify failure and
//! revocation.
//!
//! [`CapTokens`] holds the domain logic and knows nothing of gRPC; [`grpc`]
//! adapts it to the generated `CapTokensService` and `CapabilityTokensInternal`
//! traits (authentication happens in the `anumate_auth::AuthLayer` around
//! them — with [`PUBLIC_PATHS`] allowed through unauthenticated — and
//! handlers only check roles).
#![forbid(unsafe_code)]

mod audit;
mod consume;
mod convert;
pub mod grpc;
mod module;
mod purge;
pub mod receipting;
mod repo;
mod revoke;
mod tokens;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anumate_captokens::{Issuer, Verifier};
use anumate_crypto::KeyRing;
use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::captokens::v1 as pb;
use anumate_service::clients::ReceiptsClient;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};

pub use grpc::CapTokensGrpc;
pub use module::module;
pub use receipting::{RECEIPTS_SERVICE_NAME, RevocationReceipt};
pub use repo::MIGRATIONS as REPO_MIGRATIONS;

/// gRPC paths that need no credential (`GetJwks`); pass each to
/// `AuthLayer::allow_unauthenticated`.
pub const PUBLIC_PATHS: &[&str] = &["/anumate.captokens.v1.CapTokensService/GetJwks"];

/// Every migration the service needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(repo::MIGRATIONS)
}

/// `[captokens]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapTokensConfig {
    /// The `iss` of every token.
    pub issuer: String,
    /// PKCS#8 PEM files of the signing keys, active first (the others verify
    /// only, until retired). Empty: a key kept under the data directory.
    pub key_files: Vec<PathBuf>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u32,
    /// How often expired replay records are purged, in seconds.
    pub replay_purge_interval_secs: u64,
    /// How long a verifier may cache the JWKS, in seconds.
    pub jwks_max_age_secs: u64,
    /// The receipts service that receipts revocations, when it does not run
    /// in this process (e.g. `http://receipts:7600`). Empty: the in-process
    /// one, if any.
    pub receipts_url: String,
    /// Longest a chain of refreshes may keep a call's authority alive, in
    /// seconds from the first token's `iat`: a refresh whose new `exp` would
    /// pass it is refused (`FAILED_PRECONDITION`).
    pub max_refresh_lifetime_secs: u64,
}

impl Default for CapTokensConfig {
    fn default() -> Self {
        CapTokensConfig {
            issuer: "anumate-captokens".into(),
            key_files: Vec::new(),
            leeway_secs: 5,
            replay_purge_interval_secs: 60,
            jwks_max_age_secs: 300,
            receipts_url: String::new(),
            max_refresh_lifetime_secs: 1800,
        }
    }
}

/// Loads the signing keys: `cfg.key_files`, else `<keys_dir>/captokens.key.pem`
/// (created on first use).
pub fn load_keys(cfg: &CapTokensConfig, keys_dir: &Path) -> Result<KeyRing> {
    if cfg.key_files.is_empty() {
        KeyRing::load_or_create(keys_dir, "captokens")
    } else {
        KeyRing::from_pem_files(&cfg.key_files)
    }
}

/// Who is acting: the tenant and principal from the verified bearer token.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Tenant id.
    pub tenant: String,
    /// Principal subject (`svc:<name>` for a platform service).
    pub subject: String,
    /// A human admin rather than a platform service: an admin's issue is
    /// flagged in the audit log ([`ADMIN_ISSUE_REASON`]).
    pub admin: bool,
}

/// The audit `reason` of a token issued (or refreshed) by an admin instead of
/// the orchestrator: such tokens stand for no approved plan step.
pub const ADMIN_ISSUE_REASON: &str = "admin-issued";

/// What to revoke.
#[derive(Debug, Clone, Copy)]
pub enum RevokeTarget<'a> {
    /// One token.
    Jti(&'a str),
    /// Every unexpired token of a run (and any later one).
    Run(&'a str),
}

/// Filters of [`CapTokens::list_audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this kind (`UNSPECIFIED`: any).
    pub kind: pb::AuditKind,
    /// Only this token.
    pub jti: String,
    /// Only this run.
    pub run_id: String,
    /// At or after, Unix microseconds.
    pub start_micros: Option<i64>,
    /// Before, Unix microseconds.
    pub end_micros: Option<i64>,
}

/// The service.
#[derive(Clone)]
pub struct CapTokens {
    inner: Arc<Inner>,
    receipts: Option<Arc<dyn ReceiptsClient>>,
}

struct Inner {
    store: Store,
    keys: Arc<KeyRing>,
    issuer: Issuer,
    verifier: Verifier,
    leeway: i64,
    purge_interval: Duration,
    jwks_max_age: Duration,
    max_refresh_lifetime: i64,
    /// Tenants whose `captoken_replay_tenants` row is known to exist (rows
    /// there are never deleted), so a consume need not write it again.
    replay_tenants: std::sync::RwLock<std::collections::HashSet<String>>,
}

fn unix_now() -> i64 {
    anumate_store::now_micros().div_euclid(1_000_000)
}

impl CapTokens {
    /// The service over `store`, signing with the ring's active key and
    /// verifying with every key of the ring. Fails only when a key of the ring
    /// is unusable for ES256.
    pub fn new(store: Store, keys: Arc<KeyRing>, cfg: &CapTokensConfig) -> Result<CapTokens> {
        let verifier = Verifier::from_key_ring(&keys)
            .map_err(|e| Error::new(ErrorCode::Internal, format!("captokens keys: {e}")))?
            .with_leeway(cfg.leeway_secs);
        Ok(CapTokens {
            inner: Arc::new(Inner {
                store,
                keys,
                issuer: Issuer::new(cfg.issuer.clone()),
                verifier,
                leeway: i64::from(cfg.leeway_secs),
                purge_interval: Duration::from_secs(cfg.replay_purge_interval_secs.max(1)),
                jwks_max_age: Duration::from_secs(cfg.jwks_max_age_secs),
                max_refresh_lifetime: i64::try_from(cfg.max_refresh_lifetime_secs)
                    .unwrap_or(i64::MAX),
                replay_tenants: Default::default(),
            }),
            receipts: None,
        })
    }

    /// Receipts every revocation through `receipts` (see [`receipting`]).
    #[must_use]
    pub fn with_revocation_receipts(mut self, receipts: Arc<dyn ReceiptsClient>) -> Self {
        self.receipts = Some(receipts);
        self
    }

    fn replay_tenant_unknown(&self, tenant: &str) -> bool {
        !self
            .inner
            .replay_tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(tenant)
    }

    fn replay_tenant_known(&self, tenant: &str) {
        self.inner
            .replay_tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.to_owned());
    }

    /// The public keys that verify tokens, as JWKS JSON, and the cache age.
    pub fn jwks(&self) -> Result<(String, Duration)> {
        let json = serde_json::to_string(&self.inner.keys.jwks()).map_err(Error::internal)?;
        Ok((json, self.inner.jwks_max_age))
    }
}
