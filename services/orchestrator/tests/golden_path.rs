#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The golden path through gRPC on the composition `anumate dev` runs (the
//! registry, receipts, policy, captokens, compiler, approvals, GhostRun, the
//! connector hub and the orchestrator in one server, behind the real
//! authentication layer), on SQLite and PostgreSQL: push tools, a capsule and
//! its policy; compile; preflight (WARN: an approval is needed); execute;
//! the run waits; two approvers other than the starter approve (quorum 2);
//! the transfer runs once through the hub with a token; the run succeeds;
//! every receipt of the run verifies offline; and (with the suite's broker,
//! `ANUMATE_TEST_KAFKA`) the run's events, relayed from the outbox, are on
//! Kafka as CloudEvents a consumer decodes. Plus the bad input `Execute`
//! and the control RPCs must refuse precisely, with the service serving on.

use std::time::Duration;

use anumate_auth::Role;
use anumate_engine::json as ej;
use anumate_errors::Reason;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::ghostrun::v1 as gpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_testing::{expect_reason, on_both_backends};
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

on_both_backends! {
    golden_path => golden_path_sqlite, golden_path_postgres;
    bad_input => bad_input_sqlite, bad_input_postgres;
}

async fn golden_path(app: TestApp) {
    let plan_hash = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let args = json!({"to": "acct_bob", "amount": 250000});

    // Preflight: WARN, an approval is needed.
    let report = preflight(&mut alice, &plan_hash, args.clone()).await;
    assert_eq!(report.verdict(), gpb::PreflightVerdict::Warn, "{report:#?}");
    assert!(report.citable);

    // Execute: the run starts, the lookup runs, the transfer waits.
    let resp = alice
        .orch
        .execute(execute(
            &plan_hash,
            args.clone(),
            &report.preflight_id,
            "pay-1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.created);
    let run = resp.run.unwrap();
    assert_eq!(run.created_by, "user:alice");
    assert_eq!(run.plan_hash, plan_hash);
    assert_eq!(run.steps.len(), 2);
    let run_id = run.run_id.clone();
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::WaitingApproval as i32
    })
    .await;
    assert_eq!(step(&run, "lookup").state(), pb::StepState::Succeeded);
    let transfer = step(&run, "transfer");
    assert_eq!(transfer.state(), pb::StepState::WaitingApproval);
    assert_eq!(transfer.approval_ids.len(), 1);
    let approval_id = transfer.approval_ids[0].clone();

    // The same key again: the same run, not created; another request: refused.
    let again = alice
        .orch
        .execute(execute(
            &plan_hash,
            args.clone(),
            &report.preflight_id,
            "pay-1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.run.unwrap().run_id, run_id);
    let err = expect_reason(
        alice
            .orch
            .execute(execute(
                &plan_hash,
                json!({"to": "acct_bob", "amount": 7}),
                &report.preflight_id,
                "pay-1",
            ))
            .await,
        Reason::IdempotencyKeyReused,
    );
    assert!(
        err.metadata
            .iter()
            .any(|(k, v)| k == "field" && v == "inputs_hash"),
        "{err:?}"
    );

    // Nothing was transferred yet.
    let calls = |c: &mut Clients| {
        let mut hub = c.hub.clone();
        let run_id = run_id.clone();
        async move {
            hub.list_mock_calls(conpb::ListMockCallsRequest {
                run_id,
                tool: "payments.transfer".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .calls
        }
    };
    assert!(calls(&mut alice).await.is_empty());

    // The starter may not approve their own run; two others do.
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
    assert_eq!(approval.run_id, run_id);
    assert_eq!(approval.requester, "user:alice");
    let approve = |id: &str, sha: &str| apb::ApproveRequest {
        approval_id: id.into(),
        comment: "ok".into(),
        etag: String::new(),
        args_sha256: sha.into(),
    };
    expect_reason(
        alice
            .approvals
            .approve(approve(&approval_id, &approval.args_sha256))
            .await,
        Reason::SelfApproval,
    );
    for who in ["user:bob", "user:carol"] {
        let mut c = app.as_user(who, &[Role::Approver]).await;
        c.approvals
            .approve(approve(&approval_id, &approval.args_sha256))
            .await
            .unwrap();
        if who == "user:bob" {
            // One approval of two: still waiting.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let run = get(&mut alice, &run_id).await;
            assert_eq!(run.state(), pb::RunState::WaitingApproval);
            assert!(calls(&mut alice).await.is_empty());
        }
    }

    // The transfer runs once, with a token, and the run succeeds.
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    let transfer = step(&run, "transfer");
    assert_eq!(transfer.state(), pb::StepState::Succeeded);
    assert_eq!(transfer.attempts.len(), 1);
    let attempt = &transfer.attempts[0];
    assert!(!attempt.token_jti.is_empty());
    // The attempt shows the policy decision on its real arguments.
    let decision = attempt.decision.as_ref().unwrap();
    assert_eq!(decision.effect(), ppb::Effect::RequireApproval);
    let rule = decision.matched_rules[0].rule.as_ref().unwrap();
    assert_eq!(
        (
            rule.policy.as_str(),
            rule.rule.as_str(),
            rule.policy_version
        ),
        ("transfer-guard", "large-transfer", 1)
    );
    assert!(rule.content_hash.starts_with("sha256:"), "{rule:?}");
    assert_eq!(decision.reasons, ["transfer above 1,000"]);
    assert_eq!(attempt.idempotency_key, format!("{run_id}/transfer"));
    assert_eq!(
        ej::value_json(transfer.output.as_ref().unwrap(), 8).unwrap(),
        json!({"transfer_id": "tr_acct_bob", "amount": 250000})
    );
    let ledger = calls(&mut alice).await;
    assert_eq!(ledger.len(), 1, "{ledger:#?}");
    assert_eq!(ledger[0].deliveries, 1);
    assert!(ledger[0].acted);
    assert_eq!(ledger[0].idempotency_key, attempt.idempotency_key);
    assert!(!run.receipt_id.is_empty());

    // Every receipt of the run verifies offline.
    let mut ids: Vec<String> = run
        .steps
        .iter()
        .flat_map(|s| s.attempts.iter().map(|a| a.receipt_id.clone()))
        .collect();
    ids.push(run.receipt_id.clone());
    assert_eq!(ids.len(), 3);
    for id in &ids {
        assert!(!id.is_empty(), "{run:#?}");
        verify_offline(&app, &run_id, id).await;
    }

    // The run's events are on Kafka as CloudEvents (with the suite's broker).
    match std::env::var("ANUMATE_TEST_KAFKA") {
        Ok(brokers) => run_events_on_kafka(&app, &brokers, &run_id).await,
        Err(_) => eprintln!("ANUMATE_TEST_KAFKA unset: the run's events on Kafka are not checked"),
    }

    // The journal tells the story, and a watch of the ended run is its snapshot.
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
    assert_eq!(types.first(), Some(&"run.started"));
    assert_eq!(types.last(), Some(&"run.completed"));
    assert!(types.contains(&"step.waiting_approval"), "{types:?}");
    assert!(types.contains(&"run.running"), "{types:?}");
    assert_eq!(
        history.last().unwrap().sequence,
        run.sequence,
        "the run's sequence is its last change"
    );
    let mut watch = alice
        .orch
        .watch_run(pb::WatchRunRequest {
            run_id: run_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert!(matches!(
        first.change,
        Some(pb::watch_run_response::Change::Snapshot(_))
    ));
    assert!(watch.message().await.unwrap().is_none());

    // A control call on the ended run is refused precisely.
    expect_reason(
        alice
            .orch
            .pause_run(pb::PauseRunRequest {
                run_id: run_id.clone(),
                ..Default::default()
            })
            .await,
        Reason::RunTerminal,
    );
    // Listing finds it by creator.
    let listed = alice
        .orch
        .list_runs(pb::ListRunsRequest {
            created_by: "user:alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    assert!(listed.runs[0].steps.is_empty());
}

async fn bad_input(app: TestApp) {
    let plan_hash = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let ok = json!({"to": "acct_carol", "amount": 500});
    let report = preflight(&mut alice, &plan_hash, ok.clone()).await;

    // Inputs that do not match the schema: one violation per field.
    let err = expect_reason(
        alice
            .orch
            .execute(execute(
                &plan_hash,
                json!({"to": "carol"}),
                &report.preflight_id,
                "k-bad",
            ))
            .await,
        Reason::InvalidArgument,
    );
    let fields: Vec<&str> = err.violations.iter().map(|v| v.field.as_str()).collect();
    assert!(fields.contains(&"inputs.amount"), "{fields:?}");
    assert!(fields.contains(&"inputs.to"), "{fields:?}");
    // An unknown plan.
    expect_reason(
        alice
            .orch
            .execute(execute(
                &format!("sha256:{}", "ab".repeat(32)),
                ok.clone(),
                &report.preflight_id,
                "k-plan",
            ))
            .await,
        Reason::PlanNotFound,
    );
    // No preflight, an unknown one, one for other inputs.
    expect_reason(
        alice
            .orch
            .execute(execute(&plan_hash, ok.clone(), "", "k-none"))
            .await,
        Reason::PreflightRequired,
    );
    expect_reason(
        alice
            .orch
            .execute(execute(
                &plan_hash,
                ok.clone(),
                "0190e7b0-0000-7000-8000-000000000000",
                "k-unknown",
            ))
            .await,
        Reason::PreflightNotFound,
    );
    expect_reason(
        alice
            .orch
            .execute(execute(
                &plan_hash,
                json!({"to": "acct_carol", "amount": 501}),
                &report.preflight_id,
                "k-other",
            ))
            .await,
        Reason::PreflightMismatch,
    );
    // A FAIL preflight (the transfer would be denied).
    let huge = json!({"to": "acct_carol", "amount": 5000000});
    let failed = preflight(&mut alice, &plan_hash, huge.clone()).await;
    assert_eq!(failed.verdict(), gpb::PreflightVerdict::Fail);
    expect_reason(
        alice
            .orch
            .execute(execute(&plan_hash, huge, &failed.preflight_id, "k-fail"))
            .await,
        Reason::PreflightFailed,
    );
    // A missing key; a key that disagrees with the metadata.
    expect_reason(
        alice
            .orch
            .execute(execute(&plan_hash, ok.clone(), &report.preflight_id, ""))
            .await,
        Reason::InvalidArgument,
    );
    let mut req = tonic::Request::new(execute(
        &plan_hash,
        ok.clone(),
        &report.preflight_id,
        "k-body",
    ));
    req.metadata_mut()
        .insert("idempotency-key", "k-header".parse().unwrap());
    expect_reason(alice.orch.execute(req).await, Reason::InvalidArgument);
    // Nothing half-written: no run exists.
    let listed = alice
        .orch
        .list_runs(pb::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty(), "{listed:#?}");

    // Unknown runs; a stale etag; then the service still serves a real run.
    expect_reason(
        alice
            .orch
            .get_run(pb::GetRunRequest {
                run_id: "0190e7b0-0000-7000-8000-000000000000".into(),
            })
            .await,
        Reason::RunNotFound,
    );
    let run = alice
        .orch
        .execute(execute(
            &plan_hash,
            ok.clone(),
            &report.preflight_id,
            "k-ok",
        ))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    expect_reason(
        alice
            .orch
            .pause_run(pb::PauseRunRequest {
                run_id: run.run_id.clone(),
                reason: String::new(),
                etag: "\"999\"".into(),
            })
            .await,
        Reason::EtagMismatch,
    );
    let done = wait_for(&mut alice, &run.run_id, |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    assert_eq!(step(&done, "transfer").state(), pb::StepState::Succeeded);
    expect_reason(
        alice
            .orch
            .resume_run(pb::ResumeRunRequest {
                run_id: run.run_id.clone(),
                etag: done.etag.clone(),
            })
            .await,
        Reason::RunTerminal,
    );
    expect_reason(
        alice
            .orch
            .resolve_step(pb::ResolveStepRequest {
                run_id: run.run_id.clone(),
                step_id: "transfer".into(),
                action: pb::ResolveAction::Retry as i32,
                reason: "again".into(),
                ..Default::default()
            })
            .await,
        Reason::RunTerminal,
    );
    // Kill of an ended run is a no-op that returns it.
    let killed = alice
        .orch
        .kill_run(pb::KillRunRequest {
            run_id: run.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(killed.state(), pb::RunState::Succeeded);
}

/// Relays the app's outbox to Kafka (as every serving process does with
/// `[kafka] brokers`) and reads `anumate.runs` back as a consumer would:
/// the run's story, one structured CloudEvent per change, each decoding to
/// its protobuf message.
async fn run_events_on_kafka(app: &TestApp, brokers: &str, run_id: &str) {
    use prost::Message as _;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::{Headers as _, Message as _};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    use std::collections::HashMap;
    use std::time::Instant;

    let store = anumate_store::Store::connect(&app._db.config)
        .await
        .unwrap();
    let relay = anumate_events::relay::Relay::new(
        store,
        anumate_events::relay::KafkaConfig {
            brokers: brokers.into(),
            poll_ms: 10,
            // The test connects as the database's owner.
            relay_role: String::new(),
            ..Default::default()
        },
    )
    .unwrap()
    .spawn();

    let topic = "anumate.runs";
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("golden-{run_id}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut partitions = TopicPartitionList::new();
    while partitions.count() == 0 {
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            for t in md.topics() {
                for p in t.partitions() {
                    partitions
                        .add_partition_offset(topic, p.id(), Offset::Beginning)
                        .unwrap();
                }
            }
        }
        if partitions.count() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    consumer.assign(&partitions).unwrap();
    // (type, headers, value) of this run's events (the broker is shared).
    let mut seen: Vec<(String, HashMap<String, String>, Vec<u8>)> = Vec::new();
    while !seen
        .iter()
        .any(|(t, _, _)| t == "dev.anumate.run.completed.v1")
    {
        assert!(
            Instant::now() < deadline,
            "no run.completed for {run_id} on {topic}; saw {:?}",
            seen.iter().map(|(t, _, _)| t).collect::<Vec<_>>()
        );
        let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let headers: HashMap<String, String> = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        // The subject of a run's events is the run.
        if headers.get("ce_subject").is_some_and(|s| s == run_id) {
            let ty = headers.get("ce_type").cloned().unwrap_or_default();
            seen.push((ty, headers, msg.payload().unwrap_or_default().to_vec()));
        }
    }
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .unwrap();
    relay.shutdown(Duration::from_secs(5)).await;

    let types: Vec<&str> = seen.iter().map(|(t, _, _)| t.as_str()).collect();
    for wanted in [
        "dev.anumate.step.started.v1",
        "dev.anumate.step.completed.v1",
        "dev.anumate.step.waiting_approval.v1",
        "dev.anumate.run.completed.v1",
    ] {
        assert!(types.contains(&wanted), "{wanted} missing: {types:?}");
    }
    for (ty, h, value) in &seen {
        let descriptor = anumate_events::cloudevents::descriptor_of_type(ty)
            .unwrap_or_else(|| panic!("{ty} is no Anumate event type"));
        let msg = prost_reflect::DynamicMessage::decode(descriptor, value.as_slice())
            .unwrap_or_else(|e| panic!("{ty} does not decode: {e}"));
        assert_eq!(
            msg.get_field_by_name("run_id").unwrap().as_str(),
            Some(run_id),
            "{ty}: {msg:?}"
        );
        assert_eq!(h["ce_specversion"], "1.0", "{ty}: {h:?}");
        assert_eq!(h["ce_source"], "/anumate/runs", "{ty}: {h:?}");
        assert_eq!(h["ce_tenantid"], TENANT, "{ty}: {h:?}");
        assert!(
            h.contains_key("ce_id") && h.contains_key("ce_time"),
            "{h:?}"
        );
    }
    let (_, _, completed) = seen
        .iter()
        .find(|(t, _, _)| t == "dev.anumate.run.completed.v1")
        .unwrap();
    let completed = anumate_proto::events::v1::RunCompleted::decode(completed.as_slice()).unwrap();
    assert_eq!(completed.run_id, run_id);
    assert_eq!(completed.tenant_id, TENANT);
}
