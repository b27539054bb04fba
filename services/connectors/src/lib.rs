//! The connector hub (SPEC §13): the only component that makes outbound calls
//! for tools.
//!
//! [`Hub::invoke`] first checks the call's capability token for exactly this
//! call (signature with the captokens service's public keys, expiry,
//! audience, tenant, tool, arguments hash), then claims the idempotency key
//! (`anumate-idempotency`) in a short transaction: a recorded result is
//! replayed without acting, the same key with other arguments is
//! `IDEMPOTENCY_KEY_REUSED`, a key in flight is waited for (then
//! `CALL_IN_FLIGHT`). A fresh claim spends the token in the platform's one
//! replay store — in the claim's own transaction when the captokens service
//! shares this store (`anumate dev`, `serve all`), else at the captokens
//! service right after — refused if revoked or used before (the claim is
//! undone, nothing acted). On PostgreSQL the common case (a free key, a
//! single-use token, a closed circuit) is one durable batch: BEGIN, claim,
//! spend, COMMIT in one round trip. Then the hub calls the tool's [`Connector`] with
//! no transaction open and records the result in a second short
//! transaction. A retryable failure releases the key (a retry with a fresh
//! token acts); a permanent one is recorded like a result. Release and
//! record touch the key only while this call still holds it.
//!
//! Crash window: a hub that dies after acting and before recording (or a
//! database crash losing the record, whose commit does not wait for its WAL
//! flush: `Store::write_relaxed`) leaves the key claimed without a result;
//! after `in_flight_lease_secs` another call with the key (and a fresh
//! token) takes it over and calls the connector again with the same
//! idempotency key, so only upstreams that honour the key (the mock does)
//! stay exactly-once across such a crash.
#![forbid(unsafe_code)]

mod breaker;
mod connector;
pub mod grpc;
mod http;
mod invoke;
mod keys;
mod mcp;
mod metrics;
mod mock;
mod module;
mod repo;
mod template;
mod tools;

use std::collections::HashMap;
use std::sync::Arc;

use anumate_captokens::Failure;
use anumate_errors::{Error, Reason, Result};
use anumate_service::clients::CapTokensClient;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use breaker::State as BreakerState;
pub use connector::{Call, Connector, ConnectorError};
pub use grpc::HubGrpc;
pub use http::Http;
pub use mcp::{McpServer, McpServerConfig, McpServers, McpToolInfo, tool_document, tools_file};
pub use mock::Mock;
pub use module::module;
pub use repo::{MockCallRow, MockFilter};
pub use tools::{RegistryTools, StaticTools, ToolSource};

/// The hub's name as a platform service (`svc:connectors`).
pub const SERVICE_IDENTITY: &str = "connectors";
/// Idempotency scope of `Invoke`.
pub const SCOPE: &str = "connectors.invoke";

/// Every migration the hub needs.
pub fn migrations() -> Vec<Migration> {
    anumate_idempotency::MIGRATIONS
        .iter()
        .chain(repo::MIGRATIONS)
        .copied()
        .collect()
}

/// `[connectors]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectorsConfig {
    /// The `aud` a capability token must carry to be used here.
    pub audience: String,
    /// How long a key's recorded result is replayed, in seconds.
    pub idempotency_ttl_secs: u64,
    /// Clock skew allowed on token times, in seconds.
    pub leeway_secs: u32,
    /// No longer read: tokens are verified with the captokens service's
    /// public keys (`GetJwks`). Naming it is a start-up error saying so.
    #[serde(skip_serializing)]
    pub captoken_key_files: Option<serde_json::Value>,
    /// The captokens service, when it does not run in this process (empty:
    /// in process or this server): its public keys verify tokens, and its
    /// replay store and revocation list spend them.
    pub captokens_url: String,
    /// How long a call waits for another call of the same key in flight to
    /// record its result before failing retryably, in ms.
    pub in_flight_wait_ms: u64,
    /// After how long a key claimed without a result (its claimer crashed)
    /// may be taken over by a new call, in seconds.
    pub in_flight_lease_secs: u64,
    /// The registry, when it does not run in this process (empty: in process
    /// or this server).
    pub registry_url: String,
    /// `${{ secrets.NAME }}` sources, by name: `env:VAR` (an environment
    /// variable of the hub) or `file:/path` (a file's content, trailing
    /// newline dropped). Only the hub reads them.
    pub secrets: std::collections::BTreeMap<String, String>,
    /// Consecutive retryable failures of a (tool, host) that open its
    /// circuit breaker (0: never).
    pub breaker_failures: u32,
    /// How long an open breaker fails calls fast before one probe, in ms.
    pub breaker_cooldown_ms: u64,
    /// MCP servers (`[[connectors.mcp]]`) the `mcp:<name>` tools call.
    pub mcp: Vec<McpServerConfig>,
}

/// Reads every `[connectors.secrets]` source; errors name the secret and
/// its source, never a value.
pub fn resolve_secrets(
    sources: &std::collections::BTreeMap<String, String>,
) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (name, source) in sources {
        let field = format!("connectors.secrets.{name}");
        let value = if let Some(var) = source.strip_prefix("env:") {
            std::env::var(var).map_err(|_| {
                Error::invalid_argument(&field, format!("environment variable {var} is not set"))
            })?
        } else if let Some(path) = source.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map_err(|e| Error::invalid_argument(&field, format!("cannot read {path}: {e}")))?
                .trim_end_matches(['\n', '\r'])
                .to_owned()
        } else {
            return Err(Error::invalid_argument(
                &field,
                "must be env:VARIABLE or file:/path",
            ));
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

impl Default for ConnectorsConfig {
    fn default() -> Self {
        ConnectorsConfig {
            audience: "anumate-connectors".into(),
            idempotency_ttl_secs: 7 * 24 * 3600,
            leeway_secs: 5,
            captoken_key_files: None,
            captokens_url: String::new(),
            in_flight_wait_ms: 10_000,
            in_flight_lease_secs: 300,
            registry_url: String::new(),
            secrets: Default::default(),
            breaker_failures: 5,
            breaker_cooldown_ms: 30_000,
            mcp: Vec::new(),
        }
    }
}

/// One `Invoke` request, decoded.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// The caller's tenant (from its bearer token).
    pub tenant: &'a str,
    /// Tool name.
    pub tool: &'a str,
    /// Arguments.
    pub args: &'a Value,
    /// Idempotency key.
    pub idempotency_key: &'a str,
    /// The capability token.
    pub token: &'a str,
    /// When the caller stops waiting (its gRPC deadline), if it said: a key
    /// in flight is waited for only until shortly before.
    pub deadline: Option<std::time::Instant>,
}

/// What `Invoke` answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoked {
    /// The tool's output.
    pub output: Value,
    /// A recorded result returned again; nothing acted now.
    pub replayed: bool,
    /// The connector that served it.
    pub connector: String,
    /// When the result was recorded (micros).
    pub recorded_at: i64,
}

/// The connector hub.
#[derive(Clone)]
pub struct Hub {
    store: Store,
    keys: Arc<keys::TokenKeys>,
    tokens: Arc<dyn CapTokensClient>,
    in_flight_wait: std::time::Duration,
    lease_micros: i64,
    tools: Arc<dyn ToolSource>,
    connectors: Arc<HashMap<String, Arc<dyn Connector>>>,
    audience: String,
    ttl_micros: i64,
    breakers: Arc<breaker::Breakers>,
    mcp: McpServers,
}

impl Hub {
    /// A hub with the `mock` connector and an `http` one without secrets,
    /// spending tokens at (and reading their public keys from) `tokens`.
    pub fn new(
        store: Store,
        tokens: Arc<dyn CapTokensClient>,
        tools: Arc<dyn ToolSource>,
        cfg: &ConnectorsConfig,
    ) -> Hub {
        let mut connectors: HashMap<String, Arc<dyn Connector>> = HashMap::new();
        connectors.insert("mock".into(), Arc::new(Mock));
        connectors.insert("http".into(), Arc::new(Http::default()));
        Hub {
            store,
            keys: Arc::new(keys::TokenKeys::new(tokens.clone(), cfg.leeway_secs)),
            tokens,
            in_flight_wait: std::time::Duration::from_millis(cfg.in_flight_wait_ms),
            lease_micros: i64::try_from(cfg.in_flight_lease_secs)
                .unwrap_or(i64::MAX / 2_000_000)
                .saturating_mul(1_000_000),
            tools,
            connectors: Arc::new(connectors),
            audience: cfg.audience.clone(),
            breakers: Arc::new(breaker::Breakers::new(
                cfg.breaker_failures,
                std::time::Duration::from_millis(cfg.breaker_cooldown_ms),
            )),
            mcp: McpServers::default(),
            ttl_micros: i64::try_from(cfg.idempotency_ttl_secs)
                .unwrap_or(i64::MAX / 2_000_000)
                .saturating_mul(1_000_000),
        }
    }

    /// Adds (or replaces) the connector named `name` (`http`, `mcp:<server>`).
    #[must_use]
    pub fn with_connector(mut self, name: &str, connector: Arc<dyn Connector>) -> Hub {
        Arc::make_mut(&mut self.connectors).insert(name.to_owned(), connector);
        self
    }

    /// Adds every MCP server as the connector `mcp:<name>`; `ListMcpTools` lists their tools.
    #[must_use]
    pub fn with_mcp_servers(mut self, servers: McpServers) -> Hub {
        for server in servers.iter() {
            let name = format!("mcp:{}", server.name());
            self = self.with_connector(&name, server.clone());
        }
        self.mcp = servers;
        self
    }

    /// The tools of the configured MCP server `server`, as `tenant` may see it.
    pub async fn list_mcp_tools(&self, tenant: &str, server: &str) -> Result<Vec<McpToolInfo>> {
        if server.is_empty() {
            return Err(Error::invalid_argument("server", "required"));
        }
        self.mcp.get_for(Some(tenant), server)?.list_tools().await
    }

    /// Calls a tool once per idempotency key (see the crate docs).
    pub async fn invoke(&self, inv: &Invocation<'_>) -> Result<Invoked> {
        check_request(inv)?;
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "connector.invoke",
            tool = inv.tool,
            tenant = inv.tenant,
            idempotency_key = inv.idempotency_key
        );
        let result = tracing::Instrument::instrument(self.invoke_checked(inv), span).await;
        let outcome = match &result {
            Ok(r) if r.replayed => "replayed",
            Ok(_) => "ok",
            Err(e) => e.reason.as_str(),
        };
        tracing::info!(
            target: "connector.invoked",
            tool = inv.tool,
            outcome,
            latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "connector.invoked"
        );
        let known = !matches!(&result, Err(e) if e.reason == Reason::ToolNotFound);
        metrics::invoked(
            if known { inv.tool } else { "unknown" },
            outcome,
            started.elapsed().as_secs_f64(),
        );
        result
    }

    /// The circuit breaker state of (tool, host) (`mock` for mock tools).
    pub fn breaker_state(&self, tool: &str, host: &str) -> BreakerState {
        self.breakers.state(tool, host, std::time::Instant::now())
    }

    /// The tenant's mock effects, newest first; the page token is the last call id.
    pub async fn list_mock_calls(
        &self,
        tenant: &str,
        filter: &MockFilter<'_>,
    ) -> Result<Vec<MockCallRow>> {
        let tx = self.store.read(tenant).await?;
        repo::list_mock_calls(&tx, filter).await
    }

    /// Deletes expired idempotency keys of every tenant.
    pub async fn purge(&self) -> Result<u64> {
        let sys = self.store.system_read().await?;
        let tenants = anumate_idempotency::tenants(&sys).await?;
        drop(sys);
        let mut purged = 0;
        let now = anumate_store::now_micros();
        for tenant in tenants {
            let tx = self.store.write(&tenant).await?;
            purged += anumate_idempotency::purge(&tx, now).await?;
            tx.commit().await?;
        }
        Ok(purged)
    }
}

/// The breaker key's host: the http URL's host when it is not templated,
/// else the connector's name.
fn breaker_host(tool: &anumate_tools::Tool) -> String {
    tool.spec
        .http
        .as_ref()
        .and_then(|h| reqwest::Url::parse(&h.url).ok())
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| tool.spec.connector.as_string())
}

fn check_request(inv: &Invocation<'_>) -> Result<()> {
    if inv.tool.is_empty() {
        return Err(Error::invalid_argument("tool", "required"));
    }
    anumate_tools::check_tool_name("tool", inv.tool)?;
    if inv.token.is_empty() {
        return Err(Error::invalid_argument("capability_token", "required"));
    }
    anumate_idempotency::check_key("idempotency_key", inv.idempotency_key)
}

fn replay(recorded: anumate_idempotency::Recorded) -> Result<Invoked> {
    let connector = recorded.result["connector"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if let Some(error) = recorded.result.get("error") {
        return Err(connector_error(&ConnectorError {
            retryable: false,
            message: error["message"].as_str().unwrap_or_default().to_owned(),
            upstream_status: error["upstream_status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok()),
        }));
    }
    Ok(Invoked {
        output: recorded.result["output"].clone(),
        replayed: true,
        connector,
        recorded_at: recorded.recorded_at,
    })
}

/// A token that does not authorise this call.
fn refusal(failure: &Failure) -> Error {
    let reason = match failure {
        Failure::Expired { .. } => Reason::TokenExpired,
        Failure::Replayed => Reason::TokenAlreadyUsed,
        Failure::Revoked => Reason::TokenRevoked,
        _ => Reason::TokenScopeMismatch,
    };
    Error::because(
        reason,
        format!("capability token refused for this call: {failure}"),
    )
}

fn connector_error(failure: &ConnectorError) -> Error {
    let reason = if failure.retryable {
        Reason::ConnectorRetryable
    } else {
        Reason::ConnectorFailed
    };
    let mut e = Error::because(reason, format!("tool call failed: {}", failure.message))
        .with_metadata("retryable", failure.retryable.to_string());
    if let Some(status) = failure.upstream_status {
        e = e.with_metadata("upstream_status", status.to_string());
    }
    e
}
