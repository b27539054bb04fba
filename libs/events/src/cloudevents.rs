//! The CloudEvents 1.0 Kafka protocol binding, binary content mode, written out
//! by hand (it is a header mapping): every attribute is a `ce_<name>` header,
//! the data is the message value, its media type the `content-type` header and
//! the Kafka key the aggregate id.
//!
//! Attributes Anumate sets: `ce_specversion` (`1.0`), `ce_id` (the outbox
//! event id, a UUIDv7, stable across redeliveries so consumers dedupe on it),
//! `ce_source` (`/anumate/<domain>`), `ce_type`, `ce_subject`, `ce_time`
//! (commit time, RFC 3339 UTC), `content-type` and the extensions
//! `ce_tenantid`, `ce_traceparent`, `ce_planhash` (when the event has them)
//! and `ce_sequence` (the outbox sequence number, for replay positions).

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use rdkafka::message::{Header, OwnedHeaders};

use crate::OutboxRow;

/// `content-type` of proto-encoded data (the default).
pub const PROTOBUF: &str = "application/protobuf";
/// `content-type` of proto3-JSON-encoded data.
pub const JSON: &str = "application/json";

/// How event data is encoded on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentMode {
    /// The proto bytes as stored in the outbox.
    #[default]
    Protobuf,
    /// Proto3 JSON mapping of the message.
    Json,
}

impl ContentMode {
    /// The `content-type` header value.
    pub fn content_type(self) -> &'static str {
        match self {
            ContentMode::Protobuf => PROTOBUF,
            ContentMode::Json => JSON,
        }
    }

    /// Parses a configured content type (`application/protobuf`, `protobuf`,
    /// `application/json`, `json`).
    pub fn parse(s: &str) -> Option<ContentMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "application/protobuf" | "application/x-protobuf" | "protobuf" | "proto" => {
                Some(ContentMode::Protobuf)
            }
            "application/json" | "json" => Some(ContentMode::Json),
            _ => None,
        }
    }
}

/// `ce_source` of events on `topic`: `anumate.capsules` → `/anumate/capsules`.
pub fn source_of_topic(topic: &str) -> String {
    format!(
        "/anumate/{}",
        topic.strip_prefix("anumate.").unwrap_or(topic)
    )
}

/// `ce_time` for a commit time in Unix microseconds.
pub fn time_of_micros(micros: i64) -> String {
    anumate_proto::rfc3339_from_micros(micros).unwrap_or_default()
}

/// The `(name, value)` attribute headers of one outbox row, in order.
pub fn attributes(row: &OutboxRow, mode: ContentMode) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("ce_specversion", "1.0".to_string()),
        ("ce_id", row.event_id.clone()),
        ("ce_source", source_of_topic(&row.topic)),
        ("ce_type", row.event_type.clone()),
    ];
    if !row.subject.is_empty() {
        out.push(("ce_subject", row.subject.clone()));
    }
    out.push(("ce_time", time_of_micros(row.created_at)));
    out.push(("content-type", mode.content_type().to_string()));
    out.push(("ce_tenantid", row.tenant_id.clone()));
    if let Some(t) = row.traceparent.as_ref().filter(|t| !t.is_empty()) {
        out.push(("ce_traceparent", t.clone()));
    }
    if let Some(p) = row.plan_hash.as_ref().filter(|p| !p.is_empty()) {
        out.push(("ce_planhash", p.clone()));
    }
    out.push(("ce_sequence", row.seq.to_string()));
    out
}

/// The Kafka headers of one outbox row.
pub fn headers(row: &OutboxRow, mode: ContentMode) -> OwnedHeaders {
    attributes(row, mode)
        .iter()
        .fold(OwnedHeaders::new_with_capacity(12), |h, (k, v)| {
            h.insert(Header {
                key: k,
                value: Some(v.as_str()),
            })
        })
}

/// The message descriptor of CloudEvents type `ce_type`.
pub fn descriptor_of_type(ce_type: &str) -> Option<MessageDescriptor> {
    let name = crate::all_event_types()
        .find(|(_, t)| t.cloudevent_type == ce_type)
        .map(|(name, _)| name)?;
    let pool = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).ok()?;
    pool.get_message_by_name(name)
}

/// The message value of one row in `mode`: the stored proto bytes, or their
/// proto3 JSON mapping (`None` when the row cannot be decoded as its type).
pub fn data(row: &OutboxRow, mode: ContentMode) -> Option<Vec<u8>> {
    match mode {
        ContentMode::Protobuf => Some(row.payload.clone()),
        ContentMode::Json => {
            let desc = descriptor_of_type(&row.event_type)?;
            let msg = DynamicMessage::decode(desc, row.payload.as_slice()).ok()?;
            serde_json::to_vec(&msg).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use anumate_proto::events::v1::CapsulePublished;
    use prost::Message as _;

    fn row() -> OutboxRow {
        OutboxRow {
            seq: 7,
            event_id: "0190-id".into(),
            tenant_id: "t1".into(),
            topic: "anumate.capsules".into(),
            event_type: "dev.anumate.capsule.published.v1".into(),
            aggregate_key: "refund".into(),
            subject: "capsules/refund/versions/3".into(),
            payload: CapsulePublished {
                tenant_id: "t1".into(),
                name: "refund".into(),
                version: 3,
                ..Default::default()
            }
            .encode_to_vec(),
            plan_hash: None,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            created_at: 1_764_000_000_123_456,
        }
    }

    #[test]
    fn binary_mode_attributes() {
        let attrs = attributes(&row(), ContentMode::Protobuf);
        let get = |k: &str| attrs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ce_specversion"), Some("1.0"));
        assert_eq!(get("ce_id"), Some("0190-id"));
        assert_eq!(get("ce_source"), Some("/anumate/capsules"));
        assert_eq!(get("ce_type"), Some("dev.anumate.capsule.published.v1"));
        assert_eq!(get("ce_subject"), Some("capsules/refund/versions/3"));
        assert_eq!(get("ce_time"), Some("2025-11-24T16:00:00.123456Z"));
        assert_eq!(get("content-type"), Some("application/protobuf"));
        assert_eq!(get("ce_tenantid"), Some("t1"));
        assert!(get("ce_traceparent").unwrap().starts_with("00-0af7"));
        assert_eq!(get("ce_planhash"), None);
        assert_eq!(get("ce_sequence"), Some("7"));
    }

    #[test]
    fn json_data_is_the_proto3_json_mapping() {
        let data = data(&row(), ContentMode::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&data).unwrap();
        assert_eq!(v["name"], "refund");
        assert_eq!(v["tenantId"], "t1");
        assert_eq!(ContentMode::parse("JSON"), Some(ContentMode::Json));
        assert_eq!(ContentMode::parse("xml"), None);
    }
}
