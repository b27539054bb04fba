//! Receipt append through the service (gRPC over TCP, authentication,
//! group-committed PostgreSQL transactions) with 8 concurrent clients — each
//! with one request in flight, and each with 16 in flight over its one HTTP/2
//! connection — then 10 s of sustained appends from the 8 × 16 (rate and
//! append latency p50/p99) and the time from append until an inclusion proof
//! is served with the default checkpoint cadence, idle and under that load
//! (p50/p99). Needs PostgreSQL (`ANUMATE_TEST_POSTGRES_URL`).
//!
//! The log is warmed with a few thousand receipts and the tables analyzed
//! first, as autovacuum would have done on a running system: plans cached
//! while the tables were empty pick poor indexes until the statistics exist.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anumate_auth::{
    AuthConfig, AuthLayer, Authenticator, BearerToken, DevIssuer, Role, ServiceIssuer,
};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_proto::receipts::v1 as pb;
use anumate_receipts::{Receipts, ReceiptsConfig, ReceiptsGrpc};
use anumate_store::Store;
use anumate_store::testing::TestDb;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pb::receipts_internal_client::ReceiptsInternalClient;
use pb::receipts_service_client::ReceiptsServiceClient;
use sea_orm::ConnectionTrait as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Client = ReceiptsInternalClient<InterceptedService<Channel, BearerToken>>;
type Reader = ReceiptsServiceClient<InterceptedService<Channel, BearerToken>>;

const CLIENTS: usize = 8;
const PER_CLIENT: usize = 64;
/// Receipts per client in a pipelined round: enough that filling and
/// draining the pipeline at the round's ends does not dominate.
const PER_CLIENT_PIPELINED: usize = 256;
/// How long the sustained-load phase runs.
const SUSTAINED: Duration = Duration::from_secs(10);
/// Requests in flight per client in the pipelined runs.
const INFLIGHT: usize = 16;

struct Bench {
    /// The orchestrator service's clients (only it appends step receipts).
    clients: Vec<Client>,
    /// An auditor's client, for proofs.
    reader: Reader,
    db: TestDb,
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
    let services =
        ServiceIssuer::load_or_create(&dir.path().join("services"), "orchestrator").unwrap();
    let auth = Authenticator::new(AuthConfig::default())
        .unwrap()
        .with_static_issuer(issuer.issuer(), issuer.jwks())
        .with_static_service_issuer(services.jwks());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(AuthLayer::new(
                auth,
                anumate_auth::AuthzTable::platform().unwrap(),
            ))
            .add_service(ReceiptsGrpc::new(receipts.clone()).into_internal_server())
            .add_service(ReceiptsGrpc::new(receipts).into_server())
            .serve_with_incoming(async_stream_nodelay(listener))
            .await
            .unwrap();
    });
    let token = services.mint("bench", Duration::from_secs(300)).unwrap();
    let reader_token = issuer
        .mint(
            "bench",
            "auditor",
            &[Role::Auditor],
            Duration::from_secs(3600),
        )
        .unwrap();
    let reader = ReceiptsServiceClient::with_interceptor(
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap(),
        BearerToken(reader_token),
    );
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        clients.push(ReceiptsInternalClient::with_interceptor(
            channel,
            BearerToken(token.clone()),
        ));
    }
    let bench = Bench {
        clients,
        reader,
        db,
        _dir: dir,
    };
    for warm in 0..8 {
        round(&bench.clients, &format!("warm{warm}"), PER_CLIENT, INFLIGHT).await;
    }
    let owner = Store::connect(&bench.db.config).await.unwrap();
    owner
        .owner_connection()
        .execute_unprepared("ANALYZE")
        .await
        .unwrap();
    bench
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

/// Appends `per_client` receipts from each client concurrently, `inflight`
/// requests at a time per client (multiplexed on its connection); returns the ids.
async fn round(clients: &[Client], round: &str, per_client: usize, inflight: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for lane in 0..inflight {
            let mut client = client.clone();
            let round = round.to_string();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (lane..per_client).step_by(inflight) {
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
    let mut n = 0u64;
    for (inflight, per_client) in [(1, PER_CLIENT), (INFLIGHT, PER_CLIENT_PIPELINED)] {
        group.throughput(Throughput::Elements((CLIENTS * per_client) as u64));
        let name = format!("append, 8 clients x {inflight} in flight, postgres");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    n += 1;
                    rt.block_on(round(&bench.clients, &n.to_string(), per_client, inflight));
                }
                start.elapsed()
            })
        });
    }
    group.finish();

    rt.block_on(time_to_proof(&bench.clients, &bench.reader, "idle", 0));
    rt.block_on(time_to_proof(
        &bench.clients,
        &bench.reader,
        "under load",
        INFLIGHT,
    ));
}

/// Appends probes one at a time and polls each until its inclusion proof is
/// served; with `inflight > 0` the 8 clients keep appending meanwhile, for at
/// least `SUSTAINED`. Prints p50/p99 and, under load, the sustained append
/// rate and append latency.
async fn time_to_proof(clients: &[Client], reader: &Reader, label: &str, inflight: usize) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    let started = Instant::now();
    if inflight > 0 {
        for (c, client) in clients.iter().enumerate() {
            for lane in 0..inflight {
                let (mut client, stop) = (client.clone(), stop.clone());
                load.push(tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        let start = Instant::now();
                        client
                            .append_receipt(request(format!("load-{c}-{lane}-{i}")))
                            .await
                            .unwrap();
                        latencies.push(start.elapsed());
                    }
                    latencies
                }));
            }
        }
    }
    let mut probes = {
        let mut client = clients[0].clone();
        let mut reader = reader.clone();
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
                let proof = reader
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
    eprintln!(
        "time to inclusion proof (default checkpoint interval, {label}): {}",
        summary(&mut probes)
    );
    if inflight == 0 {
        return;
    }
    if let Some(left) = SUSTAINED.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut appends = Vec::new();
    for task in load {
        appends.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    eprintln!(
        "sustained appends, {CLIENTS} clients x {inflight} in flight for {:.1} s: {:.0}/s; append latency {}",
        elapsed.as_secs_f64(),
        appends.len() as f64 / elapsed.as_secs_f64(),
        summary(&mut appends)
    );
}

/// p50, p99 and max of `latencies`.
fn summary(latencies: &mut [Duration]) -> String {
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    format!(
        "p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        p(0.5),
        p(0.99),
        latencies[latencies.len() - 1]
    )
}

criterion_group!(benches, append);
criterion_main!(benches);
