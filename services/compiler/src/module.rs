//! The compiler as the binary composes it.

use std::sync::Arc;

use anumate_proto::compiler::v1 as pb;
use anumate_service::clients::{Grpc, PolicyClient, RegistryClient};
use anumate_service::{BuildError, Context, ServiceModule};
use anumate_store::Migration;

use crate::{Compiler, CompilerConfig, CompilerGrpc, Upstreams};

/// The compiler module. Its upstreams are the registry and the policy
/// service of this process when they were built before it (in-process, no
/// socket), else gRPC clients of `[compiler] registry_url` / `policy_url`.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module)
}

struct Module;

impl ServiceModule for Module {
    fn name(&self) -> &'static str {
        pb::compiler_service_server::SERVICE_NAME
    }

    fn about(&self) -> &'static str {
        "Plan compiler: capsules into executable plans"
    }

    fn section(&self) -> &'static str {
        "compiler"
    }

    fn default_config(&self) -> Option<serde_json::Value> {
        anumate_service::default_section::<CompilerConfig>()
    }

    fn check_config(&self, section: &serde_json::Value) -> Result<(), BuildError> {
        anumate_service::check_section::<CompilerConfig>(self.section(), section)
    }

    fn migrations(&self) -> Vec<Migration> {
        crate::REPO_MIGRATIONS.to_vec()
    }

    fn build(&self, ctx: &mut Context) -> Result<(), BuildError> {
        let cfg: CompilerConfig = ctx.section(self.section())?;
        let store = ctx.store("compiler")?;
        let registry = ctx.upstream::<dyn RegistryClient>(
            "compiler.registry_url",
            &cfg.registry_url,
            |channel| Arc::new(Grpc::new(channel)),
        )?;
        let policy =
            ctx.upstream::<dyn PolicyClient>("compiler.policy_url", &cfg.policy_url, |channel| {
                Arc::new(Grpc::new(channel))
            })?;
        let compiler = Compiler::new(store, Upstreams::new(registry, policy), &cfg)
            .map_err(|e| BuildError::service("compiler", e))?;
        ctx.routes
            .add_service(CompilerGrpc::new(compiler).into_server());
        Ok(())
    }
}
