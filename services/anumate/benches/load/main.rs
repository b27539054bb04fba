//! The request-path load bench (issue 12): how many reads a second the real
//! `anumate` server answers, at what latency, against a bare tonic server
//! doing the same work (the floor our layers are measured against).
//!
//! Run (release build; both stores; the binary under test is built with it):
//!
//! ```text
//! cargo bench -p anumate-cli --bench load -- [--connections 16] [--streams 8] \
//!     [--duration 10] [--warmup 2] [--store sqlite,postgres] [--endpoints …] \
//!     [--no-latency-run] [--no-baseline]
//! ```
//!
//! Per store it starts the real `anumate dev` (this package's binary, as a
//! child process, on a fresh SQLite directory or a fresh PostgreSQL database
//! from `ANUMATE_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, served by a non-owner login
//! under row-level security as the tests do), seeds it through its gRPC API
//! (capsules pushed and published, a plan compiled, a receipt appended, a
//! capability token issued before each `VerifyToken` run), then starts the
//! baseline: this bench binary again (`--serve-baseline`), a child process
//! serving the same RPC paths with a hand-written tonic service that checks
//! the same ES256 bearer token with the same `anumate_auth::Authenticator`
//! (the dev issuer's keys, default `[auth]` settings) and runs the same
//! SELECTs in a tenant-scoped transaction with plain sqlx (PostgreSQL: BEGIN,
//! `set_config('app.tenant_id', …, true)` and the role switch, the SELECTs,
//! COMMIT). Both servers are separate processes; the load generator (this
//! process) drives one at a time.
//!
//! The baseline covers `GetCapsule`, `ListCapsules`, `GetPlan` and
//! `GetReceipt`; `VerifyToken` has none (its work is the capability-token
//! verifier and its revocation and audit bookkeeping, which a bare server
//! would have to reimplement to be comparable).
//!
//! Each measurement opens N HTTP/2 connections with M calls in flight on each
//! (default 16 × 8), and then 1 × 1 (latency), for `--warmup` seconds
//! (discarded) plus `--duration` seconds, and records every call's latency in
//! an HDR histogram. RSS is each server process's (`/proc/<pid>/status`
//! VmHWM and VmRSS) after its load. The server's `ANUMATE_…` environment
//! passes through to `anumate dev` (e.g. `ANUMATE_TELEMETRY__LOG_FILTER=warn`
//! to measure without the per-request access log).
//!
//! The last thing printed is a markdown table.

#![forbid(unsafe_code)]

mod baseline;
mod drive;
mod report;
mod seed;
mod server;

use std::time::Duration;

use clap::Parser;

/// The RPCs measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `RegistryService.GetCapsule` of a small published capsule.
    GetCapsule,
    /// `RegistryService.ListCapsules` (the seeded capsules, one page).
    ListCapsules,
    /// `CompilerService.GetPlan` of the compiled plan.
    GetPlan,
    /// `CapabilityTokensInternal.VerifyToken` (a dry check, not consuming).
    VerifyToken,
    /// `ReceiptsService.GetReceipt` of the appended receipt.
    GetReceipt,
}

impl Endpoint {
    /// Every endpoint, in report order.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::GetCapsule,
        Endpoint::ListCapsules,
        Endpoint::GetPlan,
        Endpoint::VerifyToken,
        Endpoint::GetReceipt,
    ];

    /// The RPC's name.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::GetCapsule => "GetCapsule",
            Endpoint::ListCapsules => "ListCapsules",
            Endpoint::GetPlan => "GetPlan",
            Endpoint::VerifyToken => "VerifyToken",
            Endpoint::GetReceipt => "GetReceipt",
        }
    }

    /// Whether the baseline serves it.
    pub fn has_baseline(self) -> bool {
        self != Endpoint::VerifyToken
    }
}

/// The stores the server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// A fresh SQLite file (`anumate dev`'s default).
    Sqlite,
    /// A fresh PostgreSQL database, served under row-level security.
    Postgres,
}

impl StoreKind {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres => "PostgreSQL",
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Load bench of the request path against a bare tonic baseline (issue 12)")]
struct Args {
    /// HTTP/2 connections of the throughput run.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Calls in flight on each connection in the throughput run.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Seconds measured per endpoint, server and load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before measuring (discarded).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Stores to run on.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["sqlite", "postgres"])]
    store: Vec<StoreKind>,
    /// Endpoints to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values = [
        "get-capsule", "list-capsules", "get-plan", "verify-token", "get-receipt"
    ])]
    endpoints: Vec<Endpoint>,
    /// Skip the 1 × 1 latency run.
    #[arg(long)]
    no_latency_run: bool,
    /// Skip the baseline server.
    #[arg(long)]
    no_baseline: bool,
    /// Capsules seeded (the page `ListCapsules` returns).
    #[arg(long, default_value_t = 10)]
    capsules: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: serve the baseline (the bench starts itself with this).
    #[command(flatten)]
    baseline: baseline::ServeArgs,
}

/// One load shape: connections × calls in flight on each.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// HTTP/2 connections.
    pub connections: usize,
    /// Calls in flight per connection.
    pub streams: usize,
}

impl std::fmt::Display for Load {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}", self.connections, self.streams)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.baseline.serve_baseline {
        return runtime.block_on(baseline::serve(args.baseline));
    }
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut loads = vec![Load {
        connections: args.connections.max(1),
        streams: args.streams.max(1),
    }];
    if !args.no_latency_run {
        loads.push(Load {
            connections: 1,
            streams: 1,
        });
    }
    let timing = drive::Timing {
        warmup: Duration::from_secs(args.warmup),
        duration: Duration::from_secs(args.duration.max(1)),
    };
    let mut report = report::Report::new(timing, loads.clone());
    for store in &args.store {
        eprintln!("== {}: starting anumate dev", store.name());
        let ours = server::Ours::start(*store).await?;
        eprintln!("== {}: seeding through the API", store.name());
        let seeded = seed::seed(&ours, args.capsules).await?;
        let baseline = if args.no_baseline {
            None
        } else {
            eprintln!("== {}: starting the baseline", store.name());
            Some(server::Baseline::start(&ours).await?)
        };
        for endpoint in &args.endpoints {
            for load in &loads {
                let target = drive::Target {
                    url: ours.url.clone(),
                    token: ours.token.clone(),
                };
                let call = seed::call_for(*endpoint, &ours, &seeded).await?;
                let ours_stats = drive::measure(&target, &call, *load, timing).await?;
                eprintln!(
                    "{} {} {load} ours:     {}",
                    store.name(),
                    endpoint.name(),
                    ours_stats.summary()
                );
                let base_stats = match &baseline {
                    Some(b) if endpoint.has_baseline() => {
                        let target = drive::Target {
                            url: b.url.clone(),
                            token: ours.token.clone(),
                        };
                        let stats = drive::measure(&target, &call, *load, timing).await?;
                        eprintln!(
                            "{} {} {load} baseline: {}",
                            store.name(),
                            endpoint.name(),
                            stats.summary()
                        );
                        Some(stats)
                    }
                    _ => None,
                };
                report.add(*store, *endpoint, *load, ours_stats, base_stats);
            }
        }
        report.memory(
            *store,
            server::memory(ours.pid()),
            baseline.as_ref().and_then(|b| server::memory(b.pid())),
        );
        drop(baseline);
        ours.stop();
    }
    println!("{}", report.markdown());
    Ok(())
}
