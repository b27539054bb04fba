#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A control call that lands while a worker drives the run, on SQLite and
//! PostgreSQL. The worker saves each change on the run as it last saw it
//! (on PostgreSQL in one round trip, fenced on the run's sequence); a pause
//! sent while a step's call is in flight must still hold the run once that
//! call ends: the step's result is saved, the run stays `PAUSED`, the next
//! step does not start, the journal's sequence has no gap or repeat, and
//! after `ResumeRun` the run finishes.

use std::time::Duration;

use anumate_proto::orchestrator::v1 as pb;
use anumate_testing::on_both_backends;
use serde_json::json;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: slow.step}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [i], properties: {i: {type: integer}}}
  mock: {output: {i: \"${{ args.i }}\"}, latency: 600ms}
";

const POLICY: &str = r#"policy "transfer-guard" {
  rule "never" {
    when tool == "slow.step" and args.i > 1000
    then deny(reason: "out of range")
  }
}
"#;

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: transfer
spec:
  inputs:
    n: {type: integer, required: true}
  tools: [slow.step]
  policies: [transfer-guard]
  steps:
    - id: first
      tool: slow.step
      with: {i: 1}
    - id: second
      tool: slow.step
      needs: [first]
      with: {i: 2}
"#;

mod common;
use common::*;

on_both_backends! {
    pause_during_a_call_holds_the_run_after_it => pause_during_a_call_sqlite, pause_during_a_call_postgres;
}

async fn pause_during_a_call_holds_the_run_after_it(app: TestApp) {
    let plan_hash = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let args = json!({"n": 1});
    let report = preflight(&mut alice, &plan_hash, args.clone()).await;
    let run_id = alice
        .orch
        .execute(execute(
            &plan_hash,
            args,
            &report.preflight_id,
            "pause-mid-call",
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;

    // The first call is in flight (its mock answers after 600 ms).
    let running = wait_for(&mut alice, &run_id, |r| {
        step(r, "first").state() == pb::StepState::Running
    })
    .await;
    alice
        .orch
        .pause_run(pb::PauseRunRequest {
            run_id: run_id.clone(),
            reason: "look first".into(),
            etag: running.etag.clone(),
        })
        .await
        .unwrap();

    // The call ends and its result is saved; the run stays paused.
    let after = wait_for(&mut alice, &run_id, |r| {
        step(r, "first").state() == pb::StepState::Succeeded
    })
    .await;
    assert_eq!(after.state(), pb::RunState::Paused, "{after:#?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let held = get(&mut alice, &run_id).await;
    assert_eq!(held.state(), pb::RunState::Paused, "{held:#?}");
    assert!(
        step(&held, "second").attempts.is_empty(),
        "the next step started while paused: {held:#?}"
    );
    assert_eq!(mock_calls(&mut alice, &run_id, "slow.step").await.len(), 1);

    // One journal: every change has the next sequence, the pause among them.
    let history = alice
        .orch
        .list_run_history(pb::ListRunHistoryRequest {
            run_id: run_id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let sequences: Vec<i64> = history.iter().map(|e| e.sequence).collect();
    let expected: Vec<i64> = (1..=i64::try_from(history.len()).unwrap()).collect();
    assert_eq!(sequences, expected, "{history:#?}");
    assert_eq!(held.sequence, *sequences.last().unwrap());
    let kinds: Vec<&str> = history.iter().map(|e| e.r#type.as_str()).collect();
    let paused_at = kinds.iter().position(|k| *k == "run.paused").unwrap();
    let completed_at = kinds.iter().position(|k| *k == "step.completed").unwrap();
    assert!(paused_at < completed_at, "{kinds:?}");

    alice
        .orch
        .resume_run(pb::ResumeRunRequest {
            run_id: run_id.clone(),
            etag: held.etag.clone(),
        })
        .await
        .unwrap();
    let done = wait_for(&mut alice, &run_id, |r| {
        r.state() == pb::RunState::Succeeded
    })
    .await;
    assert_eq!(step(&done, "second").state(), pb::StepState::Succeeded);
    assert_eq!(mock_calls(&mut alice, &run_id, "slow.step").await.len(), 2);
}
