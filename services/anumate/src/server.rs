//! Builds and runs the gRPC server for `dev` and `serve`.

use std::{sync::Arc, time::Duration};

use anumate_auth::{AuthLayer, Authenticator};
use anumate_captokens_service::{CapTokens, CapTokensGrpc};
use anumate_compiler::{Compiler, CompilerGrpc, Upstreams};
use anumate_crypto::KeyRing;
use anumate_events_service::{Events, EventsGrpc};
use anumate_policy_service::{Policies, PolicyGrpc};
use anumate_proto::captokens::v1::cap_tokens_service_server;
use anumate_proto::compiler::v1::compiler_service_server;
use anumate_proto::events::v1::events_service_server;
use anumate_proto::policy::v1::policy_service_server;
use anumate_proto::receipts::v1::receipts_service_server;
use anumate_proto::registry::v1::registry_service_server;
use anumate_receipts::{Receipts, ReceiptsGrpc};
use anumate_registry::{Registry, RegistryGrpc};
use anumate_store::Store;
use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::RoutesBuilder;

use crate::config::AppConfig;

/// A service the binary can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceName {
    /// Every service in one process.
    All,
    /// Capsule registry.
    Registry,
    /// Policy DSL (not implemented yet: answers UNIMPLEMENTED).
    Policy,
    /// Plan compiler.
    Compiler,
    /// GhostRun preflight (not implemented yet).
    Ghostrun,
    /// Orchestrator (not implemented yet).
    Orchestrator,
    /// Approvals (not implemented yet).
    Approvals,
    /// Capability tokens (not implemented yet).
    Captokens,
    /// Receipts: the signed, append-only receipt log.
    Receipts,
    /// Events: the event history (tail, list) and replays.
    Events,
}

impl ServiceName {
    fn grpc_name(self) -> Option<&'static str> {
        use anumate_proto::*;
        Some(match self {
            ServiceName::All => return None,
            ServiceName::Registry => registry_service_server::SERVICE_NAME,
            ServiceName::Policy => policy::v1::policy_service_server::SERVICE_NAME,
            ServiceName::Compiler => compiler::v1::compiler_service_server::SERVICE_NAME,
            ServiceName::Ghostrun => ghostrun::v1::ghost_run_service_server::SERVICE_NAME,
            ServiceName::Orchestrator => {
                orchestrator::v1::orchestrator_service_server::SERVICE_NAME
            }
            ServiceName::Approvals => approvals::v1::approvals_service_server::SERVICE_NAME,
            ServiceName::Captokens => captokens::v1::cap_tokens_service_server::SERVICE_NAME,
            ServiceName::Receipts => receipts::v1::receipts_service_server::SERVICE_NAME,
            ServiceName::Events => events::v1::events_service_server::SERVICE_NAME,
        })
    }
}

/// Full gRPC names of the selected services.
pub fn selected(services: &[ServiceName]) -> Vec<&'static str> {
    let mut all: Vec<&'static str> = vec![
        registry_service_server::SERVICE_NAME,
        compiler_service_server::SERVICE_NAME,
        events_service_server::SERVICE_NAME,
    ];
    all.extend_from_slice(anumate_unimplemented::SERVICE_NAMES);
    if services.is_empty() || services.contains(&ServiceName::All) {
        return all;
    }
    all.into_iter()
        .filter(|n| services.iter().any(|s| s.grpc_name() == Some(*n)))
        .collect()
}

/// Services that need the database.
pub const STORED_SERVICES: &[&str] = &[
    registry_service_server::SERVICE_NAME,
    compiler_service_server::SERVICE_NAME,
    receipts_service_server::SERVICE_NAME,
    policy_service_server::SERVICE_NAME,
    cap_tokens_service_server::SERVICE_NAME,
    events_service_server::SERVICE_NAME,
];

/// Services implemented in this binary (the rest answer UNIMPLEMENTED).
const IMPLEMENTED: &[&str] = &[
    registry_service_server::SERVICE_NAME,
    compiler_service_server::SERVICE_NAME,
    receipts_service_server::SERVICE_NAME,
    policy_service_server::SERVICE_NAME,
    cap_tokens_service_server::SERVICE_NAME,
    events_service_server::SERVICE_NAME,
];

/// Everything a running server needs.
pub struct Runtime {
    pub config: AppConfig,
    pub store: Option<Store>,
    pub authenticator: Authenticator,
    /// The platform's service issuer (its keys), minting this process's
    /// `svc:<name>` tokens for calls to other services; `None` without keys.
    pub service_issuer: Option<anumate_auth::ServiceIssuer>,
    pub services: Vec<&'static str>,
    /// The bound admin HTTP listener, if enabled.
    pub admin: Option<TcpListener>,
}

/// The configuration key naming each signing service's key files, for the
/// services among `services` whose keys are not configured.
pub fn missing_keys(config: &AppConfig, services: &[&str]) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if services.contains(&registry_service_server::SERVICE_NAME)
        && config.keys.registry_key_files.is_empty()
    {
        missing.push("[keys] registry_key_files");
    }
    if services.contains(&receipts_service_server::SERVICE_NAME)
        && config.keys.receipts_key_files.is_empty()
    {
        missing.push("[keys] receipts_key_files");
    }
    if services.contains(&cap_tokens_service_server::SERVICE_NAME)
        && config.captokens.key_files.is_empty()
    {
        missing.push("[captokens] key_files");
    }
    missing
}

/// Refuses to serve `services` (outside `anumate dev`) without their signing
/// keys configured: a key generated per replica would make one replica's
/// signatures and tokens fail on the others, and each JWKS show one key.
pub fn require_keys(config: &AppConfig, services: &[&str]) -> anyhow::Result<()> {
    let missing = missing_keys(config, services);
    if missing.is_empty() || config.keys.generate_missing {
        return Ok(());
    }
    Err(no_keys(&missing))
}

fn no_keys(missing: &[&str]) -> anyhow::Error {
    anyhow::anyhow!(
        "no signing keys configured: set {} (PKCS#8 PEM files, active key first, the same files on every replica; see deploy/README.md). Only `anumate dev` generates keys, under its data directory",
        missing.join(", ")
    )
}

/// Keys from `files`, else (`anumate dev` only) the key `<keys_dir>/<name>.key.pem`,
/// created if missing.
fn keys_from(
    config: &AppConfig,
    files: &[std::path::PathBuf],
    config_key: &str,
    name: &str,
) -> anyhow::Result<KeyRing> {
    if !files.is_empty() {
        return KeyRing::from_pem_files(files).with_context(|| config_key.to_string());
    }
    if !config.keys.generate_missing {
        return Err(no_keys(&[config_key]));
    }
    KeyRing::load_or_create(&config.keys_dir(), name)
        .with_context(|| format!("{name} key under {}", config.keys_dir().display()))
}

/// Loads the registry signing keys: configured files, else (`anumate dev`
/// only) a key kept under the data directory.
pub fn registry_keys(config: &AppConfig) -> anyhow::Result<KeyRing> {
    let files = &config.keys.registry_key_files;
    keys_from(config, files, "[keys] registry_key_files", "registry")
}

/// Loads the receipt log's signing keys: configured files, else (`anumate
/// dev` only) a key kept under the data directory.
pub fn receipts_keys(config: &AppConfig) -> anyhow::Result<KeyRing> {
    let files = &config.keys.receipts_key_files;
    keys_from(config, files, "[keys] receipts_key_files", "receipts")
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

/// Serves until SIGINT/SIGTERM, then drains in-flight requests.
pub async fn serve(rt: Runtime, listener: TcpListener) -> anyhow::Result<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let mut routes = RoutesBuilder::default();
    let metrics = crate::admin::Metrics::new();
    let mut admin_receipts = None;
    let mut admin_tokens = None;

    if rt.services.contains(&registry_service_server::SERVICE_NAME) {
        let store = rt.store.clone().context("the registry needs a store")?;
        let keys = Arc::new(registry_keys(&rt.config)?);
        let registry = Registry::new(store, keys, &rt.config.registry);
        routes.add_service(RegistryGrpc::new(registry).into_server());
    }
    let mut checkpointer = None;
    if rt.services.contains(&receipts_service_server::SERVICE_NAME) {
        let store = rt
            .store
            .clone()
            .context("the receipts service needs a store")?;
        let keys = Arc::new(receipts_keys(&rt.config)?);
        let receipts = Receipts::new(store, keys, &rt.config.receipts)
            .map_err(|e| anyhow::anyhow!("receipts service: {e}"))?;
        checkpointer = Some(receipts.spawn_checkpointer());
        admin_receipts = Some(receipts.clone());
        routes.add_service(ReceiptsGrpc::new(receipts).into_server());
    }
    if rt.services.contains(&policy_service_server::SERVICE_NAME) {
        let store = rt
            .store
            .clone()
            .context("the policy service needs a store")?;
        let policies = Policies::new(store, &rt.config.policy);
        routes.add_service(PolicyGrpc::new(policies).into_server());
    }
    if rt.services.contains(&compiler_service_server::SERVICE_NAME) {
        let store = rt.store.clone().context("the compiler needs a store")?;
        // Unset addresses mean this process: `dev` and `serve all` serve the registry
        // and the policy service on the same listener.
        let own = own_url(&listener)?;
        let url = |configured: &str| {
            if configured.is_empty() {
                own.clone()
            } else {
                configured.to_string()
            }
        };
        let upstreams = Upstreams::lazy(
            &url(&rt.config.compiler.registry_url),
            &url(&rt.config.compiler.policy_url),
        )
        .map_err(|e| anyhow::anyhow!("compiler: {e}"))?;
        let compiler = Compiler::new(store, upstreams, &rt.config.compiler)
            .map_err(|e| anyhow::anyhow!("compiler: {e}"))?;
        routes.add_service(CompilerGrpc::new(compiler).into_server());
    }
    let mut token_purger = None;
    if rt
        .services
        .contains(&cap_tokens_service_server::SERVICE_NAME)
    {
        let store = rt
            .store
            .clone()
            .context("the captokens service needs a store")?;
        let files = &rt.config.captokens.key_files;
        let keys = Arc::new(keys_from(
            &rt.config,
            files,
            "[captokens] key_files",
            "captokens",
        )?);
        let mut tokens = CapTokens::new(store, keys, &rt.config.captokens)
            .map_err(|e| anyhow::anyhow!("captokens service: {e}"))?;
        // Revocations are receipted by the receipts service of this process,
        // else by the one at `[captokens] receipts_url`.
        if let Some(receipts) = &admin_receipts {
            tokens = tokens.with_revocation_receipts(Arc::new(
                anumate_captokens_service::InProcessReceipts(receipts.clone()),
            ));
        } else if !rt.config.captokens.receipts_url.is_empty() {
            // Appended as the captokens service identity (the only one the
            // receipts service takes TOKEN_REVOCATION from).
            let issuer = rt
                .service_issuer
                .as_ref()
                .context("[captokens] receipts_url needs the platform's service keys ([keys] service_key_files)")?
                .for_service(anumate_captokens_service::RECEIPTS_SERVICE_NAME)?;
            let client = anumate_captokens_service::GrpcReceipts::new(
                &rt.config.captokens.receipts_url,
                issuer,
            )
            .map_err(|e| anyhow::anyhow!("captokens service: {e}"))?;
            tokens = tokens.with_revocation_receipts(Arc::new(client));
        } else {
            tracing::warn!(
                "captokens: no receipts service in this process and no [captokens] receipts_url: revocations are not receipted"
            );
        }
        token_purger = Some(tokens.spawn_background());
        admin_tokens = Some(tokens.clone());
        routes.add_service(CapTokensGrpc::new(tokens).into_server());
    }
    // The event history: fed from Kafka when a broker is configured, else
    // straight from the outbox of this store.
    let mut history_feed = None;
    let mut history_consumer = None;
    if rt.services.contains(&events_service_server::SERVICE_NAME) {
        let store = rt
            .store
            .clone()
            .context("the events service needs a store")?;
        let kafka = &rt.config.kafka;
        let replayer = match kafka.enabled() {
            true => Some(Arc::new(
                anumate_events_service::kafka::Replayer::new(kafka)
                    .context("events service: replay producer")?,
            )),
            false => None,
        };
        let events = Events::new(store, &rt.config.events, replayer);
        if kafka.enabled() {
            history_consumer = Some(
                anumate_events_service::kafka::spawn_history_consumer(&events, kafka)
                    .context("events service: history consumer")?,
            );
        } else {
            history_feed = Some(events.spawn_outbox_feed());
        }
        routes.add_service(EventsGrpc::new(events).into_server());
    }
    let mut skip: Vec<&str> = anumate_unimplemented::SERVICE_NAMES
        .iter()
        .copied()
        .filter(|n| !rt.services.contains(n))
        .collect();
    // Implemented here: never the placeholder.
    skip.extend_from_slice(IMPLEMENTED);
    let mut routes = anumate_unimplemented::add_except(routes, &skip);

    for name in &rt.services {
        health_reporter
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(anumate_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection")?;
    routes.add_service(health_service);
    routes.add_service(reflection);

    // The outbox relay: with a broker configured, every process with a store
    // runs one (replicas share the work); without one, events wait in the outbox.
    let relay = match (&rt.store, rt.config.kafka.enabled()) {
        (Some(store), true) => {
            let relay = anumate_events::relay::Relay::new(store.clone(), rt.config.kafka.clone())
                .context("kafka relay")?;
            tracing::info!(brokers = %rt.config.kafka.brokers, "relaying outbox events to kafka");
            Some(relay.spawn())
        }
        _ => None,
    };
    let grace = Duration::from_secs(rt.config.grpc.shutdown_grace_secs);
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let admin = rt.admin.map(|listener| {
        let state = crate::admin::AdminState {
            metrics: metrics.clone(),
            store: rt.store.clone(),
            captokens: admin_tokens,
            receipts: admin_receipts,
            stopping: stopping_rx,
        };
        tokio::spawn(crate::admin::serve(listener, state))
    });
    let reporter = health_reporter.clone();
    let services = rt.services.clone();
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

    // Who may call each RPC, from the `(anumate.common.v1.authz)` options in proto/.
    let authz = anumate_auth::AuthzTable::platform().context("authorization table")?;
    // Outermost first: a span per call, ErrorInfo on transport-level errors,
    // metrics, the deadline and the cap on calls in flight (so shed calls are
    // counted and cost no token check), then authentication and each RPC's
    // authorization rule (health, reflection and public RPCs pass without a token).
    let layers = tower::ServiceBuilder::new()
        .layer(
            tower_http::trace::TraceLayer::new_for_grpc()
                .make_span_with(
                    tower_http::trace::DefaultMakeSpan::new().level(tracing::Level::INFO),
                )
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                )
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .map_response(anumate_errors::layer::ensure_error_info::<tonic::body::Body>)
        .layer(metrics.layer())
        .layer(crate::limits::LimitsLayer::new(
            (rt.config.grpc.request_timeout_secs > 0)
                .then(|| Duration::from_secs(rt.config.grpc.request_timeout_secs)),
            rt.config.grpc.max_concurrent_requests,
        ))
        .layer(
            anumate_captokens_service::PUBLIC_PATHS
                .iter()
                .fold(AuthLayer::new(rt.authenticator.clone(), authz), |layer, path| {
                    layer.allow_unauthenticated(*path)
                }),
        );
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(rt.config.grpc.max_concurrent_streams.max(1))
        .layer(layers)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(nodelay(listener), signal);
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
    if let Some(consumer) = history_consumer {
        consumer.stop().await;
    }
    for task in [checkpointer, token_purger, history_feed]
        .into_iter()
        .flatten()
    {
        task.abort();
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(relay) = relay {
        relay.shutdown(Duration::from_secs(10)).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Accepted connections with `TCP_NODELAY`, as `Server::serve` would set it:
/// without it small responses wait for the peer's delayed ACK (~40 ms a call).
fn nodelay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Ok(stream)
    })
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
