#![allow(clippy::unwrap_used, clippy::expect_used)]
//! In one process an approval's decision wakes the waiting step at once
//! (the approvals service's in-process broadcast), not at the step's next
//! poll: with `approval_poll_ms` at ten minutes the transfer still runs
//! right after the quorum is reached, on SQLite and PostgreSQL.

use anumate_auth::Role;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_testing::{Backend, on_both_backends};
use serde_json::json;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: accounts.lookup}
spec:
  connector: mock
  side_effect: read
  idempotent: true
  input: {type: object, required: [account], properties: {account: {type: string}}}
  mock: {output: {account: \"${{ args.account }}\", status: open}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: payments.transfer}
spec:
  connector: mock
  side_effect: write
  idempotent: false
  input: {type: object, required: [to, amount], properties: {to: {type: string}, amount: {type: integer, minimum: 1}}}
  mock: {output: {transfer_id: \"tr_${{ args.to }}\", amount: \"${{ args.amount }}\"}}
";

const POLICY: &str = r#"policy "transfer-guard" {
  rule "huge-transfer" priority 100 {
    when tool == "payments.transfer" and args.amount > 1000000
    then deny(reason: "transfers above 1,000,000 are not automated")
  }
  rule "large-transfer" {
    when tool == "payments.transfer" and args.amount > 1000
    then require_approval(approvers: ["user:bob", "user:carol", "user:dave"], quorum: 2,
                          reason: "transfer above 1,000")
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
  tools: [accounts.lookup, payments.transfer]
  policies: [transfer-guard]
  steps:
    - id: lookup
      tool: accounts.lookup
      with: {account: "${{ inputs.to }}"}
    - id: transfer
      tool: payments.transfer
      needs: [lookup]
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
"#;

mod common;
use common::*;

/// The composition with the approval poll ten minutes long: only the
/// in-process nudge can wake the step in time.
async fn spawn_slow_poll(backend: Backend) -> TestApp {
    spawn_app_with(
        backend,
        json!({"orchestrator": {"poll_ms": 50, "approval_poll_ms": 600_000}}),
    )
    .await
}

on_both_backends! {
    spawn = spawn_slow_poll;
    a_decision_wakes_the_step => a_decision_wakes_the_step_sqlite, a_decision_wakes_the_step_postgres;
}

async fn a_decision_wakes_the_step(app: TestApp) {
    let plan_hash = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let args = json!({"to": "acct_bob", "amount": 250000});
    let report = preflight(&mut alice, &plan_hash, args.clone()).await;
    let run_id = alice
        .orch
        .execute(execute(&plan_hash, args, &report.preflight_id, "pay-1"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::WaitingApproval as i32
    })
    .await;
    let approval_id = step(&run, "transfer").approval_ids[0].clone();
    let approval = alice
        .approvals
        .get_approval(apb::GetApprovalRequest {
            approval_id: approval_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    for who in ["user:bob", "user:carol"] {
        let mut c = app.as_user(who, &[Role::Approver]).await;
        c.approvals
            .approve(apb::ApproveRequest {
                approval_id: approval_id.clone(),
                comment: "ok".into(),
                etag: String::new(),
                args_sha256: approval.args_sha256.clone(),
            })
            .await
            .unwrap();
    }
    // The next poll is ten minutes away: only the nudge can run it now.
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    let transfer = step(&run, "transfer");
    assert_eq!(transfer.attempts.len(), 1);
    let calls = alice
        .hub
        .list_mock_calls(conpb::ListMockCallsRequest {
            run_id: run_id.clone(),
            tool: "payments.transfer".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .calls;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].deliveries, 1);
}
