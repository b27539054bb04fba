//! The gRPC adapter: decode, check the role, call [`CapTokens`], encode.
//!
//! Roles: `IssueToken`, `VerifyToken`, `RefreshToken` and `RevokeToken` take a
//! service identity (`svc:…`, e.g. the orchestrator or a connector) or the
//! `operator`/`admin` role (the CLI); `ListTokenAudit` takes `auditor` or
//! `admin`; `GetJwks` takes nothing (see [`crate::PUBLIC_PATHS`]). The tenant
//! is always the caller's, from the bearer token.

use anumate_auth::{Principal, Role};
use anumate_errors::Error;
use anumate_proto::captokens::v1 as pb;
use pb::cap_tokens_service_server::{CapTokensService, CapTokensServiceServer};
use tonic::{Request, Response, Status};

use crate::{Actor, AuditQuery, CapTokens, RevokeTarget, convert};

/// Roles (besides service identities) allowed to issue, verify, refresh and revoke.
const OPERATORS: &[Role] = &[Role::Operator, Role::Admin];
/// Roles allowed to read the audit log.
const AUDITORS: &[Role] = &[Role::Auditor, Role::Admin];

/// Largest request accepted, in bytes (tokens are at most 16 KiB; arguments
/// and constraints are small).
const MAX_REQUEST_BYTES: usize = 256 * 1024;

/// The service behind the generated `CapTokensService` trait.
#[derive(Clone)]
pub struct CapTokensGrpc {
    tokens: CapTokens,
}

impl CapTokensGrpc {
    /// Wraps the service.
    pub fn new(tokens: CapTokens) -> Self {
        CapTokensGrpc { tokens }
    }

    /// The tonic server, with a request size limit.
    pub fn into_server(self) -> CapTokensServiceServer<CapTokensGrpc> {
        CapTokensServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The caller, if it is a service identity or holds one of `roles`.
fn actor<T>(req: &Request<T>, roles: &[Role], services: bool) -> Result<Actor, Status> {
    let principal: Principal = anumate_auth::principal(req)?;
    if !(services && principal.is_service()) {
        principal.require_any(roles)?;
    }
    let credential = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    Ok(Actor {
        tenant: principal.tenant_id,
        subject: principal.subject,
        credential,
    })
}

#[tonic::async_trait]
impl CapTokensService for CapTokensGrpc {
    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        let actor = actor(&req, OPERATORS, true)?;
        Ok(Response::new(
            self.tokens.issue(&actor, req.get_ref()).await?,
        ))
    }

    async fn verify_token(
        &self,
        req: Request<pb::VerifyTokenRequest>,
    ) -> Result<Response<pb::VerifyTokenResponse>, Status> {
        let actor = actor(&req, OPERATORS, true)?;
        Ok(Response::new(
            self.tokens.verify(&actor, req.get_ref()).await?,
        ))
    }

    async fn refresh_token(
        &self,
        req: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
        let actor = actor(&req, OPERATORS, true)?;
        Ok(Response::new(
            self.tokens.refresh(&actor, req.get_ref()).await?,
        ))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let actor = actor(&req, OPERATORS, true)?;
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

    async fn get_jwks(
        &self,
        _req: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let (jwks_json, max_age) = self.tokens.jwks()?;
        Ok(Response::new(pb::GetJwksResponse {
            jwks_json,
            max_age: Some(pbjson_types::Duration {
                seconds: i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
                nanos: 0,
            }),
        }))
    }

    async fn list_token_audit(
        &self,
        req: Request<pb::ListTokenAuditRequest>,
    ) -> Result<Response<pb::ListTokenAuditResponse>, Status> {
        let actor = actor(&req, AUDITORS, false)?;
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
        let (entries, next) = self
            .tokens
            .list_audit(&actor, &query, r.page.as_ref())
            .await?;
        Ok(Response::new(pb::ListTokenAuditResponse {
            entries,
            page: Some(anumate_proto::common::v1::PageResponse {
                next_page_token: next,
            }),
        }))
    }
}
