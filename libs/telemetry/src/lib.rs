//! Logging and tracing for every Anumate process.
//!
//! Logs go to stderr as JSON (production) or pretty text (a terminal). When an
//! OTLP endpoint is configured, spans are also exported over OTLP/gRPC in
//! batches; a collector that is down only costs dropped spans, never the service.
//!
//! Both pass through the redaction detectors (emails, phones, cards, IBANs,
//! API keys, JWTs, …) first: log lines are redacted as they are written, span
//! names, attributes, events and status descriptions just before export, so
//! PII never leaves the process in telemetry.
#![forbid(unsafe_code)]

pub mod propagation;

pub use propagation::{TRACEPARENT, continue_trace, current_traceparent, parse_traceparent};

use std::sync::Arc;

use anumate_redaction::{RedactingMakeWriter, Redactor};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{KeyValue, StringValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
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
    /// `tracing` filter directives, e.g. `info,anumate_registry=debug`. The
    /// per-call access log is at DEBUG (a line per call costs more than the
    /// call on a fast read): `info,tower_http=debug` turns it on.
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
    let filter = |extra: &str| {
        EnvFilter::try_new(format!("{}{extra}", cfg.log_filter))
            .map_err(|e| TelemetryError::Filter(e.to_string()))
    };
    let log_filter = filter("")?;
    let redactor = Arc::new(Redactor::default());
    let writer = RedactingMakeWriter::new(std::io::stderr, redactor.clone());
    let fmt_layer = match cfg.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(writer)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    }
    .with_filter(log_filter);

    let (otel_layer, provider) = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(RedactingExporter::new(exporter, redactor))
                .with_resource(
                    Resource::builder()
                        .with_service_name(service_name.to_string())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("anumate");
            opentelemetry::global::set_tracer_provider(provider.clone());
            // Exported traces keep their root: the per-call span is at DEBUG
            // (so that it costs nothing when neither logged nor exported).
            let span_filter = filter(&format!(",{CALL_SPAN_TARGET}=debug"))?;
            (
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(span_filter),
                ),
                Some(provider),
            )
        }
        None => (None, None),
    };

    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInit(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// The target of the per-call span the servers' trace layers open (that of
/// `tower_http`'s own, so that `tower_http=debug` logs it).
pub const CALL_SPAN_TARGET: &str = "tower_http::trace::make_span";

/// A [`SpanExporter`] that redacts every string a span carries (name,
/// attributes, events, links' attributes, status description) before handing
/// the batch to the inner exporter.
#[derive(Debug)]
pub struct RedactingExporter<E> {
    inner: E,
    redactor: Arc<Redactor>,
}

impl<E> RedactingExporter<E> {
    /// Wraps `inner`; every exported span goes through `redactor` first.
    pub fn new(inner: E, redactor: impl Into<Arc<Redactor>>) -> Self {
        RedactingExporter {
            inner,
            redactor: redactor.into(),
        }
    }

    /// Redacts one span in place.
    pub fn redact_span(&self, span: &mut SpanData) {
        let r = &self.redactor;
        redact_cow(r, &mut span.name);
        redact_attributes(r, &mut span.attributes);
        for event in span.events.events.iter_mut() {
            redact_cow(r, &mut event.name);
            redact_attributes(r, &mut event.attributes);
        }
        for link in span.links.links.iter_mut() {
            redact_attributes(r, &mut link.attributes);
        }
        if let opentelemetry::trace::Status::Error { description } = &mut span.status {
            redact_cow(r, description);
        }
    }
}

fn redact_cow(r: &Redactor, s: &mut std::borrow::Cow<'static, str>) {
    if let std::borrow::Cow::Owned(clean) = r.redact_str(s) {
        *s = std::borrow::Cow::Owned(clean);
    }
}

fn redact_string_value(r: &Redactor, v: &StringValue) -> Option<StringValue> {
    match r.redact_str(v.as_str()) {
        std::borrow::Cow::Owned(clean) => Some(StringValue::from(clean)),
        std::borrow::Cow::Borrowed(_) => None,
    }
}

fn redact_attributes(r: &Redactor, attributes: &mut [KeyValue]) {
    for kv in attributes {
        match &mut kv.value {
            Value::String(v) => {
                if let Some(clean) = redact_string_value(r, v) {
                    *v = clean;
                }
            }
            Value::Array(opentelemetry::Array::String(values)) => {
                for v in values.iter_mut() {
                    if let Some(clean) = redact_string_value(r, v) {
                        *v = clean;
                    }
                }
            }
            // Numbers and booleans: a card number recorded as an integer is
            // still a card number.
            Value::I64(n) => {
                if let std::borrow::Cow::Owned(clean) = r.redact_str(&n.to_string()) {
                    kv.value = Value::String(clean.into());
                }
            }
            _ => {}
        }
    }
}

impl<E: SpanExporter> SpanExporter for RedactingExporter<E> {
    async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
        for span in &mut batch {
            self.redact_span(span);
        }
        self.inner.export(batch).await
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
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

    /// Keeps what it is given, to look at what would have gone to a collector.
    #[derive(Debug, Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<SpanData>>>);

    impl SpanExporter for Capture {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    #[test]
    fn exported_spans_carry_no_pii() {
        use opentelemetry::trace::{Span as _, Tracer as _};
        let capture = Capture::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(RedactingExporter::new(capture.clone(), Redactor::default()))
            .build();
        let tracer = provider.tracer("t");
        let mut span = tracer.start("login alice@example.com");
        span.set_attribute(KeyValue::new("subject", "alice@example.com"));
        span.set_attribute(KeyValue::new("card", 4_111_111_111_111_111_i64));
        span.set_attribute(KeyValue::new("kind", "refund"));
        span.add_event(
            "call +1 415 555 0132",
            vec![KeyValue::new("key", "sk_live_51HxYzAbCdEfGhIjKlMnOpQr")],
        );
        span.set_status(opentelemetry::trace::Status::error(
            "no such user bob@example.org",
        ));
        span.end();
        let spans = capture.0.lock().unwrap().clone();
        assert_eq!(spans.len(), 1);
        let text = format!("{:?}", spans[0]);
        for secret in [
            "alice@example.com",
            "4111111111111111",
            "415 555 0132",
            "sk_live_",
            "bob@example.org",
        ] {
            assert!(!text.contains(secret), "{secret} exported: {text}");
        }
        assert!(text.contains("refund"), "{text}");
        assert!(text.contains("REDACTED"), "{text}");
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
