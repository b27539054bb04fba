//! GetCapsule through the REST gateway and directly over gRPC, in one run,
//! at the same concurrency: throughput and latency percentiles of each, the
//! REST/gRPC throughput ratio and the p50 the gateway adds. The platform runs
//! in process as `anumate dev` builds it (SQLite); clients share one
//! connection pool each. The gateway calls the services in process, as
//! `anumate dev` and `serve all` run it; `BENCH_UPSTREAM=network` makes it
//! call them over loopback gRPC instead, as a mesh's `serve gateway` does
//! (`BENCH_UPSTREAM_CONNECTIONS` then sets its `[gateway]
//! upstream_connections`). `BENCH_SECS` (default 5) and `BENCH_CONCURRENCY`
//! (default 1,16) tune it. Each side also prints the process's CPU
//! time per call (clients, gateway and services together), which a busy
//! machine disturbs less than throughput.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anumate_auth::{BearerToken, Role};
use anumate_gateway::{Gateway, GatewayConfig};
use anumate_proto::anumate::registry::v1 as rpb;
use anumate_service::ServiceModule;
use anumate_testing::Backend;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Mutex;

fn modules() -> Vec<Box<dyn ServiceModule>> {
    vec![
        anumate_registry::module(),
        anumate_receipts::module(),
        anumate_policy_service::module(),
        anumate_captokens_service::module(),
        anumate_compiler::module(),
        anumate_events_service::module(),
        anumate_approvals::module(),
        anumate_ghostrun::module(),
        anumate_connectors::module(),
        anumate_orchestrator::module(),
    ]
}

struct Outcome {
    calls: u64,
    secs: f64,
    hist: Histogram<u64>,
    /// CPU time of the whole process (clients, gateway, services) per call,
    /// in µs: what a call costs, whatever else the machine is running.
    cpu_us_per_call: f64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.secs
    }
    fn print(&self, what: &str) {
        println!(
            "{what:>5}: {:>8.0} calls/s  p50 {:>6} µs  p90 {:>6} µs  p99 {:>6} µs  ({} calls, {:.0} µs CPU per call)",
            self.rate(),
            self.hist.value_at_quantile(0.5),
            self.hist.value_at_quantile(0.9),
            self.hist.value_at_quantile(0.99),
            self.calls,
            self.cpu_us_per_call
        );
    }
}

/// Runs `call` from `concurrency` tasks for `secs` seconds.
async fn drive<F, Fut>(concurrency: usize, secs: u64, call: F) -> Outcome
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    // Warm-up: connections open, caches filled.
    for _ in 0..50 {
        call().await;
    }
    let start = Instant::now();
    let cpu_start = anumate_testing::process_cpu_secs();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let call = call.clone();
        let hist = hist.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new(3).unwrap();
            while Instant::now() < end {
                let t = Instant::now();
                call().await;
                local.record(t.elapsed().as_micros() as u64).unwrap();
            }
            hist.lock().await.add(local).unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = anumate_testing::process_cpu_secs() - cpu_start;
    let hist = Arc::try_unwrap(hist).ok().unwrap().into_inner();
    Outcome {
        calls: hist.len(),
        secs,
        cpu_us_per_call: cpu * 1e6 / hist.len().max(1) as f64,
        hist,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let anumate_testing::Composed {
        server,
        auth,
        db: _db,
    } = anumate_testing::compose(
        Backend::Sqlite,
        anumate_events::MIGRATIONS,
        &modules(),
        json!({}),
        "bench",
    )
    .await;
    let own_url = server.url();
    // BENCH_UPSTREAM_CONNECTIONS: the gateway's HTTP/2 connections upstream
    // (default: the configuration's default).
    let mut config = GatewayConfig::default();
    if let Some(n) = std::env::var("BENCH_UPSTREAM_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        config.upstream_connections = n;
    }
    let network = std::env::var("BENCH_UPSTREAM").is_ok_and(|v| v == "network");
    let upstream = if network {
        format!(
            "gRPC over loopback, {} connection(s)",
            config.upstream_connections
        )
    } else {
        "in process".to_owned()
    };
    let gateway = if network {
        Gateway::connect_lazy(config, &own_url).unwrap()
    } else {
        Gateway::in_process(config, server.in_process.clone()).unwrap()
    };
    let gw_listener = anumate_testing::bind().await;
    let gw_url = format!("http://{}", gw_listener.local_addr().unwrap());
    tokio::spawn(anumate_gateway::serve(
        gw_listener,
        gateway,
        std::future::pending(),
    ));
    let token = auth
        .issuer
        .mint(
            "acme",
            "user:bench",
            &[Role::Admin],
            Duration::from_secs(3600),
        )
        .unwrap();

    let channel = tonic::transport::Endpoint::from_shared(own_url)
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let grpc = rpb::registry_service_client::RegistryServiceClient::with_interceptor(
        channel,
        BearerToken(token.clone()),
    );
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/refund.capsule.yaml"
    ))
    .unwrap();
    grpc.clone()
        .push_capsule(rpb::PushCapsuleRequest {
            source_yaml: yaml,
            publish: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let rest_url = format!("{gw_url}/v1/capsules/refund-small-orders");

    println!(
        "GetCapsule, {secs} s per side, gateway upstream {upstream}; load average before: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for concurrency in levels {
        let g = grpc.clone();
        let direct = drive(concurrency, secs, move || {
            let mut g = g.clone();
            async move {
                g.get_capsule(rpb::GetCapsuleRequest {
                    name: "refund-small-orders".into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        })
        .await;
        let (h, u, t) = (http.clone(), rest_url.clone(), token.clone());
        let rest = drive(concurrency, secs, move || {
            let (h, u, t) = (h.clone(), u.clone(), t.clone());
            async move {
                let resp = h.get(&u).bearer_auth(&t).send().await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.bytes().await.unwrap();
            }
        })
        .await;
        println!("concurrency {concurrency}:");
        direct.print("gRPC");
        rest.print("REST");
        println!(
            "  REST/gRPC throughput {:.0} %, added p50 {} µs; CPU per call gRPC/REST {:.0} %",
            100.0 * rest.rate() / direct.rate(),
            rest.hist.value_at_quantile(0.5) as i64 - direct.hist.value_at_quantile(0.5) as i64,
            100.0 * direct.cpu_us_per_call / rest.cpu_us_per_call
        );
    }
    println!(
        "load average after: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    server.stop().await;
}
