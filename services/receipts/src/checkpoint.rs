//! Signed checkpoints: reading them, and the publisher that signs a note for
//! each tenant whose log grew.

use std::time::Duration;

use anumate_errors::{Error, Reason, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::receipts::v1 as pb;
use anumate_receipt::{Checkpoint, CompactRange, NoteSigner};
use anumate_service::CancellationToken;

use crate::proofs::with_nodes;
use crate::{Actor, CHECKPOINT_ACTOR, Receipts, origin, repo, size_param, timestamp};

pub(crate) fn checkpoint_proto(tenant: &str, row: &repo::CheckpointRow) -> pb::Checkpoint {
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

impl Receipts {
    /// The latest checkpoint (`tree_size` 0) or the one of `tree_size`.
    pub async fn checkpoint(&self, actor: &Actor, tree_size: i64) -> Result<pb::Checkpoint> {
        let size = size_param("tree_size", tree_size)?;
        let tx = self.store.read(&actor.tenant).await?;
        let row = Self::find_checkpoint(&tx, size).await?;
        Ok(checkpoint_proto(&actor.tenant, &row))
    }

    pub(crate) async fn find_checkpoint(
        tx: &anumate_store::TenantTx,
        size: Option<u64>,
    ) -> Result<repo::CheckpointRow> {
        repo::checkpoint(tx, size).await?.ok_or_else(|| {
            let message = match size {
                Some(s) => format!("no checkpoint was published at tree size {s}"),
                None => "no checkpoint has been published yet".to_owned(),
            };
            Error::because(Reason::CheckpointNotFound, message)
        })
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
        // `receipt_logs` has no row-level security: a system transaction sees every head.
        let tenants = {
            let tx = self.store.system_read().await?;
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
