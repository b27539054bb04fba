//! The hub as the binary composes it (`anumate serve connectors`, part of
//! `anumate dev`).

use std::sync::Arc;
use std::time::Duration;

use anumate_proto::connectors::v1 as pb;
use anumate_service::clients::{CapTokensClient, Grpc, RegistryClient};
use anumate_service::{BuildError, Context, Module, ServiceModule};

use crate::{ConnectorsConfig, Hub, HubGrpc, RegistryTools};

/// How often expired idempotency keys are purged.
const PURGE_EVERY: Duration = Duration::from_secs(300);

/// The connector hub module: `ConnectorHubService` and the service-only
/// `ConnectorHubInternal`. Tools come from the registry of this process, else
/// the one at `[connectors] registry_url`; capability tokens are verified
/// with the public keys of the captokens service of this process, else the
/// one at `[connectors] captokens_url`, and spent in its replay store.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<ConnectorsConfig> {
        name: pb::connector_hub_service_server::SERVICE_NAME,
        section: "connectors",
        about: "Connector hub: verified, idempotent tool calls",
        migrations: MIGRATIONS,
        missing_keys: |_, _| Vec::new(),
        build,
    })
}

/// The setting the hub no longer reads.
const OLD_KEYS: &str = "[connectors] captoken_key_files";

static MIGRATIONS: &[anumate_store::Migration] = &[
    anumate_idempotency::MIGRATIONS[0],
    crate::repo::MIGRATIONS[0],
    crate::repo::MIGRATIONS[1],
    crate::repo::MIGRATIONS[2],
    crate::repo::MIGRATIONS[3],
];

fn build(ctx: &mut Context, cfg: ConnectorsConfig) -> Result<(), BuildError> {
    let store = ctx.store("connectors")?;
    if cfg.captoken_key_files.is_some() {
        return Err(BuildError::failed(
            OLD_KEYS,
            "is no longer read: the hub verifies capability tokens with the captokens \
             service's public keys (GetJwks) and never holds its private keys; remove it \
             (and set [connectors] captokens_url when captokens runs in another process)",
        ));
    }
    let tokens = ctx.upstream::<dyn CapTokensClient>(
        "connectors.captokens_url",
        &cfg.captokens_url,
        |channel| {
            let mut grpc = Grpc::new(channel);
            // ConsumeToken admits only svc:connectors.
            if let Some(Ok(issuer)) = ctx
                .service_issuer()
                .map(|i| i.for_service(crate::SERVICE_IDENTITY))
            {
                grpc = grpc.with_service_issuer(issuer);
            }
            Arc::new(grpc)
        },
    )?;
    let registry = ctx.upstream::<dyn RegistryClient>(
        "connectors.registry_url",
        &cfg.registry_url,
        |channel| {
            let mut grpc = Grpc::new(channel);
            if let Some(Ok(issuer)) = ctx
                .service_issuer()
                .map(|i| i.for_service(crate::SERVICE_IDENTITY))
            {
                grpc = grpc.with_service_issuer(issuer);
            }
            Arc::new(grpc)
        },
    )?;
    let secrets = crate::resolve_secrets(&cfg.secrets)
        .map_err(|e| BuildError::service("[connectors] secrets", e))?;
    let mcp = crate::McpServers::from_config(&cfg.mcp, &secrets)
        .map_err(|e| BuildError::service("[[connectors.mcp]]", e))?;
    let hub = Hub::new(store, tokens, Arc::new(RegistryTools(registry)), &cfg)
        .with_connector("http", Arc::new(crate::Http::new(secrets)))
        .with_mcp_servers(mcp);
    let purger = hub.clone();
    ctx.tasks.spawn("connectors purge", |cancel| async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(PURGE_EVERY) => {
                    if let Err(e) = purger.purge().await {
                        tracing::warn!(error = %e, "connectors: purge failed");
                    }
                }
            }
        }
    });
    let grpc = HubGrpc::new(hub);
    ctx.routes.add_service(grpc.clone().into_internal_server());
    ctx.routes.add_service(grpc.into_server());
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `anumate serve` migrates what the hub's SQL needs (a migration left
    /// out here is a missing table or function in production only).
    #[test]
    fn the_module_applies_every_migration_of_the_hub() {
        let ids = |m: &[anumate_store::Migration]| m.iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(
            ids(&super::module().migrations()),
            ids(&crate::migrations())
        );
    }
}
