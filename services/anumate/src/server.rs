//! Builds and runs the gRPC server for `dev` and `serve`: the composition
//! list of service modules ([`modules`]), the one [`build_router`] that
//! every entry point uses, and around `anumate_service::server::serve` (the
//! production layers, shared with the tests) the admin listener, the outbox
//! relay and the drain on SIGTERM.

use std::{sync::Arc, time::Duration};

use anumate_auth::Authenticator;
use anumate_crypto::KeyRing;
use anumate_service::server::{Layers, TASKS_STOP_TIMEOUT};
use anumate_service::{Context, ServiceModule};
use anumate_store::Store;
use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::config::AppConfig;

/// Every service of the platform, in build order (a service's in-process
/// upstreams come before it). Adding a service is one line here.
pub fn modules() -> Vec<Box<dyn ServiceModule>> {
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

/// What `anumate serve` accepts: `all` and each module's name.
pub fn service_names() -> clap::builder::PossibleValuesParser {
    let mut values =
        vec![clap::builder::PossibleValue::new("all").help("Every service in one process")];
    values.extend(
        modules()
            .iter()
            .map(|m| clap::builder::PossibleValue::new(m.section()).help(m.about())),
    );
    values.push(
        clap::builder::PossibleValue::new(GATEWAY)
            .help("The REST gateway (HTTP/JSON to the services: in process next to them, else over gRPC to [gateway] upstream)"),
    );
    clap::builder::PossibleValuesParser::new(values)
}

/// The name of the REST gateway in `anumate serve` (not a gRPC module).
pub const GATEWAY: &str = "gateway";

/// The modules named (by [`ServiceModule::section`]); none or `all`: every
/// one. `gateway` alone selects none.
pub fn selected(names: &[String]) -> Vec<Box<dyn ServiceModule>> {
    let all = modules();
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return all;
    }
    if names.iter().all(|n| n == GATEWAY) {
        return Vec::new();
    }
    all.into_iter()
        .filter(|m| names.iter().any(|n| n == m.section()))
        .collect()
}

/// Whether `anumate serve` runs the REST gateway: named, or `all` (or no
/// name, which means all).
pub fn with_gateway(names: &[String]) -> bool {
    names.is_empty() || names.iter().any(|n| n == "all" || n == GATEWAY)
}

/// Every migration of `modules`, the outbox's first (once).
pub fn migrations(modules: &[Box<dyn ServiceModule>]) -> Vec<anumate_store::Migration> {
    let mut all = anumate_events::MIGRATIONS.to_vec();
    for m in modules {
        all.extend(m.migrations());
    }
    all
}

/// Everything a running server needs.
pub struct Runtime {
    pub config: AppConfig,
    pub store: Option<Store>,
    pub authenticator: Authenticator,
    /// The platform's service issuer (its keys), minting this process's
    /// `svc:<name>` tokens for calls to other services; `None` without keys.
    pub service_issuer: Option<anumate_auth::ServiceIssuer>,
    /// The services to run.
    pub modules: Vec<Box<dyn ServiceModule>>,
    /// The bound admin HTTP listener, if enabled.
    pub admin: Option<TcpListener>,
    /// The bound REST gateway listener whose gateway calls these services in
    /// process (`[gateway] upstream` empty), if any.
    pub gateway: Option<TcpListener>,
}

impl Runtime {
    /// Full gRPC names of the services run.
    pub fn service_names(&self) -> Vec<&'static str> {
        self.modules.iter().map(|m| m.name()).collect()
    }
}

/// The configuration as JSON, one key per section (what modules read).
fn config_json(config: &AppConfig) -> anyhow::Result<serde_json::Value> {
    serde_json::to_value(config).context("configuration")
}

/// The configuration keys of the signing keys `modules` need and lack.
pub fn missing_keys(
    config: &AppConfig,
    modules: &[Box<dyn ServiceModule>],
) -> anyhow::Result<Vec<&'static str>> {
    let json = config_json(config)?;
    Ok(modules
        .iter()
        .flat_map(|m| m.missing_keys(&json, &config.keys))
        .collect())
}

/// Refuses to serve `modules` (outside `anumate dev`) without their signing
/// keys configured: a key generated per replica would make one replica's
/// signatures and tokens fail on the others, and each JWKS show one key.
pub fn require_keys(config: &AppConfig, modules: &[Box<dyn ServiceModule>]) -> anyhow::Result<()> {
    let missing = missing_keys(config, modules)?;
    if missing.is_empty() || config.keys.generate_missing {
        return Ok(());
    }
    Err(anumate_service::BuildError::NoKeys(missing.join(", ")).into())
}

/// The platform's service issuer: `[keys] service_key_files`, else (in
/// `anumate dev`, where the data directory holds every key) a key kept under
/// the data directory; `None` for `serve` without configured files.
pub fn service_issuer(config: &AppConfig) -> anyhow::Result<Option<anumate_auth::ServiceIssuer>> {
    // The name is a placeholder: each service mints with `for_service(name)`.
    const ANY: &str = "anumate";
    if !config.keys.service_key_files.is_empty() {
        let keys = KeyRing::from_pem_files(&config.keys.service_key_files)
            .context("[keys] service_key_files")?;
        return Ok(Some(anumate_auth::ServiceIssuer::new(ANY, Arc::new(keys))?));
    }
    Ok(None)
}

/// `anumate dev`'s service issuer: configured files, else a key under the data directory.
pub fn dev_service_issuer(config: &AppConfig) -> anyhow::Result<anumate_auth::ServiceIssuer> {
    match service_issuer(config)? {
        Some(issuer) => Ok(issuer),
        None => anumate_auth::ServiceIssuer::load_or_create(&config.keys_dir(), "anumate")
            .with_context(|| format!("service key under {}", config.keys_dir().display())),
    }
}

/// Binds the listener (so the actual port is known before serving).
pub async fn bind(config: &AppConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(&config.grpc.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.grpc.listen))
}

/// Binds the REST gateway's listener (`[gateway] listen`), if enabled.
pub async fn bind_gateway(config: &AppConfig) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = config.gateway.address(&config.grpc.listen) else {
        return Ok(None);
    };
    let listener = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ([gateway] listen)"))?;
    Ok(Some(listener))
}

/// Runs the REST gateway on `listener` in front of the gRPC services at
/// `upstream` until SIGINT/SIGTERM.
pub async fn serve_gateway(
    config: &AppConfig,
    listener: TcpListener,
    upstream: &str,
) -> anyhow::Result<()> {
    // With `[tls]` the gateway reaches the services over mTLS (its channels
    // from the one factory, with the process's certificate).
    let tls = anumate_service::clients::process_tls(&config.tls)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {}", e.message))?;
    let gateway = match tls {
        Some(_) => anumate_gateway::Gateway::with_channels(
            config.gateway.clone(),
            (0..config.gateway.upstream_connections.max(1))
                .map(|_| anumate_service::clients::channel("gateway.upstream", upstream))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{}", e.message))?,
        )?,
        None => anumate_gateway::Gateway::connect_lazy(config.gateway.clone(), upstream)?,
    };
    anumate_gateway::serve(listener, gateway, shutdown_signal())
        .await
        .context("gateway")
}

/// `http://` address of this server's own listener (loopback when bound to all interfaces).
fn own_url(listener: &TcpListener) -> anyhow::Result<String> {
    let mut addr = listener.local_addr().context("listener address")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(format!("http://{addr}"))
}

/// The services of `rt` built into one router (see [`anumate_service::server::build`]).
pub use anumate_service::server::App;

/// Builds every module of `rt`, in order, on one [`Context`]: what `dev` and
/// `serve` serve (and the tests, through `anumate-testing`, the same way).
/// `own_url` is this server's listener (where unset upstream addresses point
/// when the upstream does not run here).
pub async fn build_router(rt: &Runtime, own_url: String) -> anyhow::Result<App> {
    let ctx = Context::new(
        config_json(&rt.config)?,
        rt.store.clone(),
        rt.config.keys.clone(),
        rt.config.keys_dir(),
        rt.service_issuer.clone(),
        own_url,
    );
    Ok(anumate_service::server::build(&rt.modules, ctx).await?)
}

/// Serves until SIGINT/SIGTERM, then drains in-flight requests and stops the
/// background tasks.
/// Exports the relay's backlog and lag (`anumate_events_outbox_backlog`,
/// `anumate_events_relay_lag_seconds`), refreshed every second from what the
/// relay last saw, until `cancel`.
async fn relay_metrics(
    stats: std::sync::Arc<anumate_events::relay::RelayStats>,
    cancel: anumate_service::CancellationToken,
) -> Result<(), anumate_service::TaskError> {
    use anumate_service::metrics::prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::{AtomicU64, Ordering};
    let backlog = Gauge::<i64>::default();
    let lag = Gauge::<f64, AtomicU64>::default();
    anumate_service::metrics::register(
        "events_outbox_backlog",
        "Outbox rows waiting to be relayed to Kafka (neither sent nor quarantined)",
        backlog.clone(),
    );
    anumate_service::metrics::register(
        "events_relay_lag_seconds",
        "Age of the oldest outbox row waiting to be relayed (0 when none waits)",
        lag.clone(),
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return Ok(()),
        }
        backlog.set(stats.backlog.load(Ordering::Relaxed));
        lag.set(stats.lag_seconds(anumate_store::now_micros()));
    }
}

pub async fn serve(rt: Runtime, listener: TcpListener) -> anyhow::Result<()> {
    let metrics = anumate_service::metrics::Metrics::new();
    // `[tls]`: mTLS on the listener and on every channel the modules build
    // (so before they are built).
    let tls = anumate_service::clients::process_tls(&rt.config.tls)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {}", e.message))?;
    if tls.is_some() {
        tracing::info!(cert = %rt.config.tls.cert.display(), "mTLS on the gRPC listener and clients");
    }
    let App {
        routes,
        mut tasks,
        provided,
        health: health_reporter,
    } = build_router(&rt, own_url(&listener)?).await?;

    // The outbox relay: with a broker configured, every process with a store
    // runs one (replicas share the work); without one, events wait in the outbox.
    if let (Some(store), true) = (&rt.store, rt.config.kafka.enabled()) {
        let relay = anumate_events::relay::Relay::new(store.clone(), rt.config.kafka.clone())
            .context("kafka relay")?;
        tracing::info!(brokers = %rt.config.kafka.brokers, "relaying outbox events to kafka");
        let relay = relay.spawn();
        let stats = relay.stats();
        tasks.spawn("outbox relay", |cancel| async move {
            cancel.cancelled().await;
            relay.shutdown(Duration::from_secs(10)).await;
            Ok(())
        });
        tasks.spawn("outbox relay metrics", |cancel| {
            relay_metrics(stats, cancel)
        });
    }
    let grace = Duration::from_secs(rt.config.grpc.shutdown_grace_secs);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let services = rt.service_names();
    if let Some(listener) = rt.admin {
        let state = crate::admin::AdminState {
            metrics: metrics.clone(),
            store: rt.store.clone(),
            captokens: provided
                .get::<anumate_captokens_service::CapTokens>()
                .cloned(),
            receipts: provided.get::<anumate_receipts::Receipts>().cloned(),
            stopping: stopping_rx,
        };
        tasks.spawn("admin listener", |cancel| async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = crate::admin::serve(listener, state) => {}
            }
            Ok(())
        });
    }
    let reporter = health_reporter.clone();
    let signal = async move {
        shutdown_signal().await;
        tracing::info!("shutting down: refusing new requests, draining in-flight ones");
        let _ = stopping_tx.send(true);
        for name in &services {
            reporter
                .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = drain_tx.send(());
    };

    // Who may call each RPC, from the `(anumate.common.v1.authz)` options in
    // proto/; every production layer around the routes (the tests serve
    // through the same function).
    let layers = Layers::platform(rt.config.grpc.clone(), rt.authenticator.clone())
        .context("authorization table")?
        .with_metrics(metrics)
        .with_tls(tls);
    let layered = anumate_service::server::layered(layers, routes.routes());
    if let Some(gw) = rt.gateway {
        // The gateway next to the services calls them through the same
        // layered routes the listener serves, without a socket.
        let gateway =
            anumate_gateway::Gateway::in_process(rt.config.gateway.clone(), layered.service())?;
        tokio::spawn(async move {
            if let Err(e) = anumate_gateway::serve(gw, gateway, shutdown_signal()).await {
                tracing::error!(error = %e, "REST gateway stopped");
            }
        });
    }
    let server = anumate_service::server::serve_layered(listener, layered, signal);
    tokio::pin!(server);
    tokio::select! {
        res = &mut server => res.context("grpc server")?,
        _ = async {
            let _ = drain_rx.await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests did not finish within the grace period");
        }
    }
    let late = tasks.shutdown(TASKS_STOP_TIMEOUT).await;
    if !late.is_empty() {
        tracing::warn!(tasks = ?late, "background tasks still running at exit");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
