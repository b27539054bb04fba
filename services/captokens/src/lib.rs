//! The capability token service (SPEC §8): issues, verifies, refreshes and
//! revokes the single-call tokens of `anumate-captokens`, with the replay
//! store and the revocation list in the database (shared by every replica),
//! and an audit log plus outbox events for every issue, verify failure and
//! revocation.
//!
//! [`CapTokens`] holds the domain logic and knows nothing of gRPC; [`grpc`]
//! adapts it to the generated `CapTokensService` trait (authentication happens
//! in the `anumate_auth::AuthLayer` around it — with [`PUBLIC_PATHS`] allowed
//! through unauthenticated — and handlers only check roles).
#![forbid(unsafe_code)]

mod convert;
pub mod grpc;
mod module;
pub mod receipting;
mod repo;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anumate_captokens::{
    ArgsBinding, Claims, Expectation, IssueError, IssueRequest, Issuer, Reason, Rejection,
    ReplayError, ReplayGuard as _, Verifier, VerifyError,
};
use anumate_crypto::KeyRing;
use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::captokens::v1 as pb;
use anumate_proto::events::v1 as ev;
use anumate_service::CancellationToken;
use anumate_service::clients::ReceiptsClient;
use anumate_store::{Migration, Store, TenantTx};
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
    anumate_events::MIGRATIONS
        .iter()
        .chain(repo::MIGRATIONS)
        .copied()
        .collect()
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
}

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn unix_now() -> i64 {
    anumate_store::now_micros().div_euclid(1_000_000)
}

fn issue_error(e: IssueError) -> Error {
    match e {
        IssueError::InvalidTtl { .. } => Error::invalid_argument("ttl", e.to_string()),
        IssueError::InvalidArgument { field, reason } => Error::invalid_argument(field, reason),
        IssueError::Signing(why) => Error::internal(why),
    }
}

fn ttl(ttl: Option<&pbjson_types::Duration>) -> Result<Option<Duration>> {
    let Some(d) = ttl else { return Ok(None) };
    let (Ok(secs), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(Error::invalid_argument("ttl", "must not be negative"));
    };
    if nanos >= 1_000_000_000 {
        return Err(Error::invalid_argument("ttl", "nanos out of range"));
    }
    Ok(Some(Duration::new(secs, nanos)))
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

    /// Mints a token for one call in the actor's tenant; audited and evented.
    pub async fn issue(
        &self,
        actor: &Actor,
        req: &pb::IssueTokenRequest,
    ) -> Result<pb::IssueTokenResponse> {
        let capability = convert::capability(req.capability.as_ref())?;
        let ttl = ttl(req.ttl.as_ref())?;
        let issued = self
            .inner
            .issuer
            .issue(
                self.inner.keys.as_ref(),
                IssueRequest {
                    // Empty: the caller started the run.
                    subject: opt(&req.subject).unwrap_or(&actor.subject),
                    audience: &req.audience,
                    tenant: &actor.tenant,
                    run: &req.run_id,
                    step: &req.step_id,
                    plan_hash: &req.plan_hash,
                    args: ArgsBinding::Sha256(&req.args_sha256),
                    capability: &capability,
                    ttl,
                    single_use: req.single_use,
                    now: None,
                },
            )
            .map_err(issue_error)?;
        let tx = self.inner.store.write(&actor.tenant).await?;
        record_issue(&tx, actor, &issued.claims, "", issued.claims.iat).await?;
        tx.commit().await?;
        Ok(pb::IssueTokenResponse {
            claims: Some(convert::claims(&issued.claims, &issued.kid)),
            token: issued.token,
        })
    }

    /// Verifies a token for a call in the actor's tenant. A rejection is a
    /// normal response (audited and evented); errors are for bad requests and
    /// outages.
    pub async fn verify(
        &self,
        actor: &Actor,
        req: &pb::VerifyTokenRequest,
    ) -> Result<pb::VerifyTokenResponse> {
        if req.token.is_empty() {
            return Err(Error::invalid_argument("token", "required"));
        }
        if req.audience.is_empty() {
            return Err(Error::invalid_argument("audience", "required"));
        }
        if req.tool.is_empty() {
            return Err(Error::invalid_argument("tool", "required"));
        }
        // A token is for one call: the verifier names that call completely.
        if req.action.is_empty() {
            return Err(Error::invalid_argument(
                "action",
                "required: the action about to be performed",
            ));
        }
        if req.args.is_none() && req.args_sha256.is_empty() {
            return Err(Error::invalid_argument(
                "args",
                "required: the call's arguments (args) or their hash (args_sha256)",
            ));
        }
        let args = req.args.as_ref().map(convert::args).transpose()?;
        let mut expected = Expectation::new(&req.audience, &actor.tenant, &req.tool);
        expected.action = opt(&req.action);
        expected.args = args.as_ref();
        expected.args_sha256 = opt(&req.args_sha256);
        expected.plan_hash = opt(&req.plan_hash);
        expected.run = opt(&req.run_id);
        expected.step = opt(&req.step_id);

        let tx = self.inner.store.write(&actor.tenant).await?;
        let outcome = self
            .inner
            .verifier
            .verify_with(
                &req.token,
                &expected,
                &repo::TxRevocations(&tx),
                &repo::TxReplay(&tx),
                req.consume,
            )
            .await;
        match outcome {
            Ok(verified) => {
                tx.commit().await?;
                Ok(pb::VerifyTokenResponse {
                    verdict: pb::Verdict::Valid as i32,
                    message: String::new(),
                    claims: Some(convert::claims(&verified.claims, &verified.kid)),
                    consumed: verified.consumed,
                })
            }
            Err(VerifyError::Rejected(rejection)) => {
                record_verify_failure(&tx, actor, &req.audience, &req.tool, &rejection).await?;
                tx.commit().await?;
                Ok(pb::VerifyTokenResponse {
                    verdict: rejection.reason().verdict_number(),
                    message: rejection.failure.to_string(),
                    claims: rejection
                        .claims
                        .as_deref()
                        .map(|c| convert::claims(c, &token_kid(&req.token))),
                    consumed: false,
                })
            }
            Err(VerifyError::Unavailable(why)) => {
                tracing::warn!(error = %why, "captokens: replay store or revocation list unavailable");
                Err(Error::new(
                    ErrorCode::Unavailable,
                    "token state unavailable",
                ))
            }
        }
    }

    /// Exchanges a valid token for a new one with the same binding; the old
    /// one is revoked in the same transaction.
    pub async fn refresh(
        &self,
        actor: &Actor,
        req: &pb::RefreshTokenRequest,
    ) -> Result<pb::RefreshTokenResponse> {
        if req.token.is_empty() {
            return Err(Error::invalid_argument("token", "required"));
        }
        let ttl = ttl(req.ttl.as_ref())?;
        if let Some(t) = ttl
            && (t.is_zero()
                || t > Duration::from_secs(anumate_captokens::MAX_TTL_SECS.unsigned_abs()))
        {
            return Err(Error::invalid_argument(
                "ttl",
                format!("must be 1..={} s", anumate_captokens::MAX_TTL_SECS),
            ));
        }
        // The audience and tool are the token's own: refresh checks
        // everything but the call.
        let Some(unverified) = convert::peek_claims(&req.token) else {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                "token does not verify: malformed",
            ));
        };
        // The arguments are the token's own (the signature check covers them).
        let expected = Expectation::new(&unverified.aud, &actor.tenant, &unverified.cap.tool)
            .args_sha256(&unverified.args_sha256);
        let tx = self.inner.store.write(&actor.tenant).await?;
        let outcome = self
            .inner
            .verifier
            .verify_with(
                &req.token,
                &expected,
                &repo::TxRevocations(&tx),
                &repo::TxReplay(&tx),
                false,
            )
            .await;
        let old = match outcome {
            Ok(v) => v.claims,
            Err(VerifyError::Rejected(rejection)) => {
                record_verify_failure(
                    &tx,
                    actor,
                    &unverified.aud,
                    &unverified.cap.tool,
                    &rejection,
                )
                .await?;
                tx.commit().await?;
                let code = match rejection.reason() {
                    Reason::Expired | Reason::Revoked | Reason::Replayed => {
                        ErrorCode::FailedPrecondition
                    }
                    Reason::WrongTenant => ErrorCode::NotFound,
                    _ => ErrorCode::Unauthenticated,
                };
                return Err(Error::new(
                    code,
                    format!("token cannot be refreshed: {}", rejection.failure),
                )
                .with_metadata("verdict", rejection.reason().verdict_name()));
            }
            Err(VerifyError::Unavailable(why)) => {
                tracing::warn!(error = %why, "captokens: token state unavailable");
                return Err(Error::new(
                    ErrorCode::Unavailable,
                    "token state unavailable",
                ));
            }
        };
        // The chain's authority ends `max_refresh_lifetime_secs` after its
        // first token was issued, however often it is refreshed.
        let root_iat = repo::find_token(&tx, &old.jti)
            .await?
            .map_or(old.iat, |t| t.root_iat);
        let new_ttl = ttl.map_or(anumate_captokens::DEFAULT_TTL_SECS, |t| {
            i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
        });
        let deadline = root_iat.saturating_add(self.inner.max_refresh_lifetime);
        if unix_now().saturating_add(new_ttl) > deadline {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "token cannot be refreshed: its chain began at {root_iat} and may not outlive {deadline} \
                     ([captokens] max_refresh_lifetime_secs = {}); mint a new token for the call",
                    self.inner.max_refresh_lifetime
                ),
            )
            .with_metadata("verdict", "REFRESH_LIMIT"));
        }
        // A single-use token is spent by its refresh: claiming its replay slot
        // in this transaction makes refresh and consume exclusive (the unique
        // insert waits for a concurrent consume and then loses, or wins and
        // the consume sees REPLAYED), so no consumed token yields a live one.
        if old.single_use {
            match repo::TxReplay(&tx)
                .check_and_consume(&old.jti, old.exp)
                .await
            {
                Ok(()) => {}
                Err(ReplayError::Replayed { .. }) => {
                    return Err(Error::new(
                        ErrorCode::FailedPrecondition,
                        "token cannot be refreshed: it was consumed",
                    )
                    .with_metadata("verdict", Reason::Replayed.verdict_name()));
                }
                Err(ReplayError::Unavailable(why)) => {
                    tracing::warn!(error = %why, "captokens: replay store unavailable");
                    return Err(Error::new(
                        ErrorCode::Unavailable,
                        "token state unavailable",
                    ));
                }
            }
        }
        let revocation = repo::NewRevocation {
            jti: Some(&old.jti),
            run: None,
            reason: "refreshed",
            actor: &actor.subject,
        };
        if !repo::insert_revocation(&tx, &revocation).await? {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "token was revoked or refreshed concurrently",
            ));
        }
        let issued = self
            .inner
            .issuer
            .issue(
                self.inner.keys.as_ref(),
                IssueRequest {
                    subject: &old.sub,
                    audience: &old.aud,
                    tenant: &old.tenant,
                    run: &old.run,
                    step: &old.step,
                    plan_hash: &old.plan_hash,
                    args: ArgsBinding::Sha256(&old.args_sha256),
                    capability: &old.cap,
                    ttl,
                    single_use: old.single_use,
                    now: None,
                },
            )
            .map_err(issue_error)?;
        record_revocation(
            &tx,
            actor,
            std::slice::from_ref(&old.jti),
            &old.run,
            &old,
            "refreshed",
        )
        .await?;
        record_issue(&tx, actor, &issued.claims, &old.jti, root_iat).await?;
        tx.commit().await?;
        Ok(pb::RefreshTokenResponse {
            claims: Some(convert::claims(&issued.claims, &issued.kid)),
            token: issued.token,
            revoked_jti: old.jti,
        })
    }

    /// The `jti`s a revocation of `target` would revoke now, and their run,
    /// read without writing. `NOT_FOUND` as for [`CapTokens::revoke`].
    async fn plan_revocation(
        &self,
        tx: &TenantTx,
        target: RevokeTarget<'_>,
        now: i64,
    ) -> Result<(Vec<String>, String)> {
        let live = |exp: i64| exp.saturating_add(self.inner.leeway) > now;
        match target {
            RevokeTarget::Jti(jti) => {
                let token = repo::find_token(tx, jti)
                    .await?
                    .ok_or_else(|| Error::not_found(format!("no token {jti}")))?;
                let fresh = live(token.exp)
                    && !repo::revocation_exists(tx, Some(jti), None).await?
                    && !repo::revocation_exists(tx, None, Some(&token.run)).await?;
                Ok((if fresh { vec![token.jti] } else { Vec::new() }, token.run))
            }
            RevokeTarget::Run(run) => {
                let tokens = repo::run_tokens(tx, run).await?;
                if tokens.is_empty() {
                    return Err(Error::not_found(format!("no token of run {run}")));
                }
                if repo::revocation_exists(tx, None, Some(run)).await? {
                    return Ok((Vec::new(), run.to_owned()));
                }
                let revoked = repo::revoked_jtis(tx, run).await?;
                let jtis = tokens
                    .into_iter()
                    .filter(|t| live(t.exp) && !revoked.contains(&t.jti))
                    .map(|t| t.jti)
                    .collect();
                Ok((jtis, run.to_owned()))
            }
        }
    }

    /// Revokes one token or a run's tokens; returns the `jti`s newly revoked
    /// and the id of the revocation's receipt (empty when nothing was revoked
    /// or no receipts service is configured).
    /// `NOT_FOUND` when the tenant issued no such token (or no token of the run);
    /// `UNAVAILABLE`, with nothing revoked, when the receipt cannot be appended.
    pub async fn revoke(
        &self,
        actor: &Actor,
        target: RevokeTarget<'_>,
        reason: &str,
    ) -> Result<(Vec<String>, String)> {
        let now = unix_now();
        // The receipt first (outside the revocation's transaction): no
        // revocation is committed without one. See `receipting`.
        let mut receipt_id = String::new();
        if let Some(receipts) = &self.receipts {
            let (planned, run) = {
                let tx = self.inner.store.read(&actor.tenant).await?;
                self.plan_revocation(&tx, target, now).await?
            };
            if !planned.is_empty() {
                let revocation = RevocationReceipt {
                    tenant: &actor.tenant,
                    actor: &actor.subject,
                    target: match target {
                        RevokeTarget::Jti(_) => "jti",
                        RevokeTarget::Run(_) => "run",
                    },
                    run: &run,
                    jtis: &planned,
                    reason,
                };
                receipt_id = receipting::append(receipts.as_ref(), &revocation).await?;
            }
        }
        let tx = self.inner.store.write(&actor.tenant).await?;
        let (jtis, run) = match target {
            RevokeTarget::Jti(jti) => {
                let token = repo::find_token(&tx, jti)
                    .await?
                    .ok_or_else(|| Error::not_found(format!("no token {jti}")))?;
                let live = token.exp.saturating_add(self.inner.leeway) > now;
                let rev = repo::NewRevocation {
                    jti: Some(jti),
                    run: None,
                    reason,
                    actor: &actor.subject,
                };
                // A token of a revoked run is revoked already: a no-op.
                if live
                    && !repo::revocation_exists(&tx, None, Some(&token.run)).await?
                    && repo::insert_revocation(&tx, &rev).await?
                {
                    (vec![token.jti], token.run)
                } else {
                    (Vec::new(), token.run)
                }
            }
            RevokeTarget::Run(run) => {
                let tokens = repo::run_tokens(&tx, run).await?;
                if tokens.is_empty() {
                    return Err(Error::not_found(format!("no token of run {run}")));
                }
                let rev = repo::NewRevocation {
                    jti: None,
                    run: Some(run),
                    reason,
                    actor: &actor.subject,
                };
                let mut newly = Vec::new();
                if repo::insert_revocation(&tx, &rev).await? {
                    let revoked = repo::revoked_jtis(&tx, run).await?;
                    newly = tokens
                        .into_iter()
                        .filter(|t| {
                            t.exp.saturating_add(self.inner.leeway) > now
                                && !revoked.contains(&t.jti)
                        })
                        .map(|t| t.jti)
                        .collect();
                }
                (newly, run.to_owned())
            }
        };
        if jtis.is_empty() {
            // Revoked meanwhile by another request (with its own receipt).
            receipt_id.clear();
        } else {
            let audit = repo::NewAudit {
                run: &run,
                ..repo::NewAudit::default()
            };
            record_revocation_entries(&tx, actor, &jtis, &run, &audit, reason, &receipt_id).await?;
        }
        tx.commit().await?;
        Ok((jtis, receipt_id))
    }

    /// The public keys that verify tokens, as JWKS JSON, and the cache age.
    pub fn jwks(&self) -> Result<(String, Duration)> {
        let json = serde_json::to_string(&self.inner.keys.jwks()).map_err(Error::internal)?;
        Ok((json, self.inner.jwks_max_age))
    }

    /// Audit entries of the actor's tenant, newest first, and the next page token.
    pub async fn list_audit(
        &self,
        actor: &Actor,
        query: &AuditQuery,
        page: Option<&anumate_proto::common::v1::PageRequest>,
    ) -> Result<(Vec<pb::TokenAuditEntry>, String)> {
        let (size, token) = match page {
            Some(p) if p.page_size < 0 => {
                return Err(Error::invalid_argument(
                    "page.page_size",
                    "must not be negative",
                ));
            }
            Some(p) => (i64::from(p.page_size), p.page_token.as_str()),
            None => (0, ""),
        };
        let size = if size == 0 {
            DEFAULT_PAGE
        } else {
            size.min(MAX_PAGE)
        };
        let before = if token.is_empty() {
            None
        } else if uuid::Uuid::parse_str(token).is_ok() {
            Some(token)
        } else {
            return Err(Error::invalid_argument(
                "page.page_token",
                "not a token from this listing",
            ));
        };
        let tx = self.inner.store.read(&actor.tenant).await?;
        let rows = repo::list_audit(
            &tx,
            &repo::AuditFilter {
                kind: query.kind as i32,
                jti: &query.jti,
                run: &query.run_id,
                start: query.start_micros,
                end: query.end_micros,
                before_id: before,
                limit: size + 1,
            },
        )
        .await?;
        let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > size;
        let mut entries: Vec<pb::TokenAuditEntry> = rows
            .into_iter()
            .take(usize::try_from(size).unwrap_or(0))
            .map(convert::audit_entry)
            .collect();
        let next = if more {
            entries
                .last()
                .map(|e| e.audit_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        entries.shrink_to_fit();
        Ok((entries, next))
    }

    /// Deletes replay records that no verification can need any more (`exp`
    /// plus leeway has passed: such tokens are rejected as expired first).
    /// Returns how many.
    pub async fn purge_replay(&self) -> Result<u64> {
        let cutoff = unix_now().saturating_sub(self.inner.leeway);
        let tenants = {
            let tx = self.inner.store.read("-").await?;
            repo::replay_tenants(&tx).await?
        };
        let mut purged = 0;
        for tenant in tenants {
            let tx = self.inner.store.write(&tenant).await?;
            purged += repo::purge_replay(&tx, cutoff).await?;
            tx.commit().await?;
        }
        Ok(purged)
    }

    /// Runs [`CapTokens::run_background`] until the process ends.
    pub fn spawn_background(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().run_background(CancellationToken::new()))
    }

    /// Runs [`CapTokens::purge_replay`] every `replay_purge_interval_secs`
    /// until `cancel` is cancelled (between purges). Failures are logged and
    /// retried next tick.
    pub async fn run_background(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.purge_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.purge_replay().await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(purged = n, "captokens: purged expired replay records")
                }
                Err(e) => tracing::warn!(error = %e, "captokens: replay purge failed"),
            }
        }
    }
}

/// The `kid` of a token's header, when it has one (for claims of rejected tokens).
fn token_kid(token: &str) -> String {
    convert::peek_kid(token).unwrap_or_default()
}

async fn record_issue(
    tx: &TenantTx,
    actor: &Actor,
    c: &Claims,
    refreshed_from: &str,
    root_iat: i64,
) -> Result<()> {
    repo::insert_token(
        tx,
        &repo::NewToken {
            claims: c,
            refreshed_from_jti: refreshed_from,
            issued_by: &actor.subject,
            root_iat,
        },
    )
    .await?;
    let kind = if refreshed_from.is_empty() {
        pb::AuditKind::Issued
    } else {
        pb::AuditKind::Refreshed
    };
    repo::insert_audit(
        tx,
        &repo::NewAudit {
            kind: kind as i32,
            jti: &c.jti,
            run: &c.run,
            step: &c.step,
            plan_hash: &c.plan_hash,
            audience: &c.aud,
            tool: &c.cap.tool,
            actor: &actor.subject,
            refreshed_from_jti: refreshed_from,
            reason: if actor.admin { ADMIN_ISSUE_REASON } else { "" },
            ..repo::NewAudit::default()
        },
    )
    .await?;
    let event = ev::TokenIssued {
        tenant_id: actor.tenant.clone(),
        jti: c.jti.clone(),
        run_id: c.run.clone(),
        step_id: c.step.clone(),
        plan_hash: c.plan_hash.clone(),
        audience: c.aud.clone(),
        tool: c.cap.tool.clone(),
        expire_time: Some(convert::timestamp(c.exp)),
        single_use: c.single_use,
        refreshed_from_jti: refreshed_from.to_owned(),
        actor: actor.subject.clone(),
    };
    let subject = format!("runs/{}/tokens/{}", c.run, c.jti);
    anumate_events::append(
        tx,
        &event,
        &c.run,
        anumate_events::EventContext {
            subject: &subject,
            plan_hash: Some(&c.plan_hash),
            traceparent: None,
        },
    )
    .await?;
    Ok(())
}

/// Audits and events a failed verification in the verifier's tenant. The
/// token's claims are recorded as claimed: for a failure at or before the
/// signature check they are unauthenticated (the verdict says so).
async fn record_verify_failure(
    tx: &TenantTx,
    actor: &Actor,
    audience: &str,
    tool: &str,
    rejection: &Rejection,
) -> Result<()> {
    let reason = rejection.reason();
    let message = rejection.failure.to_string();
    let c = rejection.claims.as_deref();
    let field = |f: fn(&Claims) -> &str| c.map(f).unwrap_or_default();
    let (jti, run, step, plan) = (
        field(|c| &c.jti),
        field(|c| &c.run),
        field(|c| &c.step),
        field(|c| &c.plan_hash),
    );
    repo::insert_audit(
        tx,
        &repo::NewAudit {
            kind: pb::AuditKind::VerifyFailed as i32,
            jti,
            run,
            step,
            plan_hash: plan,
            audience,
            tool,
            actor: &actor.subject,
            verdict: reason.verdict_number(),
            reason: &message,
            ..repo::NewAudit::default()
        },
    )
    .await?;
    let event = ev::TokenVerifyFailed {
        tenant_id: actor.tenant.clone(),
        jti: jti.to_owned(),
        run_id: run.to_owned(),
        step_id: step.to_owned(),
        plan_hash: plan.to_owned(),
        audience: audience.to_owned(),
        tool: tool.to_owned(),
        verdict: reason.verdict_number(),
        message,
        actor: actor.subject.clone(),
    };
    let key = if run.is_empty() { jti } else { run };
    anumate_events::append(
        tx,
        &event,
        key,
        anumate_events::EventContext {
            subject: "tokens",
            plan_hash: None,
            traceparent: None,
        },
    )
    .await?;
    Ok(())
}

async fn record_revocation(
    tx: &TenantTx,
    actor: &Actor,
    jtis: &[String],
    run: &str,
    c: &Claims,
    reason: &str,
) -> Result<()> {
    let audit = repo::NewAudit {
        run: &c.run,
        step: &c.step,
        plan_hash: &c.plan_hash,
        audience: &c.aud,
        tool: &c.cap.tool,
        ..repo::NewAudit::default()
    };
    record_revocation_entries(tx, actor, jtis, run, &audit, reason, "").await
}

async fn record_revocation_entries(
    tx: &TenantTx,
    actor: &Actor,
    jtis: &[String],
    run: &str,
    template: &repo::NewAudit<'_>,
    reason: &str,
    receipt_id: &str,
) -> Result<()> {
    for jti in jtis {
        repo::insert_audit(
            tx,
            &repo::NewAudit {
                kind: pb::AuditKind::Revoked as i32,
                jti,
                actor: &actor.subject,
                reason,
                ..*template
            },
        )
        .await?;
    }
    let event = ev::TokenRevoked {
        tenant_id: actor.tenant.clone(),
        jtis: jtis.to_vec(),
        run_id: run.to_owned(),
        reason: reason.to_owned(),
        receipt_id: receipt_id.to_owned(),
        actor: actor.subject.clone(),
    };
    let key = if run.is_empty() {
        jtis.first().map_or("", String::as_str)
    } else {
        run
    };
    anumate_events::append(
        tx,
        &event,
        key,
        anumate_events::EventContext {
            subject: "tokens",
            plan_hash: None,
            traceparent: None,
        },
    )
    .await?;
    Ok(())
}
