//! SQL for the event history: one row per recorded CloudEvent, per tenant.
//!
//! `event_history` is a tenant table (row-level security on PostgreSQL). Rows
//! are unique per `(tenant_id, event_id)`, so recording an event twice (a
//! redelivery, a replay, two feeders) keeps the first. Writers take a
//! transaction-scoped advisory lock on PostgreSQL before inserting, so history
//! `seq` values become visible in increasing order and a tail reading
//! `seq > last` never skips a row committed late. `event_feed_cursor` holds the
//! outbox position of the embedded feeder (no tenant data, no RLS).

use std::collections::{BTreeMap, HashMap};

use anumate_errors::{Error, Result};
use anumate_store::{Backend, Migration, QueryResult, Store, StoreError, TenantTx, Value};

/// The history tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "events_service_0001_history",
    postgres: "CREATE TABLE event_history (
        seq BIGSERIAL PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        source TEXT NOT NULL,
        topic TEXT NOT NULL,
        event_type TEXT NOT NULL,
        aggregate_key TEXT NOT NULL,
        subject TEXT NOT NULL,
        content_type TEXT NOT NULL,
        payload BYTEA NOT NULL,
        plan_hash TEXT,
        traceparent TEXT,
        event_time BIGINT NOT NULL,
        outbox_seq BIGINT,
        replay BOOLEAN NOT NULL,
        recorded_at BIGINT NOT NULL,
        UNIQUE (tenant_id, event_id)
      );
      CREATE INDEX event_history_tenant_seq ON event_history (tenant_id, seq);
      CREATE INDEX event_history_tenant_time ON event_history (tenant_id, event_time);
      CREATE TABLE event_feed_cursor (
        name TEXT PRIMARY KEY,
        position BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
      )",
    sqlite: "CREATE TABLE event_history (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        source TEXT NOT NULL,
        topic TEXT NOT NULL,
        event_type TEXT NOT NULL,
        aggregate_key TEXT NOT NULL,
        subject TEXT NOT NULL,
        content_type TEXT NOT NULL,
        payload BLOB NOT NULL,
        plan_hash TEXT,
        traceparent TEXT,
        event_time BIGINT NOT NULL,
        outbox_seq BIGINT,
        replay BOOLEAN NOT NULL,
        recorded_at BIGINT NOT NULL,
        UNIQUE (tenant_id, event_id)
      );
      CREATE INDEX event_history_tenant_seq ON event_history (tenant_id, seq);
      CREATE INDEX event_history_tenant_time ON event_history (tenant_id, event_time);
      CREATE TABLE event_feed_cursor (
        name TEXT PRIMARY KEY,
        position BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
      )",
    tenant_tables: &["event_history"],
}];

/// Advisory lock key of history writers ("evhist").
const WRITE_LOCK: i64 = 0x6576_6869_7374;

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// CloudEvents `id`.
    pub event_id: String,
    /// Tenant (`tenantid` extension).
    pub tenant_id: String,
    /// CloudEvents `source`.
    pub source: String,
    /// Kafka topic.
    pub topic: String,
    /// CloudEvents `type`.
    pub event_type: String,
    /// Kafka key.
    pub key: String,
    /// CloudEvents `subject`.
    pub subject: String,
    /// `content-type` of `payload`.
    pub content_type: String,
    /// The event data.
    pub payload: Vec<u8>,
    /// `planhash` extension.
    pub plan_hash: Option<String>,
    /// `traceparent` extension.
    pub traceparent: Option<String>,
    /// CloudEvents `time`, Unix microseconds.
    pub time_micros: i64,
    /// Outbox sequence, when known.
    pub outbox_seq: Option<i64>,
    /// Recorded from a replay.
    pub replay: bool,
}

/// A recorded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// History position.
    pub seq: i64,
    /// The event.
    pub event: NewEvent,
}

/// Which rows a query returns.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Exact CloudEvents types (any of).
    pub types: Vec<String>,
    /// Type prefixes (any of, together with `types`).
    pub type_prefixes: Vec<String>,
    /// Kafka key.
    pub key: Option<String>,
    /// Topic.
    pub topic: Option<String>,
    /// `seq > after`.
    pub after: i64,
    /// `event_time >= since`.
    pub since: Option<i64>,
    /// `event_time < until`.
    pub until: Option<i64>,
}

fn like_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

const COLUMNS: &str = "seq, tenant_id, event_id, source, topic, event_type, aggregate_key, subject, \
    content_type, payload, plan_hash, traceparent, event_time, outbox_seq, replay";

fn from_row(r: &QueryResult) -> Result<Recorded> {
    let get = |e: anumate_store::DbErr| Error::internal(e);
    Ok(Recorded {
        seq: r.try_get("", "seq").map_err(get)?,
        event: NewEvent {
            tenant_id: r.try_get("", "tenant_id").map_err(get)?,
            event_id: r.try_get("", "event_id").map_err(get)?,
            source: r.try_get("", "source").map_err(get)?,
            topic: r.try_get("", "topic").map_err(get)?,
            event_type: r.try_get("", "event_type").map_err(get)?,
            key: r.try_get("", "aggregate_key").map_err(get)?,
            subject: r.try_get("", "subject").map_err(get)?,
            content_type: r.try_get("", "content_type").map_err(get)?,
            payload: r.try_get("", "payload").map_err(get)?,
            plan_hash: r.try_get("", "plan_hash").map_err(get)?,
            traceparent: r.try_get("", "traceparent").map_err(get)?,
            time_micros: r.try_get("", "event_time").map_err(get)?,
            outbox_seq: r.try_get("", "outbox_seq").map_err(get)?,
            replay: r.try_get("", "replay").map_err(get)?,
        },
    })
}

/// Reads up to `limit` rows of the transaction's tenant matching `q`, by `seq`.
pub async fn query(tx: &TenantTx, q: &Query, limit: i64) -> Result<Vec<Recorded>> {
    let mut sql = format!("SELECT {COLUMNS} FROM event_history WHERE tenant_id = $1 AND seq > $2");
    let mut values: Vec<Value> = vec![tx.tenant_id().into(), q.after.into()];
    let mut push = |sql: &mut String, cond: &str, v: Value| {
        values.push(v);
        sql.push_str(&cond.replace('?', &format!("${}", values.len())));
    };
    if !q.types.is_empty() || !q.type_prefixes.is_empty() {
        let mut alts = String::new();
        for t in &q.types {
            alts.push_str(if alts.is_empty() { "" } else { " OR " });
            push(&mut alts, "event_type = ?", t.as_str().into());
        }
        for p in &q.type_prefixes {
            alts.push_str(if alts.is_empty() { "" } else { " OR " });
            push(
                &mut alts,
                "event_type LIKE ? ESCAPE '\\'",
                like_escape(p).into(),
            );
        }
        sql.push_str(" AND (");
        sql.push_str(&alts);
        sql.push(')');
    }
    if let Some(k) = &q.key {
        push(&mut sql, " AND aggregate_key = ?", k.as_str().into());
    }
    if let Some(t) = &q.topic {
        push(&mut sql, " AND topic = ?", t.as_str().into());
    }
    if let Some(s) = q.since {
        push(&mut sql, " AND event_time >= ?", s.into());
    }
    if let Some(u) = q.until {
        push(&mut sql, " AND event_time < ?", u.into());
    }
    push(&mut sql, " ORDER BY seq LIMIT ?", limit.into());
    let rows = tx.query_all(&sql, values).await?;
    rows.iter().map(from_row).collect()
}

/// The highest history position of the transaction's tenant (0 when empty).
pub async fn last_seq(tx: &TenantTx) -> Result<i64> {
    let row = tx
        .query_one(
            "SELECT COALESCE(MAX(seq), 0) AS last FROM event_history WHERE tenant_id = $1",
            vec![tx.tenant_id().into()],
        )
        .await?;
    match row {
        Some(r) => r.try_get("", "last").map_err(Error::internal),
        None => Ok(0),
    }
}

/// Records `events` (grouped per tenant, one transaction each); returns how
/// many were new. Events already recorded for their tenant are skipped.
/// `cursor` (name, position) is saved in `event_feed_cursor` in the last of
/// those transactions, so a feeder's position moves with what it recorded.
/// A tenant in `purge_before` also loses, in its transaction, the events older
/// than that time (retention).
pub async fn record(
    store: &Store,
    events: &[NewEvent],
    cursor: Option<(&str, i64)>,
    purge_before: &HashMap<String, i64>,
) -> std::result::Result<usize, StoreError> {
    let mut by_tenant: BTreeMap<&str, Vec<&NewEvent>> = BTreeMap::new();
    for e in events {
        by_tenant.entry(e.tenant_id.as_str()).or_default().push(e);
    }
    let groups = by_tenant.len();
    let mut inserted = 0usize;
    for (i, (tenant, batch)) in by_tenant.into_iter().enumerate() {
        let tx = store.write(tenant).await?;
        if tx.backend() == Backend::Postgres {
            tx.query_one("SELECT pg_advisory_xact_lock($1)", vec![WRITE_LOCK.into()])
                .await?;
        }
        let now = anumate_store::now_micros();
        for e in batch {
            let n = tx
                .execute(
                    "INSERT INTO event_history (tenant_id, event_id, source, topic, event_type, \
                       aggregate_key, subject, content_type, payload, plan_hash, traceparent, \
                       event_time, outbox_seq, replay, recorded_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                     ON CONFLICT (tenant_id, event_id) DO NOTHING",
                    vec![
                        tenant.into(),
                        e.event_id.as_str().into(),
                        e.source.as_str().into(),
                        e.topic.as_str().into(),
                        e.event_type.as_str().into(),
                        e.key.as_str().into(),
                        e.subject.as_str().into(),
                        e.content_type.as_str().into(),
                        e.payload.clone().into(),
                        Value::from(e.plan_hash.clone()),
                        Value::from(e.traceparent.clone()),
                        e.time_micros.into(),
                        Value::from(e.outbox_seq),
                        e.replay.into(),
                        now.into(),
                    ],
                )
                .await?;
            inserted += usize::try_from(n).unwrap_or(0);
        }
        if let Some(cutoff) = purge_before.get(tenant) {
            let purged = tx
                .execute(
                    "DELETE FROM event_history WHERE tenant_id = $1 AND event_time < $2",
                    vec![tenant.into(), (*cutoff).into()],
                )
                .await?;
            if purged > 0 {
                tracing::info!(tenant, purged, "event history past retention removed");
            }
        }
        if let (Some((name, position)), true) = (cursor, i + 1 == groups) {
            tx.execute(
                "INSERT INTO event_feed_cursor (name, position, updated_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position, \
                   updated_at = excluded.updated_at",
                vec![name.into(), position.into(), now.into()],
            )
            .await?;
        }
        tx.commit().await?;
    }
    Ok(inserted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_escape("dev.anumate.run_"), "dev.anumate.run\\_%");
        assert_eq!(like_escape("a%b"), "a\\%b%");
    }
}
