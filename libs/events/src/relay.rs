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
//! ## Reading every tenant's rows
//! The outbox is a tenant table with forced row-level security. The relay is
//! not a tenant: on PostgreSQL it switches (`set_config('role', …, true)`, for
//! its transaction only) to the dedicated NOLOGIN role `anumate_relay`, created
//! by [`MIGRATION`], which has a policy `relay_all` on `outbox` alone and the
//! privileges SELECT, DELETE and UPDATE of `sent_at` on it and nothing else. The
//! serving role keeps its tenant policy: it gains nothing, and a request
//! handler's query never runs as the relay role (only this module opens such a
//! transaction). The connecting login must be a member of `anumate_relay`
//! (the migration grants it to the migrating user; grant it to a separate
//! serving login yourself).

use std::collections::HashSet;
use std::sync::Arc;
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

/// Every Anumate topic, created on start-up if missing.
pub const TOPICS: &[&str] = &[
    "anumate.capsules",
    "anumate.policies",
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
    /// Rows held back behind an earlier row of their key held by another relay.
    pub held_back: usize,
}

/// The outbox relay. See the module docs.
pub struct Relay {
    store: Store,
    cfg: KafkaConfig,
    producer: FutureProducer,
    topics_ready: bool,
    last_purge: Option<Instant>,
}

fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.trim())
        .set("client.id", "anumate-relay")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("log_level", "3");
    c
}

fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, RelayError> {
    let mut c = client_config(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("compression.type", "none");
    Ok(c.create()?)
}

/// Creates every topic in [`TOPICS`] (and every topic of a registered event
/// type) that does not exist yet, with the configured partitions.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), RelayError> {
    let admin: AdminClient<DefaultClientContext> = client_config(cfg).create()?;
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

const COLUMNS: &str = "seq, event_id, tenant_id, topic, event_type, aggregate_key, subject, \
                       payload, plan_hash, traceparent, created_at";

fn row_of(r: &QueryResult) -> Result<OutboxRow, sea_orm::DbErr> {
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
}

fn seq_list(seqs: &[i64]) -> String {
    seqs.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Relay {
    /// A relay over `store` publishing to `cfg.brokers`. Connects lazily: a
    /// broker that is down now is retried by [`Relay::run`].
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
        })
    }

    fn backend(&self) -> DbBackend {
        match self.store.backend() {
            Backend::Postgres => DbBackend::Postgres,
            Backend::Sqlite => DbBackend::Sqlite,
        }
    }

    async fn begin(&self) -> Result<Option<DatabaseTransaction>, RelayError> {
        if self.store.backend() != Backend::Postgres {
            return Ok(None);
        }
        let tx = self.store.owner_connection().begin().await?;
        if !self.cfg.relay_role.is_empty() {
            tx.query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT set_config('role', $1, true)",
                vec![self.cfg.relay_role.as_str().into()],
            ))
            .await?;
        }
        Ok(Some(tx))
    }

    async fn fetch(
        &self,
        tx: Option<&DatabaseTransaction>,
    ) -> Result<(usize, Vec<OutboxRow>), RelayError> {
        let limit = self.cfg.batch_size.max(1);
        let Some(tx) = tx else {
            let rows = self
                .store
                .owner_connection()
                .query_all_raw(Statement::from_sql_and_values(
                    self.backend(),
                    format!(
                        "SELECT {COLUMNS} FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT $1"
                    ),
                    vec![limit.into()],
                ))
                .await?;
            let rows = rows.iter().map(row_of).collect::<Result<Vec<_>, _>>()?;
            return Ok((rows.len(), rows));
        };
        // Lock a batch; then hold back every row whose key has an earlier
        // unsent row outside the batch (locked by another relay).
        let locked = tx
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "SELECT {COLUMNS} FROM outbox WHERE sent_at IS NULL ORDER BY seq LIMIT $1 \
                     FOR UPDATE SKIP LOCKED"
                ),
                vec![limit.into()],
            ))
            .await?;
        let locked = locked.iter().map(row_of).collect::<Result<Vec<_>, _>>()?;
        if locked.is_empty() {
            return Ok((0, locked));
        }
        let seqs: Vec<i64> = locked.iter().map(|r| r.seq).collect();
        let blocked = tx
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT DISTINCT c.topic, c.aggregate_key FROM outbox c \
                     WHERE c.seq IN ({list}) AND EXISTS (\
                       SELECT 1 FROM outbox e WHERE e.aggregate_key = c.aggregate_key \
                         AND e.topic = c.topic AND e.sent_at IS NULL AND e.seq < c.seq \
                         AND e.seq NOT IN ({list}))",
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
            .filter(|r| !blocked.contains(&(r.topic.clone(), r.aggregate_key.clone())))
            .collect();
        Ok((fetched, rows))
    }

    /// Publishes `rows` and waits for every delivery report; returns the
    /// delivered rows' seqs and the first error.
    async fn publish(&self, rows: &[OutboxRow]) -> (Vec<i64>, Option<String>, usize) {
        let mut pending = Vec::with_capacity(rows.len());
        let mut first_err = None;
        let mut failed = 0;
        for row in rows {
            let mode = self.cfg.mode(&row.topic);
            let Some(data) = cloudevents::data(row, mode) else {
                // Cannot happen for rows written by `append`; keep the row.
                failed += 1;
                first_err.get_or_insert_with(|| {
                    format!("event {} cannot be encoded as {mode:?}", row.event_id)
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
            let fut = loop {
                match self.producer.send_result(record) {
                    Ok(f) => break Some(f),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        first_err.get_or_insert_with(|| e.to_string());
                        break None;
                    }
                }
            };
            match fut {
                Some(f) => pending.push((row.seq, f)),
                None => failed += 1,
            }
        }
        let mut delivered = Vec::with_capacity(pending.len());
        for (seq, fut) in pending {
            match fut.await {
                Ok(Ok(_)) => delivered.push(seq),
                Ok(Err((e, _))) => {
                    failed += 1;
                    first_err.get_or_insert_with(|| e.to_string());
                }
                Err(_) => {
                    failed += 1;
                    first_err.get_or_insert_with(|| "producer dropped the message".into());
                }
            }
        }
        (delivered, first_err, failed)
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

    async fn pass_inner(&mut self, mark: bool) -> Result<PassReport, RelayError> {
        let tx = self.begin().await?;
        let (fetched, rows) = self.fetch(tx.as_ref()).await?;
        let mut report = PassReport {
            fetched,
            held_back: fetched - rows.len(),
            sent: 0,
        };
        if rows.is_empty() {
            if let Some(tx) = tx {
                tx.commit().await?;
            }
            return Ok(report);
        }
        let (delivered, first_err, failed) = self.publish(&rows).await;
        if !mark {
            // A crash before the mark: nothing recorded, the rows stay unsent.
            return Ok(report);
        }
        self.mark_sent(tx.as_ref(), &delivered).await?;
        if let Some(tx) = tx {
            tx.commit().await?;
        }
        report.sent = delivered.len();
        if let Some(first) = first_err {
            // Start over with a new producer (an idempotent producer's state
            // may not survive a broker that lost its own, and a fatal error
            // ends it anyway) and check the topics again: a broker that came
            // back empty has none.
            if let Some((_, fatal)) = self.producer.client().fatal_error() {
                tracing::warn!(error = %fatal, "kafka producer failed fatally");
            }
            let old = std::mem::replace(&mut self.producer, producer(&self.cfg)?);
            tokio::task::spawn_blocking(move || drop(old));
            self.topics_ready = false;
            return Err(RelayError::Undelivered {
                failed,
                total: rows.len(),
                first,
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
        let task = tokio::spawn(self.run(stop_rx));
        RelayHandle {
            stop: Arc::new(stop_tx),
            task,
        }
    }
}

/// A running relay.
pub struct RelayHandle {
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<()>,
}

impl RelayHandle {
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
