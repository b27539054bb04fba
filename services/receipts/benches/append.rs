//! Receipt append through the service (gRPC over TCP, authentication,
//! group-committed PostgreSQL transactions) with 8 concurrent clients — each
//! with one request in flight, and each with 16 in flight over its one HTTP/2
//! connection — and the time from append until an inclusion proof is served
//! with the default checkpoint cadence, idle and under sustained load
//! (p50/p99, printed with the sustained rate). Needs PostgreSQL
//! (`ANUMATE_TEST_POSTGRES_URL`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anumate_auth::{AuthConfig, AuthLayer, Authenticator, BearerToken, DevIssuer, Role};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_proto::receipts::v1 as pb;
use anumate_receipts::{Receipts, ReceiptsConfig, ReceiptsGrpc};
use anumate_store::Store;
use anumate_store::testing::TestDb;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pb::receipts_service_client::ReceiptsServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Client = ReceiptsServiceClient<InterceptedService<Channel, BearerToken>>;

const CLIENTS: usize = 8;
const PER_CLIENT: usize = 64;
/// Requests in flight per client in the pipelined runs.
const INFLIGHT: usize = 16;

struct Bench {
    clients: Vec<Client>,
    _db: TestDb,
    _dir: tempfile::TempDir,
}

async fn setup() -> Bench {
    let db = TestDb::postgres().await;
    let store = Store::connect(&db.config).await.unwrap();
    store
        .migrate(&anumate_receipts::migrations())
        .await
        .unwrap();
    let keys = Arc::new(KeyRing::new(KeyPair::generate().unwrap()));
    let receipts = Receipts::new(store, keys, &ReceiptsConfig::default()).unwrap();
    receipts.spawn_checkpointer();
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::load_or_create(dir.path()).unwrap();
    let auth = Authenticator::new(AuthConfig::default())
        .unwrap()
        .with_static_issuer(issuer.issuer(), issuer.jwks());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(AuthLayer::new(auth))
            .add_service(ReceiptsGrpc::new(receipts).into_server())
            .serve_with_incoming(async_stream_nodelay(listener))
            .await
            .unwrap();
    });
    let token = issuer
        .mint(
            "bench",
            "svc:bench",
            &[Role::Auditor],
            Duration::from_secs(3600),
        )
        .unwrap();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(ReceiptsServiceClient::with_interceptor(
            channel,
            BearerToken(token.clone()),
        ));
    }
    Bench {
        clients,
        _db: db,
        _dir: dir,
    }
}

/// Accepted connections with TCP_NODELAY (as `Server::serve` would set): without
/// it, small responses wait for delayed ACKs (~40 ms per call).
fn async_stream_nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

fn request(key: String) -> pb::AppendReceiptRequest {
    pb::AppendReceiptRequest {
        kind: pb::ReceiptKind::StepExecution as i32,
        subject: Some(pb::ReceiptSubject {
            run_id: "run".into(),
            step_id: key.clone(),
            attempt: 1,
            ..Default::default()
        }),
        content: Some(
            serde_json::from_value(serde_json::json!({"tool": "refund", "amount": 12})).unwrap(),
        ),
        dedupe_key: key,
    }
}

/// Appends `PER_CLIENT` receipts from each client concurrently, `inflight`
/// requests at a time per client (multiplexed on its connection); returns the ids.
async fn round(clients: &[Client], round: u64, inflight: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for lane in 0..inflight {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (lane..PER_CLIENT).step_by(inflight) {
                    let r = client
                        .append_receipt(request(format!("{round}-{c}-{i}")))
                        .await
                        .unwrap()
                        .into_inner();
                    ids.push(r.receipt.unwrap().receipt_id);
                }
                ids
            }));
        }
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    ids
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let bench = rt.block_on(setup());
    let mut group = c.benchmark_group("receipts");
    group.sample_size(10);
    group.throughput(Throughput::Elements((CLIENTS * PER_CLIENT) as u64));
    let mut n = 0u64;
    for inflight in [1, INFLIGHT] {
        let name = format!("append, 8 clients x {inflight} in flight, postgres");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    n += 1;
                    rt.block_on(round(&bench.clients, n, inflight));
                }
                start.elapsed()
            })
        });
    }
    group.finish();

    rt.block_on(time_to_proof(&bench.clients, "idle", 0));
    rt.block_on(time_to_proof(&bench.clients, "under load", INFLIGHT));
}

/// Appends probes one at a time and polls each until its inclusion proof is
/// served; with `inflight > 0` the 8 clients keep appending meanwhile. Prints
/// p50/p99 and, under load, the sustained append rate.
async fn time_to_proof(clients: &[Client], label: &str, inflight: usize) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let appended = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    if inflight > 0 {
        for (c, client) in clients.iter().enumerate() {
            for lane in 0..inflight {
                let (mut client, stop, appended) = (client.clone(), stop.clone(), appended.clone());
                load.push(tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        client
                            .append_receipt(request(format!("load-{c}-{lane}-{i}")))
                            .await
                            .unwrap();
                        appended.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }));
            }
        }
    }
    let started = Instant::now();
    let mut latencies = {
        let mut client = clients[0].clone();
        let mut out = Vec::new();
        for i in 0..40 {
            let start = Instant::now();
            let r = client
                .append_receipt(request(format!("ttp-{label}-{i}")))
                .await
                .unwrap()
                .into_inner()
                .receipt
                .unwrap();
            loop {
                let proof = client
                    .get_inclusion_proof(pb::GetInclusionProofRequest {
                        receipt_id: r.receipt_id.clone(),
                        tree_size: 0,
                    })
                    .await;
                if proof.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            out.push(start.elapsed());
            tokio::time::sleep(Duration::from_millis(37)).await;
        }
        out
    };
    let elapsed = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let rate = appended.load(std::sync::atomic::Ordering::Relaxed) as f64 / elapsed.as_secs_f64();
    eprintln!(
        "time to inclusion proof (default checkpoint interval, {label}): p50 {:?}, p99 {:?}, max {:?}; \
         sustained appends meanwhile: {rate:.0}/s",
        p(0.5),
        p(0.99),
        latencies[latencies.len() - 1]
    );
}

criterion_group!(benches, append);
criterion_main!(benches);
