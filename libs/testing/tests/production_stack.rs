//! A spawned app runs the binary's server: the module list built with health
//! and reflection, behind every production layer. These are the layers the
//! old test stack (ErrorInfo and authentication only) lacked: the `[grpc]`
//! cap on calls in flight, shedding before authentication, the unary
//! deadline, and the metrics counting each call with its status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anumate_auth::{BearerToken, Role};
use anumate_errors::ErrorCode;
use anumate_proto::ghostrun::v1::GetPreflightRequest;
use anumate_proto::ghostrun::v1::ghost_run_service_client::GhostRunServiceClient;
use anumate_service::{BuildError, Context, KeysConfig, ServiceModule};
use anumate_store::Migration;
use anumate_testing::{DevAuth, GrpcConfig, Layers, Metrics, ModuleServer, expect_status};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A contract whose methods the authorization table and the metrics know.
const SERVICE: &str = "anumate.ghostrun.v1.GhostRunService";

/// A GhostRun stand-in whose every call reports that it arrived, then waits
/// until released and answers `UNIMPLEMENTED`: a call held in flight.
#[derive(Clone)]
struct Held {
    arrived: mpsc::UnboundedSender<()>,
    released: watch::Receiver<bool>,
}

impl tonic::server::NamedService for Held {
    const NAME: &'static str = SERVICE;
}

impl tower::Service<http::Request<tonic::body::Body>> for Held {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let _ = self.arrived.send(());
        let mut released = self.released.clone();
        Box::pin(async move {
            let _ = released.wait_for(|r| *r).await;
            Ok(tonic::Status::unimplemented("held, then released").into_http())
        })
    }
}

/// [`Held`] as a service module, so the app is built from a module list.
struct HeldModule(Held);

impl ServiceModule for HeldModule {
    fn name(&self) -> &'static str {
        SERVICE
    }
    fn section(&self) -> &'static str {
        "held"
    }
    fn about(&self) -> &'static str {
        "holds every call until released"
    }
    fn needs_store(&self) -> bool {
        false
    }
    fn migrations(&self) -> Vec<Migration> {
        Vec::new()
    }
    fn build(&self, ctx: &mut Context) -> Result<(), BuildError> {
        ctx.routes.add_service(self.0.clone());
        Ok(())
    }
}

struct App {
    server: ModuleServer,
    auth: DevAuth,
    metrics: Metrics,
    arrived: mpsc::UnboundedReceiver<()>,
    release: watch::Sender<bool>,
    _keys: tempfile::TempDir,
}

/// The held module served as the binary serves its modules, with `grpc`.
async fn spawn_app(grpc: GrpcConfig) -> App {
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let (release, released) = watch::channel(false);
    let modules: Vec<Box<dyn ServiceModule>> = vec![Box::new(HeldModule(Held {
        arrived: arrived_tx,
        released,
    }))];
    let auth = DevAuth::new();
    let keys = tempfile::tempdir().unwrap();
    let listener = anumate_testing::bind().await;
    let own_url = format!("http://{}", listener.local_addr().unwrap());
    let ctx = Context::new(
        serde_json::json!({}),
        None,
        KeysConfig::default(),
        keys.path().to_owned(),
        None,
        own_url,
    );
    let metrics = Metrics::new();
    let layers = Layers::platform(grpc, auth.authenticator.clone())
        .unwrap()
        .with_metrics(metrics.clone());
    let server = anumate_testing::serve_modules(listener, &modules, ctx, layers).await;
    App {
        server,
        auth,
        metrics,
        arrived,
        release,
        _keys: keys,
    }
}

impl App {
    async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.server.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(
        &self,
        token: Option<&str>,
    ) -> GhostRunServiceClient<tonic::service::interceptor::InterceptedService<Channel, BearerToken>>
    {
        let token = token.unwrap_or_default().to_owned();
        GhostRunServiceClient::with_interceptor(self.channel().await, BearerToken(token))
    }

    fn token(&self) -> String {
        self.auth
            .issuer
            .mint(
                "acme",
                "user:alice",
                &[Role::Auditor],
                Duration::from_secs(300),
            )
            .unwrap()
    }

    /// `anumate_grpc_requests_total` of GetPreflight answered `code`.
    fn counted(&self, code: &str) -> u64 {
        let text = self.metrics.encode().unwrap();
        let series = format!(
            "anumate_grpc_requests_total{{service=\"{SERVICE}\",method=\"GetPreflight\",code=\"{code}\"}} "
        );
        text.lines()
            .find_map(|line| line.strip_prefix(series.as_str()))
            .map_or(0, |n| n.trim().parse().unwrap())
    }
}

fn get() -> GetPreflightRequest {
    GetPreflightRequest {
        preflight_id: "p1".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_cap_are_shed_before_authentication_and_counted() {
    let mut app = spawn_app(GrpcConfig {
        max_concurrent_requests: 1,
        request_timeout_secs: 0,
        ..GrpcConfig::default()
    })
    .await;
    let token = app.token();

    // One call holds the only slot.
    let mut first = app.client(Some(&token)).await;
    let held = tokio::spawn(async move { first.get_preflight(get()).await });
    app.arrived.recv().await.unwrap();

    // The next one is refused at once, with ErrorInfo, whoever sends it: a
    // call without a token is shed before its token would be checked.
    let busy = expect_status(
        app.client(Some(&token)).await.get_preflight(get()).await,
        ErrorCode::ResourceExhausted,
    );
    assert!(
        busy.message().contains("max_concurrent_requests"),
        "{busy:?}"
    );
    expect_status(
        app.client(None).await.get_preflight(get()).await,
        ErrorCode::ResourceExhausted,
    );

    // Health checks are never shed; the binary's router serves the module's health.
    let health = HealthClient::new(app.channel().await)
        .check(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);

    // Released, the slot frees: the held call and the next get through
    // (authenticated and authorized), and tokenless calls are refused by
    // authentication again.
    app.release.send(true).unwrap();
    expect_status(held.await.unwrap(), ErrorCode::Unimplemented);
    expect_status(
        app.client(Some(&token)).await.get_preflight(get()).await,
        ErrorCode::Unimplemented,
    );
    expect_status(
        app.client(None).await.get_preflight(get()).await,
        ErrorCode::Unauthenticated,
    );

    // The metrics layer counted every call with its final status.
    assert_eq!(app.counted("ResourceExhausted"), 2);
    assert_eq!(app.counted("Unimplemented"), 2);
    assert_eq!(app.counted("Unauthenticated"), 1);
    app.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_past_the_request_timeout_is_answered_deadline_exceeded() {
    let app = spawn_app(GrpcConfig {
        request_timeout_secs: 1,
        ..GrpcConfig::default()
    })
    .await;
    let started = Instant::now();
    // Never released: only the server's deadline ends the call.
    let late = expect_status(
        app.client(Some(&app.token()))
            .await
            .get_preflight(get())
            .await,
        ErrorCode::DeadlineExceeded,
    );
    assert!(late.message().contains("request_timeout_secs"), "{late:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(app.counted("DeadlineExceeded"), 1);
    app.server.stop().await;
}
