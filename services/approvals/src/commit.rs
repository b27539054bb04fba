//! Storing decisions: each decided approval with its receipt, its event, its
//! new timers and notifications, in one transaction.
//!
//! Decisions of one tenant are group-committed ([`Approvals::submit`]): each
//! caller decides on the approval as it read it and queues the result; one
//! of them (the leader) takes the whole queue and stores it in one
//! transaction, so concurrent decisions share one commit (one WAL flush on
//! PostgreSQL) and, with the receipts log in this process, one append to the
//! log. The transaction locks the approvals' rows and stores a decision only
//! if its approval is still the version it was decided from; a decision that
//! lost to another (of the same batch or not) is decided again on the fresh
//! approval by its caller. If a batch fails as a whole, its decisions are
//! stored one by one, so one decision's failure is only its own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anumate_errors::{Error, Result};
use anumate_events::EventContext;
use anumate_service::clients::{AppendedInTx, PreparedReceipt};
use anumate_store::TenantTx;

use crate::convert::{self, Event};
use crate::rules::{Approval, Effect};
use crate::{Approvals, notify, receipting, repo, service};

/// A decided approval to store.
pub(crate) struct Decided {
    /// The approval with its new decision (the last).
    pub a: Approval,
    /// The version it was decided from: stored only if the row still has it.
    /// `None`: the caller holds the row lock and has checked it.
    pub read: Option<i64>,
    pub effect: Effect,
    /// The receipt id when the receipt was appended before the transaction
    /// (a remote receipts service).
    pub receipt: Option<String>,
    /// The receipt signed ahead, to append in the transaction (the log in
    /// this store); prepared again if a failed batch consumed it.
    pub prepared: Option<PreparedReceipt>,
}

struct Job {
    decided: Decided,
    reply: tokio::sync::oneshot::Sender<Result<Option<Approval>>>,
}

/// One tenant's queue of decisions and the lock its batch leader holds.
#[derive(Default)]
pub(crate) struct Lane {
    queue: Mutex<Vec<Job>>,
    leader: tokio::sync::Mutex<()>,
}

/// Per-tenant lanes.
pub(crate) type Lanes = Mutex<HashMap<String, Arc<Lane>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data stays consistent when poisoned: queues are only pushed to
    // and taken whole.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Approvals {
    /// Stores `decided` in a group commit with the tenant's other pending
    /// decisions. `Some`: stored (the approval as stored); `None`: its
    /// approval changed since it was read (nothing written; decide again).
    pub(crate) async fn submit(&self, tenant: &str, decided: Decided) -> Result<Option<Approval>> {
        let (reply, mut done) = tokio::sync::oneshot::channel();
        let lane = lock(&self.inner.lanes)
            .entry(tenant.to_owned())
            .or_default()
            .clone();
        lock(&lane.queue).push(Job { decided, reply });
        {
            let _leader = lane.leader.lock().await;
            // A previous leader may have stored ours already.
            if let Ok(result) = done.try_recv() {
                return result;
            }
            let jobs = std::mem::take(&mut *lock(&lane.queue));
            if !jobs.is_empty() {
                // Spawned: a cancelled caller does not abort the others'.
                let this = self.clone();
                let tenant = tenant.to_owned();
                tokio::spawn(async move { this.commit_jobs(&tenant, jobs).await })
                    .await
                    .map_err(Error::internal)?;
            }
        }
        done.await
            .map_err(|_| Error::internal("a decision batch ended without an answer"))?
    }

    async fn commit_jobs(&self, tenant: &str, jobs: Vec<Job>) {
        let (mut decided, replies): (Vec<Decided>, Vec<_>) =
            jobs.into_iter().map(|j| (j.decided, j.reply)).unzip();
        let results = match self.commit_batch(tenant, &mut decided, false).await {
            Ok(results) => results,
            Err(e) => {
                // One by one, each receipt appended before its approval is
                // stored: a failure is then only its own decision's, and a
                // receipt found by its dedupe key (an earlier attempt's) is
                // the one its approval and event name.
                tracing::debug!(error = %e, n = decided.len(), "approvals: a decision batch failed; storing its decisions one by one");
                let mut results = Vec::with_capacity(decided.len());
                for d in &mut decided {
                    let one = std::slice::from_mut(d);
                    results.push(match self.commit_batch(tenant, one, true).await {
                        Ok(mut r) => r.pop().unwrap_or(Ok(false)),
                        Err(e) => Err(e),
                    });
                }
                results
            }
        };
        for ((d, reply), result) in decided.into_iter().zip(replies).zip(results) {
            let _ = reply.send(result.map(|stored| stored.then_some(d.a)));
        }
    }

    /// One transaction for `batch`: the outer error aborts it all; each
    /// decision's result says whether it was stored.
    async fn commit_batch(
        &self,
        tenant: &str,
        batch: &mut [Decided],
        receipts_first: bool,
    ) -> Result<Vec<Result<bool>>> {
        let tx = self.inner.store.write(tenant).await?;
        let (results, appended) = self.store_decisions(&tx, batch, receipts_first).await?;
        tx.commit().await?;
        if let Some(appended) = appended {
            appended.committed();
        }
        for (d, r) in batch.iter().zip(&results) {
            if matches!(r, Ok(true)) {
                self.changed(tenant, &d.a);
            }
        }
        Ok(results)
    }

    /// Stores one decision in `tx`, whose row lock the caller holds, and
    /// commits (cancellations and timers).
    pub(crate) async fn commit_locked(
        &self,
        tx: TenantTx,
        tenant: &str,
        a: &mut Approval,
        receipt: Option<String>,
        effect: Effect,
    ) -> Result<()> {
        let mut one = [Decided {
            a: a.clone(),
            read: None,
            effect,
            receipt,
            prepared: None,
        }];
        let result = self.commit_batch_in(tx, tenant, &mut one).await;
        let [d] = one;
        *a = d.a;
        result
    }

    async fn commit_batch_in(
        &self,
        tx: TenantTx,
        tenant: &str,
        batch: &mut [Decided],
    ) -> Result<()> {
        let (mut results, appended) = self.store_decisions(&tx, batch, true).await?;
        results.pop().unwrap_or(Ok(false))?;
        tx.commit().await?;
        if let Some(appended) = appended {
            appended.committed();
        }
        for d in batch.iter() {
            self.changed(tenant, &d.a);
        }
        Ok(())
    }

    /// Writes `batch` into `tx` without committing: locks the rows, keeps
    /// the decisions whose approval is still the version it was decided
    /// from (the first of a batch's decisions on one approval wins), stores
    /// the approvals with their receipt ids, their events, and the timers
    /// and notifications of stages that opened or escalated, and appends
    /// their receipts in `tx` when the log lives in this store. Returns each
    /// decision's result and the receipts to confirm after the commit.
    ///
    /// The receipts go last (the log's head stays locked from the append to
    /// the commit), under the ids they were signed with. Should one be
    /// found stored already by its dedupe key (an earlier attempt's, with
    /// another id), or refused, this fails as a whole; `receipts_first`
    /// then appends them before the approvals are stored, so the approval
    /// and its event name the receipt the log holds.
    async fn store_decisions(
        &self,
        tx: &TenantTx,
        batch: &mut [Decided],
        receipts_first: bool,
    ) -> Result<(Vec<Result<bool>>, Option<AppendedInTx>)> {
        let checked: Vec<&str> = batch
            .iter()
            .filter(|d| d.read.is_some())
            .map(|d| d.a.id.as_str())
            .collect();
        let stored_versions = repo::lock_versions(tx, &checked).await?;
        let mut taken = HashSet::new();
        let results: Vec<Result<bool>> = batch
            .iter()
            .map(|d| {
                let current = match d.read {
                    None => true,
                    Some(read) => stored_versions.get(&d.a.id) == Some(&read),
                };
                Ok(current && taken.insert(d.a.id.clone()))
            })
            .collect();
        let won = |i: usize| matches!(results[i], Ok(true));

        let in_tx = self
            .inner
            .receipts
            .as_ref()
            .filter(|r| r.appends_in_transaction());
        let mut prepared = Vec::new();
        for (i, d) in batch.iter_mut().enumerate() {
            if !won(i) {
                continue;
            }
            if let Some(id) = &d.receipt {
                set_receipt(&mut d.a, id.clone());
            } else if let Some(receipts) = in_tx {
                let p = match d.prepared.take() {
                    Some(p) => p,
                    None => receipting::prepare(receipts.as_ref(), tx.tenant_id(), &d.a)?,
                };
                set_receipt(&mut d.a, p.receipt_id.clone());
                prepared.push((i, p));
            }
        }
        let mut appended = None;
        if let Some(receipts) = in_tx.filter(|_| receipts_first && !prepared.is_empty()) {
            let (at, signed): (Vec<usize>, Vec<PreparedReceipt>) =
                std::mem::take(&mut prepared).into_iter().unzip();
            let out = receipts.append_in(tx, signed).await?;
            for (&i, receipt) in at.iter().zip(&out.receipts) {
                let receipt = receipt.as_ref().map_err(Clone::clone)?;
                set_receipt(&mut batch[i].a, receipt.receipt_id.clone());
            }
            appended = Some(out);
        }

        let winners: Vec<&Decided> = batch
            .iter()
            .enumerate()
            .filter(|&(i, _)| won(i))
            .map(|(_, d)| d)
            .collect();
        let approvals: Vec<&Approval> = winners.iter().map(|d| &d.a).collect();
        repo::save_many(tx, &approvals).await?;
        append_events(tx, &approvals).await?;
        for d in &winners {
            if matches!(d.effect, Effect::StageApproved | Effect::Escalated) {
                service::schedule(tx, &d.a).await?;
                // The opened (or escalated) stage has new approvers: tell
                // them, in the same transaction so the notice exists iff it
                // committed.
                notify::enqueue(tx, &self.inner.cfg.notify, &convert::approval(&d.a)).await?;
            }
        }

        if let Some(receipts) = in_tx.filter(|_| !prepared.is_empty()) {
            let (ids, signed): (Vec<String>, Vec<PreparedReceipt>) = prepared
                .into_iter()
                .map(|(_, p)| (p.receipt_id.clone(), p))
                .unzip();
            let out = receipts.append_in(tx, signed).await?;
            for (id, receipt) in ids.iter().zip(&out.receipts) {
                let receipt = receipt.as_ref().map_err(Clone::clone)?;
                if &receipt.receipt_id != id {
                    return Err(Error::new(
                        anumate_errors::ErrorCode::Unavailable,
                        "a decision's receipt was stored by an earlier attempt",
                    ));
                }
            }
            appended = Some(out);
        }
        Ok((results, appended))
    }
}

fn set_receipt(a: &mut Approval, receipt: String) {
    if let Some(last) = a.decisions.last_mut() {
        last.receipt_id = receipt;
    }
}

/// The events of the approvals' last decisions: the grants (the common
/// case) in one statement, the others one by one.
async fn append_events(tx: &TenantTx, approvals: &[&Approval]) -> Result<()> {
    let subjects: Vec<String> = approvals
        .iter()
        .map(|a| format!("approvals/{}", a.id))
        .collect();
    let mut grants = Vec::new();
    for (a, subject) in approvals.iter().zip(&subjects) {
        match convert::event_of_last(tx.tenant_id(), a) {
            Some(Event::Granted(e)) => grants.push((
                e,
                EventContext {
                    subject,
                    plan_hash: Some(&a.plan_hash),
                    traceparent: None,
                },
            )),
            _ => service::append_event(tx, a).await?,
        }
    }
    anumate_events::append_many(tx, &grants)
        .await
        .map_err(Error::internal)?;
    Ok(())
}
