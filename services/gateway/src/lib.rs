//! The REST gateway (SPEC §11): HTTP/JSON in front of the gRPC services,
//! built at start-up from the `google.api.http` annotations in the
//! descriptor set (`anumate_proto::FILE_DESCRIPTOR_SET`). A request is
//! matched to its RPC, transcoded from proto3 JSON (path variables, query
//! parameters and body) to protobuf with `prost-reflect`, and forwarded as
//! raw bytes over gRPC; the answer comes back as JSON, NDJSON or
//! Server-Sent Events. In a mesh the gRPC call goes over the network
//! ([`Gateway::connect_lazy`]); next to the services in one process
//! (`anumate dev`, `anumate serve all`) it is handed to the services' layered
//! routes directly ([`Gateway::in_process`]): the same layers
//! (authentication, authorization, limits, metrics, rate limits), no socket,
//! no HTTP/2 framing. No RPC has a hand-written handler: a new annotated RPC
//! is routed on the next build.
#![forbid(unsafe_code)]

pub mod docs;
pub mod openapi;
pub mod routes;
pub mod status;
pub mod template;
pub mod transcode;

mod codec;
mod stream;

use std::{sync::Arc, time::Duration};

use anumate_errors::{Error, Reason};
use anumate_telemetry::propagation::CallSpan;
use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use prost_reflect::DescriptorPool;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tower_http::{
    compression::{
        CompressionLayer, Predicate,
        predicate::{DefaultPredicate, NotForContentType},
    },
    cors::{AllowOrigin, CorsLayer},
    limit::RequestBodyLimitLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    timeout::TimeoutLayer,
    trace::TraceLayer,
};

use crate::routes::{Lookup, Route, RouteTable};
use crate::status::{error_response, reason_response, status_response};

/// `[gateway]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address of the HTTP listener. Unset: the gRPC host with the gRPC
    /// port plus 2 (`127.0.0.1:7602` next to the default `127.0.0.1:7600`),
    /// or port 0 (a free port, printed at start) when the gRPC port is 0.
    /// `"off"` disables the gateway in `anumate dev`.
    pub listen: Option<String>,
    /// The gRPC services' address (`http://host:port`). Empty: this
    /// process's own services (`anumate dev`, or `serve gateway …` together
    /// with services), called in process behind the same layers as the gRPC
    /// listener.
    pub upstream: String,
    /// Origins allowed by CORS (`https://app.example`); empty: none.
    pub cors_origins: Vec<String>,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Deadline of a unary call, and of a streaming call's first message, in seconds.
    pub timeout_secs: u64,
    /// Interval of SSE heartbeat comments, in seconds.
    pub sse_heartbeat_secs: u64,
    /// How long a stream's response headers wait for its first message (an
    /// early error then gets its own HTTP status), in milliseconds.
    pub stream_first_message_wait_ms: u64,
    /// HTTP/2 connections to a network upstream, used in turn. One is the
    /// default: on two busy cores four did worse at 16 concurrent calls
    /// (fewer calls share each write), though more may spread a bigger
    /// machine's upstream over its cores.
    pub upstream_connections: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: None,
            upstream: String::new(),
            cors_origins: Vec::new(),
            max_body_bytes: 4 * 1024 * 1024,
            timeout_secs: 30,
            sse_heartbeat_secs: 15,
            stream_first_message_wait_ms: 2000,
            upstream_connections: 1,
        }
    }
}

impl GatewayConfig {
    /// The address to bind, or `None` when disabled.
    pub fn address(&self, grpc_listen: &str) -> Option<String> {
        match self.listen.as_deref().map(str::trim) {
            Some("off") | Some("") => None,
            Some(addr) => Some(addr.to_owned()),
            None => {
                let (host, port) = grpc_listen.rsplit_once(':')?;
                let port: u16 = port.parse().ok()?;
                let gw = if port == 0 { 0 } else { port.checked_add(2)? };
                Some(format!("{host}:{gw}"))
            }
        }
    }
}

/// A gateway that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The routes do not build.
    #[error(transparent)]
    Routes(#[from] routes::RouteError),
    /// The upstream address is not a URL.
    #[error("[gateway] upstream `{0}`: {1}")]
    Upstream(String, String),
    /// The listener failed.
    #[error("gateway listener: {0}")]
    Io(#[from] std::io::Error),
}

/// What the gateway calls: a gRPC channel, or the services' layered routes
/// in this process.
type Upstream = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    UpstreamError,
>;

/// An upstream's failure, as it said it (tonic reads the gRPC status out of
/// its source chain). A type of its own: a bare boxed error trips the
/// compiler's lifetime check on tonic's client futures.
#[derive(Debug)]
struct UpstreamError(tower::BoxError);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}

fn upstream<S>(service: S) -> Upstream
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError>,
{
    use tower::ServiceExt as _;
    Upstream::new(service.map_err(|e: S::Error| UpstreamError(e.into())))
}

struct Inner {
    table: RouteTable,
    channels: Vec<Upstream>,
    next: std::sync::atomic::AtomicUsize,
    openapi: Bytes,
    config: GatewayConfig,
}

/// The gateway: its routes and its channel to the services.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// Headers forwarded as gRPC metadata (same names, lowercase).
const FORWARDED: [&str; 5] = [
    "authorization",
    "traceparent",
    "tracestate",
    "idempotency-key",
    "x-request-id",
];

impl Gateway {
    /// A gateway over `channel` with the routes of the embedded descriptor set.
    pub fn new(config: GatewayConfig, channel: Channel) -> Result<Gateway, GatewayError> {
        Gateway::with_channels(config, vec![channel])
    }

    /// A gateway using `channels` in turn (at least one).
    pub fn with_channels(
        config: GatewayConfig,
        channels: Vec<Channel>,
    ) -> Result<Gateway, GatewayError> {
        Gateway::with_upstreams(config, channels.into_iter().map(upstream).collect())
    }

    /// A gateway calling `service`, the services' routes behind their
    /// production layers in this process (`anumate_service::server::Layered`),
    /// instead of a channel: a REST call then costs no loopback connection,
    /// HTTP/2 framing or second HTTP parse, and is still authenticated,
    /// authorized, limited and counted by the same layers.
    pub fn in_process<S>(config: GatewayConfig, service: S) -> Result<Gateway, GatewayError>
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<tower::BoxError>,
    {
        Gateway::with_upstreams(config, vec![upstream(service)])
    }

    fn with_upstreams(
        config: GatewayConfig,
        mut channels: Vec<Upstream>,
    ) -> Result<Gateway, GatewayError> {
        if channels.is_empty() {
            return Err(GatewayError::Upstream(
                config.upstream.clone(),
                "no channel".into(),
            ));
        }
        let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET)
            .map_err(routes::RouteError::from)?;
        let table = RouteTable::from_pool(&pool)?;
        let openapi =
            Bytes::from(serde_json::to_vec(&openapi::document(&pool, &table)).unwrap_or_default());
        Ok(Gateway {
            inner: Arc::new(Inner {
                table,
                channels: std::mem::take(&mut channels),
                next: std::sync::atomic::AtomicUsize::new(0),
                openapi,
                config,
            }),
        })
    }

    /// A gateway whose `[gateway] upstream_connections` channels connect to
    /// `upstream` on first use.
    pub fn connect_lazy(config: GatewayConfig, upstream: &str) -> Result<Gateway, GatewayError> {
        let endpoint = Endpoint::from_shared(upstream.to_owned())
            .map_err(|e| GatewayError::Upstream(upstream.to_owned(), e.to_string()))?
            .tcp_nodelay(true);
        let channels = (0..config.upstream_connections.max(1))
            .map(|_| endpoint.connect_lazy())
            .collect();
        Gateway::with_channels(config, channels)
    }

    /// The routing table.
    pub fn routes(&self) -> &RouteTable {
        &self.inner.table
    }

    /// The HTTP application with every layer.
    pub fn router(&self) -> Router {
        let config = &self.inner.config;
        let origins: Vec<HeaderValue> = config
            .cors_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        let cors = CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("traceparent"),
                HeaderName::from_static("tracestate"),
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([HeaderName::from_static("x-request-id")]);
        // NDJSON streams are written as they come; gzip would hold lines back.
        let compress =
            DefaultPredicate::new().and(NotForContentType::const_new("application/x-ndjson"));
        let x_request_id = HeaderName::from_static("x-request-id");
        Router::new()
            .route("/openapi.json", get(openapi_json))
            .route("/docs", get(docs::page))
            .route(docs::SCRIPT_PATH, get(docs::script))
            .fallback(handle)
            .with_state(self.inner.clone())
            .layer(RequestBodyLimitLayer::new(config.max_body_bytes))
            .layer(TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_secs(config.timeout_secs.max(1)),
            ))
            // Outside the limit and timeout layers, to rewrite their refusals.
            .layer(axum::middleware::map_response(layer_errors_as_status))
            .layer(CompressionLayer::new().compress_when(compress))
            .layer(cors)
            .layer(TraceLayer::new_for_http().make_span_with(CallSpan::http()))
            .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
            .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
    }
}

/// Serves `gateway` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    gateway: Gateway,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, gateway.router())
        .with_graceful_shutdown(shutdown)
        .await
}

async fn openapi_json(State(gw): State<Arc<Inner>>) -> Response {
    let mut resp = gw.openapi.clone().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `resp` with `Connection: close`: the rest of a refused body was never
/// read, so an HTTP/1.1 client must not send its next request on this
/// connection (it would find it closed mid-request).
fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// tower-http's own refusals (body too large, timeout) as `Status` JSON like every other error.
async fn layer_errors_as_status(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    match resp.status() {
        StatusCode::PAYLOAD_TOO_LARGE => closing(reason_response(
            Reason::PayloadTooLarge,
            "the request body is larger than the gateway accepts",
        )),
        StatusCode::REQUEST_TIMEOUT => reason_response(
            Reason::DeadlineExceeded,
            "the call did not answer within the gateway's timeout",
        ),
        _ => resp,
    }
}

async fn handle(State(gw): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let (route, vars) = match gw.table.lookup(&parts.method, parts.uri.path()) {
        Lookup::Found(route, vars) => (route, vars),
        Lookup::MethodNotAllowed(allowed) => {
            let list: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            let mut resp = error_response(&Error::because(
                Reason::RouteNotFound,
                format!(
                    "{} is not routed for {}; it accepts {}",
                    parts.uri.path(),
                    parts.method,
                    list.join(", ")
                ),
            ));
            *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                resp.headers_mut().insert(header::ALLOW, v);
            }
            return resp;
        }
        Lookup::NotFound => {
            return reason_response(
                Reason::RouteNotFound,
                format!("no route for {} {}", parts.method, parts.uri.path()),
            );
        }
    };
    let body = match axum::body::to_bytes(body, gw.config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            return closing(
                reason_response(
                    Reason::PayloadTooLarge,
                    format!("the request body could not be read within the limit: {e}"),
                )
                .with_limit(gw.config.max_body_bytes),
            );
        }
    };
    if !body.is_empty()
        && let Some(ct) = parts.headers.get(header::CONTENT_TYPE)
        && !ct.as_bytes().starts_with(b"application/json")
    {
        return error_response(&Error::because(
            Reason::InvalidArgument,
            format!(
                "Content-Type {} is not accepted; send application/json",
                String::from_utf8_lossy(ct.as_bytes())
            ),
        ));
    }
    let sse = route.server_streaming() && accepts_sse(&parts.headers);
    let resume = if route.server_streaming() {
        last_event_id(&parts.headers)
            .and_then(|id| stream::resume_field(&route.rpc.input()).map(|f| (f, id)))
    } else {
        None
    };
    let msg = match transcode::request(
        route,
        &vars,
        parts.uri.query(),
        &body,
        resume.as_ref().map(|(f, id)| (*f, id.as_str())),
    ) {
        Ok(m) => m,
        Err(e) => return error_response(&e),
    };
    let mut request = tonic::Request::new(transcode::encode(&msg));
    forward_headers(&parts.headers, request.metadata_mut());
    if !route.server_streaming() {
        request.set_timeout(Duration::from_secs(gw.config.timeout_secs.max(1)));
    }
    if route.server_streaming() {
        // Headers go out before the timeout layer would answer 408.
        let first_wait = Duration::from_millis(gw.config.stream_first_message_wait_ms)
            .min(Duration::from_secs(gw.config.timeout_secs.max(1)) / 2);
        stream::call(
            gw.channel(),
            route,
            request,
            sse,
            gw.config.sse_heartbeat_secs,
            first_wait,
        )
        .await
    } else {
        unary(gw.channel(), route, request).await
    }
}

impl Inner {
    /// The next upstream, in turn.
    fn channel(&self) -> &Upstream {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.channels[n % self.channels.len()]
    }
}

trait WithLimit {
    fn with_limit(self, limit: usize) -> Self;
}

impl WithLimit for Response {
    fn with_limit(mut self, limit: usize) -> Self {
        if let Ok(v) = HeaderValue::from_str(&limit.to_string()) {
            self.headers_mut()
                .insert(HeaderName::from_static("x-anumate-body-limit"), v);
        }
        self
    }
}

fn accepts_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("text/event-stream")))
}

fn last_event_id(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("last-event-id")?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

fn forward_headers(headers: &HeaderMap, metadata: &mut tonic::metadata::MetadataMap) {
    for name in FORWARDED {
        if let Some(v) = headers.get(name)
            && let Ok(mut v) = tonic::metadata::MetadataValue::try_from(v.as_bytes())
        {
            // Values new on every request (request ids, trace context, keys)
            // go never-indexed: they would only churn the HPACK table.
            v.set_sensitive(name != "authorization");
            metadata.insert(name, v);
        }
    }
    // The upstream call is a child of this request's span (itself a child
    // of the client's `traceparent`), when traces are exported.
    anumate_telemetry::propagation::inject(metadata);
}

async fn grpc_client(channel: &Upstream) -> Result<tonic::client::Grpc<Upstream>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("services unavailable: {e}")))?;
    Ok(grpc)
}

fn grpc_path(route: &Route) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::from_maybe_shared(route.grpc_path.clone())
        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
}

async fn unary(channel: &Upstream, route: &Route, request: tonic::Request<Bytes>) -> Response {
    let mut grpc = match grpc_client(channel).await {
        Ok(g) => g,
        Err(s) => return status_response(&s),
    };
    let resp = match grpc
        .unary(request, grpc_path(route), codec::BytesCodec)
        .await
    {
        Ok(r) => r,
        Err(s) => return status_response(&s),
    };
    let bytes = resp.into_inner();
    let output = route.rpc.output();
    if output.full_name() == "google.api.HttpBody" {
        return match prost_reflect::DynamicMessage::decode(output, bytes.as_ref()) {
            Ok(m) => http_body_response(&m),
            Err(e) => error_response(&Error::internal(e)),
        };
    }
    match transcode::response_json_bytes(&output, &bytes, &route.response_body) {
        Ok(json) => json_bytes_response(json),
        Err(e) => error_response(&e),
    }
}

/// A 200 answer of JSON bytes.
fn json_bytes_response(json: Vec<u8>) -> Response {
    let mut resp = Body::from(json).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A `google.api.HttpBody` answer: its bytes under its content type.
fn http_body_response(msg: &prost_reflect::DynamicMessage) -> Response {
    let content_type = msg
        .get_field_by_name("content_type")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "application/octet-stream".into());
    let data = msg
        .get_field_by_name("data")
        .and_then(|v| v.as_bytes().cloned())
        .unwrap_or_default();
    let mut resp = Body::from(data).into_response();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}
