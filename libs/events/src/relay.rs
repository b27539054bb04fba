//! The outbox relay: publishes committed outbox rows to Kafka as CloudEvents
//! (binary content mode, see [`crate::cloudevents`]) and marks them sent.
//!
//! One pass:
//! 1. PostgreSQL: in one transaction, switched to the relay role (below),
//!    lock up to `batch_size` unsent rows in `seq` order with
//!    `FOR UPDATE SKIP LOCKED`, so several replicas' relays share the work
//!    without taking the same row. A row is held back when an earlier unsent
//!    row with the same topic and key is locked by another relay: a key's
//!    events never overtake each other. SQLite (embedded, one process): the
//!    unsent rows in `seq` order, no lock needed.
//! 2. Publish them all with the idempotent producer (`enable.idempotence`,
//!    `acks=all`: librdkafka keeps the per-partition order across its own
//!    retries), key = aggregate id.
//! 3. Wait for every delivery report; set `sent_at` on the delivered rows and
//!    commit. A crash between 2 and 3 leaves the rows unsent: they are
//!    published again with the same `ce_id`, which consumers dedupe on.
//!
//! While the broker is down, deliveries time out (`message_timeout_ms`), the
//! pass rolls back and the relay backs off exponentially; rows wait in the
//! outbox. Sent rows stay in the outbox as the replay archive until
//! `retention_hours` after `sent_at`, then a periodic purge deletes them.
//!
//! ## A row that fails, and poison rows
//! A key stops at its first failure in a pass: its later rows in the batch are
//! not handed to the producer (a failure librdkafka reports only in the
//! delivery report, after later rows of the key went out, leaves those rows
//! unsent too, so they are published again after the failed one). Other keys
//! keep flowing. Failures are of three kinds ([`ErrorKind`]):
//! - the broker's (unreachable, timed out, unknown topic, not authorized): not
//!   the row's fault; the pass fails and the relay backs off as a whole;
//! - permanent for the row (too large for `max_message_bytes` or the broker,
//!   invalid record, cannot be encoded): the row is *quarantined* at once;
//! - anything else: the row's `attempts` grows, it waits (doubling from
//!   100 ms up to `max_backoff_ms`, in `retry_at`) while every other key keeps
//!   flowing, and after `quarantine_after_attempts` attempts it is quarantined.
//!
//! A quarantined row (`quarantined_at`, `last_error`, `attempts` columns) is
//! skipped from then on, logged at ERROR with its outbox seq and event id, and
//! counted in [`RelayStats::quarantined`]; [`quarantined`] lists them. The
//! rows after it on its key stay held, so a key's events are never seen out of
//! order (`quarantine_holds_key = false` lets them go on without it). An
//! operator releases a quarantined row, after fixing its cause (e.g. raising
//! the size limit), with [`requeue`], or in SQL as the relay role:
//! `UPDATE outbox SET quarantined_at = NULL, attempts = 0, retry_at = NULL,
//! last_error = NULL WHERE seq = …`.
//!
//! ## Reading every tenant's rows
//! The outbox is a tenant table with forced row-level security. The relay is
//! not a tenant: on PostgreSQL it switches (`set_config('role', …, true)`, for
//! its transaction only) to the dedicated NOLOGIN role `anumate_relay`, created
//! by [`MIGRATION`], which has a policy `relay_all` on `outbox` alone and the
//! privileges SELECT, DELETE and UPDATE of `sent_at` and the failure columns
//! (`attempts`, `last_error`, `retry_at`, `quarantined_at`) on it and nothing
//! else. The
//! serving role keeps its tenant policy: it gains nothing, and a request
//! handler's query never runs as the relay role (only this module opens such a
//! transaction). The connecting login must be a member of `anumate_relay`
//! (the migration grants it to the migrating user; grant it to a separate
//! serving login yourself).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anumate_store::{Backend, Store};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use sea_orm::{
    ConnectionTrait, DatabaseTransaction, DbBackend, QueryResult, Statement, TransactionTrait,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::OutboxRow;
use crate::cloudevents::{self, ContentMode};
use crate::security::{KafkaSecurity, KafkaSecurityError};

/// Every Anumate topic, created on start-up if missing.
pub const TOPICS: &[&str] = &[
    "anumate.capsules",
    "anumate.policies",
    "anumate.tools",
    "anumate.plans",
    "anumate.preflights",
    "anumate.runs",
    "anumate.approvals",
    "anumate.tokens",
    "anumate.receipts",
    "anumate.dlq",
];

/// The PostgreSQL role the relay reads every tenant's outbox rows as.
pub const RELAY_ROLE: &str = "anumate_relay";

/// Schema for the relay: indexes for the per-key order check and the purge,
/// and (PostgreSQL) the relay role with its cross-tenant policy on `outbox`.
pub const MIGRATION: anumate_store::Migration = anumate_store::Migration {
    id: "events_0002_relay",
    postgres: "CREATE INDEX outbox_unsent_key ON outbox (aggregate_key, seq) WHERE sent_at IS NULL;
      CREATE INDEX outbox_sent_at ON outbox (sent_at) WHERE sent_at IS NOT NULL;
      DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anumate_relay') THEN
          CREATE ROLE anumate_relay NOLOGIN NOSUPERUSER NOBYPASSRLS;
        END IF;
      EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
      END $$;
      DO $$ BEGIN
        IF NOT pg_has_role(current_user, 'anumate_relay', 'MEMBER') THEN
          EXECUTE 'GRANT anumate_relay TO ' || quote_ident(current_user);
        END IF;
      END $$;
      GRANT USAGE ON SCHEMA public TO anumate_relay;
      GRANT SELECT, DELETE ON outbox TO anumate_relay;
      GRANT UPDATE (sent_at) ON outbox TO anumate_relay;
      CREATE POLICY relay_all ON outbox TO anumate_relay USING (true) WITH CHECK (true)",
    sqlite: "CREATE INDEX outbox_unsent_key ON outbox (aggregate_key, seq) WHERE sent_at IS NULL;
      CREATE INDEX outbox_sent_at ON outbox (sent_at) WHERE sent_at IS NOT NULL",
    tenant_tables: &[],
};

/// Schema for failing rows: attempts, the last error, when to try again and
/// when the row was quarantined (see the module docs), an index of the rows
/// that failed (the per-key hold checks it), and the relay role's right to
/// write those columns.
pub const QUARANTINE_MIGRATION: anumate_store::Migration = anumate_store::Migration {
    id: "events_0003_relay_quarantine",
    postgres: "ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE outbox ADD COLUMN last_error TEXT;
      ALTER TABLE outbox ADD COLUMN retry_at BIGINT;
      ALTER TABLE outbox ADD COLUMN quarantined_at BIGINT;
      CREATE INDEX outbox_failed_key ON outbox (topic, aggregate_key, seq)
        WHERE sent_at IS NULL AND attempts > 0;
      GRANT UPDATE (attempts, last_error, retry_at, quarantined_at) ON outbox TO anumate_relay",
    sqlite: "ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
      ALTER TABLE outbox ADD COLUMN last_error TEXT;
      ALTER TABLE outbox ADD COLUMN retry_at BIGINT;
      ALTER TABLE outbox ADD COLUMN quarantined_at BIGINT;
      CREATE INDEX outbox_failed_key ON outbox (topic, aggregate_key, seq)
        WHERE sent_at IS NULL AND attempts > 0",
    tenant_tables: &[],
};

/// `[kafka]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`. Empty: no Kafka; events
    /// stay in the outbox until a broker is configured.
    pub brokers: String,
    /// Partitions of topics created on start-up.
    pub partitions: i32,
    /// Replication factor of topics created on start-up.
    pub replication_factor: i32,
    /// Topics whose data is sent as proto3 JSON (`application/json`) instead
    /// of protobuf.
    pub json_topics: Vec<String>,
    /// Hours sent rows stay in the outbox archive (for replay). 0: forever.
    pub retention_hours: u64,
    /// Most rows per relay pass.
    pub batch_size: i64,
    /// Milliseconds between polls of an idle outbox (a cheap query on the
    /// partial index of unsent rows). It dominates the lag from commit to
    /// consumer: 10 ms gives p95 ≈ 33 ms at 1,000 events/s on Tansu.
    pub poll_ms: u64,
    /// Milliseconds librdkafka tries to deliver one message before the pass
    /// gives up and rolls back.
    pub message_timeout_ms: u64,
    /// `linger.ms` of the producer.
    pub linger_ms: u64,
    /// Longest back-off while the broker or database is down, milliseconds.
    pub max_backoff_ms: u64,
    /// PostgreSQL role the relay switches to (see the module docs). Empty: the
    /// connecting role as is.
    pub relay_role: String,
    /// Largest event the producer sends (`message.max.bytes`), bytes. Keep it
    /// at or below the brokers' limit: a larger event is then quarantined at
    /// once instead of failing on the broker.
    pub max_message_bytes: u64,
    /// Attempts a row that fails for a reason of its own gets before it is
    /// quarantined (a permanent error quarantines at once).
    pub quarantine_after_attempts: u32,
    /// Whether a quarantined row holds back the later rows of its key until it
    /// is requeued (true: a key's events stay in order) or they go on without
    /// it (false: the key's consumers miss that event, silently).
    pub quarantine_holds_key: bool,
    /// TLS and SASL of every Kafka client (`[kafka.security]`).
    pub security: KafkaSecurity,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            partitions: 3,
            replication_factor: 1,
            json_topics: Vec::new(),
            retention_hours: 24 * 7,
            batch_size: 500,
            poll_ms: 10,
            message_timeout_ms: 15_000,
            linger_ms: 1,
            max_backoff_ms: 5_000,
            relay_role: RELAY_ROLE.into(),
            max_message_bytes: 1_000_000,
            quarantine_after_attempts: 10,
            quarantine_holds_key: true,
            security: KafkaSecurity::default(),
        }
    }
}

impl KafkaConfig {
    /// Whether a broker is configured.
    pub fn enabled(&self) -> bool {
        !self.brokers.trim().is_empty()
    }

    /// Content mode of `topic`.
    pub fn mode(&self, topic: &str) -> ContentMode {
        if self.json_topics.iter().any(|t| t == topic) {
            ContentMode::Json
        } else {
            ContentMode::Protobuf
        }
    }
}

/// Relay errors.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Kafka client error.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Database error.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// Configuration error.
    #[error("kafka configuration: {0}")]
    Config(String),
    /// `[kafka.security]` is unusable.
    #[error(transparent)]
    Security(#[from] KafkaSecurityError),
    /// Some rows were not delivered.
    #[error("{failed} of {total} events not delivered: {first}")]
    Undelivered {
        /// Rows not delivered.
        failed: usize,
        /// Rows in the pass.
        total: usize,
        /// First delivery error.
        first: String,
    },
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassReport {
    /// Unsent rows fetched (locked).
    pub fetched: usize,
    /// Rows published and marked sent.
    pub sent: usize,
    /// Rows held back behind an earlier row of their key held by another
    /// relay, or behind a row of their key that failed in this pass.
    pub held_back: usize,
    /// Rows that failed for a reason of their own and wait to be tried again.
    pub retrying: usize,
    /// Rows quarantined in this pass.
    pub quarantined: usize,
}

/// Counters of one relay, for metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Rows published and marked sent.
    pub sent: AtomicU64,
    /// Rows quarantined (see the module docs).
    pub quarantined: AtomicU64,
    /// Rows neither sent nor quarantined, at the relay's last look (about
    /// once a second, also while the broker is down); 0 before the first.
    pub backlog: AtomicI64,
    /// When the oldest of them was written (micros since the epoch; 0: none).
    pub oldest_unsent_micros: AtomicI64,
}

impl RelayStats {
    /// How far behind the relay is: the age of the oldest row waiting to be
    /// sent at the last look, in seconds (0 when none waits).
    pub fn lag_seconds(&self, now_micros: i64) -> f64 {
        match self.oldest_unsent_micros.load(Ordering::Relaxed) {
            0 => 0.0,
            oldest => (now_micros.saturating_sub(oldest)).max(0) as f64 / 1e6,
        }
    }
}

/// Why a row was not delivered: decides what the relay does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The broker's or the connection's: the pass fails and the relay backs
    /// off; the row's attempts do not grow.
    Broker,
    /// Will never succeed for this row: quarantined at once.
    Permanent,
    /// The row's own: retried later, quarantined after
    /// `quarantine_after_attempts`.
    Row,
}

impl ErrorKind {
    /// The kind of a producer error.
    pub fn of(e: &KafkaError) -> ErrorKind {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(
                C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::MessageBatchTooLarge
                | C::InvalidRecord
                | C::BadMessage
                | C::InvalidTopic
                | C::UnsupportedForMessageFormat
                | C::InvalidDifferentRecord,
            ) => ErrorKind::Permanent,
            None
            | Some(
                C::MessageTimedOut
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::Resolve
                | C::OperationTimedOut
                | C::TimedOutQueue
                | C::RequestTimedOut
                | C::NetworkException
                | C::BrokerNotAvailable
                | C::LeaderNotAvailable
                | C::NotLeaderForPartition
                | C::PreferredLeaderNotAvailable
                | C::EligibleLeadersNotAvailable
                | C::ReplicaNotAvailable
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::KafkaStorageError
                | C::FencedLeaderEpoch
                | C::UnknownLeaderEpoch
                | C::BrokerDestroy
                | C::DestroyBroker
                | C::UnknownBroker
                | C::QueueFull
                | C::PurgeQueue
                | C::PurgeInflight
                | C::Fatal
                | C::State
                | C::OutOfOrderSequenceNumber
                | C::DuplicateSequenceNumber
                | C::InvalidProducerEpoch
                | C::UnknownProducerId
                | C::ProducerFenced
                | C::ThrottlingQuotaExceeded
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::UnknownTopicId
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication,
            ) => ErrorKind::Broker,
            Some(_) => ErrorKind::Row,
        }
    }
}

/// The outbox relay. See the module docs.
pub struct Relay {
    store: Store,
    cfg: KafkaConfig,
    producer: FutureProducer,
    topics_ready: bool,
    last_purge: Option<Instant>,
    last_backlog: Option<Instant>,
    stats: Arc<RelayStats>,
}

fn client_config(cfg: &KafkaConfig) -> Result<ClientConfig, RelayError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.trim())
        .set("client.id", "anumate-relay")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("log_level", "3");
    cfg.security.apply(&mut c)?;
    Ok(c)
}

fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, RelayError> {
    let mut c = client_config(cfg)?;
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.max.bytes", cfg.max_message_bytes.to_string())
        .set("compression.type", "none");
    Ok(c.create()?)
}

/// Creates every topic in [`TOPICS`] (and every topic of a registered event
/// type) that does not exist yet, with the configured partitions.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), RelayError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg)?.create()?;
    let mut names: Vec<String> = TOPICS.iter().map(|t| t.to_string()).collect();
    for (_, t) in crate::all_event_types() {
        if !names.contains(&t.topic) {
            names.push(t.topic.clone());
        }
    }
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| {
            NewTopic::new(
                n,
                cfg.partitions.max(1),
                TopicReplication::Fixed(cfg.replication_factor.max(1)),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(5)))
        .request_timeout(Some(Duration::from_secs(5)));
    let results = admin.create_topics(topics.iter(), &opts).await;
    // The admin client's destructor may block: never on an async worker.
    tokio::task::spawn_blocking(move || drop(admin));
    for r in results? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(RelayError::Config(format!(
                    "cannot create topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(())
}

fn seq_list(seqs: &[i64]) -> String {
    seqs.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn db_backend(store: &Store) -> DbBackend {
    match store.backend() {
        Backend::Postgres => DbBackend::Postgres,
        Backend::Sqlite => DbBackend::Sqlite,
    }
}

/// On PostgreSQL a transaction switched to `role` (see the module docs); on
/// SQLite none (statements run on the connection).
async fn relay_tx(store: &Store, role: &str) -> Result<Option<DatabaseTransaction>, RelayError> {
    if store.backend() != Backend::Postgres {
        return Ok(None);
    }
    let tx = store.owner_connection().begin().await?;
    if !role.is_empty() {
        tx.query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT set_config('role', $1, true)",
            vec![role.into()],
        ))
        .await?;
    }
    Ok(Some(tx))
}

/// Longest `last_error` kept, bytes.
const MAX_ERROR_LEN: usize = 1000;

/// One row of a batch and how often it failed before.
struct Candidate {
    row: OutboxRow,
    attempts: i32,
}

/// One row that was not delivered.
struct Failure {
    index: usize,
    kind: ErrorKind,
    error: String,
}

/// What publishing a batch did.
#[derive(Default)]
struct Published {
    /// Seqs delivered in order (to mark sent).
    delivered: Vec<i64>,
    failures: Vec<Failure>,
    /// Rows not handed over, or delivered ahead of a failed row of their key.
    held: usize,
}

/// A quarantined outbox row, as [`quarantined`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRow {
    /// Outbox position.
    pub seq: i64,
    /// CloudEvents `id`.
    pub event_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Kafka topic.
    pub topic: String,
    /// Kafka key (aggregate id).
    pub aggregate_key: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last error.
    pub last_error: String,
    /// When it was quarantined, Unix microseconds.
    pub quarantined_at: i64,
}

/// Quarantined rows, oldest first (at most `limit`). `relay_role` as in
/// `[kafka] relay_role`: the rows of every tenant.
pub async fn quarantined(
    store: &Store,
    relay_role: &str,
    limit: i64,
) -> Result<Vec<QuarantinedRow>, RelayError> {
    let stmt = Statement::from_sql_and_values(
        db_backend(store),
        "SELECT seq, event_id, tenant_id, topic, aggregate_key, attempts, last_error, \
           quarantined_at FROM outbox \
         WHERE sent_at IS NULL AND attempts > 0 AND quarantined_at IS NOT NULL \
         ORDER BY seq LIMIT $1",
        vec![limit.max(0).into()],
    );
    let rows = match relay_tx(store, relay_role).await? {
        Some(tx) => {
            let rows = tx.query_all_raw(stmt).await?;
            tx.commit().await?;
            rows
        }
        None => store.owner_connection().query_all_raw(stmt).await?,
    };
    rows.iter()
        .map(|r| {
            Ok(QuarantinedRow {
                seq: r.try_get("", "seq")?,
                event_id: r.try_get("", "event_id")?,
                tenant_id: r.try_get("", "tenant_id")?,
                topic: r.try_get("", "topic")?,
                aggregate_key: r.try_get("", "aggregate_key")?,
                attempts: r.try_get("", "attempts")?,
                last_error: r
                    .try_get::<Option<String>>("", "last_error")?
                    .unwrap_or_default(),
                quarantined_at: r.try_get("", "quarantined_at")?,
            })
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(RelayError::Db)
}

/// Releases quarantined rows `seqs` (after their cause was fixed): their
/// attempts start again at 0 and the relay publishes them, then the rows
/// their keys held back. Seqs that are not quarantined are left alone.
/// Returns how many rows were released.
pub async fn requeue(store: &Store, relay_role: &str, seqs: &[i64]) -> Result<u64, RelayError> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let stmt = Statement::from_string(
        db_backend(store),
        format!(
            "UPDATE outbox SET quarantined_at = NULL, attempts = 0, retry_at = NULL, \
               last_error = NULL \
             WHERE seq IN ({}) AND sent_at IS NULL AND quarantined_at IS NOT NULL",
            seq_list(seqs)
        ),
    );
    let n = match relay_tx(store, relay_role).await? {
        Some(tx) => {
            let n = tx.execute_raw(stmt).await?.rows_affected();
            tx.commit().await?;
            n
        }
        None => store
            .owner_connection()
            .execute_raw(stmt)
            .await?
            .rows_affected(),
    };
    if n > 0 {
        tracing::info!(requeued = n, seqs = ?seqs, "quarantined outbox rows requeued");
    }
    Ok(n)
}

/// Wait before attempt `attempts + 1` of a failing row: doubling from 100 ms,
/// capped at `max_ms`, in microseconds.
fn retry_delay_micros(attempts: i32, max_ms: u64) -> i64 {
    let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(20);
    let ms = 100u64.saturating_mul(1 << shift).min(max_ms.max(100));
    i64::try_from(ms).unwrap_or(i64::MAX / 1000) * 1000
}

impl Relay {
    /// A relay over `store` publishing to `cfg.brokers`. Connects lazily: a
    /// broker that is down now is retried by [`Relay::run`]. Checks
    /// `[kafka.security]` (files readable, SASL complete) at once.
    pub fn new(store: Store, cfg: KafkaConfig) -> Result<Relay, RelayError> {
        if !cfg.enabled() {
            return Err(RelayError::Config("no brokers configured".into()));
        }
        let producer = producer(&cfg)?;
        Ok(Relay {
            store,
            cfg,
            producer,
            topics_ready: false,
            last_purge: None,
            last_backlog: None,
            stats: Arc::new(RelayStats::default()),
        })
    }

    /// The relay's counters (shared: they keep counting after
    /// [`Relay::spawn`]).
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    fn backend(&self) -> DbBackend {
        db_backend(&self.store)
    }

    async fn begin(&self) -> Result<Option<DatabaseTransaction>, RelayError> {
        relay_tx(&self.store, &self.cfg.relay_role).await
    }

    /// Unsent rows to publish: neither quarantined nor waiting for a retry,
    /// and not behind an earlier row of their key that is waiting (or
    /// quarantined, when `quarantine_holds_key`).
    async fn fetch(
        &self,
        tx: Option<&DatabaseTransaction>,
    ) -> Result<(usize, Vec<Candidate>), RelayError> {
        let limit = self.cfg.batch_size.max(1);
        let now = anumate_store::now_micros();
        let held_by_quarantine = if self.cfg.quarantine_holds_key {
            " OR p.quarantined_at IS NOT NULL"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {COLUMNS}, attempts FROM outbox o \
             WHERE o.sent_at IS NULL AND o.quarantined_at IS NULL \
               AND (o.retry_at IS NULL OR o.retry_at <= $1) \
               AND NOT EXISTS (SELECT 1 FROM outbox p \
                 WHERE p.sent_at IS NULL AND p.attempts > 0 AND p.topic = o.topic \
                   AND p.aggregate_key = o.aggregate_key AND p.seq < o.seq \
                   AND (p.retry_at > $2{held_by_quarantine})) \
             ORDER BY o.seq LIMIT $3{lock}",
            COLUMNS = OutboxRow::SELECT_COLUMNS,
            lock = if tx.is_some() {
                " FOR UPDATE OF o SKIP LOCKED"
            } else {
                ""
            }
        );
        let stmt = Statement::from_sql_and_values(
            self.backend(),
            sql,
            vec![now.into(), now.into(), limit.into()],
        );
        let candidates = |rows: Vec<QueryResult>| -> Result<Vec<Candidate>, sea_orm::DbErr> {
            rows.iter()
                .map(|r| {
                    Ok(Candidate {
                        row: OutboxRow::from_query(r)?,
                        attempts: r.try_get("", "attempts")?,
                    })
                })
                .collect()
        };
        let Some(tx) = tx else {
            // SQLite (one process): rows in order, no other relay.
            let rows = candidates(self.store.owner_connection().query_all_raw(stmt).await?)?;
            return Ok((rows.len(), rows));
        };
        // Lock a batch; then hold back every row whose key has an earlier
        // unsent row outside the batch (locked by another relay).
        let locked = candidates(tx.query_all_raw(stmt).await?)?;
        if locked.is_empty() {
            return Ok((0, locked));
        }
        let seqs: Vec<i64> = locked.iter().map(|c| c.row.seq).collect();
        let blocked = tx
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT DISTINCT c.topic, c.aggregate_key FROM outbox c \
                     WHERE c.seq IN ({list}) AND EXISTS (\
                       SELECT 1 FROM outbox e WHERE e.aggregate_key = c.aggregate_key \
                         AND e.topic = c.topic AND e.sent_at IS NULL AND e.seq < c.seq \
                         AND e.quarantined_at IS NULL AND e.seq NOT IN ({list}))",
                    list = seq_list(&seqs)
                ),
            ))
            .await?;
        let blocked: HashSet<(String, String)> = blocked
            .iter()
            .map(|r| Ok((r.try_get("", "topic")?, r.try_get("", "aggregate_key")?)))
            .collect::<Result<_, sea_orm::DbErr>>()?;
        let fetched = locked.len();
        let rows = locked
            .into_iter()
            .filter(|c| !blocked.contains(&(c.row.topic.clone(), c.row.aggregate_key.clone())))
            .collect();
        Ok((fetched, rows))
    }

    /// Publishes `rows` in order and waits for every delivery report. A key
    /// stops at its first failure: its later rows are not handed over, and
    /// any of them delivered before a failure was reported stay unsent.
    async fn publish(&self, rows: &[Candidate]) -> Published {
        let mut out = Published::default();
        let mut stopped: HashSet<(&str, &str)> = HashSet::new();
        let mut pending = Vec::with_capacity(rows.len());
        for (index, Candidate { row, .. }) in rows.iter().enumerate() {
            let key = (row.topic.as_str(), row.aggregate_key.as_str());
            if stopped.contains(&key) {
                out.held += 1;
                continue;
            }
            let mode = self.cfg.mode(&row.topic);
            let Some(data) = cloudevents::data(row, mode) else {
                // Cannot happen for rows written by `append`.
                stopped.insert(key);
                out.failures.push(Failure {
                    index,
                    kind: ErrorKind::Permanent,
                    error: format!("event {} cannot be encoded as {mode:?}", row.event_id),
                });
                continue;
            };
            let headers = cloudevents::headers(row, mode);
            let mut record = FutureRecord::to(&row.topic)
                .key(row.aggregate_key.as_bytes())
                .payload(&data)
                .headers(headers)
                .timestamp(row.created_at / 1000);
            // A full local queue: wait for deliveries to drain, then retry.
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        pending.push((index, key, f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        stopped.insert(key);
                        out.failures.push(Failure {
                            index,
                            kind: ErrorKind::of(&e),
                            error: e.to_string(),
                        });
                        break;
                    }
                }
            }
        }
        let mut failed_keys: HashSet<(&str, &str)> = HashSet::new();
        for (index, key, fut) in pending {
            match fut.await {
                Ok(Ok(_)) if failed_keys.contains(&key) => {
                    // Delivered after an earlier row of its key failed: kept
                    // unsent, so it is published again after that row.
                    out.held += 1;
                }
                Ok(Ok(_)) => out.delivered.push(rows[index].row.seq),
                Ok(Err((e, _))) => {
                    failed_keys.insert(key);
                    out.failures.push(Failure {
                        index,
                        kind: ErrorKind::of(&e),
                        error: e.to_string(),
                    });
                }
                Err(_) => {
                    failed_keys.insert(key);
                    out.failures.push(Failure {
                        index,
                        kind: ErrorKind::Broker,
                        error: "producer dropped the message".into(),
                    });
                }
            }
        }
        out
    }

    async fn mark_sent(
        &self,
        tx: Option<&DatabaseTransaction>,
        seqs: &[i64],
    ) -> Result<(), RelayError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let stmt = Statement::from_sql_and_values(
            self.backend(),
            format!(
                "UPDATE outbox SET sent_at = $1 WHERE seq IN ({})",
                seq_list(seqs)
            ),
            vec![anumate_store::now_micros().into()],
        );
        match tx {
            Some(tx) => tx.execute_raw(stmt).await?,
            None => self.store.owner_connection().execute_raw(stmt).await?,
        };
        Ok(())
    }

    /// Records a row's own failure: another attempt later, or quarantine.
    /// Returns whether the row was quarantined.
    async fn record_failure(
        &self,
        tx: Option<&DatabaseTransaction>,
        c: &Candidate,
        f: &Failure,
    ) -> Result<bool, RelayError> {
        let attempts = c.attempts.saturating_add(1);
        let limit = i32::try_from(self.cfg.quarantine_after_attempts.max(1)).unwrap_or(i32::MAX);
        let quarantine = f.kind == ErrorKind::Permanent || attempts >= limit;
        let now = anumate_store::now_micros();
        let mut error = f.error.clone();
        if error.len() > MAX_ERROR_LEN {
            let mut cut = MAX_ERROR_LEN;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let (retry_at, quarantined_at) = match quarantine {
            true => (None, Some(now)),
            false => (
                Some(now.saturating_add(retry_delay_micros(attempts, self.cfg.max_backoff_ms))),
                None,
            ),
        };
        let stmt = Statement::from_sql_and_values(
            self.backend(),
            "UPDATE outbox SET attempts = $1, last_error = $2, retry_at = $3, quarantined_at = $4 \
             WHERE seq = $5",
            vec![
                attempts.into(),
                error.into(),
                retry_at.into(),
                quarantined_at.into(),
                c.row.seq.into(),
            ],
        );
        match tx {
            Some(tx) => tx.execute_raw(stmt).await?,
            None => self.store.owner_connection().execute_raw(stmt).await?,
        };
        Ok(quarantine)
    }

    async fn pass_inner(&mut self, mark: bool) -> Result<PassReport, RelayError> {
        let tx = self.begin().await?;
        let (fetched, rows) = self.fetch(tx.as_ref()).await?;
        let mut report = PassReport {
            fetched,
            held_back: fetched - rows.len(),
            ..PassReport::default()
        };
        if rows.is_empty() {
            if let Some(tx) = tx {
                tx.commit().await?;
            }
            return Ok(report);
        }
        let mut published = self.publish(&rows).await;
        if !mark {
            // A crash before the mark: nothing recorded, the rows stay unsent.
            return Ok(report);
        }
        // A failure of its own on every key of a pass that delivered nothing
        // looks like the broker's: no row is charged an attempt for it.
        let row_keys: HashSet<(&str, &str)> = published
            .failures
            .iter()
            .filter(|f| f.kind == ErrorKind::Row)
            .map(|f| {
                let r = &rows[f.index].row;
                (r.topic.as_str(), r.aggregate_key.as_str())
            })
            .collect();
        if published.delivered.is_empty() && row_keys.len() > 1 {
            for f in &mut published.failures {
                if f.kind == ErrorKind::Row {
                    f.kind = ErrorKind::Broker;
                }
            }
        }
        self.mark_sent(tx.as_ref(), &published.delivered).await?;
        let mut quarantined = Vec::new();
        for f in published
            .failures
            .iter()
            .filter(|f| f.kind != ErrorKind::Broker)
        {
            let c = &rows[f.index];
            if self.record_failure(tx.as_ref(), c, f).await? {
                quarantined.push((c, f));
            } else {
                report.retrying += 1;
            }
        }
        if let Some(tx) = tx {
            tx.commit().await?;
        }
        report.sent = published.delivered.len();
        report.held_back += published.held;
        report.quarantined = quarantined.len();
        self.stats
            .sent
            .fetch_add(report.sent as u64, Ordering::Relaxed);
        self.stats
            .quarantined
            .fetch_add(report.quarantined as u64, Ordering::Relaxed);
        for (c, f) in &quarantined {
            tracing::error!(
                outbox_seq = c.row.seq,
                ce_id = %c.row.event_id,
                tenant = %c.row.tenant_id,
                topic = %c.row.topic,
                key = %c.row.aggregate_key,
                attempts = c.attempts.saturating_add(1),
                error = %f.error,
                holds_key = self.cfg.quarantine_holds_key,
                "outbox event quarantined: not relayed until requeued"
            );
        }
        for f in published
            .failures
            .iter()
            .filter(|f| f.kind == ErrorKind::Row)
        {
            let r = &rows[f.index].row;
            tracing::warn!(outbox_seq = r.seq, ce_id = %r.event_id, error = %f.error, "outbox event not delivered; retrying later");
        }
        let fatal = self.producer.client().fatal_error();
        let broker_failure = published
            .failures
            .iter()
            .find(|f| f.kind == ErrorKind::Broker);
        if fatal.is_some() || broker_failure.is_some() {
            // Start over with a new producer (an idempotent producer's state
            // may not survive a broker that lost its own, and a fatal error
            // ends it anyway) and check the topics again: a broker that came
            // back empty has none.
            if let Some((_, fatal)) = fatal {
                tracing::warn!(error = %fatal, "kafka producer failed fatally");
            }
            let old = std::mem::replace(&mut self.producer, producer(&self.cfg)?);
            tokio::task::spawn_blocking(move || drop(old));
            self.topics_ready = false;
        }
        if let Some(first) = broker_failure {
            return Err(RelayError::Undelivered {
                failed: published
                    .failures
                    .iter()
                    .filter(|f| f.kind == ErrorKind::Broker)
                    .count(),
                total: rows.len(),
                first: first.error.clone(),
            });
        }
        Ok(report)
    }

    /// One pass: publishes up to `batch_size` unsent rows and marks the
    /// delivered ones sent.
    pub async fn pass(&mut self) -> Result<PassReport, RelayError> {
        self.pass_inner(true).await
    }

    /// Test hook: a pass that publishes but "crashes" before marking
    /// anything sent (its transaction rolls back).
    #[cfg(feature = "testing")]
    pub async fn pass_then_crash(&mut self) -> Result<PassReport, RelayError> {
        self.pass_inner(false).await
    }

    /// Counts the rows waiting to be sent (neither sent nor quarantined)
    /// and finds the oldest, into [`Relay::stats`]; returns the count.
    pub async fn measure_backlog(&self) -> Result<i64, RelayError> {
        let stmt = Statement::from_string(
            self.backend(),
            "SELECT count(*) AS n, COALESCE(min(created_at), 0) AS oldest FROM outbox \
             WHERE sent_at IS NULL AND quarantined_at IS NULL",
        );
        let row = match self.begin().await? {
            Some(tx) => {
                let row = tx.query_one_raw(stmt).await?;
                tx.commit().await?;
                row
            }
            None => self.store.owner_connection().query_one_raw(stmt).await?,
        };
        let (n, oldest): (i64, i64) = match row {
            Some(r) => (r.try_get("", "n")?, r.try_get("", "oldest")?),
            None => (0, 0),
        };
        self.stats.backlog.store(n, Ordering::Relaxed);
        self.stats
            .oldest_unsent_micros
            .store(oldest, Ordering::Relaxed);
        Ok(n)
    }

    /// Deletes archived rows sent more than `retention_hours` ago; returns how
    /// many.
    pub async fn purge(&self) -> Result<u64, RelayError> {
        if self.cfg.retention_hours == 0 {
            return Ok(0);
        }
        let retention = i64::try_from(self.cfg.retention_hours)
            .unwrap_or(i64::MAX / 3_600_000_000)
            .saturating_mul(3_600_000_000);
        let cutoff = anumate_store::now_micros().saturating_sub(retention);
        let stmt = Statement::from_sql_and_values(
            self.backend(),
            "DELETE FROM outbox WHERE sent_at IS NOT NULL AND sent_at < $1",
            vec![cutoff.into()],
        );
        let n = match self.begin().await? {
            Some(tx) => {
                let n = tx.execute_raw(stmt).await?.rows_affected();
                tx.commit().await?;
                n
            }
            None => self
                .store
                .owner_connection()
                .execute_raw(stmt)
                .await?
                .rows_affected(),
        };
        Ok(n)
    }

    /// Runs passes until `stop` turns true: immediately again after a full
    /// batch, after `poll_ms` when idle, with exponential back-off after a
    /// failure. Creates the topics first (retried while the broker is down)
    /// and purges the archive about once a minute. Flushes the producer on the
    /// way out.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let min_backoff = Duration::from_millis(100);
        let max_backoff = Duration::from_millis(self.cfg.max_backoff_ms.max(100));
        let poll = Duration::from_millis(self.cfg.poll_ms.max(1));
        let mut backoff = min_backoff;
        let mut failing = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let result = if self.topics_ready {
                self.pass().await.map(Some)
            } else {
                match ensure_topics(&self.cfg).await {
                    Ok(()) => {
                        tracing::info!(brokers = %self.cfg.brokers, "kafka topics ready");
                        self.topics_ready = true;
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            };
            if self
                .last_backlog
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.last_backlog = Some(Instant::now());
                if let Err(e) = self.measure_backlog().await {
                    tracing::debug!(error = %e, "outbox backlog not measured");
                }
            }
            let wait = match result {
                Ok(report) => {
                    if failing {
                        tracing::info!("event relay recovered");
                        failing = false;
                    }
                    backoff = min_backoff;
                    if self
                        .last_purge
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
                    {
                        self.last_purge = Some(Instant::now());
                        match self.purge().await {
                            Ok(0) => {}
                            Ok(n) => tracing::debug!(purged = n, "outbox archive purged"),
                            Err(e) => tracing::warn!(error = %e, "outbox archive purge failed"),
                        }
                    }
                    match report {
                        Some(r) if r.sent > 0 && r.fetched as i64 >= self.cfg.batch_size => {
                            continue;
                        }
                        _ => poll,
                    }
                }
                Err(e) => {
                    if failing {
                        tracing::debug!(error = %e, "event relay still failing");
                    } else {
                        tracing::warn!(error = %e, "event relay failed; backing off");
                        failing = true;
                    }
                    let w = backoff;
                    backoff = (backoff * 2).min(max_backoff);
                    w
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        let producer = self.producer;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = producer.flush(Duration::from_secs(5));
        })
        .await;
    }

    /// Spawns [`Relay::run`] on the runtime.
    pub fn spawn(self) -> RelayHandle {
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats = self.stats();
        let task = tokio::spawn(self.run(stop_rx));
        RelayHandle {
            stop: Arc::new(stop_tx),
            task,
            stats,
        }
    }
}

/// A running relay.
pub struct RelayHandle {
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
    stats: Arc<RelayStats>,
}

impl RelayHandle {
    /// The running relay's counters.
    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// Stops after the current pass (which finishes or rolls back) and waits up
    /// to `grace` for it.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop.send(true);
        let abort = self.task.abort_handle();
        if tokio::time::timeout(grace, self.task).await.is_err() {
            abort.abort();
        }
    }

    /// Stops at once, like a crash (the current pass's transaction rolls back).
    pub fn abort(self) {
        self.task.abort();
    }
}
