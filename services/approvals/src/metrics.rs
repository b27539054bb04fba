//! The approvals service's metrics, registered once per process with the
//! server's (`/metrics` on the admin listener):
//!
//! - `anumate_approval_wait_seconds{outcome}`: time from an approval's
//!   request to its final decision, by outcome (`granted`, `rejected`,
//!   `expired`, `cancelled`), recorded as the decision commits.
//!
//! The labels are a fixed set: no tenant-, tool- or principal-named series.

use std::sync::OnceLock;

use anumate_service::metrics::prometheus_client;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::rules::{Approval, Effect};

/// Label sets as (name, value) pairs.
type Labels = Vec<(&'static str, &'static str)>;

fn wait() -> &'static Family<Labels, Histogram> {
    static WAIT: OnceLock<Family<Labels, Histogram>> = OnceLock::new();
    WAIT.get_or_init(|| {
        // 0.1 s .. about 2.4 days.
        let family = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.1, 2.0, 22))
        });
        anumate_service::metrics::register(
            "approval_wait_seconds",
            "Time from an approval's request to its final decision, by outcome (granted, rejected, expired, cancelled)",
            family.clone(),
        );
        family
    })
}

/// The outcome of a decision that ends its approval; `None` for one that
/// leaves it open (a vote, a delegation, a stage approved or escalated).
fn outcome(effect: &Effect) -> Option<&'static str> {
    match effect {
        Effect::Granted => Some("granted"),
        Effect::Rejected => Some("rejected"),
        Effect::Expired => Some("expired"),
        Effect::Cancelled => Some("cancelled"),
        Effect::Voted | Effect::StageApproved | Effect::Delegated | Effect::Escalated => None,
    }
}

/// Records the wait of `a`, just stored with `effect`, if that ended it.
pub(crate) fn decided(a: &Approval, effect: &Effect) {
    let Some(outcome) = outcome(effect) else {
        return;
    };
    let Some(at) = a.decided_at else {
        return;
    };
    // Microseconds to seconds; a clock step backwards counts as 0.
    let seconds = (at - a.created_at).max(0) as f64 / 1e6;
    wait()
        .get_or_create(&vec![("outcome", outcome)])
        .observe(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_decisions_have_an_outcome() {
        assert_eq!(outcome(&Effect::Granted), Some("granted"));
        assert_eq!(outcome(&Effect::Expired), Some("expired"));
        assert_eq!(outcome(&Effect::Voted), None);
        assert_eq!(outcome(&Effect::Escalated), None);
    }
}
