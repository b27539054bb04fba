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
//! callers cannot grow the series with made-up names; and since tenants
//! declare their own tools and hosts, a process labels at most
//! [`MAX_LABELS`] distinct tools (and hosts) and counts any further one as
//! `other`.

use std::sync::OnceLock;

use anumate_service::metrics::{BoundedLabel, prometheus_client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::BreakerState;

/// Distinct tools (and hosts) a process labels; further ones are `other`.
pub const MAX_LABELS: usize = 200;

/// Label sets as (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

struct HubMetrics {
    latency: Family<Labels, Histogram>,
    outcomes: Family<Labels, Counter>,
    breakers: Family<Labels, Gauge>,
    tools: BoundedLabel,
    hosts: BoundedLabel,
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
            tools: BoundedLabel::new(MAX_LABELS),
            hosts: BoundedLabel::new(MAX_LABELS),
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
    let m = metrics();
    let tool = m.tools.get(tool);
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
    let m = metrics();
    m.breakers
        .get_or_create(&vec![
            ("tool", m.tools.get(tool)),
            ("host", m.hosts.get(host)),
        ])
        .set(value);
}
