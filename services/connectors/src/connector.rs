//! The one trait every connector implements, so adding one is one file.

use anumate_store::Store;
use anumate_tools::Tool;
use futures::future::BoxFuture;
use serde_json::Value;

/// One verified call, as a connector sees it.
pub struct Call<'a> {
    /// The tool's declaration.
    pub tool: &'a Tool,
    /// The call's arguments (their hash matched the capability token).
    pub args: &'a Value,
    /// The caller's idempotency key, sent to upstreams that honour one.
    pub idempotency_key: &'a str,
    /// The run of the capability token.
    pub run: &'a str,
    /// The step of the capability token.
    pub step: &'a str,
    /// The caller's tenant.
    pub tenant: &'a str,
    /// The hub's database (the mock keeps its ledger here, in its own
    /// transaction: no transaction of the hub is open during a call).
    pub store: &'a Store,
}

/// Why a call failed, classified for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectorError {
    /// Worth retrying (connect error, timeout, 429, 5xx, open breaker).
    pub retryable: bool,
    /// What went wrong; never holds a secret.
    pub message: String,
    /// The upstream's HTTP status, when there was one.
    pub upstream_status: Option<u16>,
}

impl ConnectorError {
    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        ConnectorError {
            retryable: true,
            message: message.into(),
            upstream_status: None,
        }
    }

    /// A failure for good.
    pub fn permanent(message: impl Into<String>) -> Self {
        ConnectorError {
            retryable: false,
            message: message.into(),
            upstream_status: None,
        }
    }
}

/// A way of executing tool calls (`http`, `mock`, `mcp:<server>`).
pub trait Connector: Send + Sync {
    /// Executes `call`, returning the tool's output.
    fn invoke<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Value, ConnectorError>>;

    /// Whether `tenant`'s tools may use this connector (asked before any
    /// state changes; an MCP server may be limited to some tenants).
    fn serves(&self, _tenant: &str) -> bool {
        true
    }
}
