//! The Kafka side of the events service: the history consumer and replays.
//!
//! ## Which tenant a Kafka message belongs to
//! A Kafka header is not a credential: anyone who can produce to a topic
//! writes any `ce_tenantid`. The history consumer therefore records a message
//! only when
//! - it arrived on an Anumate topic (`anumate.*`, the topics of the event
//!   registry) and its `ce_type` is a registered type *of that topic*;
//! - its data decodes as that type's message (protobuf, or proto3 JSON on a
//!   JSON topic); and
//! - the `tenant_id` inside that message equals `ce_tenantid`: every event
//!   message carries its tenant, written by the service in the tenant's own
//!   transaction.
//!
//! Anything else is dead-lettered with the reason (`anumate_dlq_reason`) and a
//! warning. What this does not stop is a producer forging header *and* data
//! consistently: the trust anchor is the broker. Deployments must grant
//! write access to the `anumate.*` topics only to the platform's relay
//! principal (Kafka ACLs over SASL/TLS); the history consumer trusts exactly
//! those topics and nothing a message says about itself beyond the checks
//! above. Signed events (`ce_signature`, see the report of issue #9) would
//! remove that dependence and are the next step.
//!
//! ## Store outages
//! A history write that fails for a reason that passes by itself (connection
//! lost or refused, pool timeout, lock or statement timeout, serialization
//! failure, database starting or shutting down; SQLite busy or locked) is
//! retried with backoff for as long as it takes, inside the handler: the
//! message is neither dead-lettered nor marked consumed, and its offset is
//! not stored for commit, so the partition waits and nothing is lost. Only
//! permanent failures (a message that is not a valid Anumate event, an
//! error the database will repeat) reach the consumer, which dead-letters
//! them at once (`max_attempts = 1`: retrying cannot change them). Entries
//! of the dedupe table `consumed_events` older than
//! `[events] consumed_retention_hours` are purged every few minutes.

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
use sea_orm::{DbErr, RuntimeErr};

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

/// The tenant inside the event's data, decoded as the message of `ce_type`
/// (protobuf, or proto3 JSON when the `content-type` says so).
fn tenant_in_data(e: &consumer::Event) -> std::result::Result<String, String> {
    let desc = crate::SCHEMAS
        .get(&e.event_type)
        .ok_or_else(|| format!("ce_type {:?} is not a registered event type", e.event_type))?;
    let msg = if e.content_type.starts_with(cloudevents::JSON) {
        let mut de = serde_json::Deserializer::from_slice(&e.data);
        prost_reflect::DynamicMessage::deserialize(desc.clone(), &mut de)
            .map_err(|err| format!("data is not a {} in JSON: {err}", desc.full_name()))?
    } else if e.content_type.is_empty() || e.content_type == cloudevents::PROTOBUF {
        prost_reflect::DynamicMessage::decode(desc.clone(), e.data.as_slice())
            .map_err(|err| format!("data is not a {}: {err}", desc.full_name()))?
    } else {
        return Err(format!("unsupported content-type {:?}", e.content_type));
    };
    msg.get_field_by_name("tenant_id")
        .and_then(|v| v.as_str().map(str::to_string))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{} carries no tenant_id", desc.full_name()))
}

/// Rejects text a history column cannot hold or that no Anumate producer
/// writes (control characters, including NUL, which PostgreSQL refuses).
fn check_header(name: &str, value: &str) -> std::result::Result<(), String> {
    if value.len() > 1024 || value.chars().any(char::is_control) {
        return Err(format!(
            "{name}: longer than 1024 bytes or has control characters"
        ));
    }
    Ok(())
}

/// A received CloudEvent as a history row, or why it is not one (the
/// consumer dead-letters it). The tenant is accepted only when the message
/// proves it as the [module docs](self) describe: registered type of the
/// topic it came on, data of that type, and the same tenant inside the data
/// as in `ce_tenantid`.
pub fn to_new_event(e: &consumer::Event) -> std::result::Result<NewEvent, String> {
    if e.tenant_id.is_empty() {
        return Err("no ce_tenantid header".into());
    }
    if e.event_type.is_empty() {
        return Err("no ce_type header".into());
    }
    for (name, value) in [
        ("ce_id", e.id.as_str()),
        ("ce_tenantid", e.tenant_id.as_str()),
        ("ce_type", e.event_type.as_str()),
        ("ce_source", e.source.as_str()),
        ("ce_subject", e.subject.as_str()),
        ("content-type", e.content_type.as_str()),
    ] {
        check_header(name, value)?;
    }
    if e.tenant_id.len() > 128 {
        return Err("ce_tenantid: longer than 128 bytes".into());
    }
    let Some(topic) = anumate_events::all_event_types()
        .find(|(_, t)| t.cloudevent_type == e.event_type)
        .map(|(_, t)| t.topic.as_str())
    else {
        return Err(format!(
            "ce_type {:?} is not a registered event type",
            e.event_type
        ));
    };
    if topic != e.topic {
        return Err(format!(
            "{} events belong on {topic}, not on {}",
            e.event_type, e.topic
        ));
    }
    let inside = tenant_in_data(e)?;
    if inside != e.tenant_id {
        return Err(format!(
            "ce_tenantid {:?} is not the tenant inside the event ({inside:?}): refused",
            e.tenant_id
        ));
    }
    let key = String::from_utf8(e.key.clone()).map_err(|_| "Kafka key is not UTF-8".to_string())?;
    check_header("key", &key)?;
    let opt = |k: &str| e.header(k).filter(|v| !v.is_empty()).map(str::to_string);
    let plan_hash = opt("ce_planhash");
    let traceparent = opt("ce_traceparent");
    for (name, value) in [
        ("ce_planhash", &plan_hash),
        ("ce_traceparent", &traceparent),
    ] {
        if let Some(v) = value {
            check_header(name, v)?;
        }
    }
    let time =
        anumate_proto::micros_from_rfc3339(&e.time).unwrap_or_else(anumate_store::now_micros);
    Ok(NewEvent {
        event_id: e.id.clone(),
        tenant_id: e.tenant_id.clone(),
        source: e.source.clone(),
        topic: e.topic.clone(),
        event_type: e.event_type.clone(),
        key,
        subject: e.subject.clone(),
        content_type: if e.content_type.is_empty() {
            crate::PROTOBUF.to_string()
        } else {
            e.content_type.clone()
        },
        payload: e.data.clone(),
        plan_hash,
        traceparent,
        time_micros: time,
        outbox_seq: e
            .header("ce_sequence")
            .or_else(|| e.header("anumate_outbox_seq"))
            .and_then(|s| s.parse().ok()),
        replay: e.is_replay(),
    })
}

/// Whether a store error passes by itself, so the write is worth retrying:
/// the connection is lost, refused or timed out, the database is starting,
/// shutting down or out of resources, a lock or statement timed out, a
/// transaction lost a serialization race (PostgreSQL classes 08, 40, 53, 57,
/// `55P03`), or SQLite is busy or locked.
pub fn is_transient(e: &anumate_store::StoreError) -> bool {
    let anumate_store::StoreError::Db(db) = e else {
        return false;
    };
    match db {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(x)) | DbErr::Query(RuntimeErr::SqlxError(x)) => {
            sqlx_transient(x)
        }
        _ => false,
    }
}

fn sqlx_transient(e: &sea_orm::sqlx::Error) -> bool {
    use sea_orm::sqlx::Error as E;
    match e {
        E::Io(_) | E::Tls(_) | E::Protocol(_) | E::PoolTimedOut | E::PoolClosed => true,
        E::Database(d) => match d.code() {
            // SQLite: the primary result code (low byte) BUSY or LOCKED.
            Some(code) => match code.parse::<u32>() {
                Ok(n) => matches!(n & 0xff, 5 | 6),
                Err(_) => {
                    ["08", "40", "53", "57"].iter().any(|c| code.starts_with(c)) || code == "55P03"
                }
            },
            None => false,
        },
        _ => false,
    }
}

/// The running history consumer, and its purge of old dedupe entries.
pub struct HistoryConsumer {
    consumer: ConsumerHandle,
    purger: tokio::task::JoinHandle<()>,
}

impl HistoryConsumer {
    /// The consumer's counters.
    pub fn stats(&self) -> &consumer::ConsumerStats {
        self.consumer.stats()
    }

    /// Stops after the message in hand and leaves the group. A write still
    /// waiting out a store outage after [`STOP_GRACE`] is left behind (it
    /// ends with the process): that message is neither marked consumed nor
    /// committed, so it is read again on the next start.
    pub async fn stop(self) {
        self.purger.abort();
        if tokio::time::timeout(STOP_GRACE, self.consumer.stop())
            .await
            .is_err()
        {
            tracing::warn!(
                "event history consumer still waiting for the database after {} s; its message is read again on the next start",
                STOP_GRACE.as_secs()
            );
        }
    }
}

/// Least time between two purges of the history consumer's dedupe entries.
const CONSUMED_PURGE_EVERY: Duration = Duration::from_secs(300);
/// Longest wait between two attempts of a history write.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(5);
/// How long [`HistoryConsumer::stop`] waits for the message in hand.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Deletes the history consumer group's `consumed_events` entries older than
/// `[events] consumed_retention_hours`; returns how many went.
pub async fn purge_consumed(events: &Events) -> Result<u64> {
    let hours = events.cfg.consumed_retention_hours;
    if hours == 0 {
        return Ok(0);
    }
    let keep = i64::try_from(hours)
        .unwrap_or(i64::MAX / 3_600_000_000)
        .saturating_mul(3_600_000_000);
    let cutoff = anumate_store::now_micros().saturating_sub(keep);
    let tx = events.store.system_write().await?;
    let n = tx
        .execute(
            "DELETE FROM consumed_events WHERE group_id = $1 AND consumed_at < $2",
            vec![events.cfg.history_group.as_str().into(), cutoff.into()],
        )
        .await?;
    tx.commit().await?;
    if n > 0 {
        tracing::info!(group = %events.cfg.history_group, purged = n, "consumed event ids past retention removed");
    }
    Ok(n)
}

/// Records one received event, waiting out transient store failures for as
/// long as they last (see the module docs); `Err` only for a permanent one.
async fn record_received(events: &Events, e: &consumer::Event) -> std::result::Result<(), String> {
    let row = to_new_event(e)?;
    let mut wait = Duration::from_millis(100);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match events.record_at(std::slice::from_ref(&row), None).await {
            Ok(_) => return Ok(()),
            Err(err) if is_transient(&err) => {
                tracing::warn!(ce_id = %e.id, attempt, retry_in_ms = wait.as_millis(), error = %err, "event history write failed (transient); retrying, not dead-lettering");
            }
            Err(err) => {
                tracing::warn!(ce_id = %e.id, error = %err, "event history write failed (permanent)");
                return Err(format!("recording in the event history: {err}"));
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RETRY_WAIT);
    }
}

/// Starts the history consumer: every Anumate topic, group
/// `history_group`, each CloudEvent that proves its tenant recorded in the
/// history; and the purge of the group's dedupe entries past
/// `consumed_retention_hours`. Connects to `kafka.brokers` with
/// `[kafka.security]`.
pub fn spawn_history_consumer(
    events: &Events,
    kafka: &KafkaConfig,
) -> std::result::Result<HistoryConsumer, consumer::ConsumerError> {
    let topics = event_topics();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut cfg = ConsumerConfig::new(&kafka.brokers, &events.cfg.history_group, &topics);
    cfg.security = kafka.security.clone();
    // Transient failures never leave the handler; what does is permanent.
    cfg.max_attempts = 1;
    let handler_events = events.clone();
    let consumer = consumer::spawn(events.store.clone(), cfg, move |e: Arc<consumer::Event>| {
        let events = handler_events.clone();
        async move { record_received(&events, &e).await }
    })?;
    let purge_events = events.clone();
    let purger = tokio::spawn(async move {
        loop {
            if let Err(e) = purge_consumed(&purge_events).await {
                tracing::warn!(error = %e, "purging consumed event ids failed; retrying later");
            }
            tokio::time::sleep(CONSUMED_PURGE_EVERY).await;
        }
    });
    Ok(HistoryConsumer { consumer, purger })
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
    pub fn new(
        cfg: &KafkaConfig,
    ) -> std::result::Result<Replayer, anumate_events::relay::RelayError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "15000");
        cfg.security.apply(&mut client)?;
        let producer = client.create()?;
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
                    "SELECT {} FROM outbox \
                     WHERE tenant_id = $1 AND topic = $2 AND sent_at IS NOT NULL AND {cond} \
                     ORDER BY seq LIMIT $4",
                    OutboxRow::SELECT_COLUMNS
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
            .map(OutboxRow::from_query)
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
