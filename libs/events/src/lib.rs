//! Events: the transactional outbox every service writes its state changes to.
//!
//! A service appends the event in the same [`TenantTx`] as the change it
//! describes, so an event exists exactly when its change committed. The event's
//! CloudEvents `type` and Kafka topic are not written in Rust: they come from the
//! `(anumate.events.v1.cloudevent_type)` and `(topic)` options on the event's
//! proto message, read once from the embedded descriptor set. A relay (separate
//! issue) publishes unsent rows to Kafka in order and marks them sent.
#![forbid(unsafe_code)]

pub mod cloudevents;
pub mod consumer;
pub mod relay;
pub mod security;
#[cfg(feature = "testing")]
pub mod testing;

use std::{collections::HashMap, sync::LazyLock};

pub use anumate_proto::event_types::EventKey;
use anumate_store::{Migration, StoreError, TenantTx, Value};
use prost_reflect::{DescriptorPool, Value as ReflectValue};
use uuid::Uuid;

/// CloudEvents `type` and topic of one event message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventType {
    /// CloudEvents `type`, e.g. `dev.anumate.capsule.published.v1`.
    pub cloudevent_type: String,
    /// Kafka topic, e.g. `anumate.capsules`.
    pub topic: String,
}

/// Every event message's type and topic, keyed by proto full name.
static REGISTRY: LazyLock<HashMap<String, EventType>> = LazyLock::new(load_registry);

fn load_registry() -> HashMap<String, EventType> {
    let mut out = HashMap::new();
    let Ok(pool) = DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET) else {
        return out;
    };
    let (Some(type_ext), Some(topic_ext)) = (
        pool.get_extension_by_name("anumate.events.v1.cloudevent_type"),
        pool.get_extension_by_name("anumate.events.v1.topic"),
    ) else {
        return out;
    };
    for message in pool.all_messages() {
        let options = message.options();
        let get = |ext| match options.get_extension(ext).as_ref() {
            ReflectValue::String(s) if !s.is_empty() => Some(s.clone()),
            _ => None,
        };
        if let (Some(cloudevent_type), Some(topic)) = (get(&type_ext), get(&topic_ext)) {
            out.insert(
                message.full_name().to_string(),
                EventType {
                    cloudevent_type,
                    topic,
                },
            );
        }
    }
    out
}

/// The registered type of event message `M`, or `None` if `M` is not an event.
pub fn event_type<M: prost::Name>() -> Option<&'static EventType> {
    REGISTRY.get(&M::full_name())
}

/// Every registered event type.
pub fn all_event_types() -> impl Iterator<Item = (&'static str, &'static EventType)> {
    REGISTRY.iter().map(|(k, v)| (k.as_str(), v))
}

/// Outbox errors.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The message has no `cloudevent_type` option: a programming error.
    #[error("{0} is not a registered event message")]
    NotAnEvent(String),
    /// The event names another tenant than the transaction it is appended in:
    /// a programming error, refused so no event is keyed (or read) as
    /// another tenant's.
    #[error(
        "a {message} of tenant {event_tenant:?} appended in tenant {tx_tenant:?}'s transaction"
    )]
    TenantMismatch {
        /// The event message.
        message: String,
        /// The tenant its key names.
        event_tenant: String,
        /// The transaction's tenant.
        tx_tenant: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<EventError> for anumate_errors::Error {
    fn from(e: EventError) -> Self {
        match e {
            EventError::Store(s) => s.into(),
            other => anumate_errors::Error::internal(other),
        }
    }
}

/// Extra CloudEvents attributes of one event.
#[derive(Debug, Default, Clone)]
pub struct EventContext<'a> {
    /// CloudEvents `subject`, e.g. `capsules/refund/versions/3`.
    pub subject: &'a str,
    /// The `planhash` extension, where the event concerns a plan.
    pub plan_hash: Option<&'a str>,
    /// W3C `traceparent` of the span that caused the event.
    pub traceparent: Option<&'a str>,
}

pub use anumate_telemetry::{continue_trace, current_traceparent, parse_traceparent};

const OUTBOX_INSERT: &str = "INSERT INTO outbox (event_id, tenant_id, topic, event_type, \
     aggregate_key, subject, payload, plan_hash, traceparent, created_at) VALUES ";
/// Columns of [`OUTBOX_INSERT`]: parameters per row.
const OUTBOX_COLUMNS: usize = 10;

/// One outbox row's id and values, in [`OUTBOX_INSERT`]'s column order.
fn outbox_row<M: prost::Message>(
    tx: &TenantTx,
    ty: &EventType,
    message: &M,
    key: String,
    ctx: &EventContext<'_>,
    traceparent: Option<String>,
    now: i64,
) -> (Uuid, [Value; OUTBOX_COLUMNS]) {
    let id = Uuid::now_v7();
    let values = [
        id.to_string().into(),
        tx.tenant_id().into(),
        ty.topic.as_str().into(),
        ty.cloudevent_type.as_str().into(),
        key.into(),
        ctx.subject.into(),
        message.encode_to_vec().into(),
        Value::from(ctx.plan_hash.map(str::to_string)),
        Value::from(traceparent),
        now.into(),
    ];
    (id, values)
}

/// `(${first}, …, ${first + OUTBOX_COLUMNS - 1})`.
fn push_placeholders(sql: &mut String, first: usize) {
    sql.push('(');
    for k in 0..OUTBOX_COLUMNS {
        if k > 0 {
            sql.push_str(", ");
        }
        sql.push('$');
        sql.push_str(&(first + k).to_string());
    }
    sql.push(')');
}

/// The Kafka key of `message` (its `(anumate.events.v1.key)` fields, tenant
/// first), checked to name the transaction's tenant.
fn key_in<M: prost::Name + EventKey>(tx: &TenantTx, message: &M) -> Result<String, EventError> {
    let key = message.event_key();
    let event_tenant = key.split('/').next().unwrap_or_default();
    if event_tenant != tx.tenant_id() {
        return Err(EventError::TenantMismatch {
            message: M::full_name(),
            event_tenant: event_tenant.to_string(),
            tx_tenant: tx.tenant_id().to_string(),
        });
    }
    Ok(key)
}

/// Appends `message` to the outbox inside `tx`, keyed by its declared key
/// ([`EventKey`]: `tenant/aggregate`; events with one key stay in order). The
/// `traceparent` stored is the context's, else the current span's. Returns
/// the CloudEvents `id`.
pub async fn append<M: prost::Message + prost::Name + EventKey>(
    tx: &TenantTx,
    message: &M,
    ctx: EventContext<'_>,
) -> Result<Uuid, EventError> {
    let ty = event_type::<M>().ok_or_else(|| EventError::NotAnEvent(M::full_name()))?;
    let key = key_in(tx, message)?;
    let traceparent = ctx
        .traceparent
        .map(str::to_string)
        .or_else(current_traceparent);
    let (id, values) = outbox_row(
        tx,
        ty,
        message,
        key,
        &ctx,
        traceparent,
        anumate_store::now_micros(),
    );
    let mut sql = String::from(OUTBOX_INSERT);
    push_placeholders(&mut sql, 1);
    tx.execute(&sql, values.into()).await?;
    Ok(id)
}

/// Appends several events of one message type in one statement (what a batch
/// writer such as the receipts log uses: one round trip instead of one per
/// event). Each item is `(message, context)` as for [`append`]; rows get
/// outbox positions in the order given. Returns the CloudEvents ids in that
/// order.
///
/// On PostgreSQL the columns go as arrays through `unnest`, so the statement
/// text is the same for every batch size: prepared once per connection,
/// planned once. SQLite takes multi-row `VALUES` in chunks.
pub async fn append_many<M: prost::Message + prost::Name + EventKey>(
    tx: &TenantTx,
    events: &[(M, EventContext<'_>)],
) -> Result<Vec<Uuid>, EventError> {
    /// Rows per SQLite statement: far below its parameter limit.
    const CHUNK: usize = 200;
    let ty = event_type::<M>().ok_or_else(|| EventError::NotAnEvent(M::full_name()))?;
    let fallback_traceparent = current_traceparent();
    let now = anumate_store::now_micros();
    let traceparent = |ctx: &EventContext<'_>| {
        ctx.traceparent
            .map(str::to_string)
            .or_else(|| fallback_traceparent.clone())
    };
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let keys = events
        .iter()
        .map(|(message, _)| key_in(tx, message))
        .collect::<Result<Vec<String>, EventError>>()?;
    if tx.backend() == anumate_store::Backend::Postgres {
        let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
        let texts = |f: &dyn Fn(&(M, EventContext<'_>)) -> String| -> Value {
            Value::from(events.iter().map(f).collect::<Vec<String>>())
        };
        let values = vec![
            tx.tenant_id().into(),
            ty.topic.as_str().into(),
            ty.cloudevent_type.as_str().into(),
            now.into(),
            Value::from(ids.iter().map(Uuid::to_string).collect::<Vec<_>>()),
            Value::from(keys),
            texts(&|(_, ctx)| ctx.subject.to_string()),
            Value::from(
                events
                    .iter()
                    .map(|(message, _)| message.encode_to_vec())
                    .collect::<Vec<Vec<u8>>>(),
            ),
            texts(&|(_, ctx)| ctx.plan_hash.unwrap_or_default().to_string()),
            texts(&|(_, ctx)| traceparent(ctx).unwrap_or_default()),
        ];
        tx.execute(PG_OUTBOX_INSERT_MANY, values).await?;
        return Ok(ids);
    }
    let mut ids = Vec::with_capacity(events.len());
    let mut keys = keys.into_iter();
    for chunk in events.chunks(CHUNK) {
        let mut sql = String::from(OUTBOX_INSERT);
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * OUTBOX_COLUMNS);
        for (i, ((message, ctx), key)) in chunk.iter().zip(keys.by_ref()).enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            push_placeholders(&mut sql, values.len() + 1);
            let (id, row) = outbox_row(tx, ty, message, key, ctx, traceparent(ctx), now);
            ids.push(id);
            values.extend(row);
        }
        tx.execute(&sql, values).await?;
    }
    Ok(ids)
}

/// [`append_many`] on PostgreSQL: `$1` tenant, `$2` topic, `$3` type, `$4`
/// now, `$5`–`$10` the rows' columns (an empty plan hash or traceparent is
/// stored as NULL, as [`append`] stores an absent one). `ORDER BY ord` gives
/// the rows their `seq` in the order given.
const PG_OUTBOX_INSERT_MANY: &str = "INSERT INTO outbox (event_id, tenant_id, topic, event_type, \
       aggregate_key, subject, payload, plan_hash, traceparent, created_at) \
     SELECT u.event_id, $1, $2, $3, u.aggregate_key, u.subject, u.payload, \
       NULLIF(u.plan_hash, ''), NULLIF(u.traceparent, ''), $4 \
     FROM unnest($5::text[], $6::text[], $7::text[], $8::bytea[], $9::text[], $10::text[]) \
       WITH ORDINALITY AS u(event_id, aggregate_key, subject, payload, plan_hash, traceparent, ord) \
     ORDER BY u.ord";

/// One stored outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Position in the outbox (monotonic).
    pub seq: i64,
    /// CloudEvents `id`.
    pub event_id: String,
    /// Tenant.
    pub tenant_id: String,
    /// Kafka topic.
    pub topic: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// Kafka key.
    pub aggregate_key: String,
    /// CloudEvents `subject`.
    pub subject: String,
    /// The proto-encoded event message.
    pub payload: Vec<u8>,
    /// `planhash` extension.
    pub plan_hash: Option<String>,
    /// W3C `traceparent` of the span that wrote the event.
    pub traceparent: Option<String>,
    /// Commit time, Unix microseconds.
    pub created_at: i64,
}

impl OutboxRow {
    /// The outbox columns [`OutboxRow::from_query`] reads, for a `SELECT` list.
    pub const SELECT_COLUMNS: &str = "seq, event_id, tenant_id, topic, event_type, \
        aggregate_key, subject, payload, plan_hash, traceparent, created_at";

    /// The row of a query that selected at least [`OutboxRow::SELECT_COLUMNS`]:
    /// one mapping for the reader, the relay and the replayer.
    pub fn from_query(r: &anumate_store::QueryResult) -> Result<Self, anumate_store::DbErr> {
        Ok(Self {
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
}

/// Reads the tenant's outbox rows after `after_seq`, oldest first.
pub async fn read_after(
    tx: &TenantTx,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<OutboxRow>, EventError> {
    let rows = tx
        .query_all(
            &format!(
                "SELECT {} FROM outbox WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                OutboxRow::SELECT_COLUMNS
            ),
            vec![tx.tenant_id().into(), after_seq.into(), limit.into()],
        )
        .await?;
    rows.iter()
        .map(OutboxRow::from_query)
        .collect::<Result<_, anumate_store::DbErr>>()
        .map_err(|e| EventError::Store(StoreError::Db(e)))
}

/// The outbox's migrations followed by a service's own: what every service
/// that appends events migrates.
pub fn with_outbox(own: &[Migration]) -> Vec<Migration> {
    MIGRATIONS.iter().chain(own).copied().collect()
}

/// The outbox table.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "events_0001_outbox",
        postgres: "CREATE TABLE outbox (
        seq BIGSERIAL PRIMARY KEY,
        event_id TEXT NOT NULL UNIQUE,
        tenant_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        event_type TEXT NOT NULL,
        aggregate_key TEXT NOT NULL,
        subject TEXT NOT NULL,
        payload BYTEA NOT NULL,
        plan_hash TEXT,
        traceparent TEXT,
        created_at BIGINT NOT NULL,
        sent_at BIGINT
      );
      CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
      CREATE INDEX outbox_tenant_seq ON outbox (tenant_id, seq)",
        sqlite: "CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        tenant_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        event_type TEXT NOT NULL,
        aggregate_key TEXT NOT NULL,
        subject TEXT NOT NULL,
        payload BLOB NOT NULL,
        plan_hash TEXT,
        traceparent TEXT,
        created_at BIGINT NOT NULL,
        sent_at BIGINT
      );
      CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
      CREATE INDEX outbox_tenant_seq ON outbox (tenant_id, seq)",
        tenant_tables: &["outbox"],
    },
    relay::MIGRATION,
    relay::QUARANTINE_MIGRATION,
];

#[cfg(test)]
mod tests {
    use super::*;
    use anumate_proto::events::v1::{CapsulePublished, CapsulePushed};
    use anumate_store::{Store, testing::TestDb};

    #[test]
    fn types_come_from_the_proto_options() {
        let ty = event_type::<CapsulePublished>().expect("registered");
        assert_eq!(ty.cloudevent_type, "dev.anumate.capsule.published.v1");
        assert_eq!(ty.topic, "anumate.capsules");
        // The events service's own messages are in the package but are not events.
        assert!(event_type::<anumate_proto::events::v1::CloudEvent>().is_none());
    }

    #[test]
    fn a_consumer_span_continues_the_producers_trace() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let producer = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("consume");
            continue_trace(&span, Some(producer));
            let inside = span.in_scope(current_traceparent).expect("a traceparent");
            // Same trace, a new span of its own.
            assert!(
                inside.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{inside}"
            );
            assert_ne!(inside, producer);

            // Malformed or missing headers leave a fresh trace.
            for bad in [
                None,
                Some(""),
                Some("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
                Some("00-zz-yy-01"),
            ] {
                let span = tracing::info_span!("consume");
                continue_trace(&span, bad);
                let inside = span.in_scope(current_traceparent).expect("a traceparent");
                assert!(
                    !inside.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
                    "{bad:?}: {inside}"
                );
            }
        });
    }

    async fn roundtrip(db: TestDb) {
        let store = Store::connect(&db.config).await.expect("connect");
        store.migrate(MIGRATIONS).await.expect("migrate");
        let tx = store.write("t1").await.expect("tx");
        let msg = CapsulePushed {
            tenant_id: "t1".into(),
            name: "c".into(),
            version: 1,
            ..Default::default()
        };
        append(
            &tx,
            &msg,
            EventContext {
                subject: "capsules/c/versions/1",
                ..Default::default()
            },
        )
        .await
        .expect("append");
        // Rolled back with its transaction:
        drop(tx);
        let tx = store.read("t1").await.expect("tx");
        assert!(read_after(&tx, 0, 10).await.expect("read").is_empty());
        drop(tx);
        let tx = store.write("t1").await.expect("tx");
        append(&tx, &msg, EventContext::default())
            .await
            .expect("append");
        tx.commit().await.expect("commit");
        let tx = store.read("t1").await.expect("tx");
        let rows = read_after(&tx, 0, 10).await.expect("read");
        assert_eq!(rows.len(), 1);
        // Keyed by tenant and aggregate, as the proto declares.
        assert_eq!(rows[0].aggregate_key, "t1/c");
        assert_eq!(rows[0].event_type, "dev.anumate.capsule.pushed.v1");
        let decoded =
            <CapsulePushed as prost::Message>::decode(rows[0].payload.as_slice()).expect("decode");
        assert_eq!(decoded, msg);
        let other = store.read("t2").await.expect("tx");
        assert!(read_after(&other, 0, 10).await.expect("read").is_empty());
        drop(other);
        // An event naming another tenant is refused, alone or in a batch.
        let tx = store.write("t2").await.expect("tx");
        let err = append(&tx, &msg, EventContext::default())
            .await
            .expect_err("t1's event in t2's transaction");
        assert!(matches!(err, EventError::TenantMismatch { .. }), "{err}");
        let err = append_many(&tx, &[(msg.clone(), EventContext::default())])
            .await
            .expect_err("t1's event in t2's transaction");
        assert!(matches!(err, EventError::TenantMismatch { .. }), "{err}");
        drop(tx);

        // A batch: more rows than one SQLite statement holds, in the order given,
        // with the ids returned.
        let batch: Vec<(CapsulePushed, String)> = (0..450)
            .map(|i| {
                (
                    CapsulePushed {
                        tenant_id: "t1".into(),
                        name: format!("c{i}"),
                        version: i,
                        ..Default::default()
                    },
                    format!("capsules/c{i}"),
                )
            })
            .collect();
        // Even rows carry a plan hash and a traceparent, odd rows neither.
        const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let items: Vec<(CapsulePushed, EventContext<'_>)> = batch
            .iter()
            .enumerate()
            .map(|(i, (m, subject))| {
                (
                    m.clone(),
                    EventContext {
                        subject,
                        plan_hash: (i % 2 == 0).then_some("sha256:ab"),
                        traceparent: (i % 2 == 0).then_some(TRACEPARENT),
                    },
                )
            })
            .collect();
        let tx = store.write("t1").await.expect("tx");
        let ids = append_many(&tx, &items).await.expect("append_many");
        tx.commit().await.expect("commit");
        let tx = store.read("t1").await.expect("tx");
        let rows = read_after(&tx, rows[0].seq, 1000).await.expect("read");
        assert_eq!(rows.len(), 450);
        for (i, row) in rows.iter().enumerate() {
            assert_eq!(row.event_id, ids[i].to_string());
            assert_eq!(row.aggregate_key, format!("t1/c{i}"));
            assert_eq!(row.subject, format!("capsules/c{i}"));
            assert_eq!(
                row.plan_hash.as_deref(),
                (i % 2 == 0).then_some("sha256:ab")
            );
            assert_eq!(
                row.traceparent.as_deref(),
                (i % 2 == 0).then_some(TRACEPARENT)
            );
            let decoded =
                <CapsulePushed as prost::Message>::decode(row.payload.as_slice()).expect("decode");
            assert_eq!(decoded, batch[i].0);
        }
        assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[tokio::test]
    async fn outbox_rows_commit_with_their_transaction_sqlite() {
        roundtrip(TestDb::sqlite()).await;
    }

    #[tokio::test]
    async fn outbox_rows_commit_with_their_transaction_postgres() {
        roundtrip(TestDb::postgres().await).await;
    }
}
