//! The gRPC adapter: decode, call [`CapTokens`], encode, for the public
//! `CapTokensService` and the service-only `CapabilityTokensInternal`
//! (minting, verifying, refreshing; no HTTP rule, so the REST gateway cannot
//! route it).
//!
//! Who may call what (SPEC §8) is declared on each RPC in
//! `proto/anumate/captokens/v1/captokens.proto` (`authz` options, read for
//! both services) and enforced by the auth layer before a handler runs. A
//! service identity is only ever a token of the platform's service issuer,
//! never a subject prefix:
//! - `IssueToken`, `RefreshToken`: the orchestrator service, or `admin`
//!   (audited and flagged as an admin issue). Operators may not mint.
//! - `VerifyToken`: any service identity (the connectors), or `admin`.
//! - `RevokeToken`: the orchestrator service, `admin` or `operator`.
//! - `ListTokenAudit`: `auditor` or `admin`; `GetJwks`: public.
//!
//! The tenant is always the caller's, from the bearer token.

use anumate_auth::Role;
use anumate_errors::Error;
use anumate_proto::captokens::v1 as pb;
use anumate_proto::google::api::HttpBody;
use pb::cap_tokens_service_server::{CapTokensService, CapTokensServiceServer};
use pb::capability_tokens_internal_server::{
    CapabilityTokensInternal, CapabilityTokensInternalServer,
};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::{Actor, AuditQuery, CapTokens, RevokeTarget, convert};

/// Largest request accepted, in bytes (tokens are at most 16 KiB; arguments
/// and constraints are small).
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The service behind the generated `CapTokensService` and
/// `CapabilityTokensInternal` traits.
#[derive(Clone)]
pub struct CapTokensGrpc {
    tokens: CapTokens,
}

impl CapTokensGrpc {
    /// Wraps the service.
    pub fn new(tokens: CapTokens) -> Self {
        CapTokensGrpc { tokens }
    }

    /// The tonic server of `CapTokensService`, with a request size limit.
    pub fn into_server(self) -> CapTokensServiceServer<CapTokensGrpc> {
        CapTokensServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The tonic server of `CapabilityTokensInternal`, with a request size
    /// limit.
    pub fn into_internal_server(self) -> CapabilityTokensInternalServer<CapTokensGrpc> {
        CapabilityTokensInternalServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The caller, as the auth layer verified it and admitted it by the RPC's
/// `(anumate.common.v1.authz)` rule; `admin` marks a person acting as admin.
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    Ok(Actor {
        admin: principal.service.is_none() && principal.has_role(Role::Admin),
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

#[tonic::async_trait]
impl CapabilityTokensInternal for CapTokensGrpc {
    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let actor = actor(&req)?;
        Ok(Response::new(
            self.tokens.issue(&actor, req.get_ref()).await?,
        ))
    }

    async fn verify_token(
        &self,
        req: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let actor = actor(&req)?;
        Ok(Response::new(
            self.tokens.verify(&actor, req.get_ref()).await?,
        ))
    }

    async fn consume_token(
        &self,
        req: Request<pb::ConsumeTokenRequest>,
    ) -> Result<Response<pb::ConsumeTokenResponse>, Status> {
        let actor = actor(&req)?;
        Ok(Response::new(
            self.tokens.consume(&actor, req.get_ref()).await?,
        ))
    }

    async fn refresh_token(
        &self,
        req: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
        let actor = actor(&req)?;
        Ok(Response::new(
            self.tokens.refresh(&actor, req.get_ref()).await?,
        ))
    }
}

#[tonic::async_trait]
impl CapTokensService for CapTokensGrpc {
    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let target = match &r.target {
            Some(pb::revoke_token_request::Target::Jti(jti)) if !jti.is_empty() => {
                RevokeTarget::Jti(jti)
            }
            Some(pb::revoke_token_request::Target::RunId(run)) if !run.is_empty() => {
                RevokeTarget::Run(run)
            }
            _ => {
                return Err(
                    Error::invalid_argument("target", "a jti or a run_id is required").into(),
                );
            }
        };
        let (revoked_jtis, receipt_id) = self.tokens.revoke(&actor, target, &r.reason).await?;
        Ok(Response::new(pb::RevokeTokenResponse {
            revoked_jtis,
            receipt_id,
        }))
    }

    /// The JWKS as a JSON document, with how long it may be cached as the
    /// `cache-control` response metadata (an HTTP header through a gateway).
    async fn get_jwks(
        &self,
        _req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<HttpBody>, Status> {
        let (jwks_json, max_age) = self.tokens.jwks()?;
        let mut response = Response::new(HttpBody {
            content_type: "application/json".to_owned(),
            data: jwks_json.into_bytes(),
            extensions: Vec::new(),
        });
        let cache = MetadataValue::try_from(format!("public, max-age={}", max_age.as_secs()))
            .map_err(Error::internal)?;
        response.metadata_mut().insert("cache-control", cache);
        Ok(response)
    }

    async fn list_token_audit(
        &self,
        req: Request<pb::ListTokenAuditRequest>,
    ) -> Result<Response<pb::ListTokenAuditResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let kind = pb::AuditKind::try_from(r.kind).map_err(|_| {
            Error::invalid_argument("kind", format!("unknown AuditKind value {}", r.kind))
        })?;
        let query = AuditQuery {
            kind,
            jti: r.jti,
            run_id: r.run_id,
            start_micros: r
                .start_time
                .as_ref()
                .map(|t| convert::micros(t, "start_time"))
                .transpose()?,
            end_micros: r
                .end_time
                .as_ref()
                .map(|t| convert::micros(t, "end_time"))
                .transpose()?,
        };
        let (entries, next_page_token) = self
            .tokens
            .list_audit(&actor, &query, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListTokenAuditResponse {
            entries,
            next_page_token,
        }))
    }
}
