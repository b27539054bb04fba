//! The load generator: N HTTP/2 connections, M calls in flight on each, each
//! call's latency in an HDR histogram; calls started during the warm-up are
//! not counted.

use std::time::{Duration, Instant};

use anumate_proto::captokens::v1 as captokens;
use anumate_proto::compiler::v1 as compiler;
use anumate_proto::receipts::v1 as receipts;
use anumate_proto::registry::v1 as registry;
use anyhow::Context as _;
use hdrhistogram::Histogram;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::Load;

/// How long each measurement runs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Load before measuring, not counted.
    pub warmup: Duration,
    /// Load measured.
    pub duration: Duration,
}

/// A server and the bearer token to call it with.
pub struct Target {
    /// `http://host:port`.
    pub url: String,
    /// The bearer token (without `Bearer `).
    pub token: String,
}

/// One RPC with its request, repeated by every caller.
#[derive(Clone)]
pub enum Call {
    GetCapsule(registry::GetCapsuleRequest),
    ListCapsules(registry::ListCapsulesRequest),
    GetPlan(compiler::GetPlanRequest),
    VerifyToken(captokens::VerifyTokenRequest),
    GetReceipt(receipts::GetReceiptRequest),
}

/// The generated clients over one connection.
struct Clients {
    registry: registry::registry_service_client::RegistryServiceClient<Channel>,
    compiler: compiler::compiler_service_client::CompilerServiceClient<Channel>,
    captokens:
        captokens::capability_tokens_internal_client::CapabilityTokensInternalClient<Channel>,
    receipts: receipts::receipts_service_client::ReceiptsServiceClient<Channel>,
}

impl Clients {
    fn new(channel: Channel) -> Clients {
        Clients {
            registry: registry::registry_service_client::RegistryServiceClient::new(
                channel.clone(),
            ),
            compiler: compiler::compiler_service_client::CompilerServiceClient::new(
                channel.clone(),
            ),
            captokens:
                captokens::capability_tokens_internal_client::CapabilityTokensInternalClient::new(
                    channel.clone(),
                ),
            receipts: receipts::receipts_service_client::ReceiptsServiceClient::new(channel),
        }
    }
}

/// `req` with the bearer token.
fn authorized<T>(req: T, auth: &MetadataValue<Ascii>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(req);
    req.metadata_mut().insert("authorization", auth.clone());
    req
}

impl Call {
    /// Makes the call once; an error, or a token verdict other than VALID,
    /// is a failure.
    async fn invoke(&self, c: &mut Clients, auth: &MetadataValue<Ascii>) -> Result<(), String> {
        let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
        match self {
            Call::GetCapsule(r) => {
                c.registry
                    .get_capsule(authorized(r.clone(), auth))
                    .await
                    .map_err(status)?;
            }
            Call::ListCapsules(r) => {
                c.registry
                    .list_capsules(authorized(r.clone(), auth))
                    .await
                    .map_err(status)?;
            }
            Call::GetPlan(r) => {
                c.compiler
                    .get_plan(authorized(r.clone(), auth))
                    .await
                    .map_err(status)?;
            }
            Call::VerifyToken(r) => {
                let v = c
                    .captokens
                    .verify_token(authorized(r.clone(), auth))
                    .await
                    .map_err(status)?
                    .into_inner();
                if v.verdict != captokens::TokenVerdict::Valid as i32 {
                    return Err(format!("verdict {}: {}", v.verdict, v.message));
                }
            }
            Call::GetReceipt(r) => {
                c.receipts
                    .get_receipt(authorized(r.clone(), auth))
                    .await
                    .map_err(status)?;
            }
        }
        Ok(())
    }
}

/// What one measurement saw.
pub struct Stats {
    /// Latencies of the successful calls, in nanoseconds.
    pub latency: Histogram<u64>,
    /// Failed calls.
    pub errors: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// The measured window.
    pub window: Duration,
}

impl Stats {
    /// Successful calls per second.
    pub fn rps(&self) -> f64 {
        self.latency.len() as f64 / self.window.as_secs_f64()
    }

    /// The latency at `q` (0..1), in microseconds.
    pub fn micros(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    /// One line for the progress log.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
            self.rps(),
            self.micros(0.50),
            self.micros(0.99),
            self.micros(0.999)
        );
        if self.errors > 0 {
            s.push_str(&format!(
                ", {} errors (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            ));
        }
        s
    }
}

/// A fresh histogram: 1 ns to 60 s at 3 significant digits.
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")
}

/// Drives `call` against `target` with `load` for `timing`.
pub async fn measure(
    target: &Target,
    call: &Call,
    load: Load,
    timing: Timing,
) -> anyhow::Result<Stats> {
    let auth: MetadataValue<Ascii> = format!("Bearer {}", target.token)
        .parse()
        .context("token as metadata")?;
    let mut channels = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        // One `Channel` per `connect` is one HTTP/2 connection.
        let channel = Endpoint::from_shared(target.url.clone())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {}", target.url))?;
        channels.push(channel);
    }
    let start = Instant::now();
    let counted_from = start + timing.warmup;
    let end = counted_from + timing.duration;
    let mut callers = Vec::with_capacity(load.connections * load.streams);
    for channel in &channels {
        for _ in 0..load.streams {
            let mut clients = Clients::new(channel.clone());
            let call = call.clone();
            let auth = auth.clone();
            let mut latency = histogram()?;
            callers.push(tokio::spawn(async move {
                let mut errors = 0u64;
                let mut first_error = None;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let result = call.invoke(&mut clients, &auth).await;
                    if t0 < counted_from {
                        continue;
                    }
                    match result {
                        Ok(()) => {
                            let nanos = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
                            latency.saturating_record(nanos);
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
                (latency, errors, first_error)
            }));
        }
    }
    let mut stats = Stats {
        latency: histogram()?,
        errors: 0,
        first_error: None,
        window: timing.duration,
    };
    for caller in callers {
        let (latency, errors, first_error) = caller.await.context("a caller panicked")?;
        stats.latency.add(&latency).context("merging histograms")?;
        stats.errors += errors;
        if stats.first_error.is_none() {
            stats.first_error = first_error;
        }
    }
    // Calls in flight at `end` finish after it: count over the real window.
    stats.window = Instant::now()
        .saturating_duration_since(counted_from)
        .max(Duration::from_millis(1));
    Ok(stats)
}
