//! Webhook notifications of approval requests (`[approvals.notify]`).
//!
//! A stub until the notifier lands: nothing is configured, nothing is sent.

use std::future::Future;
use std::pin::Pin;

use anumate_errors::Error;
use anumate_proto::approvals::v1 as pb;
use anumate_service::{CancellationToken, TaskError};
use anumate_store::{Migration, Store, TenantTx};
use serde::{Deserialize, Serialize};

/// The notifier's tables.
pub const MIGRATIONS: &[Migration] = &[];

/// `[approvals.notify]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {}

/// Records the deliveries of `approval`'s notification in `tx` (the
/// transaction that opens it, or a reminder's); a no-op when no webhook is
/// configured.
pub async fn enqueue(
    _tx: &TenantTx,
    _config: &NotifyConfig,
    _approval: &pb::Approval,
) -> Result<(), Error> {
    Ok(())
}

/// The supervised task that delivers recorded notifications.
pub type NotifyTask = Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + 'static>>;

/// The delivery task over `store` (spawn it with `Tasks::spawn`).
pub fn task(_store: Store, _config: NotifyConfig) -> impl FnOnce(CancellationToken) -> NotifyTask {
    |cancel: CancellationToken| -> NotifyTask {
        Box::pin(async move {
            cancel.cancelled().await;
            Ok(())
        })
    }
}
