//! The per-call span every server opens, continuing its caller's trace, and
//! the trace context every outgoing gRPC call carries.
//!
//! A call's span is a child of the `traceparent` it arrived with (a gRPC
//! metadata entry, or the REST client's header at the gateway), and each
//! call a service makes while serving it carries that span's `traceparent`:
//! with `[telemetry] otlp_endpoint` set on every process, one trace runs from
//! the gateway through every service a request touches (and, through the
//! outbox's `ce_traceparent`, into the consumers of its events).

use anumate_telemetry::TRACEPARENT;
pub use anumate_telemetry::propagation::CallSpan;

/// Sets `traceparent` on an outgoing call's metadata to the current span's,
/// when there is one to propagate (else leaves the metadata as it is).
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if let Some(tp) = anumate_telemetry::current_traceparent()
        && let Ok(mut value) = tonic::metadata::AsciiMetadataValue::try_from(tp)
    {
        // New on every call: never worth an HPACK table entry.
        value.set_sensitive(true);
        metadata.insert(TRACEPARENT, value);
    }
}
