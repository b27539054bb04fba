#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Compensations over gRPC on the composition `anumate dev` runs, on SQLite
//! and PostgreSQL: a run whose first step (a transfer declaring a
//! compensation) succeeded waits for an approval of its second step; the
//! starter cancels it. The compensation runs once as a governed call of its
//! own (policy decision, token, the hub with its own idempotency key, a
//! receipt that verifies offline), the waiting step is cancelled, the run
//! ends `CANCELLED` naming the compensated step, and a compensation the
//! policy denies leaves the step `COMPENSATION_FAILED` without calling.

use std::time::{Duration, Instant};

use anumate_engine::json as ej;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::ghostrun::v1 as gpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_testing::on_both_backends;
use serde_json::json;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: payments.transfer}
spec:
  connector: mock
  side_effect: write
  idempotent: false
  input: {type: object, required: [to, amount], properties: {to: {type: string}, amount: {type: integer, minimum: 1}}}
  mock: {output: {transfer_id: \"tr_${{ args.to }}\", amount: \"${{ args.amount }}\"}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: payments.reverse}
spec:
  connector: mock
  side_effect: write
  idempotent: false
  input: {type: object, required: [transfer_id], properties: {transfer_id: {type: string}, amount: {type: integer}}}
  mock: {output: {reversed: \"${{ args.transfer_id }}\"}, latency: 300ms, fail: {times: 1, code: UNAVAILABLE}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: notify.send}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [to], properties: {to: {type: string}}}
  mock: {output: {sent: true}}
";

const POLICY: &str = r#"policy "transfer-guard" {
  rule "notify-needs-approval" {
    when tool == "notify.send"
    then require_approval(approvers: ["user:bob"], quorum: 1, reason: "a human reads it first")
  }
  rule "no-big-reversal" {
    when tool == "payments.reverse" and args.amount > 5000
    then deny(reason: "reversals above 5,000 are done by hand")
  }
}
"#;

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: transfer
spec:
  inputs:
    to:     {type: string, required: true, pattern: "^acct_[a-z0-9]+$"}
    amount: {type: integer, required: true, minimum: 1}
  tools: [payments.transfer, payments.reverse, notify.send]
  policies: [transfer-guard]
  steps:
    - id: transfer
      tool: payments.transfer
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
      compensate:
        tool: payments.reverse
        with: {transfer_id: "${{ steps.transfer.output.transfer_id }}", amount: "${{ inputs.amount }}"}
        timeout: 5s
    - id: notify
      tool: notify.send
      needs: [transfer]
      with: {to: "${{ inputs.to }}"}
"#;

mod common;
use common::*;

/// Starts a run for `amount`, waits until the transfer succeeded and the
/// notification waits for its approval, then cancels it.
async fn start_and_cancel(c: &mut Clients, plan_hash: &str, amount: i64, key: &str) -> String {
    let args = json!({"to": "acct_bob", "amount": amount});
    let report = preflight(c, plan_hash, args.clone()).await;
    assert_eq!(report.verdict(), gpb::PreflightVerdict::Warn, "{report:#?}");
    let run = c
        .orch
        .execute(execute(plan_hash, args, &report.preflight_id, key))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let run_id = run.run_id.clone();
    let run = wait_for(c, &run_id, |r| {
        r.state == pb::RunState::WaitingApproval as i32
    })
    .await;
    assert_eq!(step(&run, "transfer").state(), pb::StepState::Succeeded);
    assert_eq!(step(&run, "notify").state(), pb::StepState::WaitingApproval);
    assert!(mock_calls(c, &run_id, "payments.reverse").await.is_empty());
    c.orch
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
            reason: "the customer withdrew".into(),
            etag: run.etag.clone(),
        })
        .await
        .unwrap();
    run_id
}

/// The approval once it is no longer pending (at most 10 s).
async fn wait_approval_ended(c: &mut Clients, id: &str) -> apb::Approval {
    let start = Instant::now();
    loop {
        let a = c
            .approvals
            .get_approval(apb::GetApprovalRequest {
                approval_id: id.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .approval
            .unwrap();
        if a.state() != apb::ApprovalState::Pending || start.elapsed() > Duration::from_secs(10) {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_backends! {
    cancel_compensates => cancel_compensates_sqlite, cancel_compensates_postgres;
}

async fn cancel_compensates(app: TestApp) {
    let plan_hash = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;

    // The plan carries the declared compensation.
    let plan = alice
        .compiler
        .get_plan(cpb::GetPlanRequest {
            plan_hash: plan_hash.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    let comp = plan.steps[0].compensation.as_ref().unwrap();
    assert_eq!(comp.tool, "payments.reverse");

    // Cancelled while the notification waits: the transfer is reversed once.
    let run_id = start_and_cancel(&mut alice, &plan_hash, 100, "pay-1").await;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Cancelled as i32
    })
    .await;
    assert!(!run.killed);
    let transfer = step(&run, "transfer");
    assert_eq!(transfer.state(), pb::StepState::Compensated, "{run:#?}");
    let notify = step(&run, "notify");
    assert_eq!(notify.state(), pb::StepState::Cancelled);
    // Its open approval is cancelled with the run.
    let approval = wait_approval_ended(&mut alice, &notify.approval_ids[0]).await;
    assert_eq!(approval.state(), apb::ApprovalState::Cancelled);
    // The call's attempt carries its policy decision.
    let call = &transfer.attempts[0];
    assert_eq!(
        call.decision.as_ref().unwrap().effect(),
        ppb::Effect::Allow,
        "{call:#?}"
    );
    // The reversal's first delivery fails (retryable): tried again with the
    // same key.
    assert_eq!(transfer.compensation_attempts.len(), 2, "{transfer:#?}");
    let failed = &transfer.compensation_attempts[0];
    assert_eq!(failed.state(), pb::AttemptState::Failed);
    assert!(failed.failure.as_ref().unwrap().retryable, "{failed:#?}");
    let comp = &transfer.compensation_attempts[1];
    assert_eq!(comp.idempotency_key, failed.idempotency_key);
    assert_eq!(comp.kind(), pb::AttemptKind::Compensation);
    assert_eq!(comp.state(), pb::AttemptState::Succeeded);
    assert_eq!(
        comp.idempotency_key,
        format!("{run_id}/transfer/compensate")
    );
    assert_ne!(comp.idempotency_key, call.idempotency_key);
    assert!(!comp.token_jti.is_empty());
    assert_ne!(comp.token_jti, call.token_jti);
    assert_eq!(comp.decision.as_ref().unwrap().effect(), ppb::Effect::Allow);
    assert!(!comp.receipt_id.is_empty());

    let reversals = mock_calls(&mut alice, &run_id, "payments.reverse").await;
    assert_eq!(reversals.len(), 1, "{reversals:#?}");
    assert!(reversals[0].acted);
    assert_eq!(reversals[0].deliveries, 2);
    assert_eq!(reversals[0].idempotency_key, comp.idempotency_key);
    assert_eq!(reversals[0].step_id, "transfer");
    assert_eq!(
        ej::struct_json(reversals[0].args.as_ref().unwrap()).unwrap(),
        json!({"transfer_id": "tr_acct_bob", "amount": 100})
    );
    assert_eq!(
        mock_calls(&mut alice, &run_id, "payments.transfer")
            .await
            .len(),
        1
    );
    assert!(
        mock_calls(&mut alice, &run_id, "notify.send")
            .await
            .is_empty()
    );

    // The journal names the compensation; its receipt and the run's verify.
    let history = alice
        .orch
        .list_run_history(pb::ListRunHistoryRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let types: Vec<&str> = history.iter().map(|e| e.r#type.as_str()).collect();
    assert!(types.contains(&"step.compensated"), "{types:?}");
    assert_eq!(types.last(), Some(&"run.cancelled"), "{types:?}");
    verify_offline(&app, &run_id, &comp.receipt_id).await;
    verify_offline(&app, &run_id, &run.receipt_id).await;

    // Cancelling again changes nothing: the reversal acted once.
    let _ = alice
        .orch
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
            reason: "again".into(),
            etag: String::new(),
        })
        .await;
    let reversals = mock_calls(&mut alice, &run_id, "payments.reverse").await;
    assert_eq!(reversals.len(), 1);
    assert_eq!(reversals[0].deliveries, 2);

    // A compensation the policy denies is not called; the step says so.
    let run_id = start_and_cancel(&mut alice, &plan_hash, 9000, "pay-2").await;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Cancelled as i32
    })
    .await;
    let transfer = step(&run, "transfer");
    assert_eq!(
        transfer.state(),
        pb::StepState::CompensationFailed,
        "{run:#?}"
    );
    assert!(
        transfer.state_reason.contains("reversals above 5,000"),
        "{}",
        transfer.state_reason
    );
    let comp = &transfer.compensation_attempts[0];
    assert_eq!(comp.state(), pb::AttemptState::Failed);
    let decision = comp.decision.as_ref().unwrap();
    assert_eq!(decision.effect(), ppb::Effect::Deny);
    assert_eq!(
        decision.matched_rules[0].rule.as_ref().unwrap().rule,
        "no-big-reversal"
    );
    assert!(
        mock_calls(&mut alice, &run_id, "payments.reverse")
            .await
            .is_empty()
    );
    verify_offline(&app, &run_id, &comp.receipt_id).await;

    // Killed while compensating: the step stays on record as a
    // compensation that did not finish, its attempt abandoned.
    let run_id = start_and_cancel(&mut alice, &plan_hash, 200, "pay-3").await;
    wait_for(&mut alice, &run_id, |r| {
        r.steps[0].state == pb::StepState::Compensating as i32
    })
    .await;
    alice
        .orch
        .kill_run(pb::KillRunRequest {
            run_id: run_id.clone(),
            reason: "stop everything".into(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let run = get(&mut alice, &run_id).await;
    assert_eq!(run.state(), pb::RunState::Cancelled);
    assert!(run.killed);
    let transfer = step(&run, "transfer");
    assert_eq!(
        transfer.state(),
        pb::StepState::CompensationFailed,
        "{run:#?}"
    );
    assert!(transfer.state_reason.contains("killed"), "{transfer:#?}");
    assert!(
        transfer
            .compensation_attempts
            .iter()
            .all(|a| a.state() != pb::AttemptState::Running),
        "{transfer:#?}"
    );
}
