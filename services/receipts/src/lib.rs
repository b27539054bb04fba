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
//!   each connection; SQLite takes a statement per table. The tree is
//!   therefore always integrated up to the last committed receipt; nothing is
//!   pending in memory, so a restart loses nothing.
//! - **Checkpoints** are published by [`Receipts::spawn_checkpointer`], one
//!   task per process: every `checkpoint_interval_ms` (500 ms), or sooner once
//!   `checkpoint_batch` leaves are waiting, it signs a note for each tenant
//!   whose log grew. Replicas may race; the head lock makes them publish the
//!   same sizes at most once.
//! - **Proofs** read only the perfect-subtree nodes they need.
#![forbid(unsafe_code)]

pub mod export;
pub mod grpc;
mod module;
mod repo;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anumate_crypto::KeyRing;
use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::receipts::v1 as pb;
use anumate_receipt::{
    Checkpoint, CompactRange, Hash, NodeStore, NoteSigner, Statement, Subject, consistency_proof,
    inclusion_proof,
};
use anumate_redaction::{RedactionConfig, Redactor};
use anumate_service::CancellationToken;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

pub use grpc::ReceiptsGrpc;
pub use module::module;
pub use repo::{Filter, MIGRATIONS as REPO_MIGRATIONS};

/// Every migration the receipts service needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::MIGRATIONS
        .iter()
        .chain(repo::MIGRATIONS)
        .copied()
        .collect()
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

/// A validated, redacted append request.
struct Prepared {
    actor: Actor,
    kind: &'static str,
    subject: Subject,
    digest: String,
    canonical: String,
    fingerprint: String,
    dedupe_key: String,
    /// Signed on the caller's task, before the batch: signing needs no
    /// leaf index, so it stays out of the log's critical section.
    receipt_id: String,
    issued_at: i64,
    kid: String,
    signed: anumate_receipt::SignedStatement,
}

/// A queued append and where its answer goes.
struct Job {
    prepared: Prepared,
    reply: tokio::sync::oneshot::Sender<Result<(pb::Receipt, bool)>>,
}

/// One tenant's append queue and the lock its batch leader holds.
#[derive(Default)]
struct Lane {
    queue: Mutex<Vec<Job>>,
    leader: tokio::sync::Mutex<()>,
    /// The tree's peaks at the size this process last committed. The tree of
    /// a given size never changes, so when the locked head still has that size
    /// (no other replica appended since) the batch skips reading them.
    peaks: Mutex<Option<(u64, Vec<Hash>)>>,
}

/// Locks a std mutex, recovering from poisoning (the data stays consistent:
/// queues are only pushed to and taken whole).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An inclusion proof and the checkpoint it leads to.
#[derive(Debug, Clone)]
pub struct InclusionProofOut {
    /// Leaf index.
    pub leaf_index: u64,
    /// Leaf hash.
    pub leaf_hash: Hash,
    /// Audit path, leaf first.
    pub audit_path: Vec<Hash>,
    /// The checkpoint.
    pub checkpoint: pb::Checkpoint,
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
pub fn timestamp(micros: i64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

/// A protobuf timestamp to microseconds.
pub fn micros(t: &pbjson_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos) / 1000)
}

fn rfc3339_micros(micros: i64) -> Result<String> {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .ok_or_else(|| Error::internal("clock out of range"))
}

/// Records which nodes a proof asks for without knowing their hashes.
struct Recorder {
    size: u64,
    asked: RefCell<Vec<(u32, u64)>>,
}

impl NodeStore for Recorder {
    fn size(&self) -> u64 {
        self.size
    }
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        self.asked.borrow_mut().push((level, index));
        Some([0; 32])
    }
}

/// Nodes fetched from the database.
struct Fetched {
    size: u64,
    nodes: HashMap<(u32, u64), Hash>,
}

impl NodeStore for Fetched {
    fn size(&self) -> u64 {
        self.size
    }
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        self.nodes.get(&(level, index)).copied()
    }
}

/// Runs `compute` over the nodes of a tree of `size` leaves, fetching exactly the
/// nodes it reads: a first pass records them, a second computes with them.
async fn with_nodes<T>(
    tx: &anumate_store::TenantTx,
    size: u64,
    compute: impl Fn(&dyn NodeStore) -> std::result::Result<T, anumate_receipt::ProofError>,
) -> Result<T> {
    let recorder = Recorder {
        size,
        asked: RefCell::new(Vec::new()),
    };
    compute(&recorder).map_err(|e| Error::invalid_argument("tree_size", e.to_string()))?;
    let mut wanted = recorder.asked.into_inner();
    wanted.sort_unstable();
    wanted.dedup();
    let store = Fetched {
        size,
        nodes: repo::nodes(tx, &wanted).await?,
    };
    compute(&store).map_err(Error::internal)
}

fn request_hash(kind: &str, subject: &Subject, digest: &str) -> String {
    let mut jtis = subject.jtis.clone();
    jtis.sort();
    let value = serde_json::json!({
        "kind": kind,
        "run_id": subject.run_id,
        "step_id": subject.step_id,
        "attempt": subject.attempt,
        "plan_hash": subject.plan_hash,
        "approval_id": subject.approval_id,
        "jtis": jtis,
        "content_digest": digest,
    });
    anumate_crypto::content_hash(&value).1
}

fn checkpoint_proto(tenant: &str, row: &repo::CheckpointRow) -> pb::Checkpoint {
    pb::Checkpoint {
        tenant_id: tenant.to_string(),
        tree_size: i64::try_from(row.size).unwrap_or(i64::MAX),
        root_hash: row.root.to_vec(),
        time: Some(timestamp(row.created_at)),
        kid: row.kid.clone(),
        note: row.note.clone(),
        ..Default::default()
    }
}

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

    /// Issues, signs and appends a receipt; with a known `dedupe_key` returns the
    /// existing receipt and `false`.
    ///
    /// Appends of one tenant are group-committed: callers queue their prepared
    /// receipt, one of them (the leader) takes the whole queue and writes it in a
    /// single transaction, and every caller gets its own result.
    pub async fn append(
        &self,
        actor: &Actor,
        kind: i32,
        subject: Option<pb::ReceiptSubject>,
        content: Option<pbjson_types::Struct>,
        dedupe_key: &str,
    ) -> Result<(pb::Receipt, bool)> {
        let prepared = self.prepare(actor, kind, subject, content, dedupe_key)?;
        let (reply, mut done) = tokio::sync::oneshot::channel();
        let lane = self.lane(&actor.tenant);
        lock(&lane.queue).push(Job { prepared, reply });
        {
            let _leader = lane.leader.lock().await;
            // A previous leader may already have written our receipt.
            if let Ok(result) = done.try_recv() {
                return result;
            }
            let jobs = std::mem::take(&mut *lock(&lane.queue));
            if !jobs.is_empty() {
                // Spawned: a cancelled caller does not abort the others' batch.
                let this = self.clone();
                let tenant = actor.tenant.clone();
                let lane = lane.clone();
                tokio::spawn(async move { this.commit_batch(&tenant, &lane, jobs).await })
                    .await
                    .map_err(Error::internal)?;
            }
        }
        done.await
            .map_err(|_| Error::internal("append batch ended without an answer"))?
    }

    fn lane(&self, tenant: &str) -> Arc<Lane> {
        lock(&self.lanes)
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }

    /// Validates and redacts a request, outside any transaction.
    fn prepare(
        &self,
        actor: &Actor,
        kind: i32,
        subject: Option<pb::ReceiptSubject>,
        content: Option<pbjson_types::Struct>,
        dedupe_key: &str,
    ) -> Result<Prepared> {
        let kind_name = kind_name(kind)?;
        // Each kind is attested by the one service that does what it records.
        let owner = pb::ReceiptKind::try_from(kind)
            .ok()
            .and_then(kind_owner)
            .ok_or_else(|| Error::internal("a receipt kind without an owner"))?;
        if actor.service.as_deref() != Some(owner) {
            tracing::warn!(tenant = %actor.tenant, subject = %actor.subject, kind = kind_name, "receipts: append by a principal that does not own the kind");
            return Err(Error::new(
                ErrorCode::PermissionDenied,
                format!("{kind_name} receipts are appended only by the {owner} service"),
            )
            .with_metadata("required_services", owner));
        }
        let kind = kind_name;
        if dedupe_key.is_empty() {
            return Err(Error::invalid_argument(
                "dedupe_key",
                "required, e.g. step:<run>:<step>:<attempt>",
            ));
        }
        check_text("dedupe_key", dedupe_key)?;
        let subject = subject.unwrap_or_default();
        check_subject(&subject)?;
        let mut content = match content {
            Some(c) => serde_json::to_value(&c).map_err(Error::internal)?,
            None => Value::Object(serde_json::Map::new()),
        };
        self.redactor.redact_json(&mut content);
        let (canonical, digest) = anumate_crypto::content_hash(&content);
        if canonical.len() > self.cfg.max_content_bytes {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "content is {} bytes of canonical JSON; the limit is {}",
                    canonical.len(),
                    self.cfg.max_content_bytes
                ),
            ));
        }
        let subject = Subject {
            run_id: subject.run_id,
            step_id: subject.step_id,
            attempt: subject.attempt,
            plan_hash: subject.plan_hash,
            approval_id: subject.approval_id,
            jtis: subject.jtis,
        };
        let fingerprint = request_hash(kind, &subject, &digest);
        let issued_at = anumate_store::now_micros();
        let receipt_id = uuid::Uuid::now_v7().to_string();
        let key = self.keys.active();
        let kid = key.kid().to_string();
        let statement = Statement {
            receipt_id: receipt_id.clone(),
            tenant_id: actor.tenant.clone(),
            kind: kind.to_string(),
            subject: subject.clone(),
            content_digest: digest.clone(),
            issue_time: rfc3339_micros(issued_at)?,
            kid: kid.clone(),
            actor: anumate_auth::service_subject(owner),
        };
        let signed = statement.sign(key).map_err(Error::internal)?;
        Ok(Prepared {
            actor: actor.clone(),
            kind,
            subject,
            digest,
            canonical,
            fingerprint,
            dedupe_key: dedupe_key.to_string(),
            receipt_id,
            issued_at,
            kid,
            signed,
        })
    }

    /// Writes a batch and answers every job.
    async fn commit_batch(&self, tenant: &str, lane: &Lane, jobs: Vec<Job>) {
        let (prepared, replies): (Vec<Prepared>, Vec<_>) =
            jobs.into_iter().map(|j| (j.prepared, j.reply)).unzip();
        match self.write_batch(tenant, lane, &prepared).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// One transaction for a batch: the outer error aborts it all, inner errors
    /// are one job's (a reused dedupe key).
    async fn write_batch(
        &self,
        tenant: &str,
        lane: &Lane,
        batch: &[Prepared],
    ) -> Result<Vec<Result<(pb::Receipt, bool)>>> {
        let tx = self.store.write(tenant).await?;
        let head = repo::lock_head(&tx).await?;
        let known = lock(&lane.peaks)
            .as_ref()
            .filter(|(size, _)| *size == head.size)
            .map(|(_, peaks)| peaks.clone());
        let peaks = match known {
            Some(peaks) => peaks,
            None => {
                with_nodes(&tx, head.size, |s| {
                    CompactRange::from_store(s, head.size).map(|r| r.peaks().to_vec())
                })
                .await?
            }
        };
        let mut range = CompactRange::from_peaks(head.size, peaks).map_err(Error::internal)?;
        let keys: Vec<&str> = batch.iter().map(|p| p.dedupe_key.as_str()).collect();
        let stored = repo::by_dedupe_keys(&tx, &keys).await?;
        // Receipts this batch creates, by dedupe key: later duplicates in the
        // batch answer from them as from stored ones.
        let mut created: HashMap<&str, repo::ReceiptRow> = HashMap::new();
        let mut new_rows: Vec<(&Prepared, u64)> = Vec::new();
        let mut nodes = Vec::new();
        let mut results = Vec::with_capacity(batch.len());
        for p in batch {
            let key = p.dedupe_key.as_str();
            if let Some(existing) = created.get(key).or_else(|| stored.get(key)) {
                results.push(if existing.request_hash == p.fingerprint {
                    receipt_proto(existing, true).map(|r| (r, false))
                } else {
                    Err(Error::new(
                        ErrorCode::AlreadyExists,
                        format!(
                            "dedupe_key {:?} was used for a different receipt (leaf {})",
                            p.dedupe_key, existing.leaf_index
                        ),
                    ))
                });
                continue;
            }
            range.append(p.signed.leaf_hash, |level, index, hash| {
                nodes.push((level, index, *hash))
            });
            let row = repo::ReceiptRow {
                leaf_index: range.size() - 1,
                request_hash: p.fingerprint.clone(),
                issued_at: p.issued_at,
                statement_json: p.signed.statement_json.clone(),
                signature: p.signed.signature.clone(),
                kid: p.kid.clone(),
                leaf_hash: p.signed.leaf_hash,
                content_json: p.canonical.clone(),
            };
            results.push(receipt_proto(&row, true).map(|r| (r, true)));
            new_rows.push((p, row.leaf_index));
            created.insert(key, row);
        }
        let inserts: Vec<repo::NewReceipt> = new_rows
            .iter()
            .map(|&(p, leaf_index)| repo::NewReceipt {
                leaf_index,
                receipt_id: &p.receipt_id,
                dedupe_key: &p.dedupe_key,
                request_hash: &p.fingerprint,
                kind: p.kind,
                run_id: &p.subject.run_id,
                plan_hash: &p.subject.plan_hash,
                issued_at: p.issued_at,
                statement_json: &p.signed.statement_json,
                signature: &p.signed.signature,
                kid: &p.kid,
                leaf_hash: &p.signed.leaf_hash,
                content_json: &p.canonical,
            })
            .collect();
        repo::append_batch(&tx, &inserts, &nodes, range.size()).await?;
        // One outbox statement for the batch's events.
        let subjects: Vec<String> = new_rows
            .iter()
            .map(|(p, _)| format!("receipts/{}", p.receipt_id))
            .collect();
        let events = new_rows
            .iter()
            .zip(&subjects)
            .map(|(&(p, leaf_index), event_subject)| {
                Ok((
                    ev::ReceiptAppended {
                        tenant_id: tenant.to_string(),
                        receipt_id: p.receipt_id.clone(),
                        kind: kind_from_name(p.kind) as i32,
                        run_id: p.subject.run_id.clone(),
                        step_id: p.subject.step_id.clone(),
                        plan_hash: p.subject.plan_hash.clone(),
                        leaf_index: i64::try_from(leaf_index).map_err(Error::internal)?,
                        content_digest: p.digest.clone(),
                        actor: p.actor.subject.clone(),
                    },
                    tenant,
                    anumate_events::EventContext {
                        subject: event_subject.as_str(),
                        plan_hash: (!p.subject.plan_hash.is_empty())
                            .then_some(p.subject.plan_hash.as_str()),
                        ..Default::default()
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        anumate_events::append_many(&tx, &events)
            .await
            .map_err(Error::internal)?;
        tx.commit().await?;
        *lock(&lane.peaks) = Some((range.size(), range.peaks().to_vec()));
        if range.size() - head.checkpoint_size >= self.cfg.checkpoint_batch {
            self.wake.notify_one();
        }
        Ok(results)
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
        repo::by_id(tx, receipt_id)
            .await?
            .ok_or_else(|| Error::not_found(format!("receipt {receipt_id} not found")))
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
        check_text("filter.plan_hash", &f.plan_hash)?;
        Ok(Filter {
            kind: kind.map(str::to_string),
            run_id: (!f.run_id.is_empty()).then(|| f.run_id.clone()),
            plan_hash: (!f.plan_hash.is_empty()).then(|| f.plan_hash.clone()),
            start_micros: f.start_time.as_ref().map(micros),
            end_micros: f.end_time.as_ref().map(micros),
        })
    }

    /// A page of receipts, newest first, without content.
    pub async fn list(
        &self,
        actor: &Actor,
        filter: &Filter,
        page: Option<&anumate_proto::common::v1::PageRequest>,
    ) -> Result<(Vec<pb::Receipt>, String)> {
        let size = match page.map_or(0, |p| p.page_size) {
            n if n < 0 => {
                return Err(Error::invalid_argument(
                    "page.page_size",
                    "must not be negative",
                ));
            }
            0 => 50,
            n => i64::from(n).min(500),
        };
        let cursor =
            match page.map(|p| p.page_token.as_str()).unwrap_or("") {
                "" => None,
                t => Some(t.parse::<u64>().map_err(|_| {
                    Error::invalid_argument("page.page_token", "malformed page token")
                })?),
            };
        let tx = self.store.read(&actor.tenant).await?;
        let rows = repo::list(&tx, filter, cursor, true, size + 1).await?;
        let more = rows.len() as i64 > size;
        let rows = &rows[..rows.len().min(size as usize)];
        let next = match (more, rows.last()) {
            (true, Some(last)) => last.leaf_index.to_string(),
            _ => String::new(),
        };
        let receipts = rows
            .iter()
            .map(|r| receipt_proto(r, false))
            .collect::<Result<Vec<_>>>()?;
        Ok((receipts, next))
    }

    /// Up to `limit` receipts after leaf `after` (exclusive; `None` = from the
    /// start), oldest first, for exports.
    pub async fn export_page(
        &self,
        actor: &Actor,
        filter: &Filter,
        after: Option<u64>,
        limit: i64,
        with_content: bool,
    ) -> Result<Vec<pb::Receipt>> {
        let tx = self.store.read(&actor.tenant).await?;
        repo::list(&tx, filter, after, false, limit)
            .await?
            .iter()
            .map(|r| receipt_proto(r, with_content))
            .collect()
    }

    /// The latest checkpoint (`tree_size` 0) or the one of `tree_size`.
    pub async fn checkpoint(&self, actor: &Actor, tree_size: i64) -> Result<pb::Checkpoint> {
        let size = size_param("tree_size", tree_size)?;
        let tx = self.store.read(&actor.tenant).await?;
        let row = Self::find_checkpoint(&tx, size).await?;
        Ok(checkpoint_proto(&actor.tenant, &row))
    }

    async fn find_checkpoint(
        tx: &anumate_store::TenantTx,
        size: Option<u64>,
    ) -> Result<repo::CheckpointRow> {
        repo::checkpoint(tx, size).await?.ok_or_else(|| match size {
            Some(s) => Error::not_found(format!("no checkpoint was published at tree size {s}")),
            None => Error::not_found("no checkpoint has been published yet"),
        })
    }

    /// The inclusion proof of a receipt in a published checkpoint's tree.
    pub async fn inclusion_proof(
        &self,
        actor: &Actor,
        receipt_id: &str,
        tree_size: i64,
    ) -> Result<InclusionProofOut> {
        let size = size_param("tree_size", tree_size)?;
        let tx = self.store.read(&actor.tenant).await?;
        let receipt = self.find(&tx, receipt_id).await?;
        let cp = match Self::find_checkpoint(&tx, size).await {
            Err(e) if e.code == ErrorCode::NotFound && size.is_none() => {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    "no checkpoint has been published yet; retry after the next checkpoint",
                ));
            }
            other => other?,
        };
        if receipt.leaf_index >= cp.size {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "receipt {receipt_id} (leaf {}) is newer than the checkpoint of size {}; retry after the next checkpoint",
                    receipt.leaf_index, cp.size
                ),
            ));
        }
        let index = receipt.leaf_index;
        let audit_path = with_nodes(&tx, cp.size, |s| inclusion_proof(s, index, cp.size)).await?;
        Ok(InclusionProofOut {
            leaf_index: receipt.leaf_index,
            leaf_hash: receipt.leaf_hash,
            audit_path,
            checkpoint: checkpoint_proto(&actor.tenant, &cp),
        })
    }

    /// The consistency proof between two published checkpoints.
    pub async fn consistency_proof(
        &self,
        actor: &Actor,
        first: i64,
        second: i64,
    ) -> Result<(Vec<Hash>, pb::Checkpoint, pb::Checkpoint)> {
        if first < 1 {
            return Err(Error::invalid_argument(
                "first_tree_size",
                "must be at least 1",
            ));
        }
        let second = size_param("second_tree_size", second)?;
        let tx = self.store.read(&actor.tenant).await?;
        let first_cp = Self::find_checkpoint(&tx, Some(first as u64)).await?;
        let second_cp = Self::find_checkpoint(&tx, second).await?;
        if first_cp.size > second_cp.size {
            return Err(Error::invalid_argument(
                "first_tree_size",
                format!(
                    "{} is larger than the second tree size {}",
                    first_cp.size, second_cp.size
                ),
            ));
        }
        let (m, n) = (first_cp.size, second_cp.size);
        let proof = with_nodes(&tx, n, |s| consistency_proof(s, m, n)).await?;
        Ok((
            proof,
            checkpoint_proto(&actor.tenant, &first_cp),
            checkpoint_proto(&actor.tenant, &second_cp),
        ))
    }

    /// Publishes a checkpoint of the tenant's log if it grew since the last one.
    pub async fn publish_checkpoint(&self, tenant: &str) -> Result<Option<pb::Checkpoint>> {
        let tx = self.store.write(tenant).await?;
        let head = repo::lock_head(&tx).await?;
        if head.size == head.checkpoint_size {
            return Ok(None);
        }
        let root = with_nodes(&tx, head.size, |s| {
            CompactRange::from_store(s, head.size).map(|r| r.root())
        })
        .await?;
        let key = self.keys.active();
        let checkpoint = Checkpoint {
            origin: origin(tenant),
            size: head.size,
            root,
        };
        let signer = NoteSigner::new(&checkpoint.origin, key.clone()).map_err(|e| {
            Error::internal(format!("tenant {tenant:?} cannot name a checkpoint: {e}"))
        })?;
        let note = signer
            .sign_checkpoint(&checkpoint)
            .map_err(Error::internal)?;
        let row = repo::CheckpointRow {
            size: head.size,
            root,
            note,
            kid: key.kid().to_string(),
            created_at: anumate_store::now_micros(),
        };
        repo::insert_checkpoint(&tx, &row).await?;
        repo::set_checkpoint_size(&tx, head.size).await?;
        let published = checkpoint_proto(tenant, &row);
        let event_subject = format!("checkpoints/{}", row.size);
        anumate_events::append(
            &tx,
            &ev::CheckpointPublished {
                tenant_id: tenant.to_string(),
                tree_size: published.tree_size,
                root_hash: published.root_hash.clone(),
                kid: published.kid.clone(),
                time: published.time,
                actor: CHECKPOINT_ACTOR.to_string(),
                note: published.note.clone(),
                origin: checkpoint.origin.clone(),
            },
            tenant,
            anumate_events::EventContext {
                subject: &event_subject,
                ..Default::default()
            },
        )
        .await
        .map_err(Error::internal)?;
        tx.commit().await?;
        Ok(Some(published))
    }

    /// Publishes checkpoints for every tenant whose log grew; returns how many.
    pub async fn publish_pending(&self) -> Result<usize> {
        // `receipt_logs` has no row-level security: any tenant scope sees every head.
        let tenants = {
            let tx = self.store.read("-").await?;
            repo::tenants_behind(&tx).await?
        };
        let mut published = 0;
        for tenant in tenants {
            match self.publish_checkpoint(&tenant).await {
                Ok(Some(_)) => published += 1,
                Ok(None) => {}
                Err(e) => tracing::warn!(%tenant, error = %e, "checkpoint not published"),
            }
        }
        Ok(published)
    }

    /// Removes receipt bodies older than each tenant's retention, as of
    /// `now_micros`; returns how many were removed. Tree nodes, statements,
    /// signatures and checkpoints stay: proofs keep verifying.
    pub async fn apply_retention(&self, now_micros: i64) -> Result<u64> {
        let tenants = {
            let tx = self.store.read("-").await?;
            repo::all_tenants(&tx).await?
        };
        let mut removed = 0;
        for tenant in tenants {
            let days = self.cfg.retention_days_for(&tenant);
            if days == 0 {
                continue;
            }
            let cutoff = now_micros.saturating_sub(i64::from(days) * 86_400 * 1_000_000);
            let tx = self.store.write(&tenant).await?;
            let n = repo::remove_contents_before(&tx, cutoff).await?;
            tx.commit().await?;
            if n > 0 {
                tracing::info!(%tenant, removed = n, days, "receipt bodies past retention removed");
            }
            removed += n;
        }
        Ok(removed)
    }

    /// Starts the checkpoint publisher of this process (see
    /// [`Receipts::run_checkpointer`]) until the process ends.
    pub fn spawn_checkpointer(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.clone().run_checkpointer(CancellationToken::new()))
    }

    /// The checkpoint publisher of this process: every
    /// `checkpoint_interval_ms`, or when an append finds `checkpoint_batch`
    /// leaves waiting, and the retention pass; returns once `cancel` is
    /// cancelled (between rounds, never inside one).
    pub async fn run_checkpointer(self, cancel: CancellationToken) {
        let this = self;
        let interval = Duration::from_millis(this.cfg.checkpoint_interval_ms.max(10));
        let retention_every = Duration::from_secs(this.cfg.retention_interval_secs.max(1));
        let retention_on =
            this.cfg.retention_days > 0 || this.cfg.tenant_retention_days.values().any(|d| *d > 0);
        let mut last_retention: Option<tokio::time::Instant> = None;
        loop {
            if retention_on && last_retention.is_none_or(|t| t.elapsed() >= retention_every) {
                last_retention = Some(tokio::time::Instant::now());
                if let Err(e) = this.apply_retention(anumate_store::now_micros()).await {
                    tracing::warn!(error = %e, "retention pass failed");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = this.wake.notified() => {}
            }
            if let Err(e) = this.publish_pending().await {
                tracing::warn!(error = %e, "checkpoint round failed");
            }
        }
    }
}
