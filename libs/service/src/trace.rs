//! The per-call span every server opens, continuing its caller's trace, and
//! the trace context every outgoing gRPC call carries.
//!
//! A call's span is a child of the `traceparent` it arrived with (a gRPC
//! metadata entry, or the REST client's header at the gateway), and each
//! call a service makes while serving it carries that span's `traceparent`:
//! with `[telemetry] otlp_endpoint` set on every process, one trace runs from
//! the gateway through every service a request touches (and, through the
//! outbox's `ce_traceparent`, into the consumers of its events).

pub use anumate_telemetry::propagation::{CallSpan, inject};
