//! Storing decisions: each decided approval with its receipt, its event, its
//! new timers and notifications, in one transaction.
//!
//! Decisions of one tenant are group-committed ([`Approvals::submit`]): each
//! caller decides on the approval as it read it, signs its receipt, and
//! queues the result; one of them (the leader) takes the whole queue and
//! stores it in one transaction, so concurrent decisions share one commit
//! (one WAL flush on PostgreSQL) and, with the receipts log in this process,
//! one append to the log. A decision is stored only if its approval is still
//! the version it was decided from; one that lost to another (of the same
//! batch or not) is decided again on the fresh approval by its caller. If a
//! batch fails as a whole, its decisions are stored one by one, so one
//! decision's failure is only its own.
//!
//! Batches are pipelined: the receipts go last, and only the append and the
//! commit take the tenant's commit turn, so the next batch stores its
//! approvals and events while this one commits. The turns keep the appends
//! in order, so each finds the log where the previous batch left it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anumate_errors::{Error, Result};
use anumate_events::EventContext;
use anumate_service::clients::{AppendedInTx, PreparedReceipt, ReceiptsClient};
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

/// One tenant's queue of decisions, the lock its batch leader holds while a
/// batch forms and stores its approvals, and the commit turn.
#[derive(Default)]
pub(crate) struct Lane {
    queue: Mutex<Vec<Job>>,
    leader: tokio::sync::Mutex<()>,
    turn: tokio::sync::Mutex<()>,
}

/// Per-tenant lanes.
pub(crate) type Lanes = Mutex<HashMap<String, Arc<Lane>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data stays consistent when poisoned: queues are only pushed to
    // and taken whole.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Told when a batch holds its commit turn (or ended): the next may form.
type Staged = Option<tokio::sync::oneshot::Sender<()>>;

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
            // A previous batch may have stored ours already.
            if let Ok(result) = done.try_recv() {
                return result;
            }
            let jobs = std::mem::take(&mut *lock(&lane.queue));
            if !jobs.is_empty() {
                // Spawned: a cancelled caller does not abort the others'.
                let (staged, ready) = tokio::sync::oneshot::channel();
                let this = self.clone();
                let tenant = tenant.to_owned();
                let lane = lane.clone();
                tokio::spawn(async move {
                    this.commit_jobs(&tenant, &lane, jobs, Some(staged)).await;
                });
                // An error or a dropped sender alike: the batch moved on.
                let _ = ready.await;
            }
        }
        done.await
            .map_err(|_| Error::internal("a decision batch ended without an answer"))?
    }

    async fn commit_jobs(&self, tenant: &str, lane: &Lane, jobs: Vec<Job>, mut staged: Staged) {
        let (mut decided, replies): (Vec<Decided>, Vec<_>) =
            jobs.into_iter().map(|j| (j.decided, j.reply)).unzip();
        let first = self
            .commit_batch(tenant, lane, &mut decided, &mut staged)
            .await;
        drop(staged);
        let results = match first {
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
                    results.push(match self.commit_first(tenant, one).await {
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

    /// One transaction for `batch`, receipts last, committed in the lane's
    /// turn (`staged` is told once the turn is held): the outer error aborts
    /// it all; each decision's result says whether it was stored.
    async fn commit_batch(
        &self,
        tenant: &str,
        lane: &Lane,
        batch: &mut [Decided],
        staged: &mut Staged,
    ) -> Result<Vec<Result<bool>>> {
        let tx = self.inner.store.write(tenant).await?;
        let (results, prepared) = self.store_approvals(&tx, batch).await?;
        let _turn = lane.turn.lock().await;
        if let Some(s) = staged.take() {
            let _ = s.send(());
        }
        let appended = self.append_last(&tx, prepared).await?;
        tx.commit().await?;
        self.committed(tenant, batch, &results, appended);
        Ok(results)
    }

    /// One transaction for `batch`, each receipt appended before its
    /// approval is stored.
    async fn commit_first(&self, tenant: &str, batch: &mut [Decided]) -> Result<Vec<Result<bool>>> {
        let tx = self.inner.store.write(tenant).await?;
        let (results, appended) = self.store_receipts_first(&tx, batch).await?;
        tx.commit().await?;
        self.committed(tenant, batch, &results, appended);
        Ok(results)
    }

    /// After a commit: the log's new head, and the waiters.
    fn committed(
        &self,
        tenant: &str,
        batch: &[Decided],
        results: &[Result<bool>],
        appended: Option<AppendedInTx>,
    ) {
        if let Some(appended) = appended {
            appended.committed();
        }
        for (d, r) in batch.iter().zip(results) {
            if matches!(r, Ok(true)) {
                crate::metrics::decided(&d.a, &d.effect);
                self.changed(tenant, &d.a);
            }
        }
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
        let (mut results, appended) = self.store_receipts_first(&tx, &mut one).await?;
        results.pop().unwrap_or(Ok(false))?;
        tx.commit().await?;
        self.committed(tenant, &one, &[Ok(true)], appended);
        let [d] = one;
        *a = d.a;
        Ok(())
    }

    fn in_tx(&self) -> Option<&Arc<dyn ReceiptsClient>> {
        self.inner
            .receipts
            .as_ref()
            .filter(|r| r.appends_in_transaction())
    }

    /// Gives `d` its receipt id: the one appended before the transaction,
    /// or the one its receipt is (or now gets) signed with. Returns the
    /// signed receipt to append in the transaction.
    fn sign(&self, tenant: &str, d: &mut Decided) -> Result<Option<PreparedReceipt>> {
        if let Some(id) = &d.receipt {
            set_receipt(&mut d.a, id.clone());
            return Ok(None);
        }
        let Some(receipts) = self.in_tx() else {
            return Ok(None);
        };
        let p = match d.prepared.take() {
            Some(p) => p,
            None => receipting::prepare(receipts.as_ref(), tenant, &d.a)?,
        };
        set_receipt(&mut d.a, p.receipt_id.clone());
        Ok(Some(p))
    }

    /// The receipts-last half of a batch, in `tx`: stores each approval only
    /// if it is still the version it was decided from (the first of a
    /// batch's decisions on one approval is the only candidate), under the
    /// receipt id it was signed with, and the winners' events, timers and
    /// notifications. Returns each decision's result and the winners'
    /// receipts, for [`Approvals::append_last`].
    async fn store_approvals(
        &self,
        tx: &TenantTx,
        batch: &mut [Decided],
    ) -> Result<(Vec<Result<bool>>, Vec<PreparedReceipt>)> {
        let mut seen = HashSet::new();
        let mut candidates = Vec::new();
        let mut signed = HashMap::new();
        for (i, d) in batch.iter_mut().enumerate() {
            if seen.insert(d.a.id.clone()) {
                if let Some(p) = self.sign(tx.tenant_id(), d)? {
                    signed.insert(i, p);
                }
                candidates.push(i);
            }
        }
        let items: Vec<(&Approval, Option<i64>)> = candidates
            .iter()
            .map(|&i| (&batch[i].a, batch[i].read))
            .collect();
        let stored = repo::save_many_if(tx, &items).await?;
        let results: Vec<Result<bool>> = batch
            .iter()
            .enumerate()
            .map(|(i, d)| Ok(candidates.contains(&i) && stored.contains(&d.a.id)))
            .collect();
        let prepared = (0..batch.len())
            .filter(|&i| matches!(results[i], Ok(true)))
            .filter_map(|i| signed.remove(&i))
            .collect();
        self.store_rest(tx, batch, &results).await?;
        Ok((results, prepared))
    }

    /// The winners' events, and the timers and notifications of stages that
    /// opened or escalated.
    async fn store_rest(
        &self,
        tx: &TenantTx,
        batch: &[Decided],
        results: &[Result<bool>],
    ) -> Result<()> {
        let winners: Vec<&Decided> = batch
            .iter()
            .zip(results)
            .filter(|(_, r)| matches!(r, Ok(true)))
            .map(|(d, _)| d)
            .collect();
        let approvals: Vec<&Approval> = winners.iter().map(|d| &d.a).collect();
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
        Ok(())
    }

    /// Appends the stored decisions' receipts in `tx`, last before its
    /// commit (the log's head stays locked from here to the commit). A
    /// receipt refused, or found stored already by its dedupe key (an
    /// earlier attempt's, under another id than the approval names), fails
    /// the batch: it is then stored one by one, receipts first.
    async fn append_last(
        &self,
        tx: &TenantTx,
        prepared: Vec<PreparedReceipt>,
    ) -> Result<Option<AppendedInTx>> {
        let Some(receipts) = self.in_tx().filter(|_| !prepared.is_empty()) else {
            return Ok(None);
        };
        let ids: Vec<String> = prepared.iter().map(|p| p.receipt_id.clone()).collect();
        let out = receipts.append_in(tx, prepared).await?;
        for (id, receipt) in ids.iter().zip(&out.receipts) {
            let receipt = receipt.as_ref().map_err(Clone::clone)?;
            if &receipt.receipt_id != id {
                return Err(Error::new(
                    anumate_errors::ErrorCode::Unavailable,
                    "a decision's receipt was stored by an earlier attempt",
                ));
            }
        }
        Ok(Some(out))
    }

    /// Writes `batch` into `tx` without committing, each receipt appended
    /// (in `tx`, when the log lives in this store) before its approval is
    /// stored, so the approval and its event name the receipt the log holds
    /// even when an earlier attempt's is found by its dedupe key. Locks the
    /// rows first and keeps the decisions whose approval is still the
    /// version it was decided from (rows the caller locked: all).
    async fn store_receipts_first(
        &self,
        tx: &TenantTx,
        batch: &mut [Decided],
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
        let mut at = Vec::new();
        let mut prepared = Vec::new();
        for (i, d) in batch.iter_mut().enumerate() {
            if matches!(results[i], Ok(true))
                && let Some(p) = self.sign(tx.tenant_id(), d)?
            {
                at.push(i);
                prepared.push(p);
            }
        }
        let mut appended = None;
        if let Some(receipts) = self.in_tx().filter(|_| !prepared.is_empty()) {
            let out = receipts.append_in(tx, prepared).await?;
            for (&i, receipt) in at.iter().zip(&out.receipts) {
                let receipt = receipt.as_ref().map_err(Clone::clone)?;
                set_receipt(&mut batch[i].a, receipt.receipt_id.clone());
            }
            appended = Some(out);
        }
        let winners: Vec<&Approval> = batch
            .iter()
            .zip(&results)
            .filter(|(_, r)| matches!(r, Ok(true)))
            .map(|(d, _)| &d.a)
            .collect();
        repo::save_many(tx, &winners).await?;
        self.store_rest(tx, batch, &results).await?;
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
