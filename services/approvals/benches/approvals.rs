#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Approvals on PostgreSQL, served as the binary serves them (receipts
//! module in process, every production layer, real TCP):
//!
//! 1. decision -> the waiting party notified: after each `Approve` commits,
//!    how long until `Approvals::wait` returns (the in-process nudge the
//!    orchestrator uses) and until a `WatchApprovals` stream delivers the
//!    grant (the outbox feed); both measured from the commit (the broadcast
//!    sent right after it) and from the start of the `Approve` call;
//! 2. `Approve` throughput with 8 concurrent clients.
//!
//! Run: `cargo bench -p anumate-approvals --bench approvals` (PostgreSQL on
//! 127.0.0.1:5432; `APPROVALS_BENCH_N` decisions per client, default 300).

use std::time::{Duration, Instant};

use anumate_approvals::Approvals;
use anumate_auth::{BearerToken, Role};
use anumate_proto::approvals::v1 as pb;
use anumate_proto::policy::v1::PolicyRuleRef;
use anumate_service::{Context, KeysConfig, ServiceModule};
use anumate_testing::{Backend, DevAuth, Layers, ModuleServer};
use hdrhistogram::Histogram;
use pb::approvals_internal_client::ApprovalsInternalClient;
use pb::approvals_service_client::ApprovalsServiceClient;
use tokio_stream::StreamExt as _;
use tonic::transport::{Channel, Endpoint};

const TENANT: &str = "bench";
const ARGS: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const CLIENTS: usize = 8;

async fn channel(server: &ModuleServer) -> Channel {
    Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn request(run: &str, step: &str) -> pb::RequestApprovalRequest {
    pb::RequestApprovalRequest {
        run_id: run.into(),
        step_id: step.into(),
        plan_hash: ARGS.into(),
        args_sha256: ARGS.into(),
        tool: "payments.refund".into(),
        rule: Some(PolicyRuleRef {
            policy: "p".into(),
            policy_version: 1,
            rule: "r".into(),
            ..Default::default()
        }),
        requester: "user:rita".into(),
        stages: vec![pb::StageRequest {
            name: String::new(),
            approvers: vec!["group:approvers".into()],
            quorum: 1,
        }],
        ..Default::default()
    }
}

fn approve(id: &str) -> pb::ApproveRequest {
    pb::ApproveRequest {
        approval_id: id.into(),
        args_sha256: ARGS.into(),
        ..Default::default()
    }
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn row(name: &str, h: &Histogram<u64>) {
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
        h.len(),
        ms(h, 0.5),
        ms(h, 0.95),
        ms(h, 0.99)
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("APPROVALS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut migrations = anumate_receipts::migrations();
    migrations.extend(anumate_approvals::own_migrations());
    let (_db, store) = anumate_testing::migrated_store(Backend::Postgres, &migrations).await;
    let auth = DevAuth::with_service_issuer("orchestrator");
    let listener = anumate_testing::bind().await;
    let own_url = format!("http://{}", listener.local_addr().unwrap());
    let ctx = Context::new(
        serde_json::json!({}),
        Some(store),
        KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        },
        auth.dir.path().join("keys"),
        None,
        own_url,
    );
    // APPROVALS_BENCH_NO_RECEIPTS=1 leaves the receipts service out (the
    // decision path without its receipt, to see what the receipt costs).
    let receipted = std::env::var_os("APPROVALS_BENCH_NO_RECEIPTS").is_none();
    let mut modules: Vec<Box<dyn ServiceModule>> = Vec::new();
    if receipted {
        modules.push(anumate_receipts::module());
    }
    modules.push(anumate_approvals::module());
    let layers = Layers::platform(
        anumate_testing::GrpcConfig::default(),
        auth.authenticator.clone(),
    )
    .unwrap();
    let server = anumate_testing::serve_modules(listener, &modules, ctx, layers).await;
    let approvals = server.provided.get::<Approvals>().unwrap().clone();

    let orchestrator_token = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint(TENANT, Duration::from_secs(3600))
        .unwrap();
    let mut orchestrator = ApprovalsInternalClient::with_interceptor(
        channel(&server).await,
        BearerToken(orchestrator_token),
    );
    let approver = |i: usize| {
        auth.issuer
            .mint_with_groups(
                TENANT,
                &format!("user:a{i}"),
                &[Role::Approver],
                &["approvers".to_string()],
                Duration::from_secs(3600),
            )
            .unwrap()
    };

    // 1. Decision -> notified.
    let mut client =
        ApprovalsServiceClient::with_interceptor(channel(&server).await, BearerToken(approver(0)));
    let mut watch = client
        .watch_approvals(pb::WatchApprovalsRequest {
            after_sequence: 0,
            run_id: "nudge".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut nudge_commit = Histogram::<u64>::new(3).unwrap();
    let mut nudge_call = Histogram::<u64>::new(3).unwrap();
    let mut feed_commit = Histogram::<u64>::new(3).unwrap();
    let mut feed_call = Histogram::<u64>::new(3).unwrap();
    let mut approve_call = Histogram::<u64>::new(3).unwrap();
    for i in 0..n {
        let a = orchestrator
            .request_approval(request("nudge", &format!("s{i}")))
            .await
            .unwrap()
            .into_inner()
            .approval
            .unwrap();
        let id = a.approval_id.clone();
        let mut changes = approvals.subscribe();
        let waiting = approvals.clone();
        let wid = id.clone();
        let waiter = tokio::spawn(async move {
            waiting.wait(TENANT, &wid).await.unwrap();
            Instant::now()
        });
        let cid = id.clone();
        let committed = tokio::spawn(async move {
            loop {
                let c = changes.recv().await.unwrap();
                if c.approval_id == cid && c.state == pb::ApprovalState::Approved {
                    return Instant::now();
                }
            }
        });
        // Let the waiter park on the channel first.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let start = Instant::now();
        client.approve(approve(&id)).await.unwrap();
        let returned = Instant::now();
        let fed = loop {
            let item = watch.next().await.unwrap().unwrap();
            if item.approval.as_ref().map(|x| x.approval_id.as_str()) == Some(id.as_str())
                && item.event_type == "dev.anumate.approval.granted.v1"
            {
                break Instant::now();
            }
        };
        let woke = waiter.await.unwrap();
        let commit = committed.await.unwrap();
        let us = |d: Duration| d.as_micros() as u64;
        nudge_commit
            .record(us(woke.saturating_duration_since(commit)))
            .unwrap();
        nudge_call.record(us(woke.duration_since(start))).unwrap();
        feed_commit
            .record(us(fed.saturating_duration_since(commit)))
            .unwrap();
        feed_call.record(us(fed.duration_since(start))).unwrap();
        approve_call
            .record(us(returned.duration_since(start)))
            .unwrap();
    }

    // 2. Approve throughput, 8 clients, each on its own connection: all in
    // one tenant, then each in its own (receipts append per tenant log).
    let (load, elapsed) = throughput(&server, &auth, n, false).await;
    let (spread, spread_elapsed) = throughput(&server, &auth, n, true).await;

    println!(
        "approvals on PostgreSQL, {n} decisions per measurement, receipts {}\n",
        if receipted { "on" } else { "off" }
    );
    println!("| measure | n | p50 ms | p95 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    row(
        "commit -> Approvals::wait returns (in-process nudge)",
        &nudge_commit,
    );
    row(
        "commit -> WatchApprovals delivers the grant (outbox feed)",
        &feed_commit,
    );
    row("Approve call start -> Approvals::wait returns", &nudge_call);
    row("Approve call start -> WatchApprovals delivers", &feed_call);
    row("Approve call (1 client)", &approve_call);
    row(&format!("Approve call ({CLIENTS} clients)"), &load);
    row(
        &format!("Approve call ({CLIENTS} clients, {CLIENTS} tenants)"),
        &spread,
    );
    println!(
        "\nApprove throughput, {CLIENTS} clients in one tenant: {:.0} decisions/s ({} in {:.2} s)",
        load.len() as f64 / elapsed.as_secs_f64(),
        load.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "Approve throughput, {CLIENTS} clients in {CLIENTS} tenants: {:.0} decisions/s ({} in {:.2} s)",
        spread.len() as f64 / spread_elapsed.as_secs_f64(),
        spread.len(),
        spread_elapsed.as_secs_f64()
    );
    server.stop().await;
}

/// `CLIENTS` clients approving `n` approvals each (opened first, not timed),
/// in one tenant or each in its own. Returns the call latencies and the wall
/// time of the approving.
async fn throughput(
    server: &ModuleServer,
    auth: &DevAuth,
    n: usize,
    per_tenant: bool,
) -> (Histogram<u64>, Duration) {
    let tenant = |c: usize| {
        if per_tenant {
            format!("{TENANT}-{c}")
        } else {
            TENANT.to_string()
        }
    };
    let run = if per_tenant { "spread" } else { "load" };
    let mut work = Vec::new();
    for c in 0..CLIENTS {
        let token = auth
            .services
            .as_ref()
            .unwrap()
            .for_service("orchestrator")
            .unwrap()
            .mint(&tenant(c), Duration::from_secs(3600))
            .unwrap();
        let mut orchestrator =
            ApprovalsInternalClient::with_interceptor(channel(server).await, BearerToken(token));
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let a = orchestrator
                .request_approval(request(run, &format!("c{c}-s{i}")))
                .await
                .unwrap()
                .into_inner()
                .approval
                .unwrap();
            ids.push(a.approval_id);
        }
        let token = auth
            .issuer
            .mint_with_groups(
                &tenant(c),
                &format!("user:c{c}"),
                &[Role::Approver],
                &["approvers".to_string()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let client =
            ApprovalsServiceClient::with_interceptor(channel(server).await, BearerToken(token));
        work.push((client, ids));
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut client, ids) in work {
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            for id in ids {
                let t = Instant::now();
                client.approve(approve(&id)).await.unwrap();
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    (all, started.elapsed())
}
