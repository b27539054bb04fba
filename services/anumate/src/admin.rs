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
//!   and checkpoints (as `GetReceiptSigningKeys`), when the receipts service runs here.

use std::time::Duration;

use anumate_service::metrics::Metrics;
use anyhow::Context as _;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
}
