//! Retention: receipt bodies older than their tenant's retention are
//! removed; tree nodes, statements, signatures and checkpoints stay, so proofs
//! keep verifying.

use anumate_errors::Result;

use crate::{Receipts, repo};

impl Receipts {
    /// Removes receipt bodies older than each tenant's retention, as of
    /// `now_micros`; returns how many were removed. Tree nodes, statements,
    /// signatures and checkpoints stay: proofs keep verifying.
    pub async fn apply_retention(&self, now_micros: i64) -> Result<u64> {
        let tenants = {
            let tx = self.store.system_read().await?;
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
}
