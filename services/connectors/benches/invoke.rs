#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hub overhead per call: `Invoke` of a mock tool (no latency) over gRPC on
//! PostgreSQL with every production layer — token verification, then three
//! transactions: the idempotency claim with the token's single-use spend
//! (durable), the mock's ledger row (the upstream's own write) and the
//! record of the result — as latency (1 client, sequential) and throughput
//! (8 concurrent clients; concurrent calls' writes commit in groups, see
//! `Store::write_text`). Tokens are minted beforehand.
//!
//! Beside it, in the same run, two floors: the gRPC round trip through the
//! same layers (an `Invoke` refused before any work), and the floor any hub
//! pays on the same database: one durable transaction per call (claim an
//! idempotency key, commit: one WAL flush), sequentially and from 8 tasks.
//! Report the hub against them.
//!
//! Run: `cargo bench -p anumate-connectors --bench invoke` (PostgreSQL on
//! 127.0.0.1:5432; `HUB_BENCH_N` calls per client, default 1000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anumate_auth::BearerToken;
use anumate_captokens::{ArgsBinding, Capability, IssueRequest, Issuer};
use anumate_connectors::{ConnectorsConfig, Hub, HubGrpc, StaticTools};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_proto::connectors::v1 as pb;
use anumate_testing::{Backend, DevAuth, Layers, migrated_store};
use hdrhistogram::Histogram;
use pb::connector_hub_internal_client::ConnectorHubInternalClient;
use serde_json::json;
use tonic::service::Routes;
use tonic::transport::Endpoint;

const CLIENTS: usize = 8;
const TOOL: &str = "bench.echo";

/// CPU seconds used so far by the PostgreSQL server's processes alive now
/// (every `postgres` process on the machine: other databases' work counts
/// too, so read it on a quiet machine).
fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|stat| {
            let (head, rest) = stat.rsplit_once(')')?;
            head.ends_with("(postgres").then_some(())?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
            Some((ticks(11)? + ticks(12)?) / 100.0)
        })
        .sum()
}

fn requests(keys: &KeyRing, prefix: &str, n: usize) -> Vec<pb::InvokeRequest> {
    let args = json!({"amount": 5, "to": "bob"});
    let cap = Capability {
        tool: TOOL.into(),
        actions: vec!["call".into()],
        constraints: Default::default(),
    };
    (0..n)
        .map(|i| {
            let token = Issuer::new("bench")
                .issue(
                    keys,
                    IssueRequest {
                        subject: "user:bench",
                        audience: "anumate-connectors",
                        tenant: "bench",
                        run: prefix,
                        step: "s",
                        plan_hash: &format!("sha256:{}", "0".repeat(64)),
                        args: ArgsBinding::Args(&args),
                        capability: &cap,
                        ttl: Some(Duration::from_secs(300)),
                        single_use: true,
                        now: None,
                    },
                )
                .unwrap()
                .token;
            pb::InvokeRequest {
                tool: TOOL.into(),
                args: Some(serde_json::from_value(args.clone()).unwrap()),
                idempotency_key: format!("{prefix}-{i}"),
                capability_token: token,
            }
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("HUB_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let mut migrations = anumate_connectors::migrations();
    migrations.extend(anumate_captokens_service::migrations());
    let (_db, store) = migrated_store(Backend::Postgres, &migrations).await;
    let keys = Arc::new(KeyRing::new(KeyPair::generate().unwrap()));
    // The captokens service in this process (`anumate dev`, `serve all`).
    let captokens = anumate_captokens_service::CapTokens::new(
        store.clone(),
        keys.clone(),
        &anumate_captokens_service::CapTokensConfig::default(),
    )
    .unwrap();
    let tool = serde_json::from_value(json!({
        "apiVersion": "anumate.dev/v1", "kind": "Tool",
        "metadata": {"name": TOOL},
        "spec": {"connector": "mock", "side_effect": "write", "mock": {"output": {"id": "tr_${{ args.to }}"}}}
    }))
    .unwrap();
    let hub = Hub::new(
        store.clone(),
        Arc::new(captokens),
        Arc::new(StaticTools::new([tool])),
        &ConnectorsConfig::default(),
    );
    let auth = DevAuth::with_service_issuer("orchestrator");
    let layers = Layers::platform(
        anumate_testing::GrpcConfig::default(),
        auth.authenticator.clone(),
    )
    .unwrap();
    let (addr, _) = anumate_testing::serve_with(
        anumate_testing::bind().await,
        layers,
        Routes::new(HubGrpc::new(hub).into_internal_server()),
    );
    let bearer = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint("bench", Duration::from_secs(3600))
        .unwrap();
    let client = || async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ConnectorHubInternalClient::with_interceptor(channel, BearerToken(bearer.clone()))
    };

    // The gRPC floor: an Invoke refused before any work (no token) goes
    // through every layer (authentication, limits, telemetry) and back.
    {
        let mut c = client().await;
        let mut h = Histogram::<u64>::new(3).unwrap();
        for i in 0..(n + 100) {
            let t = Instant::now();
            let err = c
                .invoke(pb::InvokeRequest {
                    tool: TOOL.into(),
                    args: None,
                    idempotency_key: format!("none-{i}"),
                    capability_token: String::new(),
                })
                .await
                .unwrap_err();
            if i >= 100 {
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            assert_ne!(err.code(), tonic::Code::Ok);
        }
        println!(
            "gRPC floor (Invoke refused before any work), 1 client, {n} calls: p50 {} us, p90 {} us",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9)
        );
    }
    // Warm-up, then sequential latency.
    let mut c = client().await;
    for r in requests(&keys, "warm", 100) {
        c.invoke(r).await.unwrap();
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    for r in requests(&keys, "seq", n) {
        let t = Instant::now();
        let out = c.invoke(r).await.unwrap().into_inner();
        hist.record(t.elapsed().as_micros() as u64).unwrap();
        assert!(!out.replayed);
    }
    println!(
        "Invoke latency, 1 client, {n} calls: p50 {} us, p90 {} us, p99 {} us",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99)
    );

    // Throughput with 8 clients.
    let mut batches = Vec::new();
    for i in 0..CLIENTS {
        batches.push((client().await, requests(&keys, &format!("c{i}"), n)));
    }
    let cpu_start = anumate_testing::process_cpu_secs();
    let pg_start = postgres_cpu_secs();
    let started = Instant::now();
    let tasks: Vec<_> = batches
        .into_iter()
        .map(|(mut c, reqs)| {
            tokio::spawn(async move {
                for r in reqs {
                    c.invoke(r).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let total = CLIENTS * n;
    let hub_rate = total as f64 / secs;
    let hub_cpu = (anumate_testing::process_cpu_secs() - cpu_start) * 1e6 / total as f64;
    let hub_pg_cpu = (postgres_cpu_secs() - pg_start) * 1e6 / total as f64;
    println!(
        "Invoke throughput, {CLIENTS} clients: {hub_rate:.0} invokes/s ({total} in {secs:.2} s, \
         {hub_cpu:.0} us CPU per call in this process: clients, hub, captokens; \
         {hub_pg_cpu:.0} us in PostgreSQL)"
    );

    // The floor: one durable transaction per call on the same store.
    let commit = |store: anumate_store::Store, key: String| async move {
        let tx = store.write("bench").await.unwrap();
        let k = anumate_idempotency::Key {
            scope: "bench.floor",
            key: &key,
            fingerprint: "sha256:0",
            expires_at: i64::MAX,
        };
        anumate_idempotency::claim(&tx, &k).await.unwrap();
        tx.commit().await.unwrap();
    };
    let mut floor = Histogram::<u64>::new(3).unwrap();
    for i in 0..n {
        let t = Instant::now();
        commit(store.clone(), format!("seq-{i}")).await;
        floor.record(t.elapsed().as_micros() as u64).unwrap();
    }
    println!(
        "Floor (one durable commit), 1 client, {n} calls: p50 {} us, p90 {} us, p99 {} us",
        floor.value_at_quantile(0.5),
        floor.value_at_quantile(0.9),
        floor.value_at_quantile(0.99)
    );
    let cpu_start = anumate_testing::process_cpu_secs();
    let pg_start = postgres_cpu_secs();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..n {
                    commit(store.clone(), format!("c{c}-{i}")).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let floor_rate = total as f64 / started.elapsed().as_secs_f64();
    let floor_cpu = (anumate_testing::process_cpu_secs() - cpu_start) * 1e6 / total as f64;
    let floor_pg_cpu = (postgres_cpu_secs() - pg_start) * 1e6 / total as f64;
    println!(
        "Floor throughput, {CLIENTS} tasks: {floor_rate:.0} commits/s ({floor_cpu:.0} us CPU per call; \
         {floor_pg_cpu:.0} us in PostgreSQL)"
    );
    println!(
        "Hub vs floor: p50 {:+} us ({:.2}x), throughput {:.0} % of the floor",
        hist.value_at_quantile(0.5) as i64 - floor.value_at_quantile(0.5) as i64,
        hist.value_at_quantile(0.5) as f64 / floor.value_at_quantile(0.5) as f64,
        100.0 * hub_rate / floor_rate
    );
}
