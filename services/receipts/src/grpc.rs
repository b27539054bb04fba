//! The gRPC adapter: decode, call [`Receipts`], encode, for the public
//! `ReceiptsService` and the service-only `ReceiptsInternal` (appending; no
//! HTTP rule, so the REST gateway cannot route it). Who may call each RPC is
//! enforced before the handler by the auth layer (the proto's `authz`
//! options, read for both services): reading needs `admin`, `auditor` or
//! `operator`; appending is for platform service identities only, each for
//! the kinds it owns (checked by [`Receipts::append`]).

use std::pin::Pin;

use anumate_errors::Error;
use anumate_proto::google::api::HttpBody;
use anumate_proto::receipts::v1 as pb;
use pb::receipts_internal_server::{ReceiptsInternal, ReceiptsInternalServer};
use pb::receipts_service_server::{ReceiptsService, ReceiptsServiceServer};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::{Actor, Receipts};

/// Most receipts per export chunk.
const EXPORT_CHUNK: i64 = 200;
/// Most bytes of `data` per export chunk (a single larger record goes
/// alone), so each message stays well under a client's default 4 MiB limit.
pub const EXPORT_CHUNK_BYTES: usize = 1024 * 1024;

/// The receipts service behind the generated `ReceiptsService` and
/// `ReceiptsInternal` traits.
#[derive(Clone)]
pub struct ReceiptsGrpc {
    receipts: Receipts,
}

impl ReceiptsGrpc {
    /// Wraps a receipts service.
    pub fn new(receipts: Receipts) -> Self {
        ReceiptsGrpc { receipts }
    }

    /// Largest request accepted: above the content limit, for its encoding.
    fn max_request_bytes(&self) -> usize {
        self.receipts
            .cfg
            .max_content_bytes
            .saturating_mul(4)
            .saturating_add(64 * 1024)
    }

    /// The tonic server of `ReceiptsService`, with a request size limit.
    pub fn into_server(self) -> ReceiptsServiceServer<ReceiptsGrpc> {
        let limit = self.max_request_bytes();
        ReceiptsServiceServer::new(self).max_decoding_message_size(limit)
    }

    /// The tonic server of `ReceiptsInternal` (appending), with a request
    /// size limit above the content limit.
    pub fn into_internal_server(self) -> ReceiptsInternalServer<ReceiptsGrpc> {
        let limit = self.max_request_bytes();
        ReceiptsInternalServer::new(self).max_decoding_message_size(limit)
    }
}

/// The caller, as the auth layer verified it and admitted it by the RPC's
/// `(anumate.common.v1.authz)` rule; `service` is its service identity, if
/// any (only services are admitted to append).
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    Ok(Actor {
        service: principal.service_name().map(str::to_owned),
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

/// The stream type of `ExportReceipts`.
pub type ExportStream = Pin<Box<dyn Stream<Item = Result<HttpBody, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ReceiptsInternal for ReceiptsGrpc {
    async fn append_receipt(
        &self,
        req: Request<pb::AppendReceiptRequest>,
    ) -> Result<Response<pb::AppendReceiptResponse>, Status> {
        let actor = actor(&req)?;
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
}

#[tonic::async_trait]
impl ReceiptsService for ReceiptsGrpc {
    async fn get_receipt(
        &self,
        req: Request<pb::GetReceiptRequest>,
    ) -> Result<Response<pb::GetReceiptResponse>, Status> {
        let actor = actor(&req)?;
        let receipt = self.receipts.get(&actor, &req.get_ref().receipt_id).await?;
        Ok(Response::new(pb::GetReceiptResponse {
            receipt: Some(receipt),
        }))
    }

    async fn list_receipts(
        &self,
        req: Request<pb::ListReceiptsRequest>,
    ) -> Result<Response<pb::ListReceiptsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let filter = Receipts::filter(r.filter.as_ref())?;
        let (receipts, next_page_token) = self
            .receipts
            .list(&actor, &filter, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListReceiptsResponse {
            receipts,
            next_page_token,
        }))
    }

    async fn get_checkpoint(
        &self,
        req: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::GetCheckpointResponse>, Status> {
        let actor = actor(&req)?;
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
        let actor = actor(&req)?;
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
        let actor = actor(&req)?;
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

    async fn get_receipt_signing_keys(
        &self,
        _req: Request<pb::GetReceiptSigningKeysRequest>,
    ) -> Result<Response<HttpBody>, Status> {
        let data = serde_json::to_vec(&self.receipts.jwks()).map_err(Error::internal)?;
        Ok(Response::new(HttpBody {
            content_type: "application/json".to_owned(),
            data,
            extensions: Vec::new(),
        }))
    }

    type ExportReceiptsStream = ExportStream;

    async fn export_receipts(
        &self,
        req: Request<pb::ExportReceiptsRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let actor = actor(&req)?;
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
        if r.from_leaf_index < 0 {
            return Err(Error::invalid_argument(
                "from_leaf_index",
                format!("{} is negative: leaf indexes start at 0", r.from_leaf_index),
            )
            .into());
        }
        let filter = Receipts::filter(r.filter.as_ref())?;
        let receipts = self.receipts.clone();
        let include_content = r.include_content;
        let content_type = content_type(format);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            // Leaf `from_leaf_index` is the first one wanted: start after
            // the one before it.
            let mut after = u64::try_from(r.from_leaf_index)
                .ok()
                .and_then(|i| i.checked_sub(1));
            let mut sent = false;
            loop {
                let records = receipts
                    .export_page(&actor, &filter, after, EXPORT_CHUNK, include_content)
                    .await
                    .and_then(|page| {
                        let last = page.last().map(|r| r.leaf_index as u64);
                        let full = page.len() as i64 == EXPORT_CHUNK;
                        page.iter()
                            .map(|r| crate::export::record(format, r, include_content))
                            .collect::<anumate_errors::Result<Vec<String>>>()
                            .map(|records| (records, last, full))
                    });
                let (records, last, full) = match records {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        break;
                    }
                };
                let mut messages = chunks(records, content_type);
                if messages.is_empty() && !sent && !full {
                    // Nothing matched: one empty body still says the type.
                    messages.push(body(content_type, String::new()));
                }
                for msg in messages {
                    sent = true;
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                if !full {
                    break;
                }
                after = last;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The media type of an export format's lines.
fn content_type(format: pb::ExportFormat) -> &'static str {
    match format {
        pb::ExportFormat::Ndjson => "application/x-ndjson",
        _ => "text/plain; charset=utf-8",
    }
}

fn body(content_type: &str, data: String) -> HttpBody {
    HttpBody {
        content_type: content_type.to_owned(),
        data: data.into_bytes(),
        extensions: Vec::new(),
    }
}

/// Packs complete records into bodies of at most [`EXPORT_CHUNK_BYTES`] of
/// `data` (a record larger than that travels alone).
fn chunks(records: Vec<String>, content_type: &str) -> Vec<HttpBody> {
    let mut out = Vec::new();
    let mut data = String::new();
    for record in records {
        if !data.is_empty() && data.len() + record.len() > EXPORT_CHUNK_BYTES {
            out.push(body(content_type, std::mem::take(&mut data)));
        }
        data.push_str(&record);
    }
    if !data.is_empty() {
        out.push(body(content_type, data));
    }
    out
}
