//! W3C trace context (`traceparent`) across process boundaries: read from
//! an incoming call or event, written onto an outgoing one, so that one trace
//! spans the gateway, the services it calls, the services they call, and the
//! consumers of the events they publish.
//!
//! Without an OpenTelemetry layer (no `[telemetry] otlp_endpoint`), spans
//! carry no trace context: nothing is read or written then.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::CALL_SPAN_TARGET;

/// The header (and gRPC metadata key, and Kafka header after its `ce_`
/// prefix) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C `traceparent` of the current `tracing` span, when an OpenTelemetry
/// layer records it (`None` without one, or outside any span).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// The W3C `traceparent` of `span` (see [`current_traceparent`]).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return None;
    }
    Some(format!(
        "00-{:032x}-{:016x}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    ))
}

/// The W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) as a remote
/// parent context, or `None` when it is absent or malformed.
pub fn parse_traceparent(traceparent: &str) -> Option<opentelemetry::Context> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00"
        || parts.next().is_some()
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(sc))
}

/// Makes `span` a child of the trace named by `traceparent` (a server
/// continuing its caller's trace, a consumer its producer's). A missing or
/// malformed value, a disabled span, or no OpenTelemetry layer installed,
/// leaves the span as it is.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    if let Some(cx) = traceparent.and_then(parse_traceparent) {
        let _ = span.set_parent(cx);
    }
}

/// Opens the span of one call (at DEBUG, under `tower_http`'s target: it
/// costs nothing unless logged or exported) as a child of the request's
/// `traceparent`, named after its path (the gRPC method) for the exporter.
#[derive(Debug, Clone, Copy)]
pub struct CallSpan {
    grpc: bool,
}

impl CallSpan {
    /// The span of a gRPC server call (`otel.name` = `/package.Service/Method`).
    pub const fn grpc() -> CallSpan {
        CallSpan { grpc: true }
    }

    /// The span of an HTTP request (`otel.name` = `METHOD /path`).
    pub const fn http() -> CallSpan {
        CallSpan { grpc: false }
    }
}

impl<B> tower_http::trace::MakeSpan<B> for CallSpan {
    fn make_span(&mut self, request: &http::Request<B>) -> tracing::Span {
        let path = request.uri().path();
        let span = if self.grpc {
            tracing::debug_span!(
                target: CALL_SPAN_TARGET,
                "request",
                otel.name = path,
                otel.kind = "server",
                rpc.system = "grpc",
                method = %request.method(),
                uri = %request.uri(),
                version = ?request.version(),
            )
        } else {
            tracing::debug_span!(
                target: CALL_SPAN_TARGET,
                "request",
                otel.name = format_args!("{} {path}", request.method()).to_string(),
                otel.kind = "server",
                method = %request.method(),
                uri = %request.uri(),
                version = ?request.version(),
            )
        };
        let incoming = request
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        continue_trace(&span, incoming);
        span
    }
}

/// Sets `traceparent` on an outgoing gRPC call's metadata to the current
/// span's, when there is one to propagate (else leaves the metadata as it is).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(tp) = current_traceparent()
        && let Ok(mut value) = tonic::metadata::AsciiMetadataValue::try_from(tp)
    {
        // New on every call: never worth an HPACK table entry.
        value.set_sensitive(true);
        metadata.insert(TRACEPARENT, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-xx",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} accepted");
        }
        assert!(
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").is_some()
        );
    }

    #[test]
    fn a_span_continues_the_trace_it_is_given() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
            let span = tracing::info_span!("call");
            continue_trace(&span, Some(incoming));
            let out = span.in_scope(current_traceparent).expect("a traceparent");
            // Same trace, a new span of its own, still sampled.
            assert!(
                out.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                "{out}"
            );
            assert!(!out.contains("b7ad6b7169203331"), "{out}");
            assert!(out.ends_with("-01"), "{out}");
            // Outside any span: nothing to propagate.
            assert_eq!(current_traceparent(), None);
        });
    }
}
