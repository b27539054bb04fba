//! The gRPC adapter: decode, call [`GhostRun`], encode. Who may call each RPC
//! is enforced before the handler by the auth layer (the proto's `authz` options).

use anumate_errors::Error;
use anumate_proto::ghostrun::v1 as pb;
use pb::ghost_run_service_server::{GhostRunService, GhostRunServiceServer};
use tonic::{Request, Response, Status};

use crate::{Actor, GhostRun, Inputs};

/// Requests carry inputs and fixtures: bounded.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// GhostRun behind the generated `GhostRunService` trait.
#[derive(Clone)]
pub struct GhostRunGrpc {
    ghostrun: GhostRun,
}

impl GhostRunGrpc {
    /// Wraps the service.
    pub fn new(ghostrun: GhostRun) -> Self {
        GhostRunGrpc { ghostrun }
    }

    /// The tonic server, refusing oversized requests from their length prefix.
    pub fn into_server(self) -> GhostRunServiceServer<GhostRunGrpc> {
        GhostRunServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    let mut roles: Vec<String> = principal
        .roles
        .iter()
        .map(|r| r.as_str().to_string())
        .collect();
    roles.sort();
    Ok(Actor {
        tenant: principal.tenant_id.clone(),
        subject: principal.subject.clone(),
        roles,
        groups: principal.groups.clone(),
        authorization: req.metadata().get("authorization").cloned(),
        principal: Some(principal),
    })
}

#[tonic::async_trait]
impl GhostRunService for GhostRunGrpc {
    async fn preflight(
        &self,
        req: Request<pb::PreflightRequest>,
    ) -> Result<Response<pb::PreflightResponse>, Status> {
        let actor = actor(&req)?;
        let mut r = req.into_inner();
        let inputs = match (r.inputs.take(), r.inputs_json.is_empty()) {
            (Some(_), false) => {
                return Err(Error::invalid_argument(
                    "inputs_json",
                    "give inputs or inputs_json, not both",
                )
                .into());
            }
            (s, true) => Inputs::Struct(s),
            (None, false) => Inputs::Json(std::mem::take(&mut r.inputs_json)),
        };
        let report = self.ghostrun.preflight(&actor, r, inputs).await?;
        Ok(Response::new(pb::PreflightResponse {
            report: Some(report),
        }))
    }

    async fn get_preflight(
        &self,
        req: Request<pb::GetPreflightRequest>,
    ) -> Result<Response<pb::GetPreflightResponse>, Status> {
        let actor = actor(&req)?;
        let report = self
            .ghostrun
            .get(&actor, &req.get_ref().preflight_id)
            .await?;
        Ok(Response::new(pb::GetPreflightResponse {
            report: Some(report),
        }))
    }

    async fn list_preflights(
        &self,
        req: Request<pb::ListPreflightsRequest>,
    ) -> Result<Response<pb::ListPreflightsResponse>, Status> {
        let actor = actor(&req)?;
        let (reports, next_page_token) = self.ghostrun.list(&actor, req.get_ref()).await?;
        Ok(Response::new(pb::ListPreflightsResponse {
            reports,
            next_page_token,
        }))
    }
}
