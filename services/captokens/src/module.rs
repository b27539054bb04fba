//! The captokens service as the binary composes it.

use std::sync::Arc;

use anumate_proto::captokens::v1 as pb;
use anumate_service::clients::{self, Grpc, ReceiptsClient};
use anumate_service::{BuildError, Context, Module, ServiceModule};

use crate::{CapTokens, CapTokensConfig, CapTokensGrpc, RECEIPTS_SERVICE_NAME};

/// The captokens service module: `CapTokensService` and the service-only
/// `CapabilityTokensInternal` on the same server. It provides [`CapTokens`]
/// (for the admin JWKS) and an in-process `CapTokensClient` (for the
/// orchestrator and the connector hub) and runs the replay purge. Revocations are receipted by the
/// receipts service of this process (built before it), else by the one at
/// `[captokens] receipts_url`.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<CapTokensConfig> {
        name: pb::cap_tokens_service_server::SERVICE_NAME,
        section: "captokens",
        about: "Capability tokens: mint, verify, refresh, revoke",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: |cfg, _| match cfg.key_files.is_empty() {
            true => vec![KEYS],
            false => Vec::new(),
        },
        build,
    })
}

const KEYS: &str = "[captokens] key_files";

fn build(ctx: &mut Context, cfg: CapTokensConfig) -> Result<(), BuildError> {
    let store = ctx.store("captokens")?;
    let keys = Arc::new(ctx.key_ring(&cfg.key_files, KEYS, "captokens")?);
    let mut tokens = CapTokens::new(store, keys, &cfg)
        .map_err(|e| BuildError::service("captokens service", e))?;
    if let Some(receipts) = ctx.get::<Arc<dyn ReceiptsClient>>() {
        tokens = tokens.with_revocation_receipts(receipts.clone());
    } else if !cfg.receipts_url.is_empty() {
        // Appended as the captokens service identity (the only one the
        // receipts service takes TOKEN_REVOCATION from).
        let issuer = ctx
            .service_issuer()
            .ok_or_else(|| {
                BuildError::failed(
                    "[captokens] receipts_url",
                    "needs the platform's service keys ([keys] service_key_files)",
                )
            })?
            .for_service(RECEIPTS_SERVICE_NAME)
            .map_err(|e| BuildError::service("captokens service", e))?;
        let channel = clients::channel("captokens.receipts_url", &cfg.receipts_url)
            .map_err(|e| BuildError::service("captokens service", e))?;
        tokens = tokens
            .with_revocation_receipts(Arc::new(Grpc::new(channel).with_service_issuer(issuer)));
    } else {
        tracing::warn!(
            "captokens: no receipts service in this process and no [captokens] receipts_url: revocations are not receipted"
        );
    }
    let purger = tokens.clone();
    ctx.tasks
        .spawn("captokens replay purge", |cancel| async move {
            purger.run_background(cancel).await;
            Ok(())
        });
    ctx.provide(tokens.clone());
    ctx.provide::<Arc<dyn clients::CapTokensClient>>(Arc::new(tokens.clone()));
    let grpc = CapTokensGrpc::new(tokens);
    ctx.routes.add_service(grpc.clone().into_internal_server());
    ctx.routes.add_service(grpc.into_server());
    Ok(())
}
