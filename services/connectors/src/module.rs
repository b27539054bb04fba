//! The hub as the binary composes it (`anumate serve connectors`, part of
//! `anumate dev`).

use std::sync::Arc;
use std::time::Duration;

use anumate_captokens::Verifier;
use anumate_proto::connectors::v1 as pb;
use anumate_service::clients::{Grpc, RegistryClient};
use anumate_service::{BuildError, Context, Module, ServiceModule};

use crate::{ConnectorsConfig, Hub, HubGrpc, RegistryTools};

/// How often expired keys and replay records are purged.
const PURGE_EVERY: Duration = Duration::from_secs(300);

/// The connector hub module: `ConnectorHubService` and the service-only
/// `ConnectorHubInternal`. Tools come from the registry of this process, else
/// the one at `[connectors] registry_url`; token keys are the captokens
/// service's (`[connectors] captoken_key_files`, or under the data directory).
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<ConnectorsConfig> {
        name: pb::connector_hub_service_server::SERVICE_NAME,
        section: "connectors",
        about: "Connector hub: verified, idempotent tool calls",
        migrations: MIGRATIONS,
        missing_keys: |cfg, _| match cfg.captoken_key_files.is_empty() {
            true => vec![KEYS],
            false => Vec::new(),
        },
        build,
    })
}

const KEYS: &str = "[connectors] captoken_key_files";

static MIGRATIONS: &[anumate_store::Migration] = &[
    anumate_idempotency::MIGRATIONS[0],
    crate::repo::MIGRATIONS[0],
];

fn build(ctx: &mut Context, cfg: ConnectorsConfig) -> Result<(), BuildError> {
    let store = ctx.store("connectors")?;
    let ring = ctx.key_ring(&cfg.captoken_key_files, KEYS, "captokens")?;
    let verifier =
        Verifier::from_key_ring(&ring).map_err(|e| BuildError::failed(KEYS, e.to_string()))?;
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
    let hub = Hub::new(store, verifier, Arc::new(RegistryTools(registry)), &cfg)
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
