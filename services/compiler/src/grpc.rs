//! The gRPC adapter: decode, call [`Compiler`], encode. Who may call each RPC
//! is enforced before the handler by the auth layer (the proto's `authz` options).

use anumate_proto::compiler::v1 as pb;
use pb::compiler_service_server::{CompilerService, CompilerServiceServer};
use tonic::{Request, Response, Status};

use crate::{Actor, Compiler};

/// Requests are small (a name and a version, or a hash).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The compiler behind the generated `CompilerService` trait.
#[derive(Clone)]
pub struct CompilerGrpc {
    compiler: Compiler,
}

impl CompilerGrpc {
    /// Wraps a compiler.
    pub fn new(compiler: Compiler) -> Self {
        CompilerGrpc { compiler }
    }

    /// The tonic server, refusing oversized requests from their length prefix.
    pub fn into_server(self) -> CompilerServiceServer<CompilerGrpc> {
        CompilerServiceServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

/// The caller, as the auth layer verified it and admitted it by the RPC's
/// `(anumate.common.v1.authz)` rule.
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    Ok(Actor {
        tenant: principal.tenant_id.clone(),
        subject: principal.subject.clone(),
        authorization: req.metadata().get("authorization").cloned(),
        principal: Some(principal),
    })
}

#[tonic::async_trait]
impl CompilerService for CompilerGrpc {
    async fn compile(
        &self,
        req: Request<pb::CompileRequest>,
    ) -> Result<Response<pb::CompileResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let compiled = self
            .compiler
            .compile(&actor, &r.capsule_name, &r.version)
            .await?;
        Ok(Response::new(pb::CompileResponse {
            plan: Some((*compiled.plan).clone()),
            cache_hit: compiled.cache_hit,
        }))
    }

    async fn get_plan(
        &self,
        req: Request<pb::GetPlanRequest>,
    ) -> Result<Response<pb::GetPlanResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let plan = self.compiler.get(&actor, &r.plan_hash).await?;
        Ok(Response::new(pb::GetPlanResponse { plan: Some(plan) }))
    }

    async fn list_plans(
        &self,
        req: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (plans, next_page_token) = self
            .compiler
            .list(
                &actor,
                &r.capsule_name,
                r.capsule_version,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListPlansResponse {
            plans,
            next_page_token,
        }))
    }
}
