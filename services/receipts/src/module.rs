//! The receipts service as the binary composes it, and its in-process client.

use std::sync::Arc;

use anumate_errors::{Error, ErrorCode};
use anumate_proto::receipts::v1 as pb;
use anumate_service::clients::{
    AppendedInTx, BoxFuture, Caller, PreparedReceipt, ReceiptsClient, UpstreamResult,
};
use anumate_service::{BuildError, Context, Module, ServiceModule};
use anumate_store::TenantTx;

use crate::{Actor, Prepared, Receipts, ReceiptsConfig, ReceiptsGrpc};

const KEYS: &str = "[keys] receipts_key_files";

/// The receipts service module: `ReceiptsService` and the service-only
/// `ReceiptsInternal` on the same server. It provides [`Receipts`] (for the
/// admin JWKS) and an in-process [`ReceiptsClient`], and runs the
/// checkpointer.
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<ReceiptsConfig> {
        name: pb::receipts_service_server::SERVICE_NAME,
        section: "receipts",
        about: "Receipts: the signed, append-only receipt log",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: |_, keys| match keys.receipts_key_files.is_empty() {
            true => vec![KEYS],
            false => Vec::new(),
        },
        build,
    })
}

fn build(ctx: &mut Context, cfg: ReceiptsConfig) -> Result<(), BuildError> {
    let store = ctx.store("receipts")?;
    let files = ctx.keys().receipts_key_files.clone();
    let keys = Arc::new(ctx.key_ring(&files, KEYS, "receipts")?);
    let receipts =
        Receipts::new(store, keys, &cfg).map_err(|e| BuildError::service("receipts service", e))?;
    let checkpointer = receipts.clone();
    ctx.tasks
        .spawn("receipts checkpointer", |cancel| async move {
            checkpointer.run_checkpointer(cancel).await;
            Ok(())
        });
    ctx.provide(receipts.clone());
    ctx.provide::<Arc<dyn ReceiptsClient>>(Arc::new(receipts.clone()));
    let grpc = ReceiptsGrpc::new(receipts);
    ctx.routes.add_service(grpc.clone().into_internal_server());
    ctx.routes.add_service(grpc.into_server());
    Ok(())
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
            let Some(service) = caller.service() else {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    "receipts are appended only by the platform service that owns their kind",
                )
                .into());
            };
            let actor = Actor::service(caller.tenant(), service);
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

    /// In this process the log shares the caller's store.
    fn appends_in_transaction(&self) -> bool {
        true
    }

    fn prepare_receipt(
        &self,
        caller: &Caller,
        request: pb::AppendReceiptRequest,
    ) -> Result<PreparedReceipt, Error> {
        let Some(service) = caller.service() else {
            return Err(Error::new(
                ErrorCode::PermissionDenied,
                "receipts are appended only by the platform service that owns their kind",
            ));
        };
        let prepared = self.prepare_request(&Actor::service(caller.tenant(), service), request)?;
        Ok(PreparedReceipt {
            receipt_id: prepared.receipt_id().to_owned(),
            prepared: Box::new(prepared),
        })
    }

    fn append_in<'a>(
        &'a self,
        tx: &'a TenantTx,
        receipts: Vec<PreparedReceipt>,
    ) -> BoxFuture<'a, Result<AppendedInTx, Error>> {
        Box::pin(async move {
            let prepared = receipts
                .into_iter()
                .map(|p| {
                    p.prepared
                        .downcast::<Prepared>()
                        .map(|p| *p)
                        .map_err(|_| Error::internal("a receipt prepared by another client"))
                })
                .collect();
            let (results, pending) = self.append_prepared_in(tx, prepared).await?;
            Ok(AppendedInTx {
                receipts: results.into_iter().map(|r| r.map(|(r, _)| r)).collect(),
                on_commit: Box::new(move || pending.committed()),
            })
        })
    }
}
