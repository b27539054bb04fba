//! The registry as the binary composes it, and its in-process client.

use std::sync::Arc;

use anumate_proto::registry::v1 as pb;
use anumate_service::clients::{
    BoxFuture, Caller, RegistryClient, TenantSettings, TenantSettingsClient, UpstreamResult,
};
use anumate_service::{BuildError, Context, Module, ServiceModule};

use crate::{
    Actor, Registry, RegistryConfig, RegistryGrpc, TenantSettingsGrpc, TenantSettingsStore,
    ToolsGrpc, VersionSelector,
};

const KEYS: &str = "[keys] registry_key_files";

/// The registry service module. It provides an in-process [`RegistryClient`].
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<RegistryConfig> {
        name: pb::registry_service_server::SERVICE_NAME,
        section: "registry",
        about: "Capsule registry: versioned, signed capsules; the tenant's tool catalogue; tenant settings",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: |_, keys| match keys.registry_key_files.is_empty() {
            true => vec![KEYS],
            false => Vec::new(),
        },
        build,
    })
}

fn build(ctx: &mut Context, cfg: RegistryConfig) -> Result<(), BuildError> {
    let store = ctx.store("registry")?;
    let files = ctx.keys().registry_key_files.clone();
    let keys = Arc::new(ctx.key_ring(&files, KEYS, "registry")?);
    let settings = TenantSettingsStore::new(store.clone());
    let registry = Registry::new(store, keys, &cfg);
    let documents = registry.documents().clone();
    ctx.tasks
        .spawn("registry cache invalidation", |cancel| async move {
            Ok(documents.follow_changes(cancel).await?)
        });
    let tools = registry.tools().documents().clone();
    ctx.tasks
        .spawn("tool catalogue cache invalidation", |cancel| async move {
            Ok(tools.follow_changes(cancel).await?)
        });
    let followed = settings.clone();
    ctx.tasks
        .spawn("tenant settings cache invalidation", |cancel| async move {
            Ok(followed.follow_changes(cancel).await?)
        });
    ctx.provide::<Arc<dyn RegistryClient>>(Arc::new(registry.clone()));
    ctx.provide::<Arc<dyn TenantSettingsClient>>(Arc::new(settings.clone()));
    ctx.routes
        .add_service(TenantSettingsGrpc::new(settings).into_server());
    ctx.routes
        .add_service(ToolsGrpc::new(registry.tools().clone()).into_server());
    ctx.routes
        .add_service(RegistryGrpc::new(registry).into_server());
    Ok(())
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

    fn get_tool<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::GetToolRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::GetToolResponse>> {
        Box::pin(async move {
            let actor = Actor {
                tenant: caller.tenant().to_owned(),
                subject: caller.subject(),
            };
            let (tool, version) = self
                .tools()
                .get(&actor, &request.name, &request.version)
                .await?;
            Ok(pb::GetToolResponse {
                tool: Some(tool),
                version: Some(version),
            })
        })
    }
}

/// In this process: the cached read, no socket. Any principal of the tenant
/// may read its settings.
impl TenantSettingsClient for TenantSettingsStore {
    fn get_tenant_settings<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> BoxFuture<'a, UpstreamResult<TenantSettings>> {
        Box::pin(async move { Ok(self.get_typed(caller.tenant()).await?) })
    }
}
