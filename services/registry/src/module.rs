//! The registry as the binary composes it, and its in-process client.

use std::sync::Arc;

use anumate_proto::registry::v1 as pb;
use anumate_service::clients::{BoxFuture, Caller, RegistryClient, UpstreamResult};
use anumate_service::{BuildError, Context, KeysConfig, ServiceModule};
use anumate_store::Migration;

use crate::{Actor, Registry, RegistryConfig, RegistryGrpc, VersionSelector};

/// The registry service module.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module)
}

struct Module;

const KEYS: &str = "[keys] registry_key_files";

impl ServiceModule for Module {
    fn name(&self) -> &'static str {
        pb::registry_service_server::SERVICE_NAME
    }

    fn about(&self) -> &'static str {
        "Capsule registry: versioned, signed capsules"
    }

    fn section(&self) -> &'static str {
        "registry"
    }

    fn default_config(&self) -> Option<serde_json::Value> {
        anumate_service::default_section::<RegistryConfig>()
    }

    fn check_config(&self, section: &serde_json::Value) -> Result<(), BuildError> {
        anumate_service::check_section::<RegistryConfig>(self.section(), section)
    }

    fn migrations(&self) -> Vec<Migration> {
        crate::REPO_MIGRATIONS.to_vec()
    }

    fn missing_keys(&self, _config: &serde_json::Value, keys: &KeysConfig) -> Vec<&'static str> {
        if keys.registry_key_files.is_empty() {
            vec![KEYS]
        } else {
            Vec::new()
        }
    }

    fn build(&self, ctx: &mut Context) -> Result<(), BuildError> {
        let cfg: RegistryConfig = ctx.section(self.section())?;
        let store = ctx.store("registry")?;
        let files = ctx.keys().registry_key_files.clone();
        let keys = Arc::new(ctx.key_ring(&files, KEYS, "registry")?);
        let registry = Registry::new(store, keys, &cfg);
        ctx.provide::<Arc<dyn RegistryClient>>(Arc::new(registry.clone()));
        ctx.routes
            .add_service(RegistryGrpc::new(registry).into_server());
        Ok(())
    }
}

/// In this process: the domain call, no socket. The caller was authorized by
/// the service calling upstream (the compiler admits only roles that may read
/// capsules).
impl RegistryClient for Registry {
    fn get_capsule<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::GetCapsuleRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::GetCapsuleResponse>> {
        Box::pin(async move {
            let actor = Actor {
                tenant: caller.tenant().to_owned(),
                subject: caller.subject(),
            };
            let selector = VersionSelector::parse(&request.version)?;
            let (capsule, version) = self.get(&actor, &request.name, selector).await?;
            Ok(pb::GetCapsuleResponse {
                capsule: Some(capsule),
                version: Some(version),
            })
        })
    }
}
