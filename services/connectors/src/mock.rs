//! The `mock` connector: answers from the tool's declaration and behaves like
//! a real API that honours idempotency keys. Each (tool, key) is one effect
//! in `connector_mock_calls` with how many times it was delivered; it acts
//! (computes and keeps its output) at most once, and the scripted failures
//! (`fail: {times, code}`) are the first `times` deliveries of each key.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use crate::connector::{Call, Connector, ConnectorError};
use crate::repo;

/// gRPC codes of scripted failures that a caller should retry.
const RETRYABLE_CODES: &[&str] = &[
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "INTERNAL",
    "UNKNOWN",
];

/// The mock connector.
#[derive(Debug, Default, Clone)]
pub struct Mock;

impl Connector for Mock {
    fn invoke<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Value, ConnectorError>> {
        Box::pin(async move {
            let spec = call
                .tool
                .spec
                .mock
                .as_ref()
                .ok_or_else(|| ConnectorError::permanent("the tool declares no spec.mock"))?;
            if let Some(latency) = spec.latency {
                tokio::time::sleep(latency.min(Duration::from_secs(30))).await;
            }
            let store_failed =
                |e: anumate_errors::Error| ConnectorError::retryable(format!("mock ledger: {e}"));
            let rendered = crate::template::render(&spec.output, call.args);
            let fail_times = spec.fail.as_ref().map_or(0, |f| f.times);
            let delivery =
                repo::deliver_mock(&call, call.tool.name(), fail_times, rendered.as_ref().ok())
                    .await
                    .map_err(store_failed)?;
            if let Some(output) = delivery.output {
                return Ok(output);
            }
            if let Some(fail) = &spec.fail
                && delivery.deliveries <= i64::from(fail.times)
            {
                let message = format!(
                    "scripted failure {} of {} ({})",
                    delivery.deliveries, fail.times, fail.code
                );
                return Err(ConnectorError {
                    retryable: RETRYABLE_CODES.contains(&fail.code.as_str()),
                    message,
                    upstream_status: None,
                });
            }
            let output = rendered
                .map_err(|e| ConnectorError::permanent(format!("spec.mock.output: {e}")))?;
            Ok(output)
        })
    }
}
