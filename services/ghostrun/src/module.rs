//! GhostRun as the binary composes it.

use std::sync::Arc;

use anumate_proto::ghostrun::v1 as pb;
use anumate_service::clients::{
    CompilerClient, Grpc, PolicyClient, RegistryClient, TenantSettingsClient,
};
use anumate_service::{BuildError, Context, Module, ServiceModule, no_keys};

use crate::{GhostRun, GhostRunConfig, GhostRunGrpc};

/// The GhostRun module. Plans come from the compiler, policies from the
/// policy service, the tenant's settings (the citation expiry) and the
/// capsule labels policies see from the registry: each in process when that module was built before GhostRun in
/// this process (no socket), else over gRPC at `[ghostrun] compiler_url`,
/// `policy_url` and `registry_url` (empty: this server's own listener).
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<GhostRunConfig> {
        name: pb::ghost_run_service_server::SERVICE_NAME,
        section: "ghostrun",
        about: "GhostRun preflight: deterministic simulation of a plan",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: no_keys,
        build,
    })
}

fn build(ctx: &mut Context, cfg: GhostRunConfig) -> Result<(), BuildError> {
    let store = ctx.store("ghostrun")?;
    let issuer = match ctx.service_issuer() {
        Some(issuer) => Some(
            issuer
                .for_service(crate::SERVICE_NAME)
                .map_err(|e| BuildError::service("ghostrun", e))?,
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
    let compiler = ctx.upstream::<dyn CompilerClient>(
        "ghostrun.compiler_url",
        &cfg.compiler_url,
        |channel| grpc(channel),
    )?;
    let policy =
        ctx.upstream::<dyn PolicyClient>("ghostrun.policy_url", &cfg.policy_url, |channel| {
            grpc(channel)
        })?;
    let settings = ctx.upstream::<dyn TenantSettingsClient>(
        "ghostrun.registry_url",
        &cfg.registry_url,
        |channel| grpc(channel),
    )?;
    let registry = ctx.upstream::<dyn RegistryClient>(
        "ghostrun.registry_url",
        &cfg.registry_url,
        |channel| grpc(channel),
    )?;
    let ghostrun = GhostRun::new(store, compiler, policy, cfg)
        .with_settings(settings)
        .with_registry(registry);
    ctx.provide(ghostrun.clone());
    ctx.routes
        .add_service(GhostRunGrpc::new(ghostrun).into_server());
    Ok(())
}
