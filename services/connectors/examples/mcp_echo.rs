//! A tiny MCP server over stdio (rmcp), for the `mcp` connector's tests and
//! demos: `cargo run -p anumate-connectors --example mcp_echo`.
//!
//! Tools: `add` (structured `{sum}`, with an output schema; read-only,
//! idempotent), `echo` (its arguments back as JSON text), `Say Hello` (plain
//! text), `fail` (an `isError` result naming `$MCP_ECHO_TOKEN`'s value, which
//! the hub must scrub), `crash` (the process exits: the session breaks) and
//! `slow` (answers after `ms` milliseconds). Every call is appended to the
//! file `$MCP_ECHO_LOG`, when set, one tool name a line.
//!
//! `mcp_echo --http 127.0.0.1:0` serves streamable HTTP at `/mcp` instead
//! and prints the address it listens on as its first line; with
//! `$MCP_ECHO_TOKEN` set it answers 401 to a request without
//! `Authorization: Bearer <that token>`.

use std::io::Write as _;
use std::sync::Arc;

use axum::response::IntoResponse as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::{ServerHandler, ServiceExt as _};
use serde_json::{Value, json};

struct Echo;

fn schema(v: Value) -> Arc<serde_json::Map<String, Value>> {
    match v {
        Value::Object(m) => Arc::new(m),
        _ => Arc::new(serde_json::Map::new()),
    }
}

fn tools() -> Vec<Tool> {
    let add = Tool::new(
        "add",
        "Adds two numbers",
        schema(json!({
            "type": "object",
            "required": ["a", "b"],
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}}
        })),
    )
    .with_raw_output_schema(schema(json!({
        "type": "object",
        "required": ["sum"],
        "properties": {"sum": {"type": "number"}}
    })))
    .with_annotations(ToolAnnotations::new().read_only(true).idempotent(true));
    let echo = Tool::new(
        "echo",
        "Returns its arguments",
        schema(json!({"type": "object"})),
    );
    let hello = Tool::new(
        "Say Hello",
        "Greets someone",
        schema(json!({"type": "object", "properties": {"name": {"type": "string"}}})),
    );
    let fail = Tool::new("fail", "Always fails", schema(json!({"type": "object"})))
        .with_annotations(ToolAnnotations::new().destructive(true));
    let crash = Tool::new(
        "crash",
        "Exits the server",
        schema(json!({"type": "object"})),
    );
    let slow = Tool::new(
        "slow",
        "Answers after ms milliseconds",
        schema(json!({"type": "object", "properties": {"ms": {"type": "integer"}}})),
    );
    vec![add, echo, hello, fail, crash, slow]
}

fn log(tool: &str) {
    if let Ok(path) = std::env::var("MCP_ECHO_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{tool}");
    }
}

impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        log(&request.name);
        let args = Value::Object(request.arguments.unwrap_or_default());
        let result = match request.name.as_ref() {
            "add" => {
                let (Some(a), Some(b)) = (args["a"].as_f64(), args["b"].as_f64()) else {
                    return Err(ErrorData::invalid_params("a and b must be numbers", None));
                };
                let sum = match (args["a"].as_i64(), args["b"].as_i64()) {
                    (Some(a), Some(b)) => json!(a.saturating_add(b)),
                    _ => json!(a + b),
                };
                let mut r = CallToolResult::success(vec![ContentBlock::text(sum.to_string())]);
                r.structured_content = Some(json!({"sum": sum}));
                r
            }
            "echo" => CallToolResult::success(vec![ContentBlock::text(args.to_string())]),
            "Say Hello" => CallToolResult::success(vec![ContentBlock::text(format!(
                "hello {}",
                args["name"].as_str().unwrap_or("world")
            ))]),
            "fail" => CallToolResult::error(vec![ContentBlock::text(format!(
                "boom (token {})",
                std::env::var("MCP_ECHO_TOKEN").unwrap_or_default()
            ))]),
            "crash" => std::process::exit(3),
            "slow" => {
                let ms = args["ms"].as_u64().unwrap_or(1000);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                CallToolResult::success(vec![ContentBlock::text("{\"slept\": true}")])
            }
            other => {
                return Err(ErrorData::invalid_params(
                    format!("no tool {other:?}"),
                    None,
                ));
            }
        };
        Ok(result.into())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, addr] = args.as_slice()
        && flag == "--http"
    {
        return serve_http(addr).await;
    }
    let service = Echo.serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}

async fn serve_http(addr: &str) -> Result<(), Box<dyn std::error::Error>> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    };
    let service = StreamableHttpService::new(
        || Ok(Echo),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let expected = std::env::var("MCP_ECHO_TOKEN")
        .ok()
        .map(|t| format!("Bearer {t}"));
    let app = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let expected = expected.clone();
                async move {
                    let given = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok());
                    if expected.is_some() && given != expected.as_deref() {
                        return axum::http::StatusCode::UNAUTHORIZED.into_response();
                    }
                    next.run(req).await
                }
            },
        ));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
