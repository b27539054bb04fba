//! `WatchApprovals`: the tenant's approval events as they commit, read from
//! the outbox (so a resumed stream sees what happened while it was away, as
//! long as the outbox keeps the rows), each sent with the approval as it is
//! then.
//!
//! On PostgreSQL an outbox `seq` can commit after a higher one, so each pass
//! re-reads a window of `LOOKBACK` positions below the highest sent and skips
//! those already sent: a late row is sent late rather than never.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use anumate_errors::{Error, Reason, Result};
use anumate_proto::approvals::v1 as pb;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc;

use crate::{Approvals, Caller, convert, repo};

/// Outbox positions re-read below the highest sent.
const LOOKBACK: i64 = 256;
/// Rows per read (more than the window, so a full read has new rows).
const BATCH: i64 = 1024;

/// The open watch streams of a process: in total and per tenant.
#[derive(Debug, Default)]
pub(crate) struct Open(Mutex<(usize, HashMap<String, usize>)>);

/// One open stream's place in [`Open`], given back when dropped.
struct Slot {
    open: Arc<Open>,
    tenant: String,
}

impl Open {
    fn take(self: &Arc<Self>, tenant: &str, max: usize, per_tenant: usize) -> Result<Slot> {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, tenants) = &mut *g;
        let mine = tenants.get(tenant).copied().unwrap_or(0);
        if mine >= per_tenant.max(1) {
            return Err(Error::because(
                Reason::RateLimited,
                format!(
                    "too many open approval watches for this tenant ({mine}): close one and retry"
                ),
            )
            .with_metadata("limit", "max_watches_per_tenant"));
        }
        if *total >= max.max(1) {
            return Err(Error::because(
                Reason::RateLimited,
                format!("too many open approval watches (at most {max} per server)"),
            )
            .with_metadata("limit", "max_watches"));
        }
        *total += 1;
        tenants.insert(tenant.to_owned(), mine + 1);
        Ok(Slot {
            open: self.clone(),
            tenant: tenant.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.open.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, tenants) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = tenants.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                tenants.remove(&self.tenant);
            }
        }
    }
}

/// Items of a watch stream.
pub type WatchItem = std::result::Result<pb::WatchApprovalsResponse, tonic::Status>;

impl Approvals {
    /// Starts a watch for `caller`'s tenant: a receiver of changes after
    /// `r.after_sequence` (0: from now on). The feeding task ends when the
    /// receiver is dropped.
    pub async fn watch(
        &self,
        caller: &Caller,
        r: &pb::WatchApprovalsRequest,
    ) -> Result<mpsc::Receiver<WatchItem>> {
        if r.after_sequence < 0 {
            return Err(Error::invalid_argument(
                "after_sequence",
                "must not be negative",
            ));
        }
        let cfg = &self.inner.cfg;
        let slot =
            self.inner
                .watches
                .take(&caller.tenant, cfg.max_watches, cfg.max_watches_per_tenant)?;
        let start = if r.after_sequence == 0 {
            let tx = self.inner.store.read(&caller.tenant).await?;
            repo::outbox_head(&tx).await?
        } else {
            r.after_sequence
        };
        let (tx, rx) = mpsc::channel(64);
        let me = self.clone();
        let tenant = caller.tenant.clone();
        let run = r.run_id.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = me.feed(&tenant, &run, start, &tx).await {
                let _ = tx.send(Err(e.to_status())).await;
            }
        });
        Ok(rx)
    }

    async fn feed(
        &self,
        tenant: &str,
        run: &str,
        start: i64,
        out: &mpsc::Sender<WatchItem>,
    ) -> Result<()> {
        let mut changes = self.subscribe();
        let mut high = start;
        let mut sent: BTreeSet<i64> = BTreeSet::new();
        loop {
            let floor = start.max(high - LOOKBACK);
            let (rows, full) = {
                let tx = self.inner.store.read(tenant).await?;
                let skip: Vec<i64> = sent.range(floor + 1..).copied().collect();
                let marks = repo::outbox_after(&tx, floor, &skip, BATCH).await?;
                let full = marks.len() as i64 >= BATCH;
                let marks: Vec<repo::OutboxMark> = marks
                    .into_iter()
                    .filter(|m| !sent.contains(&m.seq))
                    .collect();
                let ids: Vec<&str> = marks
                    .iter()
                    .map(|m| m.subject.strip_prefix("approvals/").unwrap_or_default())
                    .collect();
                // The approvals of the pass in one read.
                let approvals = repo::load_many(&tx, &ids).await?;
                let items: Vec<_> = marks
                    .iter()
                    .zip(&ids)
                    .map(|(m, id)| (m.seq, m.event_type.clone(), approvals.get(*id).cloned()))
                    .collect();
                (items, full)
            };
            for (seq, event_type, approval) in rows {
                sent.insert(seq);
                high = high.max(seq);
                let Some(a) = approval else { continue };
                if !run.is_empty() && a.run_id != run {
                    continue;
                }
                let item = pb::WatchApprovalsResponse {
                    sequence: seq,
                    event_type,
                    approval: Some(convert::approval(&a)),
                };
                if out.send(Ok(item)).await.is_err() {
                    return Ok(());
                }
            }
            let keep_from = high - LOOKBACK;
            sent = sent.split_off(&keep_from);
            if full {
                continue;
            }
            let poll = tokio::time::sleep(self.watch_poll());
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    _ = out.closed() => return Ok(()),
                    _ = &mut poll => break,
                    change = changes.recv() => match change {
                        // Another tenant's change has nothing for this
                        // stream: keep waiting rather than re-read the outbox.
                        Ok(c) if c.tenant != tenant => {}
                        Ok(_) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return Ok(()),
                    },
                }
            }
            // One pass reads every change committed so far: the wake-ups
            // queued meanwhile need no pass of their own.
            loop {
                match changes.try_recv() {
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return Ok(()),
                }
            }
        }
    }
}
