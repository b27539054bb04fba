#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The orchestrator's three goals (issue 16), on PostgreSQL, with the
//! composition `anumate dev` runs served over gRPC behind the real
//! authentication layer (as `tests/common` sets it up): every step is a
//! policy decision, a single-use token minted and verified, the connector
//! hub's `Invoke` of a mock tool (no latency) and a receipt appended.
//!
//! - **Throughput**: `ORCH_BENCH_RUNS` runs (default 400) of a five-step
//!   capsule (steps chained by `needs`), submitted by 16 concurrent
//!   clients; durable steps per second from the first `Execute` to the last
//!   run's end (server times). Goal ≥ 2,000 steps/s.
//! - **Execute → first step started**: one run at a time, from the client's
//!   clock just before `Execute` to the first attempt's `start_time` (taken
//!   just before the attempt is journaled and the run turns RUNNING). Goal
//!   p95 ≤ 10 ms.
//! - **Approval decision → run RUNNING**: a one-step capsule whose policy
//!   requires one approver; from the client's clock just before `Approve`
//!   to the step's first attempt `start_time`. Goal p95 ≤ 25 ms.
//!
//! Run: `cargo bench -p anumate-orchestrator --bench orchestrator`
//! (PostgreSQL on 127.0.0.1:5432). `ORCH_BENCH_WORKERS` sets the
//! orchestrator's worker pool (default: its configured default, 32);
//! `ORCH_BENCH_SAMPLES` the latency samples (default 100).

use std::time::{Duration, Instant};

use anumate_auth::Role;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_testing::Backend;
use hdrhistogram::Histogram;
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: bench.step}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [n, i], properties: {n: {type: integer}, i: {type: integer}}}
  mock: {output: {n: \"${{ args.n }}\", i: \"${{ args.i }}\"}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: bench.gated}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [n], properties: {n: {type: integer}}}
  mock: {output: {n: \"${{ args.n }}\"}}
";

/// Evaluated on every step; the first rule never matches the bench's
/// arguments, the second gates `bench.gated` behind one approver.
const POLICY: &str = r#"policy "bench-guard" {
  rule "huge" priority 100 {
    when tool == "bench.step" and args.n > 1000000000
    then deny(reason: "too large")
  }
  rule "gated" {
    when tool == "bench.gated"
    then require_approval(approvers: ["user:bob"], quorum: 1, reason: "gated")
  }
}
"#;

const STEPS: usize = 5;

const CHAIN: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: chain
spec:
  inputs:
    n: {type: integer, required: true}
  tools: [bench.step]
  policies: [bench-guard]
  steps:
    - id: s1
      tool: bench.step
      with: {n: "${{ inputs.n }}", i: 1}
    - id: s2
      tool: bench.step
      needs: [s1]
      with: {n: "${{ inputs.n }}", i: 2}
    - id: s3
      tool: bench.step
      needs: [s2]
      with: {n: "${{ inputs.n }}", i: 3}
    - id: s4
      tool: bench.step
      needs: [s3]
      with: {n: "${{ inputs.n }}", i: 4}
    - id: s5
      tool: bench.step
      needs: [s4]
      with: {n: "${{ inputs.n }}", i: 5}
"#;

const GATED: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: gated
spec:
  inputs:
    n: {type: integer, required: true}
  tools: [bench.gated]
  policies: [bench-guard]
  steps:
    - id: g
      tool: bench.gated
      with: {n: "${{ inputs.n }}"}
"#;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn micros(t: &Option<pbjson_types::Timestamp>) -> i64 {
    t.as_ref()
        .map(|t| t.seconds * 1_000_000 + i64::from(t.nanos) / 1000)
        .unwrap_or(0)
}

fn wall_micros() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

fn ended(r: &pb::Run) -> bool {
    [
        pb::RunState::Succeeded,
        pb::RunState::Failed,
        pb::RunState::Cancelled,
    ]
    .iter()
    .any(|s| r.state == *s as i32)
}

fn first_attempt_start(r: &pb::Run) -> i64 {
    micros(&r.steps[0].attempts[0].start_time)
}

/// Pushes the tools, the policy and both capsules; turns the tenant's
/// preflight requirement off; returns the plans' hashes (chain, gated).
async fn seed_bench(app: &TestApp) -> (String, String) {
    let mut admin = app.as_user("user:root", &[Role::Admin]).await;
    admin
        .tools
        .push_tools(rpb::PushToolsRequest {
            source_yaml: TOOLS.into(),
            source_name: "tools.yaml".into(),
        })
        .await
        .unwrap();
    admin
        .policy
        .push_policy(ppb::PushPolicyRequest {
            source: POLICY.into(),
            source_name: "bench.policy".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    let mut hashes = Vec::new();
    for (name, source) in [("chain", CHAIN), ("gated", GATED)] {
        admin
            .registry
            .push_capsule(rpb::PushCapsuleRequest {
                source_yaml: source.into(),
                source_name: format!("{name}.yaml"),
                etag: String::new(),
                publish: true,
            })
            .await
            .unwrap();
        let plan = admin
            .compiler
            .compile(cpb::CompileRequest {
                capsule_name: name.into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .plan
            .unwrap();
        hashes.push(plan.plan_hash);
    }
    admin_settings(app).await;
    (hashes[0].clone(), hashes[1].clone())
}

/// `require_preflight` off: the bench measures execution, not preflight.
async fn admin_settings(app: &TestApp) {
    let token = app
        .auth
        .issuer
        .mint(
            TENANT,
            "user:root",
            &[Role::Admin],
            Duration::from_secs(600),
        )
        .unwrap();
    let url = app.server.as_ref().unwrap().url();
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    rpb::tenant_settings_service_client::TenantSettingsServiceClient::with_interceptor(
        channel,
        anumate_auth::BearerToken(token),
    )
    .update_tenant_settings(rpb::UpdateTenantSettingsRequest {
        settings: Some(rpb::TenantSettings {
            require_preflight: Some(false),
            ..Default::default()
        }),
        update_mask: Some(pbjson_types::FieldMask {
            paths: vec!["require_preflight".into()],
        }),
        etag: String::new(),
    })
    .await
    .unwrap();
}

async fn start(c: &mut Clients, plan: &str, n: i64, key: &str) -> String {
    c.orch
        .execute(execute(plan, json!({ "n": n }), "", key))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id
}

/// Polls run `id` every millisecond until `done`.
async fn poll(c: &mut Clients, id: &str, done: impl Fn(&pb::Run) -> bool) -> pb::Run {
    poll_every(c, id, done, Duration::from_millis(1)).await
}

/// Polls run `id` every `every` until `done`.
async fn poll_every(
    c: &mut Clients,
    id: &str,
    done: impl Fn(&pb::Run) -> bool,
    every: Duration,
) -> pb::Run {
    let began = Instant::now();
    loop {
        let r = get(c, id).await;
        if done(&r) {
            return r;
        }
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "run {id} stuck: {r:#?}"
        );
        tokio::time::sleep(every).await;
    }
}

fn line(name: &str, h: &Histogram<u64>, goal: &str) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name:<38} n={:<4} p50 {:>7.2} ms  p95 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms   goal: {goal}",
        h.len(),
        ms(0.5),
        ms(0.95),
        ms(0.99),
        h.max() as f64 / 1000.0
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let runs = env("ORCH_BENCH_RUNS", 400);
    let samples = env("ORCH_BENCH_SAMPLES", 100);
    let workers = std::env::var("ORCH_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let mut orch = json!({"poll_ms": 50, "approval_poll_ms": 600_000});
    if let Some(w) = workers {
        orch["workers"] = json!(w);
    }
    let app = spawn_app_with(Backend::Postgres, json!({ "orchestrator": orch })).await;
    let (chain, gated) = seed_bench(&app).await;
    let mut alice = app.alice().await;
    let mut bob = app.as_user("user:bob", &[Role::Approver]).await;

    // Warm-up: caches (plans, policies, keys, connections).
    for k in 0..5 {
        let id = start(&mut alice, &chain, k, &format!("warm-{k}")).await;
        poll(&mut alice, &id, ended).await;
    }

    // Execute → first step started, one run at a time.
    let mut first = Histogram::<u64>::new(3).unwrap();
    for k in 0..samples {
        let before = wall_micros();
        let id = start(&mut alice, &chain, 1, &format!("first-{k}")).await;
        let r = poll(&mut alice, &id, ended).await;
        assert_eq!(r.state, pb::RunState::Succeeded as i32, "{r:#?}");
        first
            .record(u64::try_from(first_attempt_start(&r) - before).unwrap_or(0))
            .unwrap();
    }

    // Approval decision → run RUNNING, one run at a time.
    let mut approved = Histogram::<u64>::new(3).unwrap();
    for k in 0..samples {
        let id = start(&mut alice, &gated, 1, &format!("gated-{k}")).await;
        let r = poll(&mut alice, &id, |r| {
            r.state == pb::RunState::WaitingApproval as i32
        })
        .await;
        let approval_id = r.steps[0].approval_ids[0].clone();
        let a = bob
            .approvals
            .get_approval(apb::GetApprovalRequest {
                approval_id: approval_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .approval
            .unwrap();
        let before = wall_micros();
        bob.approvals
            .approve(apb::ApproveRequest {
                approval_id,
                comment: "ok".into(),
                etag: String::new(),
                args_sha256: a.args_sha256,
            })
            .await
            .unwrap();
        let r = poll(&mut alice, &id, ended).await;
        assert_eq!(r.state, pb::RunState::Succeeded as i32, "{r:#?}");
        approved
            .record(u64::try_from(first_attempt_start(&r) - before).unwrap_or(0))
            .unwrap();
    }

    // Throughput: many concurrent runs.
    const CLIENTS: usize = 16;
    let began = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = app.alice().await;
        let chain = chain.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for k in (c..runs).step_by(CLIENTS) {
                ids.push(start(&mut client, &chain, 2, &format!("load-{k}")).await);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let submitted = began.elapsed();
    let mut done = Vec::with_capacity(ids.len());
    for id in &ids {
        // Seldom: the figure is from server times, and the poller's calls
        // would take CPU from the runs it waits for.
        let r = poll_every(&mut alice, id, ended, Duration::from_millis(50)).await;
        assert_eq!(r.state, pb::RunState::Succeeded as i32, "{r:#?}");
        done.push(r);
    }
    let t0 = done.iter().map(|r| micros(&r.create_time)).min().unwrap();
    let t1 = done.iter().map(|r| micros(&r.end_time)).max().unwrap();
    let steps: usize = done
        .iter()
        .map(|r| {
            r.steps
                .iter()
                .filter(|s| s.state == pb::StepState::Succeeded as i32)
                .count()
        })
        .sum();
    assert_eq!(steps, runs * STEPS);
    let secs = (t1 - t0) as f64 / 1e6;

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "orchestrator bench, PostgreSQL, workers {}, load average {}",
        workers.map_or_else(|| "default".to_string(), |w| w.to_string()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<38} {runs} runs x {STEPS} steps, {CLIENTS} clients: {steps} steps in {secs:.2} s = {:.0} steps/s ({:.0} runs/s; submitted in {submitted:.2?})   goal: >= 2,000 steps/s",
        "throughput",
        steps as f64 / secs,
        runs as f64 / secs
    );
    line("Execute -> first step started", &first, "p95 <= 10 ms");
    line(
        "approval decision -> run RUNNING",
        &approved,
        "p95 <= 25 ms",
    );
}
