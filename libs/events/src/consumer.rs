//! A small typed Kafka consumer for Anumate CloudEvents: one consumer group,
//! dedupe by CloudEvent id in the database, retries with backoff, and a
//! dead-letter topic.
//!
//! For each message, in partition order:
//! 1. A message without a `ce_id` header is not a CloudEvent: it goes to the
//!    dead-letter topic at once.
//! 2. If `consumed_events` already holds `(group, ce_id)` the message is a
//!    duplicate (a redelivery, a relay retry, a replay): skipped.
//! 3. The handler runs; an error is retried with exponential backoff, up to
//!    `max_attempts` attempts in all.
//! 4. After the last failed attempt the message is published to the
//!    dead-letter topic (`anumate.dlq`) with the original key, value and
//!    headers plus `anumate_dlq_reason`, `anumate_dlq_topic`,
//!    `anumate_dlq_partition`, `anumate_dlq_offset`, `anumate_dlq_group` and
//!    `anumate_dlq_attempts`, and the consumer moves on.
//! 5. The outcome is inserted into `consumed_events` (a unique insert keyed by
//!    `(group_id, event_id)`) and only then is the offset stored for commit.
//!
//! Delivery to the handler is therefore at least once, and exactly once as far
//! as ids go unless the process dies between the handler's success and the
//! insert; handlers that write to the database can make that window vanish by
//! being idempotent per event id.
//!
//! rdkafka's consumer destructor blocks (it leaves the group): it is dropped
//! on a blocking thread, never on an async worker.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anumate_store::{Migration, Store};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::watch;
use tracing::Instrument as _;

/// The dead-letter topic.
pub const DLQ_TOPIC: &str = "anumate.dlq";

/// Header naming why a message was dead-lettered.
pub const DLQ_REASON_HEADER: &str = "anumate_dlq_reason";

/// The `consumed_events` table: one row per (group, CloudEvent id) handled
/// or dead-lettered. Not a tenant table: it belongs to the consumer, not to
/// the event's tenant.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "events_0101_consumed_events",
    postgres: CONSUMED_EVENTS,
    sqlite: CONSUMED_EVENTS,
    tenant_tables: &[],
}];

/// The same DDL on both backends.
const CONSUMED_EVENTS: &str = "CREATE TABLE consumed_events (
        group_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        kafka_partition INTEGER NOT NULL,
        kafka_offset BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        consumed_at BIGINT NOT NULL,
        PRIMARY KEY (group_id, event_id)
      )";

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    pub bootstrap_servers: String,
    /// Consumer group; also the dedupe scope.
    pub group_id: String,
    /// Topics to read.
    pub topics: Vec<String>,
    /// Handler attempts per message before it is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles per attempt.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Dead-letter topic.
    pub dlq_topic: String,
    /// Extra librdkafka properties (e.g. `auto.offset.reset`).
    pub properties: Vec<(String, String)>,
    /// TLS and SASL of the consumer and its dead-letter producer (usually
    /// `[kafka.security]`).
    pub security: crate::security::KafkaSecurity,
}

impl ConsumerConfig {
    /// Defaults: 5 attempts, 100 ms doubling to 5 s, `anumate.dlq`, new groups
    /// start at the earliest offset.
    pub fn new(bootstrap_servers: &str, group_id: &str, topics: &[&str]) -> ConsumerConfig {
        ConsumerConfig {
            bootstrap_servers: bootstrap_servers.to_string(),
            group_id: group_id.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            dlq_topic: DLQ_TOPIC.to_string(),
            properties: Vec::new(),
            security: crate::security::KafkaSecurity::default(),
        }
    }
}

/// Consumer errors (at start-up; running consumers log and retry).
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The Kafka client could not be created or subscribed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The configuration is unusable.
    #[error("consumer configuration: {0}")]
    Config(String),
    /// `[kafka.security]` is unusable.
    #[error(transparent)]
    Security(#[from] crate::security::KafkaSecurityError),
}

/// One received CloudEvent (Kafka binary content mode).
#[derive(Debug, Clone)]
pub struct Event {
    /// `ce_id`.
    pub id: String,
    /// `ce_type`.
    pub event_type: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_subject`.
    pub subject: String,
    /// `ce_time` (RFC 3339), as sent.
    pub time: String,
    /// `ce_tenantid`.
    pub tenant_id: String,
    /// `content-type`.
    pub content_type: String,
    /// Topic it was read from.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Kafka key.
    pub key: Vec<u8>,
    /// Every header, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The data (message value).
    pub data: Vec<u8>,
}

impl Event {
    /// The first header named `name`, as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Whether the event was republished by a replay (`ce_replay: true`).
    pub fn is_replay(&self) -> bool {
        self.header("ce_replay") == Some("true")
    }

    /// Decodes protobuf data as `M`.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.data.as_slice())
    }

    fn from_message<M: rdkafka::Message>(m: &M) -> Event {
        let headers: Vec<(String, Vec<u8>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut e = Event {
            id: String::new(),
            event_type: String::new(),
            source: String::new(),
            subject: String::new(),
            time: String::new(),
            tenant_id: String::new(),
            content_type: String::new(),
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
            data: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers,
        };
        let get = |e: &Event, k: &str| e.header(k).unwrap_or_default().to_string();
        e.id = get(&e, "ce_id");
        e.event_type = get(&e, "ce_type");
        e.source = get(&e, "ce_source");
        e.subject = get(&e, "ce_subject");
        e.time = get(&e, "ce_time");
        e.tenant_id = get(&e, "ce_tenantid");
        e.content_type = get(&e, "content-type");
        e
    }
}

/// Counters of a running consumer.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages the handler accepted.
    pub handled: AtomicU64,
    /// Messages skipped as already consumed.
    pub duplicates: AtomicU64,
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Failed handler attempts.
    pub failures: AtomicU64,
}

/// A running consumer.
pub struct ConsumerHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<ConsumerStats>,
}

impl ConsumerHandle {
    /// The consumer's counters.
    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    /// Stops after the message in hand and leaves the group.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts a consumer on the current runtime. `handler` is called once per new
/// CloudEvent; an `Err` is retried, then dead-lettered.
pub fn spawn<H, F, E>(
    store: Store,
    cfg: ConsumerConfig,
    handler: H,
) -> Result<ConsumerHandle, ConsumerError>
where
    H: Fn(Arc<Event>) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + 'static,
{
    if cfg.topics.is_empty() || cfg.group_id.is_empty() {
        return Err(ConsumerError::Config(
            "a consumer needs a group id and at least one topic".into(),
        ));
    }
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "true")
        // Kafka's pre-3.0 defaults: a dead member is noticed (and a new one
        // joins) within seconds rather than 45 s.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    cfg.security.apply(&mut client)?;
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    let consumer: StreamConsumer = client.create()?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let mut dlq = ClientConfig::new();
    dlq.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000");
    cfg.security.apply(&mut dlq)?;
    let producer: FutureProducer = dlq.create()?;
    let (stop, stop_rx) = watch::channel(false);
    let stats = Arc::new(ConsumerStats::default());
    let worker = Worker {
        store,
        cfg,
        producer,
        stats: stats.clone(),
        stop: stop_rx,
    };
    let task = tokio::spawn(worker.run(consumer, handler));
    Ok(ConsumerHandle { stop, task, stats })
}

/// Wait before attempt `attempt + 1`: doubling from `initial_backoff`, capped.
fn backoff(cfg: &ConsumerConfig, attempt: u32) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
    cfg.initial_backoff
        .saturating_mul(factor)
        .min(cfg.max_backoff)
}

struct Worker {
    store: Store,
    cfg: ConsumerConfig,
    producer: FutureProducer,
    stats: Arc<ConsumerStats>,
    stop: watch::Receiver<bool>,
}

/// What happened to one message.
enum Outcome {
    Handled,
    DeadLettered,
    Duplicate,
    Stopped,
}

impl Worker {
    fn backoff(&self, attempt: u32) -> Duration {
        backoff(&self.cfg, attempt)
    }

    /// Sleeps unless asked to stop; false when stopping.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.changed() => false,
            _ = tokio::time::sleep(d) => !*self.stop.borrow(),
        }
    }

    async fn run<H, F, E>(mut self, consumer: StreamConsumer, handler: H)
    where
        H: Fn(Arc<Event>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        loop {
            if *self.stop.borrow() {
                break;
            }
            let msg = tokio::select! {
                _ = self.stop.changed() => break,
                m = consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(group = %self.cfg.group_id, error = %e, "kafka receive failed");
                    if !self.pause(self.cfg.initial_backoff).await {
                        break;
                    }
                    continue;
                }
            };
            let event = Arc::new(Event::from_message(&msg));
            match self.process(event, &handler).await {
                Outcome::Stopped => break,
                Outcome::Handled => {
                    self.stats.handled.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::DeadLettered => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Duplicate => {
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Err(e) = consumer.store_offset_from_message(&msg) {
                tracing::warn!(group = %self.cfg.group_id, error = %e, "cannot store offset");
            }
        }
        // Commit what was stored and leave the group, both blocking calls, off
        // the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit");
            }
            drop(consumer);
        })
        .await;
    }

    async fn process<H, F, E>(&mut self, event: Arc<Event>, handler: &H) -> Outcome
    where
        H: Fn(Arc<Event>) -> F,
        F: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        if event.id.is_empty() {
            return match self
                .dead_letter(&event, "not a CloudEvent: no ce_id header", 0)
                .await
            {
                true => Outcome::DeadLettered,
                false => Outcome::Stopped,
            };
        }
        // Dedupe; a database outage is waited out, not dead-lettered.
        let mut wait = 0;
        loop {
            match self.seen(&event.id).await {
                Ok(true) => return Outcome::Duplicate,
                Ok(false) => break,
                Err(e) => {
                    wait += 1;
                    tracing::warn!(group = %self.cfg.group_id, error = %e, "dedupe lookup failed; retrying");
                    if !self.pause(self.backoff(wait)).await {
                        return Outcome::Stopped;
                    }
                }
            }
        }
        let mut attempt = 0;
        let reason = loop {
            attempt += 1;
            // The handler runs in a span that continues the trace that
            // produced the event (`ce_traceparent`): its spans and logs join
            // that trace.
            let span = tracing::info_span!(
                "consume",
                group = %self.cfg.group_id,
                ce_id = %event.id,
                ce_type = %event.event_type,
                traceparent = event.header("ce_traceparent").unwrap_or_default(),
                attempt,
            );
            crate::continue_trace(&span, event.header("ce_traceparent"));
            let reason = match handler(event.clone()).instrument(span).await {
                Ok(()) => break None,
                Err(e) => e.to_string(),
            };
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(group = %self.cfg.group_id, ce_id = %event.id, attempt, error = %reason, "handler failed");
            if attempt >= self.cfg.max_attempts.max(1) {
                break Some(reason);
            }
            if !self.pause(self.backoff(attempt)).await {
                return Outcome::Stopped;
            }
        };
        let outcome = match reason {
            None => Outcome::Handled,
            Some(reason) => {
                if !self.dead_letter(&event, &reason, attempt).await {
                    return Outcome::Stopped;
                }
                Outcome::DeadLettered
            }
        };
        let label = match outcome {
            Outcome::Handled => "handled",
            _ => "dead_lettered",
        };
        let mut wait = 0;
        loop {
            match self.mark(&event, label).await {
                Ok(()) => break,
                Err(e) => {
                    wait += 1;
                    tracing::warn!(group = %self.cfg.group_id, error = %e, "cannot record consumed event; retrying");
                    if !self.pause(self.backoff(wait)).await {
                        return Outcome::Stopped;
                    }
                }
            }
        }
        outcome
    }

    async fn seen(&self, id: &str) -> Result<bool, anumate_store::StoreError> {
        let tx = self.store.system_read().await?;
        let row = tx
            .query_one(
                "SELECT 1 AS one FROM consumed_events WHERE group_id = $1 AND event_id = $2",
                vec![self.cfg.group_id.as_str().into(), id.into()],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn mark(&self, e: &Event, outcome: &str) -> Result<(), anumate_store::StoreError> {
        let tx = self.store.system_write().await?;
        tx.execute(
            "INSERT INTO consumed_events (group_id, event_id, topic, kafka_partition, kafka_offset, \
               outcome, consumed_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (group_id, event_id) DO NOTHING",
            vec![
                self.cfg.group_id.as_str().into(),
                e.id.as_str().into(),
                e.topic.as_str().into(),
                e.partition.into(),
                e.offset.into(),
                outcome.into(),
                anumate_store::now_micros().into(),
            ],
        )
        .await?;
        tx.commit().await
    }

    /// Publishes `e` to the dead-letter topic, retrying until the broker takes
    /// it; false when asked to stop first.
    async fn dead_letter(&mut self, e: &Event, reason: &str, attempts: u32) -> bool {
        let partition = e.partition.to_string();
        let offset = e.offset.to_string();
        let attempts = attempts.to_string();
        let mut wait = 0;
        loop {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &e.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            for (k, v) in [
                (DLQ_REASON_HEADER, reason),
                ("anumate_dlq_topic", e.topic.as_str()),
                ("anumate_dlq_partition", partition.as_str()),
                ("anumate_dlq_offset", offset.as_str()),
                ("anumate_dlq_group", self.cfg.group_id.as_str()),
                ("anumate_dlq_attempts", attempts.as_str()),
            ] {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let record = FutureRecord::to(&self.cfg.dlq_topic)
                .key(&e.key)
                .payload(&e.data)
                .headers(headers);
            match self.producer.send(record, Duration::from_secs(10)).await {
                Ok(_) => {
                    tracing::warn!(group = %self.cfg.group_id, ce_id = %e.id, topic = %e.topic, partition = e.partition, offset = e.offset, reason, "dead-lettered");
                    return true;
                }
                Err((err, _)) => {
                    wait += 1;
                    tracing::warn!(error = %err, "cannot publish to the dead-letter topic; retrying");
                    if !self.pause(self.backoff(wait)).await {
                        return false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut cfg = ConsumerConfig::new("x", "g", &["t"]);
        cfg.initial_backoff = Duration::from_millis(100);
        cfg.max_backoff = Duration::from_millis(350);
        assert_eq!(backoff(&cfg, 1), Duration::from_millis(100));
        assert_eq!(backoff(&cfg, 2), Duration::from_millis(200));
        assert_eq!(backoff(&cfg, 3), Duration::from_millis(350));
        assert_eq!(backoff(&cfg, 40), Duration::from_millis(350));
    }
}
