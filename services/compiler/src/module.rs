//! The compiler as the binary composes it, and its in-process client.

use std::sync::Arc;

use anumate_proto::compiler::v1 as pb;
use anumate_service::clients::{
    BoxFuture, Caller, CompilerClient, Grpc, PolicyClient, RegistryClient, UpstreamResult,
};
use anumate_service::{BuildError, Context, Module, ServiceModule, no_keys};

use crate::{Actor, Compiler, CompilerConfig, CompilerGrpc, Upstreams};

/// The compiler module. Its upstreams are the registry and the policy
/// service of this process when they were built before it (in-process, no
/// socket), else gRPC clients of `[compiler] registry_url` / `policy_url`.
/// It provides an in-process [`CompilerClient`] to the modules built after it
/// (GhostRun, the orchestrator).
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
    ctx.provide::<Arc<dyn CompilerClient>>(Arc::new(compiler.clone()));
    ctx.routes
        .add_service(CompilerGrpc::new(compiler).into_server());
    Ok(())
}

/// The compiler's actor for a call made in this process: the principal the
/// calling service acts for (its upstream reads act for that principal too).
fn actor(caller: &Caller) -> Actor {
    match caller {
        Caller::Delegated {
            principal, forward, ..
        } => Actor {
            tenant: principal.tenant_id.clone(),
            subject: principal.subject.clone(),
            authorization: forward.clone(),
            principal: Some(principal.clone()),
        },
        Caller::User {
            tenant,
            subject,
            authorization,
        } => Actor {
            tenant: tenant.clone(),
            subject: subject.clone(),
            authorization: authorization.clone(),
            principal: None,
        },
        Caller::Service { tenant, .. } => Actor {
            tenant: tenant.clone(),
            subject: caller.subject(),
            authorization: None,
            principal: None,
        },
    }
}

/// In this process: the domain call, no socket, no encoding. The caller was authorized by the service calling upstream
/// (GhostRun's `Preflight` admits the roles `Compile` admits; `GetPlan`
/// admits any role).
impl CompilerClient for Compiler {
    fn compile<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::CompileRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::CompileResponse>> {
        Box::pin(async move {
            let compiled = Compiler::compile(
                self,
                &actor(caller),
                &request.capsule_name,
                &request.version,
            )
            .await?;
            Ok(pb::CompileResponse {
                plan: Some((*compiled.plan).clone()),
                cache_hit: compiled.cache_hit,
            })
        })
    }

    fn get_plan<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::GetPlanRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::GetPlanResponse>> {
        Box::pin(async move {
            let plan = self.get(&actor(caller), &request.plan_hash).await?;
            Ok(pb::GetPlanResponse { plan: Some(plan) })
        })
    }
}
