//! Durable timers: each stage's expiry (escalation or the end) and its
//! reminder are rows of `approval_timers`, written in the transaction that
//! opens the stage, so they survive restarts.
//!
//! Exactly once: a timer row belongs to one timer generation of its approval
//! (bumped whenever a stage opens or escalates). Firing re-reads the
//! approval under its row lock and acts only when the approval is still
//! pending in that generation and past its expiry; the change, its event and
//! the next generation's timers commit together. So a timer that fires again
//! (after a crash between the change and the timer's removal, or on a second
//! replica) finds nothing to do. On PostgreSQL replicas also claim due rows
//! with `FOR UPDATE SKIP LOCKED`, so they share the work instead of
//! repeating it; on SQLite one worker runs per database.

use anumate_errors::Result;
use anumate_service::CancellationToken;

use crate::repo::{self, Timer};
use crate::rules::{self, Effect};
use crate::{Approvals, convert, notify};

/// Timers handled per pass.
const BATCH: i64 = 64;

impl Approvals {
    /// Fires every due timer once. Returns how many were handled.
    pub async fn fire_due(&self) -> Result<usize> {
        let now = self.now();
        if self.inner.store.backend() == anumate_store::Backend::Sqlite {
            // A claim would hold SQLite's only write lock while the tenant's
            // transaction waits for it: read, let go, then act.
            let due = {
                let tx = self.inner.store.system_read().await?;
                repo::due_timers(&tx, now, BATCH).await?
            };
            let mut fired = 0;
            for t in &due {
                // A failed timer stays for the next pass.
                if self.fire_logged(t).await {
                    let tx = self.inner.store.system_write().await?;
                    repo::delete_timer(&tx, t).await?;
                    tx.commit().await?;
                    fired += 1;
                }
            }
            return Ok(fired);
        }
        let claim = self.inner.store.system_write().await?;
        let due = repo::due_timers(&claim, now, BATCH).await?;
        let mut fired = 0;
        for t in &due {
            if self.fire_logged(t).await {
                repo::delete_timer(&claim, t).await?;
                fired += 1;
            }
        }
        claim.commit().await?;
        Ok(fired)
    }

    /// Fires `t`; false (logged) when it failed and should be retried.
    async fn fire_logged(&self, t: &Timer) -> bool {
        match self.fire(t).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(approval = %t.approval_id, kind = %t.kind, error = %e, "approvals: timer failed; retried next pass");
                false
            }
        }
    }

    async fn fire(&self, t: &Timer) -> Result<()> {
        let now = self.now();
        let Some(a) = ({
            let tx = self.inner.store.read(&t.tenant).await?;
            repo::load(&tx, &t.approval_id, false).await?
        }) else {
            return Ok(());
        };
        if t.kind == repo::REMIND {
            if a.status != rules::Status::Pending || a.timer_gen != t.generation {
                return Ok(());
            }
            let tx = self.inner.store.write(&t.tenant).await?;
            notify::enqueue(&tx, &self.inner.cfg.notify, &convert::approval(&a)).await?;
            tx.commit().await?;
            return Ok(());
        }
        let Some(what) = rules::due_expiry(&a, t.generation, now) else {
            return Ok(());
        };
        let mut planned = a;
        rules::expire(&mut planned, what, now)?;
        let receipt = self.receipt_first(&t.tenant, &planned).await?;
        let tx = self.inner.store.write(&t.tenant).await?;
        let Some(mut fresh) = repo::load(&tx, &t.approval_id, true).await? else {
            return Ok(());
        };
        if rules::due_expiry(&fresh, t.generation, now) != Some(what) {
            // Decided, or fired by another replica, in the meantime.
            return Ok(());
        }
        let effect = rules::expire(&mut fresh, what, now)?;
        self.commit_locked(tx, &t.tenant, &mut fresh, receipt, effect)
            .await?;
        if effect == Effect::Escalated {
            tracing::info!(approval = %t.approval_id, "approvals: stage escalated on expiry");
        }
        Ok(())
    }

    /// Runs [`Approvals::fire_due`] every `timer_interval_ms` until `cancel`
    /// is cancelled. Failures are logged and retried next tick.
    pub async fn run_timers(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.timer_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.fire_due().await {
                tracing::warn!(error = %e, "approvals: timer pass failed");
            }
        }
    }
}
