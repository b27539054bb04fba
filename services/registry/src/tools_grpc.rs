//! The gRPC adapter of the tool catalogue: decode, call [`ToolCatalogue`],
//! encode. Who may call each RPC is enforced before the handler by the auth
//! layer (the proto's `authz` options).

use anumate_documents::{Actor, Transition};
use anumate_proto::registry::v1 as pb;
use pb::tools_service_server::{ToolsService, ToolsServiceServer};
use tonic::{Request, Response, Status};

use crate::tools::ToolCatalogue;

/// The tool catalogue behind the generated `ToolsService` trait.
#[derive(Clone)]
pub struct ToolsGrpc {
    tools: ToolCatalogue,
}

impl ToolsGrpc {
    /// Wraps a catalogue.
    pub fn new(tools: ToolCatalogue) -> Self {
        ToolsGrpc { tools }
    }

    /// The tonic server, with a request size limit matching the file limit
    /// (larger messages are refused from their length prefix).
    pub fn into_server(self) -> ToolsServiceServer<ToolsGrpc> {
        let limit = self
            .tools
            .limits()
            .max_file_bytes
            .saturating_mul(2)
            .saturating_add(64 * 1024);
        ToolsServiceServer::new(self).max_decoding_message_size(limit)
    }
}

/// The caller, as the auth layer verified it.
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    Ok(Actor {
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

#[tonic::async_trait]
impl ToolsService for ToolsGrpc {
    async fn push_tools(
        &self,
        req: Request<pb::PushToolsRequest>,
    ) -> Result<Response<pb::PushToolsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let pushed = self
            .tools
            .push(&actor, &r.source_yaml, &r.source_name)
            .await?;
        Ok(Response::new(pb::PushToolsResponse {
            tools: pushed
                .into_iter()
                .map(|p| pb::PushedTool {
                    version: Some(p.version),
                    created: p.created,
                    tool: Some(p.document),
                })
                .collect(),
        }))
    }

    async fn get_tool(
        &self,
        req: Request<pb::GetToolRequest>,
    ) -> Result<Response<pb::GetToolResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (tool, version) = self.tools.get(&actor, &r.name, &r.version).await?;
        Ok(Response::new(pb::GetToolResponse {
            tool: Some(tool),
            version: Some(version),
        }))
    }

    async fn list_tools(
        &self,
        req: Request<pb::ListToolsRequest>,
    ) -> Result<Response<pb::ListToolsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (tools, next_page_token) = self
            .tools
            .list(&actor, &r.label_selector, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListToolsResponse {
            tools,
            next_page_token,
        }))
    }

    async fn list_tool_versions(
        &self,
        req: Request<pb::ListToolVersionsRequest>,
    ) -> Result<Response<pb::ListToolVersionsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (versions, next_page_token) = self
            .tools
            .documents()
            .list_versions(&actor, &r.name, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListToolVersionsResponse {
            versions,
            next_page_token,
        }))
    }

    async fn deprecate_tool_version(
        &self,
        req: Request<pb::DeprecateToolVersionRequest>,
    ) -> Result<Response<pb::DeprecateToolVersionResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (tool, version) = self
            .tools
            .documents()
            .transition(&actor, &r.name, r.version, &r.etag, Transition::Deprecate)
            .await?;
        Ok(Response::new(pb::DeprecateToolVersionResponse {
            version: Some(version),
            tool: Some(tool),
        }))
    }
}
