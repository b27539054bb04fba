//! Appending receipts: validate, redact and sign on the caller's task, then
//! group-commit per tenant (one write transaction takes the tenant's whole
//! queue, locks its head, assigns leaf indexes and stores receipts, tree nodes
//! and outbox events).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anumate_errors::{Error, ErrorCode, Reason, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::receipts::v1 as pb;
use anumate_receipt::{CompactRange, Hash, Statement, Subject};
use anumate_store::{Backend, TenantTx};
use serde_json::Value;
use tokio::sync::Notify;

use crate::proofs::with_nodes;
use crate::{
    Actor, Receipts, check_subject, check_text, kind_from_name, kind_name, kind_owner,
    receipt_proto, repo,
};

/// A validated, redacted append request.
pub struct Prepared {
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

impl Prepared {
    /// The receipt's id (unless its dedupe key is stored already: then the
    /// append answers with the stored receipt).
    pub fn receipt_id(&self) -> &str {
        &self.receipt_id
    }
}

/// A queued append and where its answer goes.
pub(crate) struct Job {
    prepared: Prepared,
    reply: tokio::sync::oneshot::Sender<Result<(pb::Receipt, bool)>>,
}

/// One tenant's append queue and the lock its batch leader holds.
#[derive(Default)]
pub(crate) struct Lane {
    queue: Mutex<Vec<Job>>,
    leader: tokio::sync::Mutex<()>,
    /// The tree's peaks at the size this process last committed. The tree of
    /// a given size never changes, so when the locked head still has that size
    /// (no other replica appended since) the batch skips reading them.
    peaks: Mutex<Option<(u64, Vec<Hash>)>>,
}

/// Locks a std mutex, recovering from poisoning (the data stays consistent:
/// queues are only pushed to and taken whole).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn request_hash(kind: &str, subject: &Subject, digest: &str) -> String {
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

impl Receipts {
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

    pub(crate) fn lane(&self, tenant: &str) -> Arc<Lane> {
        lock(&self.lanes)
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }

    /// Validates and redacts a request, outside any transaction.
    pub(crate) fn prepare(
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
        let mut subject = subject.unwrap_or_default();
        check_subject(&subject)?;
        // Signed and stored in its one wire form, whichever spelling came in.
        if !subject.plan_hash.is_empty() {
            subject.plan_hash =
                anumate_crypto::parse_digest("subject.plan_hash", &subject.plan_hash)?;
        }
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
            issue_time: anumate_proto::rfc3339_from_micros(issued_at)
                .ok_or_else(|| Error::internal("clock out of range"))?,
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
    pub(crate) async fn commit_batch(&self, tenant: &str, lane: &Lane, jobs: Vec<Job>) {
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
    /// are one job's (a reused dedupe key). See [`Receipts::store_in`]; when
    /// the guarded statement wrote part of the batch the transaction is
    /// rolled back and the batch appended the checked way in a new one.
    pub(crate) async fn write_batch(
        &self,
        tenant: &str,
        lane: &Lane,
        batch: &[Prepared],
    ) -> Result<Vec<Result<(pb::Receipt, bool)>>> {
        let mut guarded = true;
        loop {
            let tx = self.store.write(tenant).await?;
            if let Some(written) = self.store_in(&tx, lane, batch, guarded).await? {
                tx.commit().await?;
                return Ok(written.committed(lane, self));
            }
            // Dropped: rolled back.
            drop(tx);
            guarded = false;
        }
    }

    /// Appends receipts inside `tx`, the caller's own transaction on this
    /// service's store, so they commit (or roll back) with the change they
    /// attest: a receipt exists iff that change committed. Each request gets
    /// its receipt (`false`: its dedupe key was stored already) or its own
    /// error; the outer error means the caller's transaction must not
    /// commit. After committing, the caller hands the [`InTx`] to
    /// [`InTx::committed`] (never when it did not commit).
    ///
    /// The log's head stays locked until the caller's transaction ends, so
    /// the caller should append last, just before it commits.
    pub async fn append_in(
        &self,
        tx: &TenantTx,
        actor: &Actor,
        requests: Vec<pb::AppendReceiptRequest>,
    ) -> Result<(Vec<Result<(pb::Receipt, bool)>>, InTx)> {
        let prepared = requests
            .into_iter()
            .map(|r| self.prepare_request(actor, r))
            .collect();
        self.append_prepared_in(tx, prepared).await
    }

    /// Validates, redacts and signs `request` for
    /// [`Receipts::append_prepared_in`], outside any transaction.
    pub fn prepare_request(
        &self,
        actor: &Actor,
        request: pb::AppendReceiptRequest,
    ) -> Result<Prepared> {
        self.prepare(
            actor,
            request.kind,
            request.subject,
            request.content,
            &request.dedupe_key,
        )
    }

    /// [`Receipts::append_in`] of receipts prepared (signed) beforehand; a
    /// request that failed to prepare gets its error back.
    pub async fn append_prepared_in(
        &self,
        tx: &TenantTx,
        prepared: Vec<Result<Prepared>>,
    ) -> Result<(Vec<Result<(pb::Receipt, bool)>>, InTx)> {
        let mut results: Vec<Option<Result<(pb::Receipt, bool)>>> = Vec::new();
        let mut batch = Vec::new();
        for p in prepared {
            match p {
                Ok(p) if p.actor.tenant != tx.tenant_id() => results.push(Some(Err(
                    Error::internal("a receipt appended in another tenant's transaction"),
                ))),
                Ok(p) => {
                    batch.push(p);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let lane = self.lane(tx.tenant_id());
        let written = if batch.is_empty() {
            None
        } else {
            Some(
                // Guarded only for one receipt: it is stored or not at all
                // (`Partial` needs a rollback, and this is the caller's
                // transaction); a larger batch goes the checked way.
                self.store_in(tx, &lane, &batch, batch.len() == 1)
                    .await?
                    .ok_or_else(|| {
                        Error::new(
                            ErrorCode::Unavailable,
                            "the receipt log changed while appending; retry",
                        )
                    })?,
            )
        };
        let pending = InTx {
            lane,
            wake: self.wake.clone(),
            checkpoint_batch: self.cfg.checkpoint_batch,
            head: written
                .as_ref()
                .map(|w| (w.range.size(), w.range.peaks().to_vec(), w.checkpoint_size)),
        };
        let mut stored = written.map(|w| w.results).unwrap_or_default().into_iter();
        let results = results
            .into_iter()
            .map(|r| match r {
                Some(r) => r,
                None => stored
                    .next()
                    .unwrap_or_else(|| Err(Error::internal("a receipt without an answer"))),
            })
            .collect();
        Ok((results, pending))
    }

    /// Stores `batch` and its `receipt.appended` events in `tx`, without
    /// committing. On PostgreSQL with `guarded`, when this process committed
    /// the log's last batch (its size and peaks are known), the batch is
    /// first stored as if nothing changed since, in one guarded statement
    /// ([`repo::append_batch_at`]); if that refuses (another replica
    /// appended, or a retry) the head is locked and read in the same
    /// transaction and, with `guarded`, the guarded statement tried again on
    /// it; when that refuses too (a key is stored: a retry), or without
    /// `guarded`, the keys are looked up and the batch stored the checked
    /// way.
    /// `None`: the guarded statement wrote part of the batch (some of its
    /// dedupe keys were stored, or committed meanwhile) and `tx` must be
    /// rolled back.
    async fn store_in(
        &self,
        tx: &TenantTx,
        lane: &Lane,
        batch: &[Prepared],
        guarded: bool,
    ) -> Result<Option<Written>> {
        let guarded = guarded && tx.backend() == Backend::Postgres;
        let known = lock(&lane.peaks).clone().filter(|_| guarded);
        if let Some((size, peaks)) = known {
            match self.store_guarded(tx, lane, batch, size, peaks).await? {
                Attempt::Stored(planned, checkpoint_size) => {
                    return self.written(tx, planned, checkpoint_size).await;
                }
                Attempt::Refused => {}
                Attempt::Partial => return Ok(None),
            }
        }
        let head = repo::lock_head(tx).await?;
        let known = lock(&lane.peaks)
            .as_ref()
            .filter(|(size, _)| *size == head.size)
            .map(|(_, peaks)| peaks.clone());
        let peaks = match known {
            Some(peaks) => peaks,
            None => {
                with_nodes(tx, head.size, |s| {
                    CompactRange::from_store(s, head.size).map(|r| r.peaks().to_vec())
                })
                .await?
            }
        };
        // The head is locked and known now: the guarded statement stores
        // the batch unless a key is stored. Another replica's append, not a
        // retry, is what usually brings a lane here, and looking the keys up
        // first would cost a query whose plan may scan the tenant's receipts.
        if guarded {
            match self
                .store_guarded(tx, lane, batch, head.size, peaks.clone())
                .await?
            {
                Attempt::Stored(planned, checkpoint_size) => {
                    return self.written(tx, planned, checkpoint_size).await;
                }
                Attempt::Refused => {}
                Attempt::Partial => return Ok(None),
            }
        }
        let keys: Vec<&str> = batch.iter().map(|p| p.dedupe_key.as_str()).collect();
        let stored = repo::by_dedupe_keys(tx, &keys).await?;
        let planned = plan(batch, &stored, head.size, peaks)?;
        repo::append_batch(tx, &planned.inserts(), &planned.nodes, planned.range.size()).await?;
        self.written(tx, planned, head.checkpoint_size).await
    }

    /// [`repo::append_batch_at`] of `batch` on a log of `size` with `peaks`.
    /// On `Partial` the lane forgets its head, so its next append (a retry
    /// of this batch, say) goes the checked way.
    async fn store_guarded<'a>(
        &self,
        tx: &TenantTx,
        lane: &Lane,
        batch: &'a [Prepared],
        size: u64,
        peaks: Vec<Hash>,
    ) -> Result<Attempt<'a>> {
        let planned = plan(batch, &HashMap::new(), size, peaks)?;
        let at = repo::append_batch_at(
            tx,
            &planned.inserts(),
            &planned.nodes,
            size,
            planned.range.size(),
        )
        .await?;
        Ok(match at {
            repo::Guarded::Stored(checkpoint_size) => Attempt::Stored(planned, checkpoint_size),
            repo::Guarded::Refused => Attempt::Refused,
            repo::Guarded::Partial => {
                *lock(&lane.peaks) = None;
                Attempt::Partial
            }
        })
    }

    /// The stored batch's events, and what it wrote.
    async fn written(
        &self,
        tx: &TenantTx,
        planned: Planned<'_>,
        checkpoint_size: u64,
    ) -> Result<Option<Written>> {
        self.store_events(tx, &planned).await?;
        Ok(Some(Written {
            range: planned.range,
            results: planned.results,
            checkpoint_size,
        }))
    }

    /// Stores the `receipt.appended` events of the batch's new receipts.
    async fn store_events(&self, tx: &TenantTx, planned: &Planned<'_>) -> Result<()> {
        let tenant = tx.tenant_id();
        if planned.new_rows.is_empty() {
            return Ok(());
        }
        // One outbox statement for the batch's events.
        let subjects: Vec<String> = planned
            .new_rows
            .iter()
            .map(|(p, _)| format!("receipts/{}", p.receipt_id))
            .collect();
        let events = planned
            .new_rows
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
                    anumate_events::EventContext {
                        subject: event_subject.as_str(),
                        plan_hash: (!p.subject.plan_hash.is_empty())
                            .then_some(p.subject.plan_hash.as_str()),
                        ..Default::default()
                    },
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        anumate_events::append_many(tx, &events)
            .await
            .map_err(Error::internal)?;
        Ok(())
    }
}

/// A batch stored in a transaction that has not committed yet.
/// What [`Receipts::store_guarded`] did: [`repo::Guarded`] with the plan
/// of the stored batch.
enum Attempt<'a> {
    Stored(Planned<'a>, u64),
    Refused,
    Partial,
}

struct Written {
    range: CompactRange,
    results: Vec<Result<(pb::Receipt, bool)>>,
    checkpoint_size: u64,
}

impl Written {
    /// After the commit: remembers the new head and answers.
    fn committed(self, lane: &Lane, receipts: &Receipts) -> Vec<Result<(pb::Receipt, bool)>> {
        remember_head(lane, self.range.size(), self.range.peaks().to_vec());
        if self.range.size().saturating_sub(self.checkpoint_size) >= receipts.cfg.checkpoint_batch {
            receipts.wake.notify_one();
        }
        self.results
    }
}

/// Records that the log has `peaks` at `size`, a committed fact (the tree of
/// a size never changes), unless a longer log is known already. Only ever
/// called after a commit: a rolled-back batch would leave peaks the log may
/// never have, and the guarded append would trust them.
fn remember_head(lane: &Lane, size: u64, peaks: Vec<Hash>) {
    let mut known = lock(&lane.peaks);
    if known.as_ref().is_none_or(|(s, _)| *s <= size) {
        *known = Some((size, peaks));
    }
}

/// Receipts appended by [`Receipts::append_in`] in a transaction not yet
/// committed: what the log's head became, for the appender to remember
/// once (and only if) that transaction commits.
pub struct InTx {
    lane: Arc<Lane>,
    wake: Arc<Notify>,
    checkpoint_batch: u64,
    /// Size, peaks and checkpoint size after the batch (none: nothing stored).
    head: Option<(u64, Vec<Hash>, u64)>,
}

impl InTx {
    /// The caller's transaction committed.
    pub fn committed(self) {
        let Some((size, peaks, checkpoint_size)) = self.head else {
            return;
        };
        remember_head(&self.lane, size, peaks);
        if size.saturating_sub(checkpoint_size) >= self.checkpoint_batch {
            self.wake.notify_one();
        }
    }
}

/// A batch laid out on the log: leaf indexes, new tree nodes, each job's
/// answer.
struct Planned<'a> {
    range: CompactRange,
    new_rows: Vec<(&'a Prepared, u64)>,
    nodes: Vec<(u32, u64, Hash)>,
    results: Vec<Result<(pb::Receipt, bool)>>,
}

impl Planned<'_> {
    fn inserts(&self) -> Vec<repo::NewReceipt<'_>> {
        self.new_rows
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
            .collect()
    }
}

/// Lays `batch` out after a log of `size` with `peaks`: a job whose dedupe
/// key is `stored` (or earlier in the batch) answers from that receipt.
fn plan<'a>(
    batch: &'a [Prepared],
    stored: &HashMap<String, repo::ReceiptRow>,
    size: u64,
    peaks: Vec<Hash>,
) -> Result<Planned<'a>> {
    let mut range = CompactRange::from_peaks(size, peaks).map_err(Error::internal)?;
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
                Err(Error::because(
                    Reason::IdempotencyKeyReused,
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
    Ok(Planned {
        range,
        new_rows,
        nodes,
        results,
    })
}
