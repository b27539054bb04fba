//! The gRPC server as every entry point runs it: `anumate dev`, `anumate
//! serve` and the tests (through `anumate-testing`) call the same two
//! functions, so a test exercises the layers production runs.
//!
//! - [`build`]: the modules, in order, on one [`Context`], plus health (every
//!   service `SERVING`) and reflection (v1 and v1alpha).
//! - [`serve`]: those routes on a listener behind every production layer,
//!   outermost first: a span per call, continuing the caller's
//!   `traceparent` ([`crate::trace`]), and an access log line, both at
//!   DEBUG (a formatted, redacted line per call cost more than a point read;
//!   failures still log at WARN), `ErrorInfo` on
//!   transport-level errors, [metrics](crate::metrics), the
//!   [deadline and the cap on calls in flight](crate::limits) (so shed calls
//!   are counted and cost no token check), then authentication and each RPC's
//!   authorization rule (health, reflection and public RPCs pass without a
//!   token), then, over mTLS, the peer's [service identity](crate::tls)
//!   checked against a service token, then each tenant's
//!   [rate limits](crate::ratelimit). Each connection may open at most
//!   `[grpc] max_concurrent_streams` streams; accepted sockets get
//!   `TCP_NODELAY`. With `[tls]` the listener speaks only TLS (the
//!   certificates reloaded when their files change).
//! - [`layered`] and [`serve_layered`]: the same in two steps, so that the
//!   layered routes can also be called in process (the REST gateway next to
//!   the services) through the very layers, and their state, the listener uses.

use std::future::Future;
use std::time::Duration;

use anumate_auth::{AuthLayer, Authenticator, AuthzTable};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::service::{Routes, RoutesBuilder};

use crate::limits::LimitsLayer;
use crate::metrics::Metrics;
use crate::module::{BuildError, Context, ServiceModule};
use crate::tasks::Tasks;
use crate::tls::{PeerIdentityLayer, Tls};

/// How long background tasks get to stop after the server has drained (or
/// after a module failed to build).
pub const TASKS_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// `[grpc]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    pub listen: String,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// Seconds a unary call may take before it is answered
    /// `DEADLINE_EXCEEDED` (streaming calls are exempt); 0: no deadline.
    pub request_timeout_secs: u64,
    /// Calls in flight at once, across all connections; more are answered
    /// `RESOURCE_EXHAUSTED` at once instead of queueing (health checks are
    /// never refused). 0: no cap.
    pub max_concurrent_requests: usize,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Per-tenant rate limits per RPC family (`[grpc.rate_limits]`); off by default.
    pub rate_limits: crate::ratelimit::RateLimitConfig,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: "127.0.0.1:7600".into(),
            shutdown_grace_secs: 30,
            request_timeout_secs: 30,
            max_concurrent_requests: 1024,
            max_concurrent_streams: 256,
            rate_limits: crate::ratelimit::RateLimitConfig::default(),
        }
    }
}

impl GrpcConfig {
    /// The deadline of unary calls (`None`: `request_timeout_secs` is 0).
    pub fn request_timeout(&self) -> Option<Duration> {
        (self.request_timeout_secs > 0).then(|| Duration::from_secs(self.request_timeout_secs))
    }
}

/// The services of a module list built into one router.
pub struct App {
    /// The routes, without the layers.
    pub routes: RoutesBuilder,
    /// The background tasks, to be shut down after the server.
    pub tasks: Tasks,
    /// What the modules provided (domain values, in-process clients).
    pub provided: http::Extensions,
    /// The health service's reporter.
    pub health: tonic_health::server::HealthReporter,
}

/// Builds every module, in order, on `ctx`, and adds health (each module's
/// service and the server as a whole `SERVING`) and reflection. A module that
/// fails stops the tasks of those built before it.
pub async fn build(
    modules: &[Box<dyn ServiceModule>],
    mut ctx: Context,
) -> Result<App, BuildError> {
    for module in modules {
        if let Err(e) = module.build(&mut ctx) {
            let (_, tasks, _) = ctx.into_parts();
            tasks.shutdown(TASKS_STOP_TIMEOUT).await;
            return Err(e);
        }
    }
    let (mut routes, tasks, provided) = ctx.into_parts();
    let (health, health_service) = tonic_health::server::health_reporter();
    for module in modules {
        health
            .set_service_status(module.name(), tonic_health::ServingStatus::Serving)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    // Reflection as v1 and v1alpha: Python's grpcio-reflection, Postman and
    // older grpcurl only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(anumate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = match reflection()
        .build_v1()
        .and_then(|v1| Ok((v1, reflection().build_v1alpha()?)))
    {
        Ok(reflection) => reflection,
        Err(e) => {
            tasks.shutdown(TASKS_STOP_TIMEOUT).await;
            return Err(BuildError::failed("reflection", e));
        }
    };
    routes.add_service(health_service);
    routes.add_service(reflection.0);
    routes.add_service(reflection.1);
    Ok(App {
        routes,
        tasks,
        provided,
        health,
    })
}

/// What the production layers are made of: the `[grpc]` limits, the
/// authentication layer and the metrics the calls are counted in (clone them
/// first to read them back: the admin listener, a test).
#[derive(Clone)]
pub struct Layers {
    /// `[grpc]`: the deadline, the cap on calls in flight, streams per connection.
    pub grpc: GrpcConfig,
    /// Authentication and per-RPC authorization.
    pub auth: AuthLayer,
    /// Where calls are counted.
    pub metrics: Metrics,
    /// `[tls]` loaded: mTLS on the listener and the peer's service identity
    /// checked against its token; `None`: plain TCP.
    pub tls: Option<Tls>,
}

impl Layers {
    /// `grpc`'s limits, `auth`, and fresh metrics.
    pub fn new(grpc: GrpcConfig, auth: AuthLayer) -> Layers {
        Layers {
            grpc,
            auth,
            metrics: Metrics::new(),
            tls: None,
        }
    }

    /// [`Layers::new`] with the platform's authorization table (from the
    /// `(anumate.common.v1.authz)` options in proto/) over `authenticator`.
    pub fn platform(
        grpc: GrpcConfig,
        authenticator: Authenticator,
    ) -> Result<Layers, anumate_errors::Error> {
        let authz = AuthzTable::platform()?;
        Ok(Layers::new(grpc, AuthLayer::new(authenticator, authz)))
    }

    /// The same layers, served over mTLS as `tls` says.
    pub fn with_tls(mut self, tls: Option<Tls>) -> Layers {
        self.tls = tls;
        self
    }

    /// The same layers, counting calls in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Layers {
        self.metrics = metrics;
        self
    }
}

/// Serves `routes` on `listener` behind every production layer (see the
/// module docs) until `shutdown` completes, then drains in-flight calls.
pub async fn serve<F>(
    listener: TcpListener,
    layers: Layers,
    routes: Routes,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()>,
{
    serve_layered(listener, layered(layers, routes), shutdown).await
}

/// One call of the [`Layered`] service: a gRPC request in, its response out.
pub type LayeredService = tower::util::BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    std::convert::Infallible,
>;

/// The routes behind every production layer, built once: what [`serve`]
/// serves, and what a caller in the same process (the REST gateway next to
/// the services) calls without a socket. Its clones share the layers' state
/// (authentication, the cap on calls in flight, metrics, rate-limit
/// buckets), so such a call is authenticated, authorized, counted and
/// limited as one over the network; only the mTLS peer identity is absent
/// (there is no connection, so no service certificate to check a service
/// token against).
#[derive(Clone)]
pub struct Layered {
    service: LayeredService,
    grpc: GrpcConfig,
    tls: Option<Tls>,
}

impl Layered {
    /// The layered routes as a tower service (a clone sharing their state).
    pub fn service(&self) -> LayeredService {
        self.service.clone()
    }
}

/// `routes` behind every production layer of `layers` (see the module docs).
pub fn layered(layers: Layers, routes: Routes) -> Layered {
    let Layers {
        grpc,
        auth,
        metrics,
        tls,
    } = layers;
    let stack = tower::ServiceBuilder::new()
        // One body type for the server and in-process callers alike.
        .map_response(|r: http::Response<_>| r.map(tonic::body::Body::new))
        .layer(
            tower_http::trace::TraceLayer::new_for_grpc()
                .make_span_with(crate::trace::CallSpan::grpc())
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::DEBUG),
                )
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .map_response(anumate_errors::layer::ensure_error_info::<tonic::body::Body>)
        .layer(metrics.layer())
        .layer(LimitsLayer::new(
            grpc.request_timeout(),
            grpc.max_concurrent_requests,
        ))
        .layer(auth)
        .layer(PeerIdentityLayer::new(tls.clone()))
        .layer(crate::ratelimit::RateLimitLayer::new(&grpc.rate_limits));
    Layered {
        service: tower::util::BoxCloneSyncService::new(stack.service(routes)),
        grpc,
        tls,
    }
}

/// Serves `layered` on `listener` (see [`serve`]); other clones of it may
/// be called in process meanwhile.
pub async fn serve_layered<F>(
    listener: TcpListener,
    layered: Layered,
    shutdown: F,
) -> Result<(), tonic::transport::Error>
where
    F: Future<Output = ()>,
{
    let Layered { service, grpc, tls } = layered;
    // The routes are layered already (once, so that in-process callers share
    // the layers' state): the server's "layer" hands it that service, and
    // the empty routes it is given are never called.
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(grpc.max_concurrent_streams.max(1))
        .layer(tower::layer::layer_fn(move |_: Routes| service.clone()))
        .add_routes(Routes::default());
    match tls {
        Some(tls) => {
            let stop = tokio_util::sync::CancellationToken::new();
            let _reloader = tls.spawn_reloader(stop.clone());
            let _stop = stop.drop_guard();
            server
                .serve_with_incoming_shutdown(crate::tls::incoming(listener, tls), shutdown)
                .await
        }
        None => {
            server
                .serve_with_incoming_shutdown(nodelay(listener), shutdown)
                .await
        }
    }
}

/// Accepted connections with `TCP_NODELAY`, as `Server::serve` would set it:
/// without it small responses wait for the peer's delayed ACK (~40 ms a call).
fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Ok(stream)
    })
}
