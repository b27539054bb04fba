//! The orchestrator as the binary composes it.

use std::sync::Arc;

use anumate_proto::orchestrator::v1 as pb;
use anumate_service::clients::{
    ApprovalsClient, CapTokensClient, CompilerClient, ConnectorHubClient, GhostRunClient, Grpc,
    PolicyClient, ReceiptsClient, RegistryClient, TenantSettingsClient,
};
use anumate_service::{BuildError, Context, Module, ServiceModule, no_keys};

use crate::worker::CapTokens;
use crate::{Orchestrator, OrchestratorConfig, OrchestratorGrpc, Upstreams};

/// The orchestrator module. Upstreams are in-process when their module was
/// built before and provides a client, else gRPC at `[orchestrator] *_url`
/// (empty: this server's own listener), presenting a delegated
/// `svc:orchestrator` token for the run's starter.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<OrchestratorConfig> {
        name: pb::orchestrator_service_server::SERVICE_NAME,
        section: "orchestrator",
        about: "Orchestrator: durable, governed execution of plans",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: no_keys,
        build,
    })
}

fn build(ctx: &mut Context, cfg: OrchestratorConfig) -> Result<(), BuildError> {
    let store = ctx.store("orchestrator")?;
    let issuer = match ctx.service_issuer() {
        Some(issuer) => Some(
            issuer
                .for_service(crate::SERVICE_NAME)
                .map_err(|e| BuildError::service("orchestrator", e))?,
        ),
        None => None,
    };
    let grpc = |channel| {
        let client = Grpc::new(channel);
        Arc::new(match &issuer {
            Some(issuer) => client.with_service_issuer(issuer.clone()),
            None => client,
        })
    };
    let compiler =
        ctx.upstream::<dyn CompilerClient>("orchestrator.compiler_url", &cfg.compiler_url, |c| {
            grpc(c)
        })?;
    let policy =
        ctx.upstream::<dyn PolicyClient>("orchestrator.policy_url", &cfg.policy_url, |c| grpc(c))?;
    let approvals = ctx.upstream::<dyn ApprovalsClient>(
        "orchestrator.approvals_url",
        &cfg.approvals_url,
        |c| grpc(c),
    )?;
    let hub = ctx.upstream::<dyn ConnectorHubClient>(
        "orchestrator.connectors_url",
        &cfg.connectors_url,
        |c| grpc(c),
    )?;
    let ghostrun =
        ctx.upstream::<dyn GhostRunClient>("orchestrator.ghostrun_url", &cfg.ghostrun_url, |c| {
            grpc(c)
        })?;
    let receipts =
        ctx.upstream::<dyn ReceiptsClient>("orchestrator.receipts_url", &cfg.receipts_url, |c| {
            grpc(c)
        })?;
    let settings = ctx.upstream::<dyn TenantSettingsClient>(
        "orchestrator.registry_url",
        &cfg.registry_url,
        |c| grpc(c),
    )?;
    let tokens = ctx.upstream::<dyn CapTokensClient>(
        "orchestrator.captokens_url",
        &cfg.captokens_url,
        |c| grpc(c),
    )?;
    let captokens =
        ctx.upstream::<CapTokens>("orchestrator.captokens_url", &cfg.captokens_url, |c| {
            Arc::new(CapTokens::new(c, issuer.clone()))
        })?;
    // Capsule labels from the registry and `env` from `[ghostrun]
    // policy_env`: the same loader and key GhostRun uses.
    let registry =
        ctx.upstream::<dyn RegistryClient>("orchestrator.registry_url", &cfg.registry_url, |c| {
            grpc(c)
        })?;
    let env = ctx
        .section::<anumate_ghostrun::GhostRunConfig>("ghostrun")?
        .policy_env;
    let plans =
        anumate_ghostrun::Loader::new(compiler.clone(), policy.clone(), Some(registry), &env);
    let orchestrator = Orchestrator::new(
        store,
        Upstreams {
            plans,
            compiler,
            policy,
            approvals,
            hub,
            ghostrun,
            receipts,
            settings,
            tokens,
            captokens: (*captokens).clone(),
        },
        cfg,
    );
    // In one process, an approval's decision wakes the waiting step at once
    // (the approvals service broadcasts its committed changes); polling
    // stays the fallback across processes.
    if let Some(approvals) = ctx.get::<anumate_approvals::Approvals>() {
        let mut changes = approvals.subscribe();
        let nudged = orchestrator.clone();
        ctx.tasks
            .spawn("orchestrator approval nudges", |cancel| async move {
                loop {
                    let change = tokio::select! {
                        () = cancel.cancelled() => break,
                        c = changes.recv() => c,
                    };
                    match change {
                        Ok(c)
                            if c.state != anumate_proto::approvals::v1::ApprovalState::Pending =>
                        {
                            nudged.nudge(&c.tenant, &c.approval_id).await;
                        }
                        Ok(_) => {}
                        // Missed changes are found by the poll.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
                Ok(())
            });
    }
    let workers = orchestrator.clone();
    ctx.tasks
        .spawn("orchestrator workers", |cancel| async move {
            workers.run_workers(cancel).await;
            Ok(())
        });
    ctx.provide(orchestrator.clone());
    ctx.routes
        .add_service(OrchestratorGrpc::new(orchestrator).into_server());
    Ok(())
}
