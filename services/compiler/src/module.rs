//! The compiler as the binary composes it.

use std::sync::Arc;

use anumate_proto::compiler::v1 as pb;
use anumate_service::clients::{Grpc, PolicyClient, RegistryClient};
use anumate_service::{BuildError, Context, Module, ServiceModule, no_keys};

use crate::{Compiler, CompilerConfig, CompilerGrpc, Upstreams};

/// The compiler module. Its upstreams are the registry and the policy
/// service of this process when they were built before it (in-process, no
/// socket), else gRPC clients of `[compiler] registry_url` / `policy_url`.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<CompilerConfig> {
        name: pb::compiler_service_server::SERVICE_NAME,
        section: "compiler",
        about: "Plan compiler: capsules into executable plans",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: no_keys,
        build,
    })
}

fn build(ctx: &mut Context, cfg: CompilerConfig) -> Result<(), BuildError> {
    let store = ctx.store("compiler")?;
    // Over gRPC the compiler reads as itself acting for the caller, when the
    // platform's service keys are configured (else it forwards the caller's token).
    let issuer = match ctx.service_issuer() {
        Some(issuer) => Some(
            issuer
                .for_service(crate::SERVICE_NAME)
                .map_err(|e| BuildError::service("compiler", e))?,
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
    let registry = ctx.upstream::<dyn RegistryClient>(
        "compiler.registry_url",
        &cfg.registry_url,
        |channel| grpc(channel),
    )?;
    let policy =
        ctx.upstream::<dyn PolicyClient>("compiler.policy_url", &cfg.policy_url, |channel| {
            grpc(channel)
        })?;
    let compiler = Compiler::new(store, Upstreams::new(registry, policy), &cfg)
        .map_err(|e| BuildError::service("compiler", e))?;
    ctx.routes
        .add_service(CompilerGrpc::new(compiler).into_server());
    Ok(())
}
