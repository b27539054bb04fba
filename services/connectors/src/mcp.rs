//! The `mcp:<server>` connector: calls a tool of an MCP server declared in
//! the hub's configuration (`[[connectors.mcp]]`), through the `rmcp` client.
//!
//! A server is a stdio `command` the hub starts (with `args` and `env`), or a
//! streamable HTTP `url` (with `headers`); `env` and `headers` values may use
//! `${{ secrets.NAME }}`, resolved here once at start-up. The hub keeps one
//! session per server, opened at the first call and opened again after a
//! transport failure. A call is `tools/call` with the call's arguments; the
//! output is the result's structured content, else its text parsed as JSON,
//! else the text. `isError` fails for good; a server that cannot be started
//! or reached, a broken session or a call over `timeout_ms` is retryable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anumate_errors::{Error, Reason, Result};
use futures::future::BoxFuture;
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock};
use rmcp::service::{RoleClient, RunningService, ServiceError, ServiceExt as _};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::connector::{Call, Connector, ConnectorError};

/// Largest output (its JSON text) a call may return, in bytes.
const MAX_OUTPUT_BYTES: usize = 1024 * 1024;
/// Longest `isError` text kept in an error message, in characters.
const MAX_ERROR_CHARS: usize = 1000;

/// One `[[connectors.mcp]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpServerConfig {
    /// The server's name: tools name it as `connector: mcp:<name>` (a DNS label).
    pub name: String,
    /// A stdio server: the program the hub starts (found on `PATH`).
    pub command: String,
    /// The program's arguments.
    pub args: Vec<String>,
    /// Environment variables added to the program's (values may use
    /// `${{ secrets.NAME }}`).
    pub env: BTreeMap<String, String>,
    /// A streamable HTTP server: its endpoint (`https://host/mcp`).
    pub url: String,
    /// HTTP headers sent with every request (values may use `${{ secrets.NAME }}`).
    pub headers: BTreeMap<String, String>,
    /// Longest wait for a session to open or a call to answer, in ms.
    pub timeout_ms: u64,
    /// The tenants whose tools may call this server and list its tools
    /// (empty: every tenant). To any other tenant the server does not exist
    /// (`MCP_SERVER_NOT_FOUND`).
    pub tenants: Vec<String>,
}

impl Default for McpServerConfig {
    fn default() -> Self {
        McpServerConfig {
            name: String::new(),
            command: String::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            url: String::new(),
            headers: BTreeMap::new(),
            timeout_ms: 30_000,
            tenants: Vec::new(),
        }
    }
}

/// How the hub reaches a server, secrets resolved.
enum Transport {
    Stdio {
        command: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
    },
    Http {
        url: String,
        headers: HashMap<http::HeaderName, http::HeaderValue>,
    },
}

type Session = RunningService<RoleClient, ()>;

/// One declared MCP server: the connector of its `mcp:<name>` tools.
pub struct McpServer {
    name: String,
    transport: Transport,
    timeout: Duration,
    /// Resolved secret values used by this server, scrubbed from messages.
    secret_values: Vec<String>,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The tenants it serves (`None`: every tenant).
    tenants: Option<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No command line, URL or header: they may hold secrets.
        f.debug_struct("McpServer")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An MCP tool as `tools/list` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct McpToolInfo {
    /// The `tools/call` name.
    pub name: String,
    /// Human-readable title, or empty.
    pub title: String,
    /// Description, or empty.
    pub description: String,
    /// `inputSchema`.
    pub input_schema: Value,
    /// `outputSchema`, when given.
    pub output_schema: Option<Value>,
    /// `annotations.readOnlyHint`.
    pub read_only: bool,
    /// `annotations.destructiveHint` (false when absent).
    pub destructive: bool,
    /// `annotations.idempotentHint`.
    pub idempotent: bool,
}

fn resolve(
    field: &str,
    template: &str,
    secrets: &HashMap<String, String>,
    used: &mut Vec<String>,
) -> Result<String> {
    if !template.contains("${{") {
        return Ok(template.to_owned());
    }
    let root = json!({ "secrets": secrets });
    let value = crate::template::render_text(template, &root)
        .map_err(|e| Error::invalid_argument(field, e))?;
    for (name, secret) in secrets {
        if template.contains(name.as_str()) && !secret.is_empty() {
            used.push(secret.clone());
        }
    }
    Ok(value)
}

impl McpServer {
    /// Checks `cfg` and resolves its secrets from `secrets` (errors name the
    /// field, never a value).
    pub fn new(cfg: &McpServerConfig, secrets: &HashMap<String, String>) -> Result<McpServer> {
        let field = |f: &str| format!("connectors.mcp[{}].{f}", cfg.name);
        if anumate_tools::Connector::parse(&format!("mcp:{}", cfg.name)).is_none() {
            return Err(Error::invalid_argument(
                "connectors.mcp.name",
                format!(
                    "{:?} is not a server name (a DNS label: lowercase letters, digits, '-')",
                    cfg.name
                ),
            ));
        }
        if cfg.timeout_ms == 0 {
            return Err(Error::invalid_argument(
                &field("timeout_ms"),
                "must be at least 1",
            ));
        }
        let mut used = Vec::new();
        let transport = match (cfg.command.is_empty(), cfg.url.is_empty()) {
            (false, true) => {
                if !cfg.headers.is_empty() {
                    return Err(Error::invalid_argument(
                        &field("headers"),
                        "only for a server with a url",
                    ));
                }
                Transport::Stdio {
                    command: cfg.command.clone(),
                    args: cfg.args.clone(),
                    env: cfg
                        .env
                        .iter()
                        .map(|(k, v)| {
                            Ok((k.clone(), resolve(&field("env"), v, secrets, &mut used)?))
                        })
                        .collect::<Result<_>>()?,
                }
            }
            (true, false) => {
                if !cfg.args.is_empty() || !cfg.env.is_empty() {
                    return Err(Error::invalid_argument(
                        &field("args"),
                        "args and env are only for a server with a command",
                    ));
                }
                let url = reqwest::Url::parse(&cfg.url)
                    .map_err(|e| Error::invalid_argument(&field("url"), e.to_string()))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(Error::invalid_argument(
                        &field("url"),
                        "must be an http or https URL",
                    ));
                }
                let mut headers = HashMap::new();
                for (k, v) in &cfg.headers {
                    let name = http::HeaderName::try_from(k.as_str()).map_err(|_| {
                        Error::invalid_argument(&field("headers"), format!("{k:?} is not a header"))
                    })?;
                    let value = resolve(&field("headers"), v, secrets, &mut used)?;
                    let mut value = http::HeaderValue::try_from(value).map_err(|_| {
                        Error::invalid_argument(
                            &field("headers"),
                            format!("the value of {k:?} is not a header value"),
                        )
                    })?;
                    value.set_sensitive(true);
                    headers.insert(name, value);
                }
                Transport::Http {
                    url: cfg.url.clone(),
                    headers,
                }
            }
            _ => {
                return Err(Error::invalid_argument(
                    &field("command"),
                    "set exactly one of command (stdio) and url (streamable HTTP)",
                ));
            }
        };
        if cfg.tenants.iter().any(String::is_empty) {
            return Err(Error::invalid_argument(
                &field("tenants"),
                "a tenant id must not be empty",
            ));
        }
        Ok(McpServer {
            tenants: (!cfg.tenants.is_empty()).then(|| {
                cfg.tenants
                    .iter()
                    .cloned()
                    .collect::<std::collections::HashSet<_>>()
            }),
            name: cfg.name.clone(),
            transport,
            timeout: Duration::from_millis(cfg.timeout_ms),
            secret_values: used,
            session: tokio::sync::Mutex::new(None),
        })
    }

    /// The server's name (`mcp:<name>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `tenant` may use this server (`tenants` in its configuration).
    pub fn serves(&self, tenant: &str) -> bool {
        self.tenants.as_ref().is_none_or(|t| t.contains(tenant))
    }

    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in &self.secret_values {
            out = out.replace(value.as_str(), "[secret]");
        }
        out
    }

    async fn connect(&self) -> std::result::Result<Session, String> {
        let started = match &self.transport {
            Transport::Stdio { command, args, env } => {
                let mut cmd = tokio::process::Command::new(command);
                cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
                let child = TokioChildProcess::builder(cmd)
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .map_err(|e| format!("cannot start the server's command: {e}"))?
                    .0;
                tokio::time::timeout(self.timeout, ().serve(child)).await
            }
            Transport::Http { url, headers } => {
                // reqwest 0.13 (rmcp's) is built without a default TLS
                // provider: ring, as the rest of the hub uses.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let config =
                    rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig::with_uri(
                        url.as_str(),
                    )
                    .custom_headers(headers.clone());
                let transport = StreamableHttpClientTransport::from_config(config);
                tokio::time::timeout(self.timeout, ().serve(transport)).await
            }
        };
        match started {
            Err(_) => Err(format!(
                "the server did not finish its handshake within {} ms",
                self.timeout.as_millis()
            )),
            Ok(Err(e)) => Err(format!("the server's handshake failed: {e}")),
            Ok(Ok(session)) => Ok(session),
        }
    }

    /// The open session, or a new one.
    async fn session(&self) -> std::result::Result<Arc<Session>, ConnectorError> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref()
            && !s.is_closed()
            && !s.peer().is_transport_closed()
        {
            return Ok(s.clone());
        }
        *slot = None;
        let session = Arc::new(self.connect().await.map_err(|e| {
            ConnectorError::retryable(format!("MCP server {}: {}", self.name, self.scrub(&e)))
        })?);
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Drops `session` if it is still the pooled one: the next call opens another.
    async fn discard(&self, session: &Arc<Session>) {
        let mut slot = self.session.lock().await;
        if slot.as_ref().is_some_and(|s| Arc::ptr_eq(s, session)) {
            *slot = None;
        }
    }

    fn failed(&self, e: &ServiceError) -> ConnectorError {
        let message = format!("MCP server {}: {}", self.name, self.scrub(&e.to_string()));
        match e {
            // The server answered with a JSON-RPC error (unknown tool,
            // invalid arguments): the same call would get it again.
            ServiceError::McpError(_) | ServiceError::UnexpectedResponse => {
                ConnectorError::permanent(message)
            }
            _ => ConnectorError::retryable(message),
        }
    }

    /// Calls the MCP tool `tool` with `args` (an object).
    pub async fn call_tool(&self, tool: &str, args: &Value) -> Result<Value, ConnectorError> {
        let Value::Object(arguments) = args else {
            return Err(ConnectorError::permanent(
                "MCP tool arguments must be an object",
            ));
        };
        let session = self.session().await?;
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments.clone());
        match tokio::time::timeout(self.timeout, session.call_tool(params)).await {
            Err(_) => Err(ConnectorError::retryable(format!(
                "MCP server {}: tools/call {tool} did not answer within {} ms",
                self.name,
                self.timeout.as_millis()
            ))),
            Ok(Err(e)) => {
                let failure = self.failed(&e);
                if failure.retryable {
                    self.discard(&session).await;
                }
                Err(failure)
            }
            Ok(Ok(result)) => self.output(tool, result),
        }
    }

    fn output(&self, tool: &str, result: CallToolResult) -> Result<Value, ConnectorError> {
        let text = || {
            result
                .content
                .iter()
                .filter_map(ContentBlock::as_text)
                .map(|t| t.text.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        };
        if result.is_error == Some(true) {
            let text: String = text().chars().take(MAX_ERROR_CHARS).collect();
            return Err(ConnectorError::permanent(format!(
                "MCP tool {tool} on {} returned an error: {}",
                self.name,
                self.scrub(&text)
            )));
        }
        let output = match result.structured_content {
            Some(v) => v,
            None if result.content.iter().any(|c| c.as_text().is_some()) => {
                let text = text();
                serde_json::from_str(&text).unwrap_or(Value::String(text))
            }
            None => serde_json::to_value(&result.content).map_err(|e| {
                ConnectorError::permanent(format!("MCP tool {tool}: unreadable content: {e}"))
            })?,
        };
        let size = serde_json::to_vec(&output).map(|v| v.len()).unwrap_or(0);
        if size > MAX_OUTPUT_BYTES {
            return Err(ConnectorError::permanent(format!(
                "MCP tool {tool} returned {size} bytes; at most {MAX_OUTPUT_BYTES} are accepted"
            )));
        }
        Ok(output)
    }

    /// The server's tools (every page of `tools/list`).
    pub async fn list_tools(&self) -> Result<Vec<McpToolInfo>> {
        let to_error = |f: ConnectorError| {
            let reason = if f.retryable {
                Reason::ConnectorRetryable
            } else {
                Reason::ConnectorFailed
            };
            Error::because(reason, f.message).with_metadata("retryable", f.retryable.to_string())
        };
        let session = self.session().await.map_err(to_error)?;
        let tools = match tokio::time::timeout(self.timeout, session.list_all_tools()).await {
            Err(_) => {
                return Err(to_error(ConnectorError::retryable(format!(
                    "MCP server {}: tools/list did not answer within {} ms",
                    self.name,
                    self.timeout.as_millis()
                ))));
            }
            Ok(Err(e)) => {
                let failure = self.failed(&e);
                if failure.retryable {
                    self.discard(&session).await;
                }
                return Err(to_error(failure));
            }
            Ok(Ok(tools)) => tools,
        };
        Ok(tools
            .into_iter()
            .map(|t| {
                let hints = t.annotations.clone().unwrap_or_default();
                McpToolInfo {
                    name: t.name.to_string(),
                    title: t.title.clone().unwrap_or_default(),
                    description: t.description.as_deref().unwrap_or_default().to_owned(),
                    input_schema: Value::Object(t.input_schema.as_ref().clone()),
                    output_schema: t
                        .output_schema
                        .as_ref()
                        .map(|s| Value::Object(s.as_ref().clone())),
                    read_only: hints.read_only_hint.unwrap_or(false),
                    destructive: hints.destructive_hint.unwrap_or(false),
                    idempotent: hints.idempotent_hint.unwrap_or(false),
                }
            })
            .collect())
    }
}

impl Connector for McpServer {
    fn serves(&self, tenant: &str) -> bool {
        McpServer::serves(self, tenant)
    }

    fn invoke<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Value, ConnectorError>> {
        Box::pin(async move {
            let spec = call
                .tool
                .spec
                .mcp
                .as_ref()
                .ok_or_else(|| ConnectorError::permanent("the tool declares no spec.mcp"))?;
            if spec.server != self.name {
                return Err(ConnectorError::permanent(format!(
                    "the tool names MCP server {:?}, not {:?}",
                    spec.server, self.name
                )));
            }
            self.call_tool(&spec.tool, call.args).await
        })
    }
}

/// The MCP servers of a hub, by name.
#[derive(Debug, Default, Clone)]
pub struct McpServers(HashMap<String, Arc<McpServer>>);

impl McpServers {
    /// Every `[[connectors.mcp]]` server, checked, secrets resolved.
    pub fn from_config(
        servers: &[McpServerConfig],
        secrets: &HashMap<String, String>,
    ) -> Result<McpServers> {
        let mut out = HashMap::new();
        for cfg in servers {
            let server = McpServer::new(cfg, secrets)?;
            if out.insert(cfg.name.clone(), Arc::new(server)).is_some() {
                return Err(Error::invalid_argument(
                    "connectors.mcp.name",
                    format!("server {:?} is declared twice", cfg.name),
                ));
            }
        }
        Ok(McpServers(out))
    }

    /// The server named `name`, or `NOT_FOUND` (`MCP_SERVER_NOT_FOUND`).
    pub fn get(&self, name: &str) -> Result<&Arc<McpServer>> {
        self.get_for(None, name)
    }

    /// The server named `name` as `tenant` sees it: one that does not serve
    /// the tenant is `MCP_SERVER_NOT_FOUND` like one never declared.
    pub fn get_for(&self, tenant: Option<&str>, name: &str) -> Result<&Arc<McpServer>> {
        self.0
            .get(name)
            .filter(|s| tenant.is_none_or(|t| s.serves(t)))
            .ok_or_else(|| {
                Error::because(
                    Reason::McpServerNotFound,
                    format!(
                        "no MCP server {name:?} in the hub's configuration ([[connectors.mcp]])"
                    ),
                )
            })
    }

    /// Every server.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<McpServer>> {
        self.0.values()
    }
}

/// A Tool document (SPEC §13) for an MCP tool, named `<prefix>.<tool>` (the
/// tool's name lowercased, other characters than letters, digits, `_` and
/// `-` made `_`). Its side effect follows the server's hints (`read` for
/// read-only, `destructive`, else `write`).
pub fn tool_document(server: &str, prefix: &str, tool: &McpToolInfo) -> Value {
    let mut name: String = tool
        .name
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name.insert(0, 't');
    }
    let side_effect = if tool.read_only {
        "read"
    } else if tool.destructive {
        "destructive"
    } else {
        "write"
    };
    let mut metadata = json!({"name": format!("{prefix}.{name}")});
    let description = if tool.description.is_empty() {
        &tool.title
    } else {
        &tool.description
    };
    if !description.is_empty() {
        metadata["description"] = json!(description);
    }
    metadata["labels"] = json!({"mcp-server": server});
    let mut spec = json!({
        "connector": format!("mcp:{server}"),
        "side_effect": side_effect,
        "idempotent": tool.idempotent,
        "input": tool.input_schema,
        "mcp": {"server": server, "tool": tool.name},
    });
    if let Some(output) = &tool.output_schema {
        spec["output"] = output.clone();
    }
    json!({
        "apiVersion": anumate_tools::API_VERSION,
        "kind": anumate_tools::KIND,
        "metadata": metadata,
        "spec": spec,
    })
}

/// A file of Tool documents (`---` separated, each JSON, which is YAML) for
/// `anumate tool push`.
pub fn tools_file(server: &str, prefix: &str, tools: &[McpToolInfo]) -> String {
    tools
        .iter()
        .map(|t| {
            serde_json::to_string_pretty(&tool_document(server, prefix, t)).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
        + "\n"
}
