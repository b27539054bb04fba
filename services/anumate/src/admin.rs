//! The admin HTTP listener (`[admin] listen`): health, readiness, Prometheus
//! metrics and the public keys, for load balancers, scrapers and offline
//! verifiers. It serves no tenant data and needs no credential, so bind it to
//! a private interface.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200 when the store answers and the server is not shutting
//!   down; 503 otherwise (`database unavailable` or `shutting down`; the
//!   database's own error goes to the log, not to the caller).
//! - `GET /metrics`: Prometheus / OpenMetrics text, e.g.
//!   `anumate_grpc_requests_total{service,method,code}`. Only the methods of
//!   the contracts get their own labels; any other path counts as
//!   `service="unknown",method="unknown"`, so callers cannot grow the series.
//! - `GET /.well-known/jwks.json`: the JWKS that verifies capability tokens
//!   (as `GetJwks`), when the captokens service runs in this process.
//! - `GET /.well-known/receipts-jwks.json`: the JWKS that verifies receipts
//!   and checkpoints (as `GetSigningKeys`), when the receipts service runs here.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// `[admin]`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener. Unset: the gRPC host with the gRPC
    /// port + 1 (`127.0.0.1:7601` next to the default `127.0.0.1:7600`), or
    /// port 0 (a free port, printed at start) when the gRPC port is 0. `"off"`
    /// disables the listener.
    pub listen: Option<String>,
}

impl AdminConfig {
    /// The address to bind, or `None` when disabled.
    pub fn address(&self, grpc_listen: &str) -> Option<String> {
        match self.listen.as_deref().map(str::trim) {
            Some("off") | Some("") => None,
            Some(addr) => Some(addr.to_owned()),
            None => {
                let (host, port) = grpc_listen.rsplit_once(':')?;
                let port: u16 = port.parse().ok()?;
                let admin = if port == 0 { 0 } else { port.checked_add(1)? };
                Some(format!("{host}:{admin}"))
            }
        }
    }
}

/// Binds the admin listener, if enabled.
pub async fn bind(cfg: &AdminConfig, grpc_listen: &str) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = cfg.address(grpc_listen) else {
        return Ok(None);
    };
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ([admin] listen)"))?;
    Ok(Some(listener))
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

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
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
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
// ---------------------------------------------------------------------------

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Metrics to expose (and that the gRPC layer fills).
    pub metrics: Metrics,
    /// The store, pinged by `/readyz`.
    pub store: Option<anumate_store::Store>,
    /// The captokens service, for its JWKS.
    pub captokens: Option<anumate_captokens_service::CapTokens>,
    /// The receipts service, for its JWKS.
    pub receipts: Option<anumate_receipts::Receipts>,
    /// Becomes true when the server starts shutting down (`/readyz` then
    /// answers 503 while in-flight gRPC requests drain).
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// The admin routes.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(tokens_jwks))
        .route("/.well-known/receipts-jwks.json", get(receipts_jwks))
        .with_state(state)
}

/// Serves the admin routes on `listener` (HTTP/1.1 and HTTP/2, with the hyper
/// server tonic already uses) until the task is aborted: it keeps answering
/// while the gRPC server drains, with `/readyz` at 503.
pub async fn serve(listener: TcpListener, state: AdminState) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let service = TowerToHyperService::new(router(state));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = service.clone();
        connections.spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
        // Reap finished connections.
        while connections.try_join_next().is_some() {}
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if *state.stopping.borrow() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if let Some(store) = &state.store {
        // The database's error names hosts, users and databases: it goes to
        // the log; the unauthenticated caller learns only that it is down.
        let ping = tokio::time::timeout(Duration::from_secs(2), store.owner_connection().ping());
        match ping.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "readyz: database unavailable");
                return text(StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n");
            }
            Err(_) => {
                tracing::warn!("readyz: database did not answer within 2 s");
                return text(StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n");
            }
        }
    }
    text(StatusCode::OK, "ready\n")
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            )],
            body,
        )
            .into_response(),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n"),
    }
}

fn jwks_response(json: String, max_age: Duration) -> Response {
    let cache = HeaderValue::from_str(&format!("public, max-age={}", max_age.as_secs()))
        .unwrap_or_else(|_| HeaderValue::from_static("no-cache"));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jwk-set+json"),
            ),
            (header::CACHE_CONTROL, cache),
        ],
        json,
    )
        .into_response()
}

async fn tokens_jwks(State(state): State<AdminState>) -> Response {
    let Some(tokens) = &state.captokens else {
        return text(
            StatusCode::NOT_FOUND,
            "the captokens service does not run in this process\n",
        );
    };
    match tokens.jwks() {
        Ok((json, max_age)) => jwks_response(json, max_age),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn receipts_jwks(State(state): State<AdminState>) -> Response {
    let Some(receipts) = &state.receipts else {
        return text(
            StatusCode::NOT_FOUND,
            "the receipts service does not run in this process\n",
        );
    };
    match serde_json::to_string(&receipts.jwks()) {
        Ok(json) => jwks_response(json, Duration::from_secs(300)),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn admin_address_follows_the_grpc_port() {
        let cfg = AdminConfig::default();
        assert_eq!(
            cfg.address("127.0.0.1:7600").as_deref(),
            Some("127.0.0.1:7601")
        );
        assert_eq!(cfg.address("127.0.0.1:0").as_deref(), Some("127.0.0.1:0"));
        assert_eq!(cfg.address("[::1]:9000").as_deref(), Some("[::1]:9001"));
        let set = AdminConfig {
            listen: Some("0.0.0.0:9100".into()),
        };
        assert_eq!(set.address("127.0.0.1:0").as_deref(), Some("0.0.0.0:9100"));
        let off = AdminConfig {
            listen: Some("off".into()),
        };
        assert_eq!(off.address("127.0.0.1:7600"), None);
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
