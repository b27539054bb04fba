//! The Kafka side of the events service: the history consumer and replays.

use std::sync::Arc;
use std::time::Duration;

use anumate_errors::{Error, ErrorCode, Result};
use anumate_events::OutboxRow;
use anumate_events::cloudevents;
use anumate_events::consumer::{self, ConsumerConfig, ConsumerHandle};
use anumate_events::relay::KafkaConfig;
use anumate_proto::events::v1 as pb;
use anumate_store::Store;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::Events;
use crate::history::NewEvent;

/// Every Anumate event topic.
pub fn event_topics() -> Vec<String> {
    let mut topics: Vec<String> = anumate_events::all_event_types()
        .map(|(_, t)| t.topic.clone())
        .collect();
    topics.sort();
    topics.dedup();
    topics
}

fn rfc3339_to_micros(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// A received CloudEvent as a history row (`None` when it lacks a tenant or
/// type: the consumer dead-letters it).
pub fn to_new_event(e: &consumer::Event) -> std::result::Result<NewEvent, String> {
    if e.tenant_id.is_empty() {
        return Err("no ce_tenantid header".into());
    }
    if e.event_type.is_empty() {
        return Err("no ce_type header".into());
    }
    let time = rfc3339_to_micros(&e.time).unwrap_or_else(anumate_store::now_micros);
    let opt = |k: &str| e.header(k).filter(|v| !v.is_empty()).map(str::to_string);
    Ok(NewEvent {
        event_id: e.id.clone(),
        tenant_id: e.tenant_id.clone(),
        source: e.source.clone(),
        topic: e.topic.clone(),
        event_type: e.event_type.clone(),
        key: String::from_utf8_lossy(&e.key).into_owned(),
        subject: e.subject.clone(),
        content_type: if e.content_type.is_empty() {
            crate::PROTOBUF.to_string()
        } else {
            e.content_type.clone()
        },
        payload: e.data.clone(),
        plan_hash: opt("ce_planhash"),
        traceparent: opt("ce_traceparent"),
        time_micros: time,
        outbox_seq: e
            .header("ce_sequence")
            .or_else(|| e.header("anumate_outbox_seq"))
            .and_then(|s| s.parse().ok()),
        replay: e.is_replay(),
    })
}

/// Starts the history consumer: every Anumate topic, group
/// `history_group`, each CloudEvent recorded in the history.
pub fn spawn_history_consumer(
    events: &Events,
    bootstrap_servers: &str,
) -> std::result::Result<ConsumerHandle, consumer::ConsumerError> {
    let topics = event_topics();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let cfg = ConsumerConfig::new(bootstrap_servers, &events.cfg.history_group, &topics);
    let events = events.clone();
    consumer::spawn(events.store.clone(), cfg, move |e: Arc<consumer::Event>| {
        let events = events.clone();
        async move {
            let row = to_new_event(&e)?;
            events
                .record(std::slice::from_ref(&row))
                .await
                .map_err(|err| format!("recording in the event history: {err}"))?;
            Ok::<(), String>(())
        }
    })
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Events committed at or after this time (Unix microseconds).
    Time(i64),
    /// Events at or after this outbox sequence.
    Sequence(i64),
}

/// Publishes archived outbox rows again, marked as replays.
pub struct Replayer {
    producer: FutureProducer,
    cfg: KafkaConfig,
}

impl Replayer {
    /// A replayer publishing to the configured brokers with the idempotent
    /// producer, in each topic's configured content mode.
    pub fn new(cfg: &KafkaConfig) -> std::result::Result<Replayer, rdkafka::error::KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "15000")
            .create()?;
        Ok(Replayer {
            producer,
            cfg: cfg.clone(),
        })
    }

    /// Republishes up to `limit` archived (sent) outbox rows of `tenant` on
    /// `topic` from `from`, in outbox order.
    pub async fn replay(
        &self,
        store: &Store,
        tenant: &str,
        topic: &str,
        from: ReplayFrom,
        limit: i64,
    ) -> Result<pb::ReplayEventsResponse> {
        let replay_id = uuid::Uuid::now_v7().to_string();
        let (cond, value): (&str, i64) = match from {
            ReplayFrom::Time(t) => ("created_at >= $3", t),
            ReplayFrom::Sequence(s) => ("seq >= $3", s),
        };
        let tx = store.read(tenant).await?;
        let rows = tx
            .query_all(
                &format!(
                    "SELECT seq, event_id, tenant_id, topic, event_type, aggregate_key, subject, \
                       payload, plan_hash, traceparent, created_at FROM outbox \
                     WHERE tenant_id = $1 AND topic = $2 AND sent_at IS NOT NULL AND {cond} \
                     ORDER BY seq LIMIT $4"
                ),
                vec![
                    tenant.into(),
                    topic.into(),
                    value.into(),
                    (limit + 1).into(),
                ],
            )
            .await?;
        drop(tx);
        let rows = rows
            .iter()
            .map(|r| {
                Ok(OutboxRow {
                    seq: r.try_get("", "seq")?,
                    event_id: r.try_get("", "event_id")?,
                    tenant_id: r.try_get("", "tenant_id")?,
                    topic: r.try_get("", "topic")?,
                    event_type: r.try_get("", "event_type")?,
                    aggregate_key: r.try_get("", "aggregate_key")?,
                    subject: r.try_get("", "subject")?,
                    payload: r.try_get("", "payload")?,
                    plan_hash: r.try_get("", "plan_hash")?,
                    traceparent: r.try_get("", "traceparent")?,
                    created_at: r.try_get("", "created_at")?,
                })
            })
            .collect::<std::result::Result<Vec<_>, anumate_store::DbErr>>()
            .map_err(Error::internal)?;
        let truncated = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
        let mut out = pb::ReplayEventsResponse {
            replay_id: replay_id.clone(),
            truncated,
            ..Default::default()
        };
        let mode = self.cfg.mode(topic);
        // One at a time, in order: the idempotent producer keeps the order per
        // key across retries, and a failure reports where to resume.
        for row in rows.iter().take(usize::try_from(limit).unwrap_or(0)) {
            let Some(data) = cloudevents::data(row, mode) else {
                tracing::warn!(ce_id = %row.event_id, "archived event does not decode; not replayed");
                continue;
            };
            let mut attrs = cloudevents::attributes(row, mode);
            attrs.push(("ce_replay", "true".into()));
            attrs.push(("ce_replayid", replay_id.clone()));
            let headers = attrs.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
                h.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                })
            });
            let record = FutureRecord::to(topic)
                .key(&row.aggregate_key)
                .payload(&data)
                .headers(headers);
            if let Err((e, _)) = self.producer.send(record, Duration::from_secs(10)).await {
                tracing::warn!(error = %e, replay_id, "replay publish failed");
                return Err(Error::new(
                    ErrorCode::Unavailable,
                    format!(
                        "Kafka did not take the replay after {} events: {e}; retry from sequence {}",
                        out.replayed_count, row.seq
                    ),
                ));
            }
            if out.first_sequence == 0 {
                out.first_sequence = row.seq;
            }
            out.last_sequence = row.seq;
            out.replayed_count += 1;
        }
        tracing::info!(
            tenant,
            topic,
            replay_id,
            count = out.replayed_count,
            "replayed"
        );
        Ok(out)
    }
}
