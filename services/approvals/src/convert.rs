//! From the domain [`Approval`] to the wire: the API's `Approval` and the
//! `anumate.approvals` events.

use anumate_proto::approvals::v1 as pb;
use anumate_proto::events::v1 as ev;
use anumate_proto::policy::v1::PolicyRuleRef;
use anumate_proto::timestamp_from_micros as ts;

use crate::rules::{Approval, Decision, Kind, Stage, Status};

fn duration(micros: i64) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// The proto state of a domain status.
pub fn state(s: Status) -> pb::ApprovalState {
    match s {
        Status::Pending => pb::ApprovalState::Pending,
        Status::Approved => pb::ApprovalState::Approved,
        Status::Rejected => pb::ApprovalState::Rejected,
        Status::Expired => pb::ApprovalState::Expired,
        Status::Cancelled => pb::ApprovalState::Cancelled,
    }
}

fn kind(k: Kind) -> pb::DecisionKind {
    match k {
        Kind::Approve => pb::DecisionKind::Approve,
        Kind::Reject => pb::DecisionKind::Reject,
        Kind::Delegate => pb::DecisionKind::Delegate,
        Kind::Escalate => pb::DecisionKind::Escalate,
        Kind::Expire => pb::DecisionKind::Expire,
        Kind::Cancel => pb::DecisionKind::Cancel,
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn stage(s: &Stage) -> pb::ApprovalStage {
    pb::ApprovalStage {
        name: s.name.clone(),
        approvers: s.approvers.clone(),
        quorum: i32::try_from(s.quorum).unwrap_or(i32::MAX),
        approved_count: count(s.approved_by.len()),
        approved: s.approved,
        expire_time: s.expire_at.map(ts),
        escalated: s.escalated,
        delegates: s.delegates.clone(),
        delegated_away: s.delegated_away.clone(),
    }
}

fn decision(d: &Decision) -> pb::ApprovalDecision {
    pb::ApprovalDecision {
        actor: d.actor.clone(),
        kind: kind(d.kind) as i32,
        stage_index: count(d.stage),
        comment: d.comment.clone(),
        delegate_to: d.delegate_to.clone(),
        receipt_id: d.receipt_id.clone(),
        time: Some(ts(d.at)),
        escalate_to: d.escalate_to.clone(),
        escalated: d.escalated,
    }
}

/// The API's view of an approval.
pub fn approval(a: &Approval) -> pb::Approval {
    pb::Approval {
        approval_id: a.id.clone(),
        state: state(a.status) as i32,
        run_id: a.run_id.clone(),
        step_id: a.step_id.clone(),
        plan_hash: a.plan_hash.clone(),
        args_sha256: a.args_sha256.clone(),
        tool: a.tool.clone(),
        destructive: a.destructive,
        rule: Some(PolicyRuleRef {
            policy: a.rule.policy.clone(),
            policy_version: a.rule.policy_version,
            content_hash: a.rule.content_hash.clone(),
            rule: a.rule.rule.clone(),
            span: None,
        }),
        reason: a.reason.clone(),
        requester: a.requester.clone(),
        stages: a.stages.iter().map(stage).collect(),
        current_stage: count(a.current),
        decisions: a.decisions.iter().map(decision).collect(),
        expire_time: a.expire_at().map(ts),
        escalate_to: a.escalate_to.clone(),
        escalated: a.stages.iter().any(|s| s.escalated),
        etag: a.etag(),
        create_time: Some(ts(a.created_at)),
        decide_time: a.decided_at.map(ts),
        exclude: a.exclude.clone(),
        capsule: a.capsule.clone(),
        capsule_version: a.capsule_version,
        args_preview: a
            .args_preview
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok()),
        risk_level: a.risk_level,
        risk_score: a.risk_score,
        escalate_quorum: i32::try_from(a.escalate_quorum).unwrap_or(i32::MAX),
        expires_after: Some(duration(a.expires_after)),
        remind_before: Some(duration(a.remind_before)),
    }
}

/// `dev.anumate.approval.requested.v1`.
pub fn requested(tenant: &str, a: &Approval) -> ev::ApprovalRequested {
    let first = a.stages.first();
    ev::ApprovalRequested {
        tenant_id: tenant.to_owned(),
        approval_id: a.id.clone(),
        run_id: a.run_id.clone(),
        step_id: a.step_id.clone(),
        plan_hash: a.plan_hash.clone(),
        args_sha256: a.args_sha256.clone(),
        tool: a.tool.clone(),
        policy: a.rule.policy.clone(),
        rule: a.rule.rule.clone(),
        approvers: first.map(|s| s.approvers.clone()).unwrap_or_default(),
        quorum: first
            .map(|s| i32::try_from(s.quorum).unwrap_or(i32::MAX))
            .unwrap_or_default(),
        stage_count: count(a.stages.len()),
        expire_time: a.expire_at().map(ts),
        actor: a.requester.clone(),
        stages: a
            .stages
            .iter()
            .map(|s| pb::ApprovalStage {
                name: s.name.clone(),
                approvers: s.approvers.clone(),
                quorum: i32::try_from(s.quorum).unwrap_or(i32::MAX),
                expire_time: s.expire_at.map(ts),
                ..Default::default()
            })
            .collect(),
        destructive: a.destructive,
    }
}

/// The event of the last decision of `a` (`None` for a vote that did not
/// complete a stage).
pub enum Event {
    /// Granted.
    Granted(ev::ApprovalGranted),
    /// Rejected.
    Rejected(ev::ApprovalRejected),
    /// Delegated.
    Delegated(ev::ApprovalDelegated),
    /// Escalated.
    Escalated(ev::ApprovalEscalated),
    /// Expired.
    Expired(ev::ApprovalExpired),
    /// Cancelled.
    Cancelled(ev::ApprovalCancelled),
}

/// The event announcing `a`'s last decision, if it has one.
pub fn event_of_last(tenant: &str, a: &Approval) -> Option<Event> {
    let d = a.decisions.last()?;
    let tenant_id = tenant.to_owned();
    let (approval_id, run_id, step_id, plan_hash) = (
        a.id.clone(),
        a.run_id.clone(),
        a.step_id.clone(),
        a.plan_hash.clone(),
    );
    Some(match d.kind {
        Kind::Approve if a.status == Status::Approved => Event::Granted(ev::ApprovalGranted {
            tenant_id,
            approval_id,
            run_id,
            step_id,
            plan_hash,
            args_sha256: a.args_sha256.clone(),
            approvers: a
                .decisions
                .iter()
                .filter(|x| x.kind == Kind::Approve)
                .map(|x| x.actor.clone())
                .collect(),
            receipt_id: d.receipt_id.clone(),
            actor: d.actor.clone(),
        }),
        Kind::Approve => return None,
        Kind::Reject => Event::Rejected(ev::ApprovalRejected {
            tenant_id,
            approval_id,
            run_id,
            step_id,
            plan_hash,
            args_sha256: a.args_sha256.clone(),
            stage_index: count(d.stage),
            comment: d.comment.clone(),
            receipt_id: d.receipt_id.clone(),
            actor: d.actor.clone(),
        }),
        Kind::Delegate => Event::Delegated(ev::ApprovalDelegated {
            tenant_id,
            approval_id,
            run_id,
            step_id,
            plan_hash,
            stage_index: count(d.stage),
            delegate_to: d.delegate_to.clone(),
            receipt_id: d.receipt_id.clone(),
            actor: d.actor.clone(),
        }),
        Kind::Escalate => Event::Escalated(ev::ApprovalEscalated {
            tenant_id,
            approval_id,
            run_id,
            step_id,
            plan_hash,
            stage_index: count(d.stage),
            escalate_to: d.escalate_to.clone(),
            expire_time: a.expire_at().map(ts),
            actor: d.actor.clone(),
            quorum: a
                .stages
                .get(d.stage)
                .map(|s| i32::try_from(s.quorum).unwrap_or(i32::MAX))
                .unwrap_or_default(),
            receipt_id: d.receipt_id.clone(),
        }),
        Kind::Expire => Event::Expired(ev::ApprovalExpired {
            tenant_id,
            approval_id,
            run_id,
            step_id,
            plan_hash,
            stage_index: count(d.stage),
            escalated: d.escalated,
            receipt_id: d.receipt_id.clone(),
            actor: d.actor.clone(),
        }),
        Kind::Cancel => Event::Cancelled(ev::ApprovalCancelled {
            tenant_id,
            approval_id,
            run_id,
            step_id,
            plan_hash,
            reason: d.comment.clone(),
            actor: d.actor.clone(),
        }),
    })
}
