//! The orchestrator's metrics, registered once per process with the server's
//! (`/metrics` on the admin listener):
//!
//! - `anumate_orchestrator_step_duration_seconds{tool,outcome}`: each
//!   attempt's tool call, from its start to the hub's answer (or the attempt
//!   timeout);
//! - `anumate_orchestrator_step_outcomes_total{tool,outcome}`: the attempts
//!   by outcome.
//!
//! `outcome` is `succeeded` or the attempt's failure kind (`tool_error`,
//! `timeout`, `connector_unavailable`, `token_rejected`, …), a fixed set.
//! `tool` is the tool the compiled plan names, so one of a tenant's
//! catalogue; since tenants declare their own tools, a process labels at
//! most [`MAX_TOOLS`] distinct tools and counts any further one as
//! `tool="other"`, so the series stay bounded however many tenants and
//! tools there are.

use std::sync::OnceLock;

use anumate_proto::orchestrator::v1 as pb;
use anumate_service::metrics::{BoundedLabel, prometheus_client};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Distinct `tool` labels a process gives; further tools are `other`.
pub const MAX_TOOLS: usize = 200;

/// Label sets as (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

struct StepMetrics {
    duration: Family<Labels, Histogram>,
    outcomes: Family<Labels, Counter>,
    tools: BoundedLabel,
}

fn metrics() -> &'static StepMetrics {
    static METRICS: OnceLock<StepMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let m = StepMetrics {
            // 1 ms .. about 9 min.
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 20))
            }),
            outcomes: Family::default(),
            tools: BoundedLabel::new(MAX_TOOLS),
        };
        anumate_service::metrics::register(
            "orchestrator_step_duration_seconds",
            "Duration of a step attempt's tool call, by tool and outcome (succeeded or the failure kind)",
            m.duration.clone(),
        );
        anumate_service::metrics::register(
            "orchestrator_step_outcomes",
            "Step attempts, by tool and outcome (succeeded or the failure kind)",
            m.outcomes.clone(),
        );
        m
    })
}

/// The `outcome` label of an attempt's result.
fn outcome_label(failure: Option<i32>) -> String {
    match failure {
        None => "succeeded".to_owned(),
        Some(kind) => pb::FailureKind::try_from(kind)
            .unwrap_or(pb::FailureKind::Unspecified)
            .as_str_name()
            .trim_start_matches("FAILURE_KIND_")
            .to_ascii_lowercase(),
    }
}

/// Counts one attempt of a step calling `tool`, `micros` long, ended with
/// `outcome` (the failure, if it failed).
pub(crate) fn attempt<T>(tool: &str, outcome: &Result<T, pb::Failure>, micros: i64) {
    let m = metrics();
    let tool = m.tools.get(tool);
    let outcome = outcome_label(outcome.as_ref().err().map(|f| f.kind));
    let labels = vec![("tool", tool), ("outcome", outcome)];
    // Microseconds to seconds; a clock step backwards counts as 0.
    let seconds = micros.max(0) as f64 / 1e6;
    m.duration.get_or_create(&labels).observe(seconds);
    m.outcomes.get_or_create(&labels).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_the_failure_kinds() {
        assert_eq!(outcome_label(None), "succeeded");
        assert_eq!(
            outcome_label(Some(pb::FailureKind::Timeout as i32)),
            "timeout"
        );
        assert_eq!(outcome_label(Some(9999)), "unspecified");
    }
}
