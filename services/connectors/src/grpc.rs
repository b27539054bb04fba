//! The gRPC adapter: decode, call [`Hub`], encode, for the public
//! `ConnectorHubService` and the service-only `ConnectorHubInternal`. Who may
//! call is declared on each RPC (`authz` options) and enforced by the auth
//! layer; the tenant is always the caller's, from its bearer token.

use anumate_errors::{Error, Result};
use anumate_proto::connectors::v1 as pb;
use pb::connector_hub_internal_server::{ConnectorHubInternal, ConnectorHubInternalServer};
use pb::connector_hub_service_server::{ConnectorHubService, ConnectorHubServiceServer};
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::{Hub, Invocation, MockCallRow, MockFilter};

/// Largest request accepted, in bytes.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The service behind both generated traits.
#[derive(Clone)]
pub struct HubGrpc {
    hub: Hub,
}

impl HubGrpc {
    /// Wraps the hub.
    pub fn new(hub: Hub) -> Self {
        HubGrpc { hub }
    }

    /// The tonic server of `ConnectorHubService`.
    pub fn into_server(self) -> ConnectorHubServiceServer<HubGrpc> {
        ConnectorHubServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// The tonic server of `ConnectorHubInternal`.
    pub fn into_internal_server(self) -> ConnectorHubInternalServer<HubGrpc> {
        ConnectorHubInternalServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

fn tenant<T>(req: &Request<T>) -> std::result::Result<String, Status> {
    Ok(anumate_auth::principal(req)?.tenant_id)
}

fn to_struct(v: &Value, field: &str) -> Result<pbjson_types::Struct> {
    match v {
        Value::Object(_) => serde_json::from_value(v.clone())
            .map_err(|e| Error::internal(format!("{field} is not a Struct: {e}"))),
        // A Struct holds an object; anything else travels as `{"value": …}`.
        other => serde_json::from_value(serde_json::json!({"value": other}))
            .map_err(|e| Error::internal(format!("{field} is not a Struct: {e}"))),
    }
}

#[tonic::async_trait]
impl ConnectorHubInternal for HubGrpc {
    async fn invoke(
        &self,
        req: Request<pb::InvokeRequest>,
    ) -> std::result::Result<Response<pb::InvokeResponse>, Status> {
        let tenant = tenant(&req)?;
        let deadline = grpc_timeout(req.metadata()).map(|t| std::time::Instant::now() + t);
        let r = req.get_ref();
        let args = match &r.args {
            None => return Err(Error::invalid_argument("args", "required").into()),
            Some(s) => anumate_engine::json::struct_json(s)
                .map_err(|e| Error::invalid_argument("args", e.to_string()))?,
        };
        let invoked = self
            .hub
            .invoke(&Invocation {
                tenant: &tenant,
                tool: &r.tool,
                args: &args,
                idempotency_key: &r.idempotency_key,
                token: &r.capability_token,
                deadline,
            })
            .await?;
        Ok(Response::new(pb::InvokeResponse {
            output: Some(to_struct(&invoked.output, "output")?),
            replayed: invoked.replayed,
            connector: invoked.connector,
            recorded_at: Some(anumate_proto::timestamp_from_micros(invoked.recorded_at)),
        }))
    }
}

/// The call's `grpc-timeout` (digits and a unit: H, M, S, m, u, n).
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn mock_call(row: MockCallRow) -> Result<pb::MockCall> {
    Ok(pb::MockCall {
        acted: row.output.is_some(),
        output: row
            .output
            .as_ref()
            .map(|o| to_struct(o, "output"))
            .transpose()?,
        args: Some(to_struct(&row.args, "args")?),
        call_id: row.call_id,
        tool: row.tool,
        idempotency_key: row.idempotency_key,
        run_id: row.run,
        step_id: row.step,
        deliveries: i32::try_from(row.deliveries).unwrap_or(i32::MAX),
        first_delivered_at: Some(anumate_proto::timestamp_from_micros(row.first_delivered_at)),
        last_delivered_at: Some(anumate_proto::timestamp_from_micros(row.last_delivered_at)),
    })
}

#[tonic::async_trait]
impl ConnectorHubService for HubGrpc {
    async fn list_mcp_tools(
        &self,
        req: Request<pb::ListMcpToolsRequest>,
    ) -> std::result::Result<Response<pb::ListMcpToolsResponse>, Status> {
        let tenant = tenant(&req)?;
        let r = req.get_ref();
        let (size, after) = anumate_store::paging::page_params(r.page_size, &r.page_token)?;
        let mut tools = self.hub.list_mcp_tools(&tenant, &r.server).await?;
        if let Some(after) = after {
            let at = tools
                .iter()
                .position(|t| t.name == after)
                .ok_or_else(anumate_store::paging::malformed_token)?;
            tools.drain(..=at);
        }
        let (tools, next_page_token) =
            anumate_store::paging::finish_page(tools, size, |t| t.name.clone());
        let tools = tools
            .into_iter()
            .map(|t| {
                Ok(pb::McpTool {
                    input_schema: Some(to_struct(&t.input_schema, "input_schema")?),
                    output_schema: t
                        .output_schema
                        .as_ref()
                        .map(|s| to_struct(s, "output_schema"))
                        .transpose()?,
                    name: t.name,
                    title: t.title,
                    description: t.description,
                    read_only_hint: t.read_only,
                    destructive_hint: t.destructive,
                    idempotent_hint: t.idempotent,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Response::new(pb::ListMcpToolsResponse {
            tools,
            next_page_token,
        }))
    }

    async fn list_mock_calls(
        &self,
        req: Request<pb::ListMockCallsRequest>,
    ) -> std::result::Result<Response<pb::ListMockCallsResponse>, Status> {
        let tenant = tenant(&req)?;
        let r = req.get_ref();
        let (size, after) = anumate_store::paging::page_params(r.page_size, &r.page_token)?;
        let rows = self
            .hub
            .list_mock_calls(
                &tenant,
                &MockFilter {
                    run: &r.run_id,
                    tool: &r.tool,
                    before_id: after.as_deref(),
                    limit: size + 1,
                },
            )
            .await?;
        let (rows, next_page_token) =
            anumate_store::paging::finish_page(rows, size, |c| c.call_id.clone());
        Ok(Response::new(pb::ListMockCallsResponse {
            calls: rows.into_iter().map(mock_call).collect::<Result<_>>()?,
            next_page_token,
        }))
    }
}
