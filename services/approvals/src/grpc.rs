//! The gRPC adapter: decode, call [`Approvals`], encode, for the public
//! `ApprovalsService` and the service-only `ApprovalsInternal` (opening and
//! withdrawing approvals; no HTTP rule, so the REST gateway cannot route it).
//!
//! Who may call what is declared on each RPC in
//! `proto/anumate/approvals/v1/approvals.proto` (`authz` options) and
//! enforced by the auth layer before a handler runs; whether the caller may
//! decide *this* approval (eligibility, separation of duties) is the domain's
//! rule ([`crate::rules`]). The tenant is always the caller's, from the
//! bearer token; the decider is its verified principal with its groups.

use anumate_proto::approvals::v1 as pb;
use pb::approvals_internal_server::{ApprovalsInternal, ApprovalsInternalServer};
use pb::approvals_service_server::{ApprovalsService, ApprovalsServiceServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::rules::{self, Action};
use crate::{Approvals, Caller};

/// Largest request accepted, in bytes (the arguments preview is at most
/// 64 KiB of JSON).
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The service behind the generated `ApprovalsService` and
/// `ApprovalsInternal` traits.
#[derive(Clone)]
pub struct ApprovalsGrpc {
    approvals: Approvals,
}

impl ApprovalsGrpc {
    /// Wraps the service.
    pub fn new(approvals: Approvals) -> Self {
        ApprovalsGrpc { approvals }
    }

    /// The tonic server of `ApprovalsService`, with a request size limit.
    pub fn into_server(self) -> ApprovalsServiceServer<ApprovalsGrpc> {
        ApprovalsServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The tonic server of `ApprovalsInternal`, with a request size limit.
    pub fn into_internal_server(self) -> ApprovalsInternalServer<ApprovalsGrpc> {
        ApprovalsInternalServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The caller as the auth layer verified it: the person behind the call
/// (for a service acting for someone, that someone) and their groups.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let p = anumate_auth::principal(req)?;
    Ok(Caller {
        principal: rules::principal_of(p.originator()),
        service: p.is_service() && p.on_behalf_of().is_none(),
        groups: p.groups,
        tenant: p.tenant_id,
    })
}

#[tonic::async_trait]
impl ApprovalsService for ApprovalsGrpc {
    async fn get_approval(
        &self,
        req: Request<pb::GetApprovalRequest>,
    ) -> Result<Response<pb::GetApprovalResponse>, Status> {
        let c = caller(&req)?;
        let approval = self
            .approvals
            .get(&c.tenant, &req.get_ref().approval_id)
            .await?;
        Ok(Response::new(pb::GetApprovalResponse {
            approval: Some(approval),
        }))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let c = caller(&req)?;
        let (approvals, next_page_token) = self.approvals.list(&c, req.get_ref()).await?;
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals,
            next_page_token,
        }))
    }

    async fn approve(
        &self,
        req: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApproveResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let args = anumate_crypto::parse_digest("args_sha256", &r.args_sha256)?;
        let approval = self
            .approvals
            .decide(
                &c,
                &r.approval_id,
                Action::Approve { args_sha256: &args },
                &r.comment,
                &r.etag,
            )
            .await?;
        Ok(Response::new(pb::ApproveResponse {
            approval: Some(approval),
        }))
    }

    async fn reject(
        &self,
        req: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::RejectResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let approval = self
            .approvals
            .decide(&c, &r.approval_id, Action::Reject, &r.comment, &r.etag)
            .await?;
        Ok(Response::new(pb::RejectResponse {
            approval: Some(approval),
        }))
    }

    async fn delegate(
        &self,
        req: Request<pb::DelegateRequest>,
    ) -> Result<Response<pb::DelegateResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let to = rules::parse_entry("delegate_to", &r.delegate_to)?;
        let approval = self
            .approvals
            .decide(
                &c,
                &r.approval_id,
                Action::Delegate { to: &to },
                &r.comment,
                &r.etag,
            )
            .await?;
        Ok(Response::new(pb::DelegateResponse {
            approval: Some(approval),
        }))
    }

    type WatchApprovalsStream = ReceiverStream<crate::watch::WatchItem>;

    async fn watch_approvals(
        &self,
        req: Request<pb::WatchApprovalsRequest>,
    ) -> Result<Response<Self::WatchApprovalsStream>, Status> {
        let c = caller(&req)?;
        let rx = self.approvals.watch(&c, req.get_ref()).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl ApprovalsInternal for ApprovalsGrpc {
    async fn request_approval(
        &self,
        req: Request<pb::RequestApprovalRequest>,
    ) -> Result<Response<pb::RequestApprovalResponse>, Status> {
        let c = caller(&req)?;
        let (approval, created) = self.approvals.request(&c, req.get_ref()).await?;
        Ok(Response::new(pb::RequestApprovalResponse {
            approval: Some(approval),
            created,
        }))
    }

    async fn cancel_approval(
        &self,
        req: Request<pb::CancelApprovalRequest>,
    ) -> Result<Response<pb::CancelApprovalResponse>, Status> {
        let c = caller(&req)?;
        let r = req.get_ref();
        let approval = self.approvals.cancel(&c, &r.approval_id, &r.reason).await?;
        Ok(Response::new(pb::CancelApprovalResponse {
            approval: Some(approval),
        }))
    }
}
