//! The gRPC adapter: decode, check the role, call [`Receipts`], encode.

use std::pin::Pin;

use anumate_auth::{Principal, Role};
use anumate_errors::Error;
use anumate_proto::receipts::v1 as pb;
use pb::receipts_service_server::{ReceiptsService, ReceiptsServiceServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{Actor, Receipts};

/// Roles allowed to read receipts, checkpoints, proofs and keys.
const READERS: &[Role] = &[Role::Admin, Role::Auditor, Role::Operator];
/// Roles allowed to append (service principals may too).
const APPENDERS: &[Role] = &[Role::Admin, Role::Operator];
/// Receipts per export chunk.
const EXPORT_CHUNK: i64 = 200;

/// The receipts service behind the generated `ReceiptsService` trait.
#[derive(Clone)]
pub struct ReceiptsGrpc {
    receipts: Receipts,
}

impl ReceiptsGrpc {
    /// Wraps a receipts service.
    pub fn new(receipts: Receipts) -> Self {
        ReceiptsGrpc { receipts }
    }

    /// The tonic server, with request size limits above the content limit.
    pub fn into_server(self) -> ReceiptsServiceServer<ReceiptsGrpc> {
        let limit = self
            .receipts
            .cfg
            .max_content_bytes
            .saturating_mul(4)
            .saturating_add(64 * 1024);
        ReceiptsServiceServer::new(self).max_decoding_message_size(limit)
    }
}

fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    anumate_auth::principal(req)
}

fn denied<T>(principal: &Principal, e: Error) -> Status {
    tracing::warn!(tenant = %principal.tenant_id, subject = %principal.subject, method = std::any::type_name::<T>(), "permission denied");
    e.into()
}

fn actor<T>(req: &Request<T>, roles: &[Role]) -> Result<Actor, Status> {
    let principal = principal(req)?;
    if let Err(e) = principal.require_any(roles) {
        return Err(denied::<T>(&principal, e));
    }
    Ok(Actor {
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

fn appender<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = principal(req)?;
    if !principal.is_service()
        && let Err(e) = principal.require_any(APPENDERS)
    {
        return Err(denied::<T>(&principal, e));
    }
    Ok(Actor {
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

/// The stream type of `ExportReceipts`.
pub type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportReceiptsResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ReceiptsService for ReceiptsGrpc {
    async fn append_receipt(
        &self,
        req: Request<pb::AppendReceiptRequest>,
    ) -> Result<Response<pb::AppendReceiptResponse>, Status> {
        let actor = appender(&req)?;
        let r = req.into_inner();
        let (receipt, created) = self
            .receipts
            .append(&actor, r.kind, r.subject, r.content, &r.dedupe_key)
            .await?;
        Ok(Response::new(pb::AppendReceiptResponse {
            receipt: Some(receipt),
            created,
        }))
    }

    async fn get_receipt(
        &self,
        req: Request<pb::GetReceiptRequest>,
    ) -> Result<Response<pb::GetReceiptResponse>, Status> {
        let actor = actor(&req, READERS)?;
        let receipt = self.receipts.get(&actor, &req.get_ref().receipt_id).await?;
        Ok(Response::new(pb::GetReceiptResponse {
            receipt: Some(receipt),
        }))
    }

    async fn list_receipts(
        &self,
        req: Request<pb::ListReceiptsRequest>,
    ) -> Result<Response<pb::ListReceiptsResponse>, Status> {
        let actor = actor(&req, READERS)?;
        let r = req.into_inner();
        let filter = Receipts::filter(r.filter.as_ref())?;
        let (receipts, next) = self.receipts.list(&actor, &filter, r.page.as_ref()).await?;
        Ok(Response::new(pb::ListReceiptsResponse {
            receipts,
            page: Some(anumate_proto::common::v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }

    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let actor = actor(&req, READERS)?;
        let checkpoint = self
            .receipts
            .checkpoint(&actor, req.get_ref().tree_size)
            .await?;
        Ok(Response::new(pb::GetCheckpointResponse {
            checkpoint: Some(checkpoint),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        req: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let actor = actor(&req, READERS)?;
        let r = req.into_inner();
        let proof = self
            .receipts
            .inclusion_proof(&actor, &r.receipt_id, r.tree_size)
            .await?;
        Ok(Response::new(pb::GetInclusionProofResponse {
            leaf_index: i64::try_from(proof.leaf_index).map_err(Error::internal)?,
            leaf_hash: proof.leaf_hash.to_vec(),
            audit_path: proof.audit_path.iter().map(|h| h.to_vec()).collect(),
            checkpoint: Some(proof.checkpoint),
        }))
    }

    async fn get_consistency_proof(
        &self,
        req: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::GetConsistencyProofResponse>, Status> {
        let actor = actor(&req, READERS)?;
        let r = req.into_inner();
        let (proof, first, second) = self
            .receipts
            .consistency_proof(&actor, r.first_tree_size, r.second_tree_size)
            .await?;
        Ok(Response::new(pb::GetConsistencyProofResponse {
            proof: proof.iter().map(|h| h.to_vec()).collect(),
            first_checkpoint: Some(first),
            second_checkpoint: Some(second),
        }))
    }

    async fn get_signing_keys(
        &self,
        req: Request<pb::GetSigningKeysRequest>,
    ) -> Result<Response<pb::GetSigningKeysResponse>, Status> {
        actor(&req, READERS)?;
        let jwks_json = serde_json::to_string(&self.receipts.jwks()).map_err(Error::internal)?;
        Ok(Response::new(pb::GetSigningKeysResponse { jwks_json }))
    }

    type ExportReceiptsStream = ExportStream;

    async fn export_receipts(
        &self,
        req: Request<pb::ExportReceiptsRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let actor = actor(&req, READERS)?;
        let r = req.into_inner();
        let format = match pb::ExportFormat::try_from(r.format) {
            Ok(pb::ExportFormat::Unspecified) => {
                return Err(Error::invalid_argument(
                    "format",
                    "required: EXPORT_FORMAT_NDJSON, EXPORT_FORMAT_CEF or EXPORT_FORMAT_SYSLOG",
                )
                .into());
            }
            Ok(f) => f,
            Err(_) => {
                return Err(Error::invalid_argument(
                    "format",
                    format!("unknown ExportFormat value {}", r.format),
                )
                .into());
            }
        };
        let filter = Receipts::filter(r.filter.as_ref())?;
        let receipts = self.receipts.clone();
        let include_content = r.include_content;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut after = None;
            loop {
                let page = receipts
                    .export_page(&actor, &filter, after, EXPORT_CHUNK, include_content)
                    .await;
                let chunk = page.and_then(|page| {
                    let mut data = String::new();
                    for receipt in &page {
                        data.push_str(&crate::export::record(format, receipt, include_content)?);
                    }
                    Ok((page, data))
                });
                match chunk {
                    Ok((page, _)) if page.is_empty() => break,
                    Ok((page, data)) => {
                        after = page.last().map(|r| r.leaf_index as u64);
                        let last = (page.len() as i64) < EXPORT_CHUNK;
                        let msg = pb::ExportReceiptsResponse {
                            data,
                            record_count: page.len() as i32,
                        };
                        if tx.send(Ok(msg)).await.is_err() || last {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
