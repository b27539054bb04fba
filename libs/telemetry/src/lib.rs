//! Logging and tracing for every Anumate process.
//!
//! Logs go to stderr as JSON (production) or pretty text (a terminal). When an
//! OTLP endpoint is configured, spans are also exported over OTLP/gRPC in
//! batches; a collector that is down only costs dropped spans, never the service.
#![forbid(unsafe_code)]

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable, for terminals.
    Pretty,
}

/// `[telemetry]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Log format.
    pub log_format: LogFormat,
    /// `tracing` filter directives, e.g. `info,anumate_registry=debug`.
    pub log_filter: String,
    /// OTLP/gRPC collector endpoint (`http://127.0.0.1:4317`); no export when unset.
    pub otlp_endpoint: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_format: LogFormat::Json,
            log_filter: "info".into(),
            otlp_endpoint: None,
        }
    }
}

/// Errors setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The filter directives do not parse.
    #[error("invalid log filter: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built (bad endpoint).
    #[error("otlp exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("telemetry already initialised: {0}")]
    AlreadyInit(String),
}

/// Flushes and shuts the span exporter down when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Failure here means the collector is unreachable; nothing to do about it.
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. Must be called inside a multi-thread tokio
/// runtime when an OTLP endpoint is set (the exporter spawns onto it).
pub fn init(service_name: &str, cfg: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::try_new(&cfg.log_filter).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let fmt_layer = match cfg.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let (otel_layer, provider) = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    Resource::builder()
                        .with_service_name(service_name.to_string())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("anumate");
            opentelemetry::global::set_tracer_provider(provider.clone());
            (
                Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                Some(provider),
            )
        }
        None => (None, None),
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInit(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_collector_is_not_fatal() {
        let cfg = TelemetryConfig {
            log_format: LogFormat::Json,
            log_filter: "info".into(),
            // Nothing listens on port 9 (discard) on loopback.
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
        };
        let guard = init("test", &cfg).expect("init");
        tracing::info_span!("work").in_scope(|| tracing::info!("hello"));
        let started = std::time::Instant::now();
        drop(guard);
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    #[test]
    fn bad_filter_is_reported() {
        let cfg = TelemetryConfig {
            log_filter: "info,[".into(),
            ..TelemetryConfig::default()
        };
        assert!(matches!(init("t", &cfg), Err(TelemetryError::Filter(_))));
    }
}
