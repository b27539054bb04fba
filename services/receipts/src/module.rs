//! The receipts service as the binary composes it, and its in-process client.

use std::sync::Arc;

use anumate_errors::{Error, ErrorCode};
use anumate_proto::receipts::v1 as pb;
use anumate_service::clients::{BoxFuture, Caller, ReceiptsClient, UpstreamResult};
use anumate_service::{BuildError, Context, KeysConfig, ServiceModule};
use anumate_store::Migration;

use crate::{Actor, Receipts, ReceiptsConfig, ReceiptsGrpc};

/// The receipts service module. It provides [`Receipts`] (for the admin
/// JWKS) and an in-process [`ReceiptsClient`].
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module)
}

struct Module;

const KEYS: &str = "[keys] receipts_key_files";

impl ServiceModule for Module {
    fn name(&self) -> &'static str {
        pb::receipts_service_server::SERVICE_NAME
    }

    fn about(&self) -> &'static str {
        "Receipts: the signed, append-only receipt log"
    }

    fn section(&self) -> &'static str {
        "receipts"
    }

    fn default_config(&self) -> Option<serde_json::Value> {
        anumate_service::default_section::<ReceiptsConfig>()
    }

    fn check_config(&self, section: &serde_json::Value) -> Result<(), BuildError> {
        anumate_service::check_section::<ReceiptsConfig>(self.section(), section)
    }

    fn migrations(&self) -> Vec<Migration> {
        crate::REPO_MIGRATIONS.to_vec()
    }

    fn missing_keys(&self, _config: &serde_json::Value, keys: &KeysConfig) -> Vec<&'static str> {
        if keys.receipts_key_files.is_empty() {
            vec![KEYS]
        } else {
            Vec::new()
        }
    }

    fn build(&self, ctx: &mut Context) -> Result<(), BuildError> {
        let cfg: ReceiptsConfig = ctx.section(self.section())?;
        let store = ctx.store("receipts")?;
        let files = ctx.keys().receipts_key_files.clone();
        let keys = Arc::new(ctx.key_ring(&files, KEYS, "receipts")?);
        let receipts = Receipts::new(store, keys, &cfg)
            .map_err(|e| BuildError::service("receipts service", e))?;
        let checkpointer = receipts.clone();
        ctx.tasks
            .spawn("receipts checkpointer", |cancel| async move {
                checkpointer.run_checkpointer(cancel).await;
                Ok(())
            });
        ctx.provide(receipts.clone());
        ctx.provide::<Arc<dyn ReceiptsClient>>(Arc::new(receipts.clone()));
        ctx.routes
            .add_service(ReceiptsGrpc::new(receipts).into_server());
        Ok(())
    }
}

/// In this process: the domain call, no socket. As over gRPC, only a
/// platform service appends (each only the kinds it owns).
impl ReceiptsClient for Receipts {
    fn append_receipt<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::AppendReceiptRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::AppendReceiptResponse>> {
        Box::pin(async move {
            let Caller::Service { tenant, service } = caller else {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    "receipts are appended only by the platform service that owns their kind",
                )
                .into());
            };
            let actor = Actor::service(tenant, service);
            let (receipt, created) = self
                .append(
                    &actor,
                    request.kind,
                    request.subject,
                    request.content,
                    &request.dedupe_key,
                )
                .await?;
            Ok(pb::AppendReceiptResponse {
                receipt: Some(receipt),
                created,
            })
        })
    }
}
