//! Purging replay records no verification can need any more, and the
//! background task that does it periodically.

use anumate_errors::Result;
use anumate_service::CancellationToken;

use crate::{CapTokens, repo, unix_now};

impl CapTokens {
    /// Deletes replay records that no verification can need any more (`exp`
    /// plus leeway has passed: such tokens are rejected as expired first).
    /// Returns how many.
    pub async fn purge_replay(&self) -> Result<u64> {
        let cutoff = unix_now().saturating_sub(self.inner.leeway);
        let tenants = {
            let tx = self.inner.store.system_read().await?;
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
