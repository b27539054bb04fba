//! The hub's metrics, registered once per process with the server's
//! (`/metrics` on the admin listener):
//!
//! - `anumate_connector_invoked_duration_seconds{tool}`: `Invoke` latency;
//! - `anumate_connector_invoked_total{tool,outcome}`: `ok`, `replayed` or the
//!   error reason (`TOKEN_ALREADY_USED`, `CONNECTOR_RETRYABLE`, …);
//! - `anumate_connector_breaker_state{tool,host}`: 0 closed, 1 half-open,
//!   2 open.
//!
//! A call naming no tool of the catalogue counts as `tool="unknown"`, so
//! callers cannot grow the series with made-up names.

use std::sync::OnceLock;

use anumate_service::metrics::prometheus_client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::BreakerState;

/// Label sets as (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

struct HubMetrics {
    latency: Family<Labels, Histogram>,
    outcomes: Family<Labels, Counter>,
    breakers: Family<Labels, Gauge>,
}

fn metrics() -> &'static HubMetrics {
    static METRICS: OnceLock<HubMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = HubMetrics {
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
            }),
            outcomes: Family::default(),
            breakers: Family::default(),
        };
        anumate_service::metrics::register(
            "connector_invoked_duration_seconds",
            "Connector hub Invoke latency, by tool",
            m.latency.clone(),
        );
        anumate_service::metrics::register(
            "connector_invoked",
            "Connector hub Invoke calls, by tool and outcome (ok, replayed or the error reason)",
            m.outcomes.clone(),
        );
        anumate_service::metrics::register(
            "connector_breaker_state",
            "Circuit breaker state per tool and host: 0 closed, 1 half-open, 2 open",
            m.breakers.clone(),
        );
        m
    })
}

/// Counts one `Invoke` and its latency.
pub fn invoked(tool: &str, outcome: &str, seconds: f64) {
    let tool = tool.to_owned();
    let m = metrics();
    m.latency
        .get_or_create(&vec![("tool", tool.clone())])
        .observe(seconds);
    m.outcomes
        .get_or_create(&vec![("tool", tool), ("outcome", outcome.to_owned())])
        .inc();
}

/// Sets the breaker gauge of (tool, host).
pub fn breaker(tool: &str, host: &str, state: BreakerState) {
    let value = match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    };
    metrics()
        .breakers
        .get_or_create(&vec![("tool", tool.to_owned()), ("host", host.to_owned())])
        .set(value);
}
