//! Placeholder gRPC services for the contracts whose implementation has not
//! landed yet.
//!
//! Every method of every service here answers gRPC `UNIMPLEMENTED` with a
//! `google.rpc.Status` whose `ErrorInfo` has `domain = "anumate.dev"` and
//! `reason = "UNIMPLEMENTED"` (plus `service` and `method` metadata), so
//! clients, the REST gateway (HTTP 501) and the health service see the full
//! surface of the platform from day one.
//!
//! Implementing the generated server traits (rather than a catch-all route)
//! keeps this crate honest: a change to a proto that adds or renames an RPC
//! fails to compile here until the placeholder is updated.
//!
//! ```no_run
//! let routes = anumate_unimplemented::add_all(tonic::service::RoutesBuilder::default());
//! # let _ = routes;
//! ```
#![forbid(unsafe_code)]

use anumate_errors::{Error, ErrorCode};
use anumate_proto::{
    approvals::v1::approvals_service_server::{self, ApprovalsServiceServer},
    captokens::v1::cap_tokens_service_server::{self, CapTokensServiceServer},
    ghostrun::v1::ghost_run_service_server::{self, GhostRunServiceServer},
    orchestrator::v1::orchestrator_service_server::{self, OrchestratorServiceServer},
    policy::v1::policy_service_server::{self, PolicyServiceServer},
    receipts::v1::receipts_service_server::{self, ReceiptsServiceServer},
};
use tonic::service::RoutesBuilder;

/// Full gRPC names of the placeholder services (for the health service and
/// reflection), in the order [`add_all`] adds them.
pub const SERVICE_NAMES: &[&str] = &[
    policy_service_server::SERVICE_NAME,
    ghost_run_service_server::SERVICE_NAME,
    orchestrator_service_server::SERVICE_NAME,
    approvals_service_server::SERVICE_NAME,
    cap_tokens_service_server::SERVICE_NAME,
    receipts_service_server::SERVICE_NAME,
];

/// A service implementation that answers every method with [`status`]. It
/// implements the server trait of every service in [`SERVICE_NAMES`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Unimplemented;

/// The status every placeholder method returns: `UNIMPLEMENTED` with
/// `ErrorInfo.reason = "UNIMPLEMENTED"` and `service` / `method` metadata.
pub fn status(service: &str, method: &str) -> tonic::Status {
    Error::new(
        ErrorCode::Unimplemented,
        format!("{service}/{method} is not implemented yet"),
    )
    .with_metadata("service", service)
    .with_metadata("method", method)
    .to_status()
}

/// Adds every placeholder service to `routes`.
pub fn add_all(routes: RoutesBuilder) -> RoutesBuilder {
    add_except(routes, &[])
}

/// Adds the placeholder services whose full name is not in `skip`, for a
/// server that already has real implementations of some of them.
pub fn add_except(mut routes: RoutesBuilder, skip: &[&str]) -> RoutesBuilder {
    let wanted = |name: &str| !skip.contains(&name);
    if wanted(policy_service_server::SERVICE_NAME) {
        routes.add_service(PolicyServiceServer::new(Unimplemented));
    }
    if wanted(ghost_run_service_server::SERVICE_NAME) {
        routes.add_service(GhostRunServiceServer::new(Unimplemented));
    }
    if wanted(orchestrator_service_server::SERVICE_NAME) {
        routes.add_service(OrchestratorServiceServer::new(Unimplemented));
    }
    if wanted(approvals_service_server::SERVICE_NAME) {
        routes.add_service(ApprovalsServiceServer::new(Unimplemented));
    }
    if wanted(cap_tokens_service_server::SERVICE_NAME) {
        routes.add_service(CapTokensServiceServer::new(Unimplemented));
    }
    if wanted(receipts_service_server::SERVICE_NAME) {
        routes.add_service(ReceiptsServiceServer::new(Unimplemented));
    }
    routes
}

/// Implements a generated server trait for [`Unimplemented`]. Each entry is
/// `fn method(Request) -> Response;`; server-streaming methods follow as
/// `stream method(Request) -> StreamType<Item>;`. The RPC name reported is the
/// request type without `Request` (buf lint guarantees they match).
macro_rules! unimplemented_service {
    (
        $pkg:ident :: $server:ident :: $service:ident {
            $( fn $method:ident($req:ident) -> $resp:ident; )*
            $( stream $smethod:ident($sreq:ident) -> $stream:ident<$item:ident>; )*
        }
    ) => {
        #[tonic::async_trait]
        impl anumate_proto::$pkg::v1::$server::$service for Unimplemented {
            $(
                async fn $method(
                    &self,
                    _request: tonic::Request<anumate_proto::$pkg::v1::$req>,
                ) -> Result<tonic::Response<anumate_proto::$pkg::v1::$resp>, tonic::Status> {
                    Err(rpc_status(anumate_proto::$pkg::v1::$server::SERVICE_NAME, stringify!($req)))
                }
            )*
            $(
                type $stream = tonic::codegen::BoxStream<anumate_proto::$pkg::v1::$item>;

                async fn $smethod(
                    &self,
                    _request: tonic::Request<anumate_proto::$pkg::v1::$sreq>,
                ) -> Result<tonic::Response<Self::$stream>, tonic::Status> {
                    Err(rpc_status(anumate_proto::$pkg::v1::$server::SERVICE_NAME, stringify!($sreq)))
                }
            )*
        }
    };
}

fn rpc_status(service: &str, request_type: &str) -> tonic::Status {
    let method = request_type.strip_suffix("Request").unwrap_or(request_type);
    status(service, method)
}

unimplemented_service!(policy::policy_service_server::PolicyService {
    fn push_policy(PushPolicyRequest) -> PushPolicyResponse;
    fn validate_policy(ValidatePolicyRequest) -> ValidatePolicyResponse;
    fn get_policy(GetPolicyRequest) -> GetPolicyResponse;
    fn list_policies(ListPoliciesRequest) -> ListPoliciesResponse;
    fn list_policy_versions(ListPolicyVersionsRequest) -> ListPolicyVersionsResponse;
    fn publish_policy_version(PublishPolicyVersionRequest) -> PublishPolicyVersionResponse;
    fn deprecate_policy_version(DeprecatePolicyVersionRequest) -> DeprecatePolicyVersionResponse;
    fn delete_policy(DeletePolicyRequest) -> DeletePolicyResponse;
    fn evaluate_policy(EvaluatePolicyRequest) -> EvaluatePolicyResponse;
    fn test_policy(TestPolicyRequest) -> TestPolicyResponse;
    fn redact(RedactRequest) -> RedactResponse;
});

unimplemented_service!(ghostrun::ghost_run_service_server::GhostRunService {
    fn preflight(PreflightRequest) -> PreflightResponse;
    fn get_preflight(GetPreflightRequest) -> GetPreflightResponse;
    fn list_preflights(ListPreflightsRequest) -> ListPreflightsResponse;
});

unimplemented_service!(orchestrator::orchestrator_service_server::OrchestratorService {
    fn execute(ExecuteRequest) -> ExecuteResponse;
    fn get_run(GetRunRequest) -> GetRunResponse;
    fn list_runs(ListRunsRequest) -> ListRunsResponse;
    fn pause_run(PauseRunRequest) -> PauseRunResponse;
    fn resume_run(ResumeRunRequest) -> ResumeRunResponse;
    fn cancel_run(CancelRunRequest) -> CancelRunResponse;
    fn kill_run(KillRunRequest) -> KillRunResponse;
    stream watch_run(WatchRunRequest) -> WatchRunStream<WatchRunResponse>;
});

unimplemented_service!(approvals::approvals_service_server::ApprovalsService {
    fn request_approval(RequestApprovalRequest) -> RequestApprovalResponse;
    fn get_approval(GetApprovalRequest) -> GetApprovalResponse;
    fn list_approvals(ListApprovalsRequest) -> ListApprovalsResponse;
    fn approve(ApproveRequest) -> ApproveResponse;
    fn reject(RejectRequest) -> RejectResponse;
    fn delegate(DelegateRequest) -> DelegateResponse;
    fn cancel_approval(CancelApprovalRequest) -> CancelApprovalResponse;
});

unimplemented_service!(captokens::cap_tokens_service_server::CapTokensService {
    fn issue_token(IssueTokenRequest) -> IssueTokenResponse;
    fn verify_token(VerifyTokenRequest) -> VerifyTokenResponse;
    fn refresh_token(RefreshTokenRequest) -> RefreshTokenResponse;
    fn revoke_token(RevokeTokenRequest) -> RevokeTokenResponse;
    fn get_jwks(GetJwksRequest) -> GetJwksResponse;
    fn list_token_audit(ListTokenAuditRequest) -> ListTokenAuditResponse;
});

unimplemented_service!(receipts::receipts_service_server::ReceiptsService {
    fn append_receipt(AppendReceiptRequest) -> AppendReceiptResponse;
    fn get_receipt(GetReceiptRequest) -> GetReceiptResponse;
    fn list_receipts(ListReceiptsRequest) -> ListReceiptsResponse;
    fn get_checkpoint(GetCheckpointRequest) -> GetCheckpointResponse;
    fn get_inclusion_proof(GetInclusionProofRequest) -> GetInclusionProofResponse;
    fn get_consistency_proof(GetConsistencyProofRequest) -> GetConsistencyProofResponse;
    fn get_signing_keys(GetSigningKeysRequest) -> GetSigningKeysResponse;
    stream export_receipts(ExportReceiptsRequest) -> ExportReceiptsStream<ExportReceiptsResponse>;
});

#[cfg(test)]
mod tests;
