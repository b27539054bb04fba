//! The embedded feeder: copies committed outbox rows into the event history
//! when no Kafka broker is configured (`anumate dev`), so `TailEvents` works
//! without one.
//!
//! It reads the outbox of every tenant the way the relay does (on PostgreSQL
//! as the `anumate_relay` role, whose policy alone sees every tenant's outbox
//! rows; the outbox and the history live in one database in embedded mode),
//! remembers its position in `event_feed_cursor`, and re-checks a window of
//! `LOOKBACK` sequence numbers below the cursor on every pass on PostgreSQL,
//! where a `BIGSERIAL` value can commit after a higher one and such a row must
//! not be skipped. Recording is idempotent, so a restart or a second feeder only
//! repeats work.

use std::collections::BTreeSet;
use std::time::Duration;

use anumate_errors::{Error, Result};
use anumate_store::{Backend, QueryResult, Store, Value};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};

use crate::Events;
use crate::history::NewEvent;

/// Name of the embedded feeder's row in `event_feed_cursor`.
const CURSOR: &str = "outbox";
/// Sequence numbers below the cursor re-checked on each pass.
const LOOKBACK: i64 = 1000;
/// Rows per pass.
const BATCH: i64 = 500;

/// The feeder's state between passes.
pub(crate) struct OutboxFeed {
    store: Store,
    cursor: i64,
    /// Outbox sequence numbers recorded within the lookback window.
    seen: BTreeSet<i64>,
}

fn backend(store: &Store) -> DbBackend {
    match store.backend() {
        Backend::Postgres => DbBackend::Postgres,
        Backend::Sqlite => DbBackend::Sqlite,
    }
}

/// Runs one outbox query across tenants (as the relay role on PostgreSQL).
async fn read_outbox(store: &Store, sql: &str, values: Vec<Value>) -> Result<Vec<QueryResult>> {
    let db = store.owner_connection();
    let stmt = Statement::from_sql_and_values(backend(store), sql, values);
    if store.backend() != Backend::Postgres {
        return db.query_all_raw(stmt).await.map_err(Error::internal);
    }
    let tx = db.begin().await.map_err(Error::internal)?;
    tx.query_one_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT set_config('role', $1, true)",
        vec![anumate_events::relay::RELAY_ROLE.into()],
    ))
    .await
    .map_err(Error::internal)?;
    let rows = tx.query_all_raw(stmt).await.map_err(Error::internal)?;
    tx.commit().await.map_err(Error::internal)?;
    Ok(rows)
}

impl OutboxFeed {
    /// Loads the cursor.
    pub(crate) async fn load(store: Store) -> Result<OutboxFeed> {
        let row = store
            .owner_connection()
            .query_one_raw(Statement::from_sql_and_values(
                backend(&store),
                "SELECT position FROM event_feed_cursor WHERE name = $1",
                vec![CURSOR.into()],
            ))
            .await
            .map_err(Error::internal)?;
        let cursor = match row {
            Some(r) => r.try_get("", "position").map_err(Error::internal)?,
            None => 0,
        };
        Ok(OutboxFeed {
            store,
            cursor,
            seen: BTreeSet::new(),
        })
    }

    /// One pass: records new outbox rows; returns how many were new.
    pub(crate) async fn pass(&mut self, events: &Events) -> Result<usize> {
        let low = (self.cursor - LOOKBACK).max(0);
        // Cheap check of the window first: sequence numbers only.
        // SQLite assigns sequence numbers inside its single writer's
        // transaction, so they commit in order: no window to re-check there.
        let late: Vec<i64> = if self.cursor > 0 && self.store.backend() == Backend::Postgres {
            read_outbox(
                &self.store,
                "SELECT seq FROM outbox WHERE seq > $1 AND seq <= $2",
                vec![low.into(), self.cursor.into()],
            )
            .await?
            .iter()
            .map(|r| r.try_get::<i64>("", "seq"))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::internal)?
            .into_iter()
            .filter(|s| !self.seen.contains(s))
            .collect()
        } else {
            Vec::new()
        };
        let mut rows = Vec::new();
        let cols = "SELECT seq, event_id, tenant_id, topic, event_type, aggregate_key, subject, \
                    payload, plan_hash, traceparent, created_at FROM outbox";
        for seq in late {
            rows.extend(
                read_outbox(
                    &self.store,
                    &format!("{cols} WHERE seq = $1"),
                    vec![seq.into()],
                )
                .await?,
            );
        }
        rows.extend(
            read_outbox(
                &self.store,
                &format!("{cols} WHERE seq > $1 ORDER BY seq LIMIT $2"),
                vec![self.cursor.into(), BATCH.into()],
            )
            .await?,
        );
        if rows.is_empty() {
            return Ok(0);
        }
        let mut batch = Vec::with_capacity(rows.len());
        let mut seqs = Vec::with_capacity(rows.len());
        for r in &rows {
            let seq: i64 = r.try_get("", "seq").map_err(Error::internal)?;
            let topic: String = r.try_get("", "topic").map_err(Error::internal)?;
            seqs.push(seq);
            batch.push(NewEvent {
                event_id: r.try_get("", "event_id").map_err(Error::internal)?,
                tenant_id: r.try_get("", "tenant_id").map_err(Error::internal)?,
                source: anumate_events::cloudevents::source_of_topic(&topic),
                event_type: r.try_get("", "event_type").map_err(Error::internal)?,
                key: r.try_get("", "aggregate_key").map_err(Error::internal)?,
                subject: r.try_get("", "subject").map_err(Error::internal)?,
                content_type: crate::PROTOBUF.into(),
                payload: r.try_get("", "payload").map_err(Error::internal)?,
                plan_hash: r.try_get("", "plan_hash").map_err(Error::internal)?,
                traceparent: r.try_get("", "traceparent").map_err(Error::internal)?,
                time_micros: r.try_get("", "created_at").map_err(Error::internal)?,
                outbox_seq: Some(seq),
                replay: false,
                topic,
            });
        }
        let max = seqs
            .iter()
            .copied()
            .max()
            .unwrap_or(self.cursor)
            .max(self.cursor);
        let new = events.record_at(&batch, Some((CURSOR, max))).await?;
        self.seen.extend(seqs.iter().copied());
        self.cursor = max;
        let low = self.cursor - LOOKBACK;
        self.seen = self.seen.split_off(&low);
        Ok(new)
    }
}

/// Runs the feeder until aborted: a pass every `interval`, at once again
/// after a full batch; errors are logged and retried.
pub(crate) async fn run(events: Events, interval: Duration) {
    let mut feed = loop {
        match OutboxFeed::load(events.store.clone()).await {
            Ok(f) => break f,
            Err(e) => {
                tracing::warn!(error = %e, "event history feeder cannot start; retrying");
                tokio::time::sleep(interval.max(Duration::from_secs(1))).await;
            }
        }
    };
    loop {
        match feed.pass(&events).await {
            Ok(n) if n >= usize::try_from(BATCH).unwrap_or(usize::MAX) => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "event history feeder pass failed"),
        }
        tokio::time::sleep(interval).await;
    }
}
