//! The Receipts service (SPEC §9): signed receipts as the leaves of a
//! per-tenant append-only RFC 6962 Merkle log, signed checkpoints (C2SP signed
//! notes), inclusion and consistency proofs, and exports.
//!
//! [`Receipts`] holds the domain logic and knows nothing of gRPC; [`grpc`]
//! adapts it to the generated `ReceiptsService` trait.
//!
//! ## How the log works
//! - **Append** is group-committed per tenant: each caller validates, redacts
//!   and signs its statement (ES256; the statement holds no leaf index), then
//!   queues it, and one write transaction takes the whole queue. It locks the
//!   tenant's head row (`SELECT … FOR UPDATE` on PostgreSQL; SQLite write
//!   transactions are exclusive), takes the next leaf indexes, and stores each
//!   receipt, every tree node the leaf completes (from
//!   [`anumate_receipt::CompactRange`]) and the `receipt.appended` outbox
//!   events. On PostgreSQL that is two statements whose text never changes
//!   (columns travel as arrays through `unnest`), so they stay prepared on
//!   each connection; SQLite takes a statement per table. When this process
//!   committed the log's last batch, PostgreSQL needs no separate lock, head
//!   read or dedupe lookup first: one guarded statement locks the head and
//!   stores the batch only if the log still has the size this process left
//!   and no dedupe key is taken; otherwise (another replica appended, or a
//!   retry) it is rolled back and the batch appended the checked way. The tree is
//!   therefore always integrated up to the last committed receipt; nothing is
//!   pending in memory, so a restart loses nothing.
//! - **In the caller's transaction** ([`Receipts::append_in`], the in-process
//!   `ReceiptsClient::append_in`): a service whose store is the log's appends
//!   its receipts in the transaction of the change they attest, so a receipt
//!   exists iff that change committed. The same guarded (else checked)
//!   statements run in that transaction; the head this process remembers is
//!   updated only once the caller reports the commit ([`InTx::committed`]),
//!   never for a transaction rolled back.
//! - **Checkpoints** are published by [`Receipts::spawn_checkpointer`], one
//!   task per process: every `checkpoint_interval_ms` (500 ms), or sooner once
//!   `checkpoint_batch` leaves are waiting, it signs a note for each tenant
//!   whose log grew. Replicas may race; the head lock makes them publish the
//!   same sizes at most once.
//! - **Proofs** read only the perfect-subtree nodes they need.
#![forbid(unsafe_code)]

mod append;
mod checkpoint;
pub mod export;
pub mod grpc;
mod module;
mod proofs;
mod repo;
mod retention;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anumate_crypto::KeyRing;
use anumate_errors::{Error, Reason, Result};
use anumate_proto::receipts::v1 as pb;
use anumate_redaction::{RedactionConfig, Redactor};
use anumate_store::{Migration, Store, paging};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

use append::Lane;
pub use append::{InTx, Prepared};
pub use grpc::ReceiptsGrpc;
pub use module::module;
pub use proofs::InclusionProofOut;
pub use repo::{Filter, MIGRATIONS as REPO_MIGRATIONS};

/// Every migration the receipts service needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(repo::MIGRATIONS)
}

/// The principal named as the actor of checkpoint events.
pub const CHECKPOINT_ACTOR: &str = "svc:receipts";

/// The checkpoint origin (and signed-note key name) of a tenant's log.
pub fn origin(tenant_id: &str) -> String {
    anumate_receipt::log_origin(tenant_id)
}

/// The platform service that owns (and alone may append) each receipt kind.
pub fn kind_owner(kind: pb::ReceiptKind) -> Option<&'static str> {
    match kind {
        pb::ReceiptKind::StepExecution | pb::ReceiptKind::RunOutcome => Some("orchestrator"),
        pb::ReceiptKind::ApprovalDecision => Some("approvals"),
        pb::ReceiptKind::TokenRevocation => Some("captokens"),
        pb::ReceiptKind::Unspecified => None,
    }
}

/// `[receipts]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptsConfig {
    /// Most milliseconds between an append and the checkpoint covering it.
    pub checkpoint_interval_ms: u64,
    /// Publish as soon as this many leaves wait for a checkpoint.
    pub checkpoint_batch: u64,
    /// Largest accepted content, in bytes of canonical JSON.
    pub max_content_bytes: usize,
    /// Days a receipt's content is kept; older bodies are removed (the
    /// statement, signature, tree and checkpoints stay, so proofs still
    /// verify). 0 keeps them forever.
    pub retention_days: u32,
    /// Per-tenant overrides of `retention_days` (0: forever).
    pub tenant_retention_days: std::collections::BTreeMap<String, u32>,
    /// Seconds between retention passes.
    pub retention_interval_secs: u64,
}

impl ReceiptsConfig {
    /// The retention of `tenant`'s receipt bodies, in days (0: forever).
    pub fn retention_days_for(&self, tenant: &str) -> u32 {
        self.tenant_retention_days
            .get(tenant)
            .copied()
            .unwrap_or(self.retention_days)
    }
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        ReceiptsConfig {
            checkpoint_interval_ms: 500,
            checkpoint_batch: 1000,
            max_content_bytes: 64 * 1024,
            retention_days: 0,
            tenant_retention_days: std::collections::BTreeMap::new(),
            retention_interval_secs: 3600,
        }
    }
}

/// Who is acting: the tenant and principal from the verified token.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Tenant id.
    pub tenant: String,
    /// Principal subject.
    pub subject: String,
    /// The platform service name, when (and only when) the principal is a
    /// service-issuer identity: only services append receipts.
    pub service: Option<String>,
}

impl Actor {
    /// The platform service `name` acting in `tenant` (for in-process callers).
    pub fn service(tenant: &str, name: &str) -> Actor {
        Actor {
            tenant: tenant.to_owned(),
            subject: anumate_auth::service_subject(name),
            service: Some(name.to_owned()),
        }
    }
}

/// The receipts service.
#[derive(Clone)]
pub struct Receipts {
    store: Store,
    keys: Arc<KeyRing>,
    cfg: ReceiptsConfig,
    redactor: Arc<Redactor>,
    wake: Arc<Notify>,
    lanes: Arc<Mutex<HashMap<String, Arc<Lane>>>>,
}

const MAX_FIELD: usize = 256;
const MAX_JTIS: usize = 1000;

fn kind_name(kind: i32) -> Result<&'static str> {
    match pb::ReceiptKind::try_from(kind) {
        Ok(pb::ReceiptKind::StepExecution) => Ok("STEP_EXECUTION"),
        Ok(pb::ReceiptKind::ApprovalDecision) => Ok("APPROVAL_DECISION"),
        Ok(pb::ReceiptKind::TokenRevocation) => Ok("TOKEN_REVOCATION"),
        Ok(pb::ReceiptKind::RunOutcome) => Ok("RUN_OUTCOME"),
        Ok(pb::ReceiptKind::Unspecified) => Err(Error::invalid_argument(
            "kind",
            "required: one of the ReceiptKind values",
        )),
        Err(_) => Err(Error::invalid_argument(
            "kind",
            format!("unknown ReceiptKind value {kind}"),
        )),
    }
}

fn kind_from_name(name: &str) -> pb::ReceiptKind {
    match name {
        "STEP_EXECUTION" => pb::ReceiptKind::StepExecution,
        "APPROVAL_DECISION" => pb::ReceiptKind::ApprovalDecision,
        "TOKEN_REVOCATION" => pb::ReceiptKind::TokenRevocation,
        "RUN_OUTCOME" => pb::ReceiptKind::RunOutcome,
        _ => pb::ReceiptKind::Unspecified,
    }
}

fn check_text(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_FIELD {
        return Err(Error::invalid_argument(
            field,
            format!("at most {MAX_FIELD} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid_argument(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_subject(s: &pb::ReceiptSubject) -> Result<()> {
    check_text("subject.run_id", &s.run_id)?;
    check_text("subject.step_id", &s.step_id)?;
    check_text("subject.plan_hash", &s.plan_hash)?;
    check_text("subject.approval_id", &s.approval_id)?;
    if s.attempt < 0 {
        return Err(Error::invalid_argument(
            "subject.attempt",
            "must not be negative",
        ));
    }
    if s.jtis.len() > MAX_JTIS {
        return Err(Error::invalid_argument(
            "subject.jtis",
            format!("at most {MAX_JTIS} token ids"),
        ));
    }
    for jti in &s.jtis {
        check_text("subject.jtis", jti)?;
    }
    Ok(())
}

/// Microseconds to a protobuf timestamp.
pub use anumate_proto::timestamp_from_micros as timestamp;

/// A protobuf timestamp to microseconds (a filter bound: far-off times clamp).
pub use anumate_proto::micros_from_timestamp_saturating as micros;

/// Rebuilds the `Receipt` message from a stored row.
fn receipt_proto(row: &repo::ReceiptRow, with_content: bool) -> Result<pb::Receipt> {
    let st: Value = serde_json::from_str(&row.statement_json).map_err(Error::internal)?;
    let text = |k: &str| st.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let subject = st.get("subject").cloned().unwrap_or(Value::Null);
    let sub_text = |k: &str| {
        subject
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let archived = row.content_json.is_empty();
    let content = if with_content && !archived {
        Some(serde_json::from_str(&row.content_json).map_err(Error::internal)?)
    } else {
        None
    };
    Ok(pb::Receipt {
        receipt_id: text("receipt_id"),
        tenant_id: text("tenant_id"),
        kind: kind_from_name(&text("kind")) as i32,
        subject: Some(pb::ReceiptSubject {
            run_id: sub_text("run_id"),
            step_id: sub_text("step_id"),
            attempt: subject
                .get("attempt")
                .and_then(Value::as_i64)
                .and_then(|a| i32::try_from(a).ok())
                .unwrap_or(0),
            plan_hash: sub_text("plan_hash"),
            approval_id: sub_text("approval_id"),
            jtis: subject
                .get("jtis")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|j| j.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        }),
        content_digest: text("content_digest"),
        issue_time: Some(timestamp(row.issued_at)),
        kid: row.kid.clone(),
        statement_json: row.statement_json.clone(),
        signature: row.signature.clone(),
        leaf_index: i64::try_from(row.leaf_index).map_err(Error::internal)?,
        leaf_hash: row.leaf_hash.to_vec(),
        content,
        content_archived: archived,
        actor: text("actor"),
    })
}

fn size_param(field: &str, v: i64) -> Result<Option<u64>> {
    match v {
        0 => Ok(None),
        n if n < 0 => Err(Error::invalid_argument(field, "must not be negative")),
        n => Ok(Some(n as u64)),
    }
}

impl Receipts {
    /// A service over `store`, signing receipts and checkpoints with the ring's active key.
    pub fn new(store: Store, keys: Arc<KeyRing>, cfg: &ReceiptsConfig) -> Result<Receipts> {
        let redactor = Redactor::new(RedactionConfig::default()).map_err(Error::internal)?;
        Ok(Receipts {
            store,
            keys,
            cfg: cfg.clone(),
            redactor: Arc::new(redactor),
            wake: Arc::new(Notify::new()),
            lanes: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The public keys that verify receipts and checkpoints.
    pub fn jwks(&self) -> anumate_crypto::Jwks {
        self.keys.jwks()
    }

    /// A receipt with its content.
    pub async fn get(&self, actor: &Actor, receipt_id: &str) -> Result<pb::Receipt> {
        let tx = self.store.read(&actor.tenant).await?;
        let row = self.find(&tx, receipt_id).await?;
        receipt_proto(&row, true)
    }

    async fn find(
        &self,
        tx: &anumate_store::TenantTx,
        receipt_id: &str,
    ) -> Result<repo::ReceiptRow> {
        if receipt_id.is_empty() {
            return Err(Error::invalid_argument("receipt_id", "required"));
        }
        check_text("receipt_id", receipt_id)?;
        repo::by_id(tx, receipt_id).await?.ok_or_else(|| {
            Error::because(
                Reason::ReceiptNotFound,
                format!("receipt {receipt_id} not found"),
            )
        })
    }

    /// Builds a validated [`Filter`].
    pub fn filter(f: Option<&pb::ReceiptFilter>) -> Result<Filter> {
        let Some(f) = f else {
            return Ok(Filter::default());
        };
        let kind = match f.kind {
            0 => None,
            k => Some(kind_name(k).map_err(|_| {
                Error::invalid_argument("filter.kind", format!("unknown ReceiptKind value {k}"))
            })?),
        };
        check_text("filter.run_id", &f.run_id)?;
        let plan_hash = (!f.plan_hash.is_empty())
            .then(|| anumate_crypto::parse_digest("filter.plan_hash", &f.plan_hash))
            .transpose()?;
        Ok(Filter {
            kind: kind.map(str::to_string),
            run_id: (!f.run_id.is_empty()).then(|| f.run_id.clone()),
            plan_hash,
            start_micros: f.start_time.as_ref().map(micros),
            end_micros: f.end_time.as_ref().map(micros),
        })
    }

    /// A page of receipts, newest first, without content, and the next page
    /// token (AIP-158 `page_size` and `page_token`; the token carries the
    /// last leaf index of the page).
    pub async fn list(
        &self,
        actor: &Actor,
        filter: &Filter,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<pb::Receipt>, String)> {
        let (size, key) = paging::page_params(page_size, page_token)?;
        let cursor = key
            .map(|k| {
                k.parse::<u64>()
                    .map_err(|_| Error::invalid_argument("page_token", "malformed page token"))
            })
            .transpose()?;
        let tx = self.store.read(&actor.tenant).await?;
        let rows = repo::list(&tx, filter, cursor, true, size + 1).await?;
        let (rows, next) = paging::finish_page(rows, size, |r| r.leaf_index.to_string());
        let receipts = rows
            .iter()
            .map(|r| receipt_proto(r, false))
            .collect::<Result<Vec<_>>>()?;
        Ok((receipts, next))
    }
}
