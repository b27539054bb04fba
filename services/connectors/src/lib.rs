//! The connector hub (SPEC §13): the only component that makes outbound calls
//! for tools.
//!
//! [`Hub::invoke`] verifies the call's capability token for exactly this call
//! (audience, tenant, tool, arguments hash, expiry, single use consumed in
//! the hub's replay store) before anything else; then, in the same write
//! transaction, claims the idempotency key (`anumate-idempotency`), calls the
//! tool's [`Connector`] and records the result, so the token's consumption,
//! the connector's recorded effects and the key's result commit together. A
//! repeat of the call gets the recorded result without acting; the same key
//! with other arguments is `IDEMPOTENCY_KEY_REUSED`. A retryable failure
//! releases the key (a retry with a fresh token acts); a permanent one is
//! recorded like a result.
//!
//! The transaction stays open during the connector's call (zero2prod's
//! pattern): a concurrent repeat on another replica waits on the key and then
//! replays. Connectors bound their calls (latency caps, timeouts).
#![forbid(unsafe_code)]

mod breaker;
mod connector;
pub mod grpc;
mod http;
mod mcp;
mod mock;
mod module;
mod repo;
mod template;
mod tools;

use std::collections::HashMap;
use std::sync::Arc;

use anumate_captokens::{Expectation, Failure, Verifier, VerifyError};
use anumate_errors::{Error, Reason, Result};
use anumate_idempotency::{Claim, Key};
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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
    /// PEM files of the capability token keys (the captokens service's);
    /// empty: the `captokens` key under the data directory (`anumate dev`).
    pub captoken_key_files: Vec<std::path::PathBuf>,
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
            captoken_key_files: Vec::new(),
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
    verifier: Arc<Verifier>,
    tools: Arc<dyn ToolSource>,
    connectors: Arc<HashMap<String, Arc<dyn Connector>>>,
    audience: String,
    ttl_micros: i64,
    breakers: Arc<breaker::Breakers>,
    mcp: McpServers,
}

impl Hub {
    /// A hub with the `mock` connector and an `http` one without secrets.
    pub fn new(
        store: Store,
        verifier: Verifier,
        tools: Arc<dyn ToolSource>,
        cfg: &ConnectorsConfig,
    ) -> Hub {
        let mut connectors: HashMap<String, Arc<dyn Connector>> = HashMap::new();
        connectors.insert("mock".into(), Arc::new(Mock));
        connectors.insert("http".into(), Arc::new(Http::default()));
        Hub {
            store,
            verifier: Arc::new(verifier.with_leeway(cfg.leeway_secs)),
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

    /// The tools of the configured MCP server `server`.
    pub async fn list_mcp_tools(&self, server: &str) -> Result<Vec<McpToolInfo>> {
        if server.is_empty() {
            return Err(Error::invalid_argument("server", "required"));
        }
        self.mcp.get(server)?.list_tools().await
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
        result
    }

    async fn invoke_checked(&self, inv: &Invocation<'_>) -> Result<Invoked> {
        let fingerprint = anumate_idempotency::fingerprint(&json!({
            "tool": inv.tool,
            "args": inv.args,
        }))?;
        let key = Key {
            scope: SCOPE,
            key: inv.idempotency_key,
            fingerprint: &fingerprint,
            expires_at: anumate_store::now_micros().saturating_add(self.ttl_micros),
        };
        let tx = self.store.write(inv.tenant).await?;
        let mut expected = Expectation::new(&self.audience, inv.tenant, inv.tool);
        expected.args = Some(inv.args);
        let verified = match self
            .verifier
            .verify_with(
                inv.token,
                &expected,
                &repo::NoRevocations,
                &repo::TxReplay(&tx),
                true,
            )
            .await
        {
            Ok(v) => v,
            Err(VerifyError::Rejected(r)) if r.failure == Failure::Replayed => {
                // The same call again after its answer was lost: the key's
                // recorded result, if it is for these arguments; else refused.
                return match anumate_idempotency::claim(&tx, &key).await? {
                    Claim::Replay(recorded) => replay(recorded),
                    Claim::Reused { .. } => Err(anumate_idempotency::reused_error(
                        "idempotency_key",
                        inv.idempotency_key,
                    )),
                    Claim::New | Claim::InFlight => Err(refusal(&r.failure)),
                };
            }
            Err(VerifyError::Rejected(r)) => return Err(refusal(&r.failure)),
            Err(VerifyError::Unavailable(e)) => {
                return Err(Error::new(anumate_errors::ErrorCode::Unavailable, e));
            }
        };
        match anumate_idempotency::claim(&tx, &key).await? {
            Claim::New => {}
            // Dropping the transaction rolls the consumption back: the token
            // authorised this very call, which acted once already.
            Claim::Replay(recorded) => return replay(recorded),
            Claim::Reused { .. } => {
                return Err(anumate_idempotency::reused_error(
                    "idempotency_key",
                    inv.idempotency_key,
                ));
            }
            Claim::InFlight => {
                return Err(Error::because(
                    Reason::ConnectorRetryable,
                    "a call with this idempotency key is in flight",
                )
                .with_metadata("retryable", "true"));
            }
        }
        let tool = self.tools.tool(inv.tenant, inv.tool).await?;
        let connector_name = tool.spec.connector.as_string();
        let connector = self
            .connectors
            .get(&connector_name)
            .ok_or_else(|| {
                Error::because(
                    Reason::ConnectorFailed,
                    format!("connector {connector_name:?} is not available in this hub"),
                )
                .with_metadata("retryable", "false")
            })?
            .clone();
        let host = breaker_host(&tool);
        if !self
            .breakers
            .admit(inv.tool, &host, std::time::Instant::now())
        {
            // Nothing happened: the transaction rolls back, the token stays unspent.
            return Err(connector_error(&ConnectorError::retryable(format!(
                "circuit open for {} at {host}: failing fast",
                inv.tool
            ))));
        }
        let claims = &verified.claims;
        let outcome = connector
            .invoke(Call {
                tool: &tool,
                args: inv.args,
                idempotency_key: inv.idempotency_key,
                run: &claims.run,
                step: &claims.step,
                tx: &tx,
            })
            .await;
        let failed = matches!(&outcome, Err(f) if f.retryable);
        if let Some(state) =
            self.breakers
                .record(inv.tool, &host, failed, std::time::Instant::now())
        {
            tracing::warn!(tool = inv.tool, host = %host, state = ?state, "connector circuit breaker");
        }
        match outcome {
            Ok(output) => {
                let recorded = json!({"connector": connector_name, "output": output});
                let recorded_at =
                    anumate_idempotency::record(&tx, SCOPE, inv.idempotency_key, &recorded).await?;
                tx.commit().await?;
                Ok(Invoked {
                    output,
                    replayed: false,
                    connector: connector_name,
                    recorded_at,
                })
            }
            Err(failure) if failure.retryable => {
                // The token is spent and the connector's ledger kept, but the
                // key is free for a retry.
                anumate_idempotency::release(&tx, SCOPE, inv.idempotency_key).await?;
                tx.commit().await?;
                Err(connector_error(&failure))
            }
            Err(failure) => {
                let recorded = json!({"connector": connector_name, "error": {
                    "message": failure.message,
                    "upstream_status": failure.upstream_status,
                }});
                anumate_idempotency::record(&tx, SCOPE, inv.idempotency_key, &recorded).await?;
                tx.commit().await?;
                Err(connector_error(&failure))
            }
        }
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

    /// Deletes expired replay records and idempotency keys of every tenant.
    pub async fn purge(&self) -> Result<u64> {
        let sys = self.store.system_read().await?;
        let tenants = anumate_idempotency::tenants(&sys).await?;
        drop(sys);
        let mut purged = 0;
        let now = anumate_store::now_micros();
        for tenant in tenants {
            let tx = self.store.write(&tenant).await?;
            purged += anumate_idempotency::purge(&tx, now).await?;
            purged += repo::purge_replay(&tx, now / 1_000_000 - 3600).await?;
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
