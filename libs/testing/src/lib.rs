//! Test support shared by the service crates' integration tests: one copy of
//! the scaffolding every `tests/*.rs` used to carry.
//!
//! - [`on_both_backends!`]: runs each scenario once on SQLite and once on
//!   PostgreSQL.
//! - [`migrated_store`]: a throw-away database with a crate's migrations, and
//!   the store on it.
//! - [`DevAuth`]: a dev issuer (and optionally the platform's service issuer)
//!   and an [`Authenticator`] that trusts them.
//! - [`serve`]: the service's routes on a real TCP listener behind every
//!   production layer, through the function the binary serves with
//!   ([`anumate_service::server::serve`]: tracing, ErrorInfo on every error,
//!   metrics, the `[grpc]` deadline and cap on calls in flight, authentication
//!   and per-RPC authorization). [`serve_with`] takes the layers' `[grpc]`
//!   settings and metrics; [`serve_modules`] builds a module list as the
//!   binary does ([`anumate_service::server::build`]: health and reflection
//!   too) and serves it the same way.
//! - [`expect_error`] / [`expect_status`]: a failed call's stable code, checked
//!   in its `ErrorInfo` and its gRPC code.
//!
//! A dev-dependency only: it panics on set-up failures, which fail the test.
#![forbid(unsafe_code)]
#![allow(clippy::expect_used)]

use std::net::SocketAddr;

use anumate_auth::{AuthConfig, AuthLayer, Authenticator, AuthzTable, DevIssuer, ServiceIssuer};
use anumate_errors::{Error, ErrorCode};
pub use anumate_service::GrpcConfig;
pub use anumate_service::metrics::Metrics;
pub use anumate_service::server::Layers;
use anumate_service::{Context, ServiceModule, Tasks};
pub use anumate_store::testing::TestDb;
pub use anumate_store::{Backend, Migration, Store};
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic_types::StatusExt as _;

/// Runs each scenario once on SQLite and once on PostgreSQL.
///
/// Each scenario is an `async fn(TestApp)`; the app comes from the caller's
/// `spawn_app(Backend)`, or from the function named by `spawn = path;`:
///
/// ```ignore
/// on_both_backends! {
///     lifecycle => lifecycle_sqlite, lifecycle_postgres;
/// }
/// ```
#[macro_export]
macro_rules! on_both_backends {
    (spawn = $spawn:path; $($scenario:ident => $sqlite:ident, $postgres:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $scenario($spawn($crate::Backend::Sqlite).await).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            $scenario($spawn($crate::Backend::Postgres).await).await;
        }
    )*};
    ($($scenario:ident => $sqlite:ident, $postgres:ident;)*) => {
        $crate::on_both_backends! {
            spawn = spawn_app;
            $($scenario => $sqlite, $postgres;)*
        }
    };
}

/// A throw-away database of `backend`.
pub async fn test_db(backend: Backend) -> TestDb {
    match backend {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => TestDb::postgres().await,
    }
}

/// A throw-away database of `backend` with `migrations` applied, and a store
/// on it whose login passed the serving-role check (as `serve` requires).
/// Keep the [`TestDb`]: dropping it removes the database.
pub async fn migrated_store(backend: Backend, migrations: &[Migration]) -> (TestDb, Store) {
    let db = test_db(backend).await;
    let store = Store::connect(&db.config).await.expect("connect");
    store.migrate(migrations).await.expect("migrate");
    store.check_serving_role().await.expect("serving role");
    (db, store)
}

/// The dev issuer (mints user tokens for any tenant and roles), optionally the
/// platform's service issuer, and an authenticator trusting them.
pub struct DevAuth {
    /// Mints user tokens the authenticator trusts.
    pub issuer: DevIssuer,
    /// Mints service tokens, when made by [`DevAuth::with_service_issuer`].
    pub services: Option<ServiceIssuer>,
    /// Trusts `issuer` (and `services`), with the default configuration.
    pub authenticator: Authenticator,
    /// The keys' directory; dropped last.
    pub dir: tempfile::TempDir,
}

impl DevAuth {
    /// A fresh dev issuer and an authenticator that trusts only it.
    pub fn new() -> DevAuth {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = DevIssuer::load_or_create(dir.path()).expect("dev issuer");
        let authenticator = Authenticator::new(AuthConfig::default())
            .expect("authenticator")
            .with_static_issuer(issuer.issuer(), issuer.jwks());
        DevAuth {
            issuer,
            services: None,
            authenticator,
            dir,
        }
    }

    /// Also the platform's service issuer (minting as `service`, under
    /// `<dir>/services`), trusted for service identities.
    pub fn with_service_issuer(service: &str) -> DevAuth {
        let DevAuth {
            issuer,
            authenticator,
            dir,
            ..
        } = DevAuth::new();
        let services = ServiceIssuer::load_or_create(&dir.path().join("services"), service)
            .expect("service issuer");
        let authenticator = authenticator.with_static_service_issuer(services.jwks());
        DevAuth {
            issuer,
            services: Some(services),
            authenticator,
            dir,
        }
    }
}

impl Default for DevAuth {
    fn default() -> Self {
        DevAuth::new()
    }
}

/// Serves `routes` on a fresh `127.0.0.1` port behind every layer the
/// `anumate` binary stacks, with the default `[grpc]` settings and the
/// platform's per-RPC authorization table. Abort the handle to stop the server.
pub async fn serve(auth: Authenticator, routes: Routes) -> (SocketAddr, JoinHandle<()>) {
    serve_on(bind().await, auth, routes)
}

/// [`serve`] on a listener the caller bound (to know the port first).
pub fn serve_on(
    listener: tokio::net::TcpListener,
    auth: Authenticator,
    routes: Routes,
) -> (SocketAddr, JoinHandle<()>) {
    let authz = AuthzTable::platform().expect("the platform's authorization table");
    serve_with_layer(listener, AuthLayer::new(auth, authz), routes)
}

/// A fresh `127.0.0.1` listener.
pub async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
}

/// [`serve_on`] with an authentication layer the caller configured (public
/// paths, say).
pub fn serve_with_layer(
    listener: tokio::net::TcpListener,
    auth: AuthLayer,
    routes: Routes,
) -> (SocketAddr, JoinHandle<()>) {
    serve_with(listener, Layers::new(GrpcConfig::default(), auth), routes)
}

/// Serves `routes` on `listener` through [`anumate_service::server::serve`],
/// the function `anumate dev` and `serve` run: every production layer, made of
/// `layers` (set its `grpc` limits, keep a clone of its `metrics` to read them).
pub fn serve_with(
    listener: tokio::net::TcpListener,
    layers: Layers,
    routes: Routes,
) -> (SocketAddr, JoinHandle<()>) {
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(async move {
        anumate_service::server::serve(listener, layers, routes, std::future::pending())
            .await
            .expect("server");
    });
    (addr, server)
}

/// A module list served as the binary serves it.
pub struct ModuleServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What the modules provided (domain values, in-process clients).
    pub provided: http::Extensions,
    /// The modules' background tasks.
    pub tasks: Tasks,
    /// The server; abort it to stop serving.
    pub handle: JoinHandle<()>,
    /// The routes behind the very layers the server serves them with (their
    /// state shared), callable in process: what the REST gateway next to the
    /// services calls (`Gateway::in_process`).
    pub in_process: anumate_service::server::LayeredService,
}

impl ModuleServer {
    /// `http://` address of the server.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and then its background tasks.
    pub async fn stop(self) {
        self.handle.abort();
        self.tasks
            .shutdown(anumate_service::server::TASKS_STOP_TIMEOUT)
            .await;
    }
}

/// Builds `modules` on `ctx` with [`anumate_service::server::build`] (health
/// and reflection added) and serves the router on `listener` behind every
/// production layer ([`anumate_service::server::serve_layered`]): what
/// `anumate dev` and `serve` run, without the admin listener and the outbox
/// relay. Make `ctx` with `listener`'s address as its
/// own URL.
pub async fn serve_modules(
    listener: tokio::net::TcpListener,
    modules: &[Box<dyn ServiceModule>],
    ctx: Context,
    layers: Layers,
) -> ModuleServer {
    let app = anumate_service::server::build(modules, ctx)
        .await
        .expect("build the modules");
    let layered = anumate_service::server::layered(layers, app.routes.routes());
    let in_process = layered.service();
    let addr = listener.local_addr().expect("local addr");
    let handle = tokio::spawn(async move {
        anumate_service::server::serve_layered(listener, layered, std::future::pending())
            .await
            .expect("server");
    });
    ModuleServer {
        addr,
        provided: app.provided,
        tasks: app.tasks,
        handle,
        in_process,
    }
}

/// Service modules composed as `anumate dev` runs them ([`compose`]).
pub struct Composed {
    /// The server of every module.
    pub server: ModuleServer,
    /// The dev issuers the server trusts; their keys live in `auth.dir`.
    pub auth: DevAuth,
    /// The database; dropped with it.
    pub db: TestDb,
}

impl Composed {
    /// Where the services' keys are (generated at start).
    pub fn keys_dir(&self) -> std::path::PathBuf {
        self.auth.dir.path().join("keys")
    }
}

/// `modules` built on a fresh migrated database of `backend` (`base`
/// migrations first, e.g. the outbox's, then the modules'), with `config` as
/// the server's configuration, missing keys generated, the dev issuers plus
/// the platform's service issuer (named `issuer`), and the platform's layers:
/// what `anumate dev` serves, on loopback.
pub async fn compose(
    backend: Backend,
    base: &[Migration],
    modules: &[Box<dyn ServiceModule>],
    config: serde_json::Value,
    issuer: &str,
) -> Composed {
    compose_with_grpc(
        backend,
        base,
        modules,
        config,
        issuer,
        GrpcConfig::default(),
    )
    .await
}

/// [`compose`] with `grpc` as the `[grpc]` section its layers are made of
/// (rate limits, the cap on calls in flight, the deadline).
pub async fn compose_with_grpc(
    backend: Backend,
    base: &[Migration],
    modules: &[Box<dyn ServiceModule>],
    config: serde_json::Value,
    issuer: &str,
    grpc: GrpcConfig,
) -> Composed {
    let mut migrations = base.to_vec();
    for m in modules {
        migrations.extend(m.migrations());
    }
    let (db, store) = migrated_store(backend, &migrations).await;
    let auth = DevAuth::with_service_issuer(issuer);
    let listener = bind().await;
    let own_url = format!("http://{}", listener.local_addr().expect("local address"));
    let ctx = Context::new(
        config,
        Some(store),
        anumate_service::KeysConfig {
            generate_missing: true,
            ..anumate_service::KeysConfig::default()
        },
        auth.dir.path().join("keys"),
        auth.services.clone(),
        own_url,
    );
    let layers = Layers::platform(grpc, auth.authenticator.clone()).expect("the platform's layers");
    let server = serve_modules(listener, modules, ctx, layers).await;
    Composed { server, auth, db }
}

/// The status of a call that had to fail with `code`, after checking that it
/// carries `ErrorInfo { reason: code, domain: anumate.dev }` (the class's
/// generic reason) and the gRPC code the error table maps `code` to.
#[track_caller]
pub fn expect_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: ErrorCode,
) -> tonic::Status {
    expect_failure(result, code.as_str(), code.grpc_code())
}

/// The status of a call that must fail with the registered specific `reason`:
/// its `ErrorInfo` (reason and domain) and the gRPC code of the reason's class.
#[track_caller]
pub fn expect_reason_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    reason: anumate_errors::Reason,
) -> tonic::Status {
    expect_failure(result, reason.as_str(), reason.code().grpc_code())
}

#[track_caller]
fn expect_failure<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    reason: &str,
    code: tonic::Code,
) -> tonic::Status {
    let status = match result {
        Ok(v) => panic!("expected {reason}, got success: {v:?}"),
        Err(s) => s,
    };
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
    assert_eq!(info.domain, anumate_errors::DOMAIN, "{status:?}");
    assert_eq!(status.code(), code, "{status:?}");
    status
}

/// [`expect_reason_status`], decoded into the product error (violations, metadata).
#[track_caller]
pub fn expect_reason<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    reason: anumate_errors::Reason,
) -> Error {
    let err = Error::from_status(&expect_reason_status(result, reason));
    assert_eq!((err.code, err.reason), (reason.code(), reason));
    err
}

/// [`expect_status`], decoded into the product error (violations, metadata).
#[track_caller]
pub fn expect_error<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: ErrorCode,
) -> Error {
    let err = Error::from_status(&expect_status(result, code));
    assert_eq!(err.code, code);
    err
}

/// User + system CPU time of this process so far, in seconds (from
/// `/proc/self/stat`; 0 where there is none), for benches that report CPU
/// per call beside latency.
pub fn process_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Clock ticks are 100 per second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}
