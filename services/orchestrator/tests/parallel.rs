#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Parallel steps within a run, over gRPC on the composition `anumate dev`
//! runs, on SQLite and PostgreSQL. Two independent slow steps run at once:
//! the run takes about one call's latency, not two, both calls overlap in
//! the journal (both started before either completed), each has its own
//! attempt, token, hub call and receipt, and the step needing both runs
//! after them. A branch whose call fails for good fails at once; its sibling's call
//! already in flight ends (acted once, receipted), nothing new starts (the
//! step after the sibling is skipped, never called) and the run fails
//! naming the denied step.

use std::time::{Duration, Instant};

use anumate_auth::Role;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_testing::on_both_backends;
use serde_json::json;

/// Each mock call takes this long.
const LATENCY_MS: u64 = 1500;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: ledger.debit}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [to], properties: {to: {type: string}}}
  mock: {output: {ok: true}, latency: 1500ms}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: ledger.credit}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [to], properties: {to: {type: string}}}
  mock: {output: {ok: true}, latency: 1500ms}
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
  rule "credit-to-watched-needs-approval" {
    when tool == "ledger.credit" and args.to == "acct_watched"
    then require_approval(approvers: ["user:bob"], quorum: 1, reason: "a watched account")
  }
}
"#;

/// The credit fails for good (a permanent error) at once.
fn failing_credit() -> String {
    TOOLS.replacen(
        "mock: {output: {ok: true}, latency: 1500ms}\n---\napiVersion: anumate.dev/v1\nkind: Tool\nmetadata: {name: notify.send}",
        "mock: {output: {ok: true}, fail: {times: 100, code: FAILED_PRECONDITION}}\n---\napiVersion: anumate.dev/v1\nkind: Tool\nmetadata: {name: notify.send}",
        1,
    )
}

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: transfer
spec:
  inputs:
    to: {type: string, required: true, pattern: "^acct_[a-z0-9]+$"}
  tools: [ledger.debit, ledger.credit, notify.send]
  policies: [transfer-guard]
  steps:
    - id: debit
      tool: ledger.debit
      with: {to: "${{ inputs.to }}"}
    - id: credit
      tool: ledger.credit
      with: {to: "${{ inputs.to }}"}
    - id: after-debit
      tool: notify.send
      needs: [debit]
      with: {to: "${{ inputs.to }}"}
    - id: notify
      tool: notify.send
      needs: [debit, credit, after-debit]
      with: {to: "${{ inputs.to }}"}
"#;

mod common;
use common::*;

async fn history(c: &mut Clients, run_id: &str) -> Vec<pb::RunHistoryEntry> {
    c.orch
        .list_run_history(pb::ListRunHistoryRequest {
            run_id: run_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

fn micros(t: &Option<pbjson_types::Timestamp>) -> i64 {
    let t = t.as_ref().unwrap();
    t.seconds * 1_000_000 + i64::from(t.nanos) / 1000
}

async fn start(c: &mut Clients, plan_hash: &str, to: &str, key: &str) -> String {
    let args = json!({"to": to});
    let report = preflight(c, plan_hash, args.clone()).await;
    c.orch
        .execute(execute(plan_hash, args, &report.preflight_id, key))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id
}

on_both_backends! {
    independent_steps_run_at_once => independent_steps_run_at_once_sqlite, independent_steps_run_at_once_postgres;
    a_branch_waiting_for_approval_lets_the_others_run => a_branch_waiting_for_approval_lets_the_others_run_sqlite, a_branch_waiting_for_approval_lets_the_others_run_postgres;
    a_failed_branch_fails_the_run_after_its_siblings_call => a_failed_branch_fails_the_run_after_its_siblings_call_sqlite, a_failed_branch_fails_the_run_after_its_siblings_call_postgres;
}

async fn independent_steps_run_at_once(app: TestApp) {
    let plan_hash = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let began = Instant::now();
    let run_id = start(&mut alice, &plan_hash, "acct_bob", "par-1").await;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    let took = began.elapsed();
    // debit and credit each take 1.5 s: one after the other would be 3 s.
    assert!(
        took < Duration::from_millis(2 * LATENCY_MS),
        "took {took:?}: {run:#?}"
    );
    let debit = step(&run, "debit").attempts[0].clone();
    let credit = step(&run, "credit").attempts[0].clone();
    // The two calls overlapped.
    assert!(
        micros(&debit.start_time) < micros(&credit.end_time),
        "{run:#?}"
    );
    assert!(
        micros(&credit.start_time) < micros(&debit.end_time),
        "{run:#?}"
    );
    // Each its own governed call: its key, token and receipt.
    assert_ne!(debit.idempotency_key, credit.idempotency_key);
    assert_ne!(debit.token_jti, credit.token_jti);
    for a in [&debit, &credit] {
        assert_eq!(a.state(), pb::AttemptState::Succeeded);
        assert!(!a.token_jti.is_empty());
        verify_offline(&app, &run_id, &a.receipt_id).await;
    }
    // The step needing both ran after both.
    let notify = &step(&run, "notify").attempts[0];
    assert!(micros(&notify.start_time) >= micros(&debit.end_time));
    assert!(micros(&notify.start_time) >= micros(&credit.end_time));
    for tool in ["ledger.debit", "ledger.credit"] {
        let calls = mock_calls(&mut alice, &run_id, tool).await;
        assert_eq!(calls.len(), 1, "{calls:#?}");
        assert!(calls[0].acted);
    }
    // What WatchRun streams (the journal) has both running at once: both
    // attempts started before either step completed.
    let entries = history(&mut alice, &run_id).await;
    let first_done = entries
        .iter()
        .position(|e| e.r#type == "step.completed")
        .unwrap();
    let started: Vec<&str> = entries[..first_done]
        .iter()
        .filter(|e| e.r#type == "attempt.started")
        .map(|e| e.step_id.as_str())
        .collect();
    assert!(
        started.contains(&"debit") && started.contains(&"credit"),
        "{entries:#?}"
    );
}

async fn a_failed_branch_fails_the_run_after_its_siblings_call(app: TestApp) {
    let tools = failing_credit();
    assert_ne!(tools, TOOLS);
    let plan_hash = seed(&app, &tools, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let run_id = start(&mut alice, &plan_hash, "acct_bob", "par-2").await;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Failed as i32
    })
    .await;
    let f = run.failure.as_ref().unwrap();
    assert_eq!(f.step_id, "credit", "{run:#?}");
    assert_eq!(f.kind(), pb::FailureKind::ToolError, "{f:#?}");
    let credit = step(&run, "credit");
    assert_eq!(credit.state(), pb::StepState::Failed);
    assert_eq!(credit.attempts.len(), 1, "not retried: {credit:#?}");
    verify_offline(&app, &run_id, &credit.attempts[0].receipt_id).await;
    // The sibling's call was in flight: it ended and was receipted, once.
    let debit = step(&run, "debit");
    assert_eq!(debit.state(), pb::StepState::Succeeded, "{run:#?}");
    verify_offline(&app, &run_id, &debit.attempts[0].receipt_id).await;
    let calls = mock_calls(&mut alice, &run_id, "ledger.debit").await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    // Nothing new started after the failure.
    for id in ["after-debit", "notify"] {
        let s = step(&run, id);
        assert_eq!(s.state(), pb::StepState::Skipped, "{run:#?}");
        assert!(s.attempts.is_empty());
    }
    assert!(
        mock_calls(&mut alice, &run_id, "notify.send")
            .await
            .is_empty()
    );
    // The run failed only after the sibling's call ended.
    let entries = history(&mut alice, &run_id).await;
    let types: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e.r#type.as_str(), e.step_id.as_str()))
        .collect();
    let completed = types
        .iter()
        .position(|t| *t == ("step.completed", "debit"))
        .unwrap();
    let failed = types.iter().position(|t| t.0 == "run.failed").unwrap();
    assert!(completed < failed, "{types:?}");
}

async fn a_branch_waiting_for_approval_lets_the_others_run(app: TestApp) {
    let plan_hash = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let run_id = start(&mut alice, &plan_hash, "acct_watched", "par-3").await;
    // The credit waits for bob; the debit branch runs to its end meanwhile,
    // and then the run says it waits.
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::WaitingApproval as i32
            && step(r, "after-debit").state == pb::StepState::Succeeded as i32
    })
    .await;
    assert_eq!(step(&run, "debit").state(), pb::StepState::Succeeded);
    let credit = step(&run, "credit");
    assert_eq!(credit.state(), pb::StepState::WaitingApproval, "{run:#?}");
    assert_eq!(step(&run, "notify").state(), pb::StepState::Pending);
    let approval_id = credit.approval_ids[0].clone();
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
    let mut bob = app.as_user("user:bob", &[Role::Approver]).await;
    bob.approvals
        .approve(apb::ApproveRequest {
            approval_id,
            comment: "ok".into(),
            etag: String::new(),
            args_sha256: approval.args_sha256.clone(),
        })
        .await
        .unwrap();
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    for id in ["debit", "credit", "after-debit", "notify"] {
        assert_eq!(step(&run, id).attempts.len(), 1, "{run:#?}");
    }
}
