//! Prometheus metrics of the gRPC server: a tower layer (stacked by
//! [`crate::server::serve`]) counting every call by service, method and final
//! status, and timing it. The binary's admin listener exposes them at
//! `GET /metrics`, e.g. `anumate_grpc_requests_total{service,method,code}`.
//! Only the methods of the contracts get their own labels; any other path
//! counts as `service="unknown",method="unknown"`, so callers cannot grow the
//! series.
//!
//! A service module adds its own metrics with [`register`] (once per
//! process: metrics describe the process, whichever modules it runs); they
//! are exposed with the server's, under the same `anumate_` prefix.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// The metrics crate, for modules that [`register`] their own.
pub use prometheus_client;

/// The metrics service modules registered, and their names.
struct ModuleMetrics {
    registry: Registry,
    names: HashSet<String>,
}

fn module_metrics() -> &'static Mutex<ModuleMetrics> {
    static MODULES: OnceLock<Mutex<ModuleMetrics>> = OnceLock::new();
    MODULES.get_or_init(|| {
        Mutex::new(ModuleMetrics {
            registry: Registry::with_prefix("anumate"),
            names: HashSet::new(),
        })
    })
}

/// Registers a service module's metric (`anumate_<name>`, with its help
/// text), exposed at `/metrics` next to the server's. A name registers once
/// per process: registering it again is a no-op answering false (keep the
/// metric in a process-wide `OnceLock` and register it there).
pub fn register(name: &str, help: &str, metric: impl Metric) -> bool {
    let mut modules = module_metrics()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !modules.names.insert(name.to_owned()) {
        return false;
    }
    modules.registry.register(name, help, metric);
    true
}

/// A label whose values tenants choose (tool names, hosts): its first
/// `max` distinct values in the process keep their own series, any later one
/// counts as `other`, so the series stay bounded however many tenants
/// declare however many tools.
#[derive(Debug)]
pub struct BoundedLabel {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl BoundedLabel {
    /// The value for [`BoundedLabel::get`] past the first `max`.
    pub const OTHER: &'static str = "other";

    /// At most `max` distinct values.
    pub fn new(max: usize) -> BoundedLabel {
        BoundedLabel {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// The label of `value`: itself while fewer than `max` values are
    /// labelled (or it is one of them), else `other`.
    pub fn get(&self, value: &str) -> String {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() < self.max {
            seen.insert(value.to_owned());
            return value.to_owned();
        }
        Self::OTHER.to_owned()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

/// The label of every path that is not a method of the contracts.
const UNKNOWN: &str = "unknown";

/// The process's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<CallLabels, Counter>,
    durations: Family<MethodLabels, Histogram>,
    /// `/pkg.Service/Method` of every RPC in the served contracts.
    known: Arc<HashSet<String>>,
}

/// The paths of every RPC in the contracts: a fixed set, whatever callers send.
fn known_paths() -> HashSet<String> {
    crate::limits::contract_methods()
        .into_iter()
        .map(|(path, _)| path)
        .collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("anumate");
        let requests = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC requests handled, by service, method and status code",
            requests.clone(),
        );
        let durations = Family::<MethodLabels, Histogram>::new_with_constructor(|| -> Histogram {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register(
            "grpc_request_duration_seconds",
            "Time from a gRPC request's arrival to its status, by service and method",
            durations.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            requests,
            durations,
            known: Arc::new(known_paths()),
        }
    }

    /// The labels of a request path `/pkg.Service/Method`: its own for a
    /// method of the contracts, `unknown` for anything else.
    fn labels(&self, path: &str) -> MethodLabels {
        let split = path.strip_prefix('/').and_then(|p| p.split_once('/'));
        match split {
            Some((service, method)) if self.known.contains(path) => MethodLabels {
                service: service.to_owned(),
                method: method.to_owned(),
            },
            _ => MethodLabels {
                service: UNKNOWN.into(),
                method: UNKNOWN.into(),
            },
        }
    }

    fn record(&self, labels: &MethodLabels, code: tonic::Code, started: Instant) {
        let code = match code {
            tonic::Code::Ok => "OK".to_owned(),
            other => format!("{other:?}"),
        };
        self.requests
            .get_or_create(&CallLabels {
                service: labels.service.clone(),
                method: labels.method.clone(),
                code,
            })
            .inc();
        self.durations
            .get_or_create(labels)
            .observe(started.elapsed().as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::text;
        let mut out = String::new();
        text::encode_registry(&mut out, &self.registry)?;
        {
            let modules = module_metrics()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            text::encode_registry(&mut out, &modules.registry)?;
        }
        text::encode_eof(&mut out)?;
        Ok(out)
    }

    /// A tower layer counting every gRPC request it sees.
    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer {
            metrics: self.clone(),
        }
    }
}

/// Counts requests by service, method and final `grpc-status`.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

fn header_code(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

impl<S, B> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let labels = self.metrics.labels(req.uri().path());
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A trailers-only response (every error) carries the status in
            // its headers; a normal one in the trailers at the body's end.
            if let Some(code) = header_code(resp.headers()) {
                metrics.record(&labels, code, started);
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            let body = StatusBody {
                inner: body,
                pending: Some((metrics, labels, started)),
            };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

/// A response body that records the status from its trailers; a body dropped
/// before them (the client went away) counts as `Cancelled`.
struct StatusBody {
    inner: tonic::body::Body,
    pending: Option<(Metrics, MethodLabels, Instant)>,
}

impl StatusBody {
    fn finish(&mut self, code: tonic::Code) {
        if let Some((metrics, labels, started)) = self.pending.take() {
            metrics.record(&labels, code, started);
        }
    }
}

impl http_body::Body for StatusBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(header_code) {
                    self.finish(code);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                let code = status.code();
                self.finish(code);
            }
            Poll::Ready(None) => self.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StatusBody {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

// ---------------------------------------------------------------------------
// The HTTP server

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn bounded_labels_past_the_cap_are_other() {
        let tools = BoundedLabel::new(2);
        assert_eq!(tools.get("a"), "a");
        assert_eq!(tools.get("b"), "b");
        assert_eq!(tools.get("c"), BoundedLabel::OTHER);
        // Labelled ones keep their label.
        assert_eq!(tools.get("a"), "a");
    }

    #[test]
    fn only_contract_methods_get_labels() {
        let m = Metrics::new();
        let push = m.labels("/anumate.registry.v1.RegistryService/PushCapsule");
        assert_eq!(push.service, "anumate.registry.v1.RegistryService");
        assert_eq!(push.method, "PushCapsule");
        assert_eq!(m.labels("/grpc.health.v1.Health/Check").method, "Check");
        for path in [
            "/svc/M1",
            "/anumate.registry.v1.RegistryService/NoSuchMethod",
            "garbage",
        ] {
            let labels = m.labels(path);
            assert_eq!(
                (labels.service.as_str(), labels.method.as_str()),
                (UNKNOWN, UNKNOWN)
            );
        }
    }
}
