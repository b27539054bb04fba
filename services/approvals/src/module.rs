//! The approvals service as the binary composes it.

use std::sync::Arc;

use anumate_proto::approvals::v1 as pb;
use anumate_service::clients::{self, Grpc, ReceiptsClient};
use anumate_service::{BuildError, Context, Module, ServiceModule, no_keys};

use crate::{Approvals, ApprovalsConfig, ApprovalsGrpc, RECEIPTS_SERVICE_NAME, notify};

/// The approvals service module: `ApprovalsService` and the service-only
/// `ApprovalsInternal` on the same server. It provides [`Approvals`] (the
/// orchestrator waits on it in-process) and runs the timer worker and the
/// webhook notifier. Decisions are receipted by the receipts service of this
/// process (built before it), else by the one at `[approvals] receipts_url`.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<ApprovalsConfig> {
        name: pb::approvals_service_server::SERVICE_NAME,
        section: "approvals",
        about: "Approvals: quorum, stages, delegation, expiry and escalation",
        migrations: MIGRATIONS.as_slice(),
        missing_keys: no_keys,
        build,
    })
}

/// The approvals tables followed by the notifier's.
static MIGRATIONS: std::sync::LazyLock<Vec<anumate_store::Migration>> =
    std::sync::LazyLock::new(crate::own_migrations);

fn build(ctx: &mut Context, cfg: ApprovalsConfig) -> Result<(), BuildError> {
    // Refused here, before anything starts, rather than when the notifier
    // task first runs (the server would be up and never notify).
    cfg.notify
        .validate()
        .map_err(|e| BuildError::service("[approvals.notify]", e))?;
    let store = ctx.store("approvals")?;
    let notify_cfg = cfg.notify.clone();
    let mut approvals = Approvals::new(store.clone(), cfg.clone());
    if let Some(receipts) = ctx.get::<Arc<dyn ReceiptsClient>>() {
        approvals = approvals.with_receipts(receipts.clone());
    } else if !cfg.receipts_url.is_empty() {
        // Appended as the approvals service identity (the only one the
        // receipts service takes APPROVAL_DECISION from).
        let issuer = ctx
            .service_issuer()
            .ok_or_else(|| {
                BuildError::failed(
                    "[approvals] receipts_url",
                    "needs the platform's service keys ([keys] service_key_files)",
                )
            })?
            .for_service(RECEIPTS_SERVICE_NAME)
            .map_err(|e| BuildError::service("approvals service", e))?;
        let channel = clients::channel("approvals.receipts_url", &cfg.receipts_url)
            .map_err(|e| BuildError::service("approvals service", e))?;
        approvals =
            approvals.with_receipts(Arc::new(Grpc::new(channel).with_service_issuer(issuer)));
    } else {
        tracing::warn!(
            "approvals: no receipts service in this process and no [approvals] receipts_url: decisions are not receipted"
        );
    }
    let timers = approvals.clone();
    ctx.tasks.spawn("approvals timers", |cancel| async move {
        timers.run_timers(cancel).await;
        Ok(())
    });
    ctx.tasks
        .spawn("approvals notifier", notify::task(store, notify_cfg));
    ctx.provide(approvals.clone());
    let grpc = ApprovalsGrpc::new(approvals);
    ctx.routes.add_service(grpc.clone().into_internal_server());
    ctx.routes.add_service(grpc.into_server());
    Ok(())
}
