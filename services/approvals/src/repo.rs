//! SQL for approvals and their timers. An approval is one row: the columns
//! it is found by, and its whole state as JSON (stages and decisions are
//! always read and written together). Every approval query filters on the
//! transaction's tenant; on PostgreSQL row-level security enforces it again.
//!
//! `approval_timers` is deliberately not a tenant table: the timer worker
//! claims due rows across tenants (`FOR UPDATE SKIP LOCKED` on PostgreSQL)
//! and then acts in the tenant's own transaction. It holds ids and times
//! only.

use anumate_errors::{Error, Result};
use anumate_store::{Backend, Migration, QueryResult, Store, SystemTx, TenantTx, Value};

use crate::rules::{Approval, Status};

const DDL: &str = "CREATE TABLE approvals (
        tenant_id TEXT NOT NULL,
        approval_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        args_sha256 TEXT NOT NULL,
        state INTEGER NOT NULL,
        version BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (tenant_id, approval_id)
      );
      CREATE UNIQUE INDEX approvals_call ON approvals (tenant_id, run_id, step_id, args_sha256);
      CREATE INDEX approvals_state ON approvals (tenant_id, state, approval_id);
      CREATE TABLE approval_timers (
        approval_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        generation BIGINT NOT NULL,
        tenant_id TEXT NOT NULL,
        due_at BIGINT NOT NULL,
        PRIMARY KEY (approval_id, kind, generation)
      );
      CREATE INDEX approval_timers_due ON approval_timers (due_at)";

/// The approvals tables (the notifier's come with [`crate::migrations`]).
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "approvals_0001_tables",
    postgres: DDL,
    sqlite: DDL,
    tenant_tables: &["approvals"],
}];

pub fn db(e: impl std::fmt::Display) -> Error {
    Error::internal(e)
}

/// The stored number of a state (the proto's `ApprovalState`).
pub fn state_number(s: Status) -> i32 {
    match s {
        Status::Pending => 1,
        Status::Approved => 2,
        Status::Rejected => 3,
        Status::Expired => 4,
        Status::Cancelled => 5,
    }
}

fn body(a: &Approval) -> Result<String> {
    serde_json::to_string(a).map_err(Error::internal)
}

fn from_row(row: &QueryResult) -> Result<Approval> {
    let body: String = row.try_get("", "body").map_err(db)?;
    serde_json::from_str(&body).map_err(|e| Error::internal(format!("stored approval: {e}")))
}

/// Inserts a new approval; false when one for the same call exists.
pub async fn insert(tx: &TenantTx, a: &Approval) -> Result<bool> {
    let n = tx
        .execute(
            "INSERT INTO approvals (tenant_id, approval_id, run_id, step_id, args_sha256, state, \
               version, created_at, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT DO NOTHING",
            vec![
                tx.tenant_id().into(),
                a.id.as_str().into(),
                a.run_id.as_str().into(),
                a.step_id.as_str().into(),
                a.args_sha256.as_str().into(),
                state_number(a.status).into(),
                a.version.into(),
                a.created_at.into(),
                body(a)?.into(),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// The approval of one call.
pub async fn find_call(
    tx: &TenantTx,
    run: &str,
    step: &str,
    args: &str,
) -> Result<Option<Approval>> {
    tx.query_one(
        "SELECT body FROM approvals WHERE tenant_id = $1 AND run_id = $2 AND step_id = $3 \
           AND args_sha256 = $4",
        vec![tx.tenant_id().into(), run.into(), step.into(), args.into()],
    )
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// One approval; `lock` takes its row lock on PostgreSQL (SQLite's write
/// transaction already holds the database's).
pub async fn load(tx: &TenantTx, id: &str, lock: bool) -> Result<Option<Approval>> {
    let lock = if lock && tx.backend() == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    tx.query_one(
        &format!("SELECT body FROM approvals WHERE tenant_id = $1 AND approval_id = $2{lock}"),
        vec![tx.tenant_id().into(), id.into()],
    )
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// One approval, read in one round trip of its own (no transaction to
/// open first; see [`Store::read_text`]).
pub async fn read(store: &Store, tenant: &str, id: &str) -> Result<Option<Approval>> {
    // Ids are UUIDs; anything else (a NUL included) names no approval.
    if uuid::Uuid::parse_str(id).is_err() {
        return Ok(None);
    }
    store
        .read_text(
            tenant,
            "SELECT body FROM approvals WHERE tenant_id = $1 AND approval_id = $2",
            &[tenant, id],
        )
        .await?
        .first()
        .map(from_row)
        .transpose()
}

/// Stores a changed approval.
pub async fn save(tx: &TenantTx, a: &Approval) -> Result<()> {
    tx.execute(
        "UPDATE approvals SET state = $3, version = $4, body = $5 \
         WHERE tenant_id = $1 AND approval_id = $2",
        vec![
            tx.tenant_id().into(),
            a.id.as_str().into(),
            state_number(a.status).into(),
            a.version.into(),
            body(a)?.into(),
        ],
    )
    .await?;
    Ok(())
}

/// The stored versions of approvals `ids`, row-locked for the transaction
/// (on PostgreSQL, in id order so two batches never deadlock; SQLite's write
/// transaction holds the database's lock). Missing ones are absent.
pub async fn lock_versions(
    tx: &TenantTx,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, i64>> {
    let mut out = std::collections::HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let rows = if tx.backend() == Backend::Postgres {
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        tx.query_all(
            "SELECT approval_id, version FROM approvals \
             WHERE tenant_id = $1 AND approval_id = ANY($2::text[]) \
             ORDER BY approval_id FOR UPDATE",
            vec![tx.tenant_id().into(), Value::from(ids)],
        )
        .await?
    } else {
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            rows.extend(
                tx.query_one(
                    "SELECT approval_id, version FROM approvals \
                     WHERE tenant_id = $1 AND approval_id = $2",
                    vec![tx.tenant_id().into(), (*id).into()],
                )
                .await?,
            );
        }
        rows
    };
    for r in rows {
        out.insert(
            r.try_get("", "approval_id").map_err(db)?,
            r.try_get("", "version").map_err(db)?,
        );
    }
    Ok(out)
}

/// Stores changed approvals whose rows the transaction holds locked (one
/// statement on PostgreSQL, one per approval on SQLite).
pub async fn save_many(tx: &TenantTx, approvals: &[&Approval]) -> Result<()> {
    match approvals {
        [] => return Ok(()),
        [a] => return save(tx, a).await,
        _ => {}
    }
    if tx.backend() == Backend::Sqlite {
        for a in approvals {
            save(tx, a).await?;
        }
        return Ok(());
    }
    let ids: Vec<String> = approvals.iter().map(|a| a.id.clone()).collect();
    let states: Vec<i32> = approvals.iter().map(|a| state_number(a.status)).collect();
    let versions: Vec<i64> = approvals.iter().map(|a| a.version).collect();
    let bodies = approvals
        .iter()
        .map(|a| body(a))
        .collect::<Result<Vec<String>>>()?;
    tx.execute(
        "UPDATE approvals AS a SET state = u.state, version = u.version, body = u.body \
         FROM unnest($2::text[], $3::int[], $4::bigint[], $5::text[]) AS u(id, state, version, body) \
         WHERE a.tenant_id = $1 AND a.approval_id = u.id",
        vec![
            tx.tenant_id().into(),
            Value::from(ids),
            Value::from(states),
            Value::from(versions),
            Value::from(bodies),
        ],
    )
    .await?;
    Ok(())
}

/// Stores changed approvals, each only if its stored version is still the
/// one it was decided from (`None`: the caller holds its row lock), in one
/// statement on PostgreSQL. Returns the ids stored; the others changed in
/// between (nothing written for them). On PostgreSQL a concurrent writer of
/// a row makes this wait for it and then see its version, so no row lock
/// needs to be taken (or a round trip spent) first. Ids must be distinct.
pub async fn save_many_if(
    tx: &TenantTx,
    approvals: &[(&Approval, Option<i64>)],
) -> Result<std::collections::HashSet<String>> {
    let mut stored = std::collections::HashSet::new();
    if tx.backend() == Backend::Sqlite || approvals.len() == 1 {
        for (a, expected) in approvals {
            let n = tx
                .execute(
                    "UPDATE approvals SET state = $3, version = $4, body = $5 \
                     WHERE tenant_id = $1 AND approval_id = $2 AND ($6 < 0 OR version = $6)",
                    vec![
                        tx.tenant_id().into(),
                        a.id.as_str().into(),
                        state_number(a.status).into(),
                        a.version.into(),
                        body(a)?.into(),
                        expected.unwrap_or(-1).into(),
                    ],
                )
                .await?;
            if n == 1 {
                stored.insert(a.id.clone());
            }
        }
        return Ok(stored);
    }
    let ids: Vec<String> = approvals.iter().map(|(a, _)| a.id.clone()).collect();
    let states: Vec<i32> = approvals
        .iter()
        .map(|(a, _)| state_number(a.status))
        .collect();
    let versions: Vec<i64> = approvals.iter().map(|(a, _)| a.version).collect();
    let expected: Vec<i64> = approvals.iter().map(|(_, e)| e.unwrap_or(-1)).collect();
    let bodies = approvals
        .iter()
        .map(|(a, _)| body(a))
        .collect::<Result<Vec<String>>>()?;
    let rows = tx
        .query_all(
            "UPDATE approvals AS a SET state = u.state, version = u.version, body = u.body \
             FROM unnest($2::text[], $3::int[], $4::bigint[], $5::text[], $6::bigint[]) \
               AS u(id, state, version, body, expected) \
             WHERE a.tenant_id = $1 AND a.approval_id = u.id \
               AND (u.expected < 0 OR a.version = u.expected) \
             RETURNING a.approval_id",
            vec![
                tx.tenant_id().into(),
                Value::from(ids),
                Value::from(states),
                Value::from(versions),
                Value::from(bodies),
                Value::from(expected),
            ],
        )
        .await?;
    for r in rows {
        stored.insert(r.try_get("", "approval_id").map_err(db)?);
    }
    Ok(stored)
}

/// Filters of a listing (zero / empty: not filtered).
pub struct Filter<'a> {
    pub state: i32,
    pub run: &'a str,
    /// Approvals with ids below this one (the page token).
    pub before_id: Option<&'a str>,
    pub limit: i64,
}

/// Approvals, newest first (ids are UUIDv7).
pub async fn list(tx: &TenantTx, f: &Filter<'_>) -> Result<Vec<Approval>> {
    let mut sql = String::from("SELECT body FROM approvals WHERE tenant_id = $1");
    let mut values: Vec<Value> = vec![tx.tenant_id().into()];
    if f.state != 0 {
        values.push(f.state.into());
        sql.push_str(&format!(" AND state = ${}", values.len()));
    }
    if !f.run.is_empty() {
        values.push(f.run.into());
        sql.push_str(&format!(" AND run_id = ${}", values.len()));
    }
    if let Some(before) = f.before_id {
        values.push(before.into());
        sql.push_str(&format!(" AND approval_id < ${}", values.len()));
    }
    values.push(f.limit.into());
    sql.push_str(&format!(
        " ORDER BY approval_id DESC LIMIT ${}",
        values.len()
    ));
    tx.query_all(&sql, values)
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Timer kinds.
pub const EXPIRE: &str = "expire";
/// Reminder timers.
pub const REMIND: &str = "remind";

/// Schedules a timer (a repeat of the same one is a no-op).
pub async fn insert_timer(
    tx: &TenantTx,
    id: &str,
    kind: &str,
    generation: i64,
    due_at: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO approval_timers (approval_id, kind, generation, tenant_id, due_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        vec![
            id.into(),
            kind.into(),
            generation.into(),
            tx.tenant_id().into(),
            due_at.into(),
        ],
    )
    .await?;
    Ok(())
}

/// A due timer.
#[derive(Debug, Clone)]
pub struct Timer {
    pub approval_id: String,
    pub kind: String,
    pub generation: i64,
    pub tenant: String,
}

/// Timers due at `now`, oldest first; on PostgreSQL claimed (row locks held
/// by `tx`, rows other workers hold skipped).
pub async fn due_timers(tx: &SystemTx, now: i64, limit: i64) -> Result<Vec<Timer>> {
    let claim = match tx.backend() {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let rows = tx
        .query_all(
            &format!(
                "SELECT approval_id, kind, generation, tenant_id FROM approval_timers \
                 WHERE due_at <= $1 ORDER BY due_at LIMIT $2{claim}"
            ),
            vec![now.into(), limit.into()],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Timer {
                approval_id: r.try_get("", "approval_id").map_err(db)?,
                kind: r.try_get("", "kind").map_err(db)?,
                generation: r.try_get("", "generation").map_err(db)?,
                tenant: r.try_get("", "tenant_id").map_err(db)?,
            })
        })
        .collect()
}

/// Removes a timer that fired (or was stale).
pub async fn delete_timer(tx: &SystemTx, t: &Timer) -> Result<()> {
    tx.execute(
        "DELETE FROM approval_timers WHERE approval_id = $1 AND kind = $2 AND generation = $3",
        vec![
            t.approval_id.as_str().into(),
            t.kind.as_str().into(),
            t.generation.into(),
        ],
    )
    .await?;
    Ok(())
}

/// What a watch needs of an outbox row of the approvals topic.
#[derive(Debug, Clone)]
pub struct OutboxMark {
    pub seq: i64,
    pub event_type: String,
    /// `approvals/<id>`.
    pub subject: String,
}

/// Outbox rows of the approvals topic after `after_seq`, oldest first, but
/// those at positions in `skip` (already sent; on PostgreSQL they are left
/// out by the query, on SQLite by the caller).
pub async fn outbox_after(
    tx: &TenantTx,
    after_seq: i64,
    skip: &[i64],
    limit: i64,
) -> Result<Vec<OutboxMark>> {
    let mut values: Vec<Value> = vec![
        tx.tenant_id().into(),
        crate::TOPIC.into(),
        after_seq.into(),
        limit.into(),
    ];
    let skip_sql = if tx.backend() == Backend::Postgres && !skip.is_empty() {
        values.push(Value::from(skip.to_vec()));
        " AND seq <> ALL($5::bigint[])"
    } else {
        ""
    };
    let rows = tx
        .query_all(
            &format!(
                "SELECT seq, event_type, subject FROM outbox WHERE tenant_id = $1 AND topic = $2 \
                 AND seq > $3{skip_sql} ORDER BY seq LIMIT $4"
            ),
            values,
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(OutboxMark {
                seq: r.try_get("", "seq").map_err(db)?,
                event_type: r.try_get("", "event_type").map_err(db)?,
                subject: r.try_get("", "subject").map_err(db)?,
            })
        })
        .collect()
}

/// Several approvals by id, in one statement on PostgreSQL (one per id on
/// SQLite); missing ones are absent.
pub async fn load_many(
    tx: &TenantTx,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, Approval>> {
    let mut out = std::collections::HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    if tx.backend() == Backend::Postgres {
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        for row in tx
            .query_all(
                "SELECT body FROM approvals WHERE tenant_id = $1 AND approval_id = ANY($2::text[])",
                vec![tx.tenant_id().into(), Value::from(ids)],
            )
            .await?
        {
            let a = from_row(&row)?;
            out.insert(a.id.clone(), a);
        }
    } else {
        for id in ids {
            if let Some(a) = load(tx, id, false).await? {
                out.insert(a.id.clone(), a);
            }
        }
    }
    Ok(out)
}

/// The highest outbox position of the tenant's approval events (0: none).
pub async fn outbox_head(tx: &TenantTx) -> Result<i64> {
    let row = tx
        .query_one(
            "SELECT COALESCE(MAX(seq), 0) AS head FROM outbox WHERE tenant_id = $1 AND topic = $2",
            vec![tx.tenant_id().into(), crate::TOPIC.into()],
        )
        .await?;
    match row {
        Some(r) => r.try_get("", "head").map_err(db),
        None => Ok(0),
    }
}
