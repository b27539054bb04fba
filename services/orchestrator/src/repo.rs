//! The journal: runs, their steps (with attempts), the history of every
//! change (what `WatchRun` and `ListRunHistory` read) and the work queue the
//! workers lease from. Run, step and history rows belong to a tenant (under
//! row-level security on PostgreSQL); the work queue is system state (which
//! runs need a worker), read across tenants.

use anumate_errors::{Error, Result};
use anumate_proto::orchestrator::v1 as pb;
use anumate_store::{Migration, QueryResult, SystemTx, TenantTx, paging};

const DDL: &str = "CREATE TABLE orch_runs (
        tenant_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_json TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        capsule_name TEXT NOT NULL,
        state INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        principal_json TEXT NOT NULL,
        run_json TEXT NOT NULL,
        PRIMARY KEY (tenant_id, run_id)
      );
      CREATE UNIQUE INDEX orch_runs_key ON orch_runs (tenant_id, idempotency_key);
      CREATE INDEX orch_runs_newest ON orch_runs (tenant_id, created_at, run_id);
      CREATE TABLE orch_steps (
        tenant_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        step_id TEXT NOT NULL,
        state INTEGER NOT NULL,
        step_json TEXT NOT NULL,
        PRIMARY KEY (tenant_id, run_id, step_id)
      );
      CREATE TABLE orch_history (
        tenant_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        sequence BIGINT NOT NULL,
        at BIGINT NOT NULL,
        entry_json TEXT NOT NULL,
        change_json TEXT NOT NULL,
        PRIMARY KEY (tenant_id, run_id, sequence)
      );
      CREATE TABLE orch_work (
        tenant_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        due_at BIGINT NOT NULL,
        lease_owner TEXT NOT NULL,
        lease_until BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, run_id)
      );
      CREATE INDEX orch_work_due ON orch_work (due_at)";

/// A run's journal sequence as a column, so a worker can fence a save on
/// it (see [`fence`]).
const SEQ: &str = "ALTER TABLE orch_runs ADD COLUMN seq BIGINT NOT NULL DEFAULT 0";

/// The fence before [`SAVE`] (it locked the run and checked its sequence and
/// the lease; the run's update followed apart). Unused since; the migration
/// stays as applied.
const FENCE: &str = "CREATE FUNCTION anumate_orch_fence(
        p_tenant TEXT, p_run TEXT, p_owner TEXT, p_until BIGINT, p_seq BIGINT) RETURNS VOID
        LANGUAGE plpgsql AS $$
      BEGIN
        PERFORM 1 FROM orch_runs
          WHERE tenant_id = p_tenant AND run_id = p_run AND seq = p_seq FOR UPDATE;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'anumate_orch_stale: the run changed since the worker read it';
        END IF;
        UPDATE orch_work SET lease_until = p_until
          WHERE tenant_id = p_tenant AND run_id = p_run AND lease_owner = p_owner;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'anumate_orch_stale: the worker does not hold the lease';
        END IF;
      END $$";

/// [`save_fenced`] on PostgreSQL: saves the run only if its sequence is
/// still the one the worker last saw (the update locks the run, and a
/// change committed meanwhile fails its condition) and the worker still
/// holds its lease (which it extends), or raises [`STALE`]. One statement
/// at the head of a save's batch, so the rest of the batch commits only
/// when the fence holds; it replaces `anumate_orch_fence` and the run's
/// own update, one statement less per save.
const SAVE: &str = "CREATE FUNCTION anumate_orch_save(
        p_tenant TEXT, p_run TEXT, p_owner TEXT, p_until BIGINT, p_seq BIGINT,
        p_state INTEGER, p_run_json TEXT, p_new_seq BIGINT) RETURNS VOID
        LANGUAGE plpgsql AS $$
      BEGIN
        UPDATE orch_runs SET state = p_state, run_json = p_run_json, seq = p_new_seq
          WHERE tenant_id = p_tenant AND run_id = p_run AND seq = p_seq;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'anumate_orch_stale: the run changed since the worker read it';
        END IF;
        UPDATE orch_work SET lease_until = p_until
          WHERE tenant_id = p_tenant AND run_id = p_run AND lease_owner = p_owner;
        IF NOT FOUND THEN
          RAISE EXCEPTION 'anumate_orch_stale: the worker does not hold the lease';
        END IF;
      END $$";

/// Orchestrator tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "orchestrator_0001_journal",
        postgres: DDL,
        sqlite: DDL,
        tenant_tables: &["orch_runs", "orch_steps", "orch_history"],
    },
    Migration {
        id: "orchestrator_0002_seq",
        postgres: SEQ,
        sqlite: SEQ,
        tenant_tables: &[],
    },
    Migration {
        id: "orchestrator_0003_fence",
        postgres: FENCE,
        sqlite: "SELECT 1",
        tenant_tables: &[],
    },
    Migration {
        id: "orchestrator_0004_save",
        postgres: SAVE,
        sqlite: "SELECT 1",
        tenant_tables: &[],
    },
];

/// The message a failed [`fence`] raises (in the batch's commit error).
pub const STALE: &str = "anumate_orch_stale";

/// Saves `run` (at its new sequence) at the head of a deferred save
/// (`Store::write_deferred`, PostgreSQL only), fencing the rest: the
/// batch's commit fails with [`STALE`] in the error, writing nothing, unless
/// the stored run's sequence is still `seen` and `owner` holds the run's
/// lease, which is extended to `until`. The run stays locked until the
/// commit.
pub async fn save_fenced(
    tx: &TenantTx,
    run: &pb::Run,
    owner: &str,
    until: i64,
    seen: i64,
) -> Result<()> {
    tx.execute(
        "SELECT anumate_orch_save($1, $2, $3, $4, $5, $6, $7, $8)",
        vec![
            tx.tenant_id().into(),
            run.run_id.as_str().into(),
            owner.into(),
            until.into(),
            seen.into(),
            run.state.into(),
            json(run)?.into(),
            run.sequence.into(),
        ],
    )
    .await?;
    Ok(())
}

fn db(e: anumate_store::DbErr) -> Error {
    Error::internal(e)
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(Error::internal)
}

fn parse<T: serde::de::DeserializeOwned>(row: &QueryResult, col: &str) -> Result<T> {
    let text: String = row.try_get("", col).map_err(db)?;
    serde_json::from_str(&text).map_err(Error::internal)
}

/// A stored run: the run (without steps), the request it was created from
/// and the principal it acts for.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub run: pb::Run,
    pub request: serde_json::Value,
    pub principal: crate::Starter,
}

fn run_row(row: &QueryResult) -> Result<RunRow> {
    Ok(RunRow {
        run: parse(row, "run_json")?,
        request: parse(row, "request_json")?,
        principal: parse(row, "principal_json")?,
    })
}

const RUN_COLS: &str = "run_json, request_json, principal_json";

/// Inserts a new run.
pub async fn insert_run(tx: &TenantTx, r: &RunRow, created_at: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO orch_runs (tenant_id, run_id, idempotency_key, request_json, plan_hash, capsule_name, state, created_by, created_at, principal_json, run_json, seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        vec![
            tx.tenant_id().into(),
            r.run.run_id.as_str().into(),
            r.run.idempotency_key.as_str().into(),
            json(&r.request)?.into(),
            r.run.plan_hash.as_str().into(),
            r.run.capsule_name.as_str().into(),
            r.run.state.into(),
            r.run.created_by.as_str().into(),
            created_at.into(),
            json(&r.principal)?.into(),
            json(&r.run)?.into(),
            r.run.sequence.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Saves a run's changed fields (and its sequence).
pub async fn update_run(tx: &TenantTx, run: &pb::Run) -> Result<()> {
    tx.execute(
        "UPDATE orch_runs SET state = $3, run_json = $4, seq = $5 WHERE tenant_id = $1 AND run_id = $2",
        vec![
            tx.tenant_id().into(),
            run.run_id.as_str().into(),
            run.state.into(),
            json(run)?.into(),
            run.sequence.into(),
        ],
    )
    .await?;
    Ok(())
}

/// A run by id (`lock`: `FOR UPDATE` on PostgreSQL).
pub async fn get_run(tx: &TenantTx, run_id: &str, lock: bool) -> Result<Option<RunRow>> {
    let lock = if lock && tx.backend() == anumate_store::Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let row = tx
        .query_one(
            &format!("SELECT {RUN_COLS} FROM orch_runs WHERE tenant_id = $1 AND run_id = $2{lock}"),
            vec![tx.tenant_id().into(), run_id.into()],
        )
        .await?;
    row.as_ref().map(run_row).transpose()
}

/// A run and its steps in plan order, read in one round trip on
/// PostgreSQL (`Store::read_text`), for a worker's pass.
pub async fn run_and_steps(
    store: &anumate_store::Store,
    tenant: &str,
    run_id: &str,
) -> Result<Option<(RunRow, Vec<pb::StepRun>)>> {
    let rows = store
        .read_text(
            tenant,
            "SELECT 'r' AS k, -1 AS idx, run_json AS a, request_json AS b, principal_json AS c \
             FROM orch_runs WHERE tenant_id = $1 AND run_id = $2 \
             UNION ALL SELECT 's', idx, step_json, '', '' \
             FROM orch_steps WHERE tenant_id = $1 AND run_id = $2 ORDER BY k, idx",
            &[tenant, run_id],
        )
        .await?;
    let mut rows = rows.iter();
    let Some(first) = rows.next() else {
        return Ok(None);
    };
    let kind: String = first.try_get("", "k").map_err(db)?;
    if kind != "r" {
        return Ok(None);
    }
    let row = RunRow {
        run: parse(first, "a")?,
        request: parse(first, "b")?,
        principal: parse(first, "c")?,
    };
    let steps = rows.map(|r| parse(r, "a")).collect::<Result<_>>()?;
    Ok(Some((row, steps)))
}

/// The run created with an idempotency key.
pub async fn run_by_key(tx: &TenantTx, key: &str) -> Result<Option<RunRow>> {
    let row = tx
        .query_one(
            &format!(
                "SELECT {RUN_COLS} FROM orch_runs WHERE tenant_id = $1 AND idempotency_key = $2"
            ),
            vec![tx.tenant_id().into(), key.into()],
        )
        .await?;
    row.as_ref().map(run_row).transpose()
}

/// Frees an idempotency key older than the retention: the old run keeps
/// its id but no longer answers to the key.
pub async fn retire_key(tx: &TenantTx, run_id: &str) -> Result<()> {
    tx.execute(
        "UPDATE orch_runs SET idempotency_key = $3 WHERE tenant_id = $1 AND run_id = $2",
        vec![
            tx.tenant_id().into(),
            run_id.into(),
            format!("retired:{run_id}").into(),
        ],
    )
    .await?;
    Ok(())
}

/// Inserts or replaces a step (one statement: it may be deferred).
pub async fn put_step(tx: &TenantTx, run_id: &str, idx: usize, step: &pb::StepRun) -> Result<()> {
    let idx = i32::try_from(idx).map_err(Error::internal)?;
    tx.execute(
        "INSERT INTO orch_steps (tenant_id, run_id, idx, step_id, state, step_json) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (tenant_id, run_id, step_id) DO UPDATE SET state = excluded.state, step_json = excluded.step_json",
        vec![
            tx.tenant_id().into(),
            run_id.into(),
            idx.into(),
            step.step_id.as_str().into(),
            step.state.into(),
            json(step)?.into(),
        ],
    )
    .await?;
    Ok(())
}

/// A run's steps, in plan order.
pub async fn steps(tx: &TenantTx, run_id: &str) -> Result<Vec<pb::StepRun>> {
    let rows = tx
        .query_all(
            "SELECT step_json FROM orch_steps WHERE tenant_id = $1 AND run_id = $2 ORDER BY idx",
            vec![tx.tenant_id().into(), run_id.into()],
        )
        .await?;
    rows.iter().map(|r| parse(r, "step_json")).collect()
}

/// Appends one history entry with the change `WatchRun` streams.
pub async fn append_history(
    tx: &TenantTx,
    run_id: &str,
    entry: &pb::RunHistoryEntry,
    change: &pb::WatchRunResponse,
    at: i64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO orch_history (tenant_id, run_id, sequence, at, entry_json, change_json) VALUES ($1, $2, $3, $4, $5, $6)",
        vec![
            tx.tenant_id().into(),
            run_id.into(),
            entry.sequence.into(),
            at.into(),
            json(entry)?.into(),
            json(change)?.into(),
        ],
    )
    .await?;
    Ok(())
}

/// History entries after `after`, oldest first, at most `limit`.
pub async fn history(
    tx: &TenantTx,
    run_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<(pb::RunHistoryEntry, pb::WatchRunResponse)>> {
    let rows = tx
        .query_all(
            "SELECT entry_json, change_json FROM orch_history WHERE tenant_id = $1 AND run_id = $2 AND sequence > $3 ORDER BY sequence LIMIT $4",
            vec![
                tx.tenant_id().into(),
                run_id.into(),
                after.into(),
                limit.into(),
            ],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((parse(r, "entry_json")?, parse(r, "change_json")?)))
        .collect()
}

/// `ListRuns` filters.
pub struct Filter<'a> {
    pub state: i32,
    pub plan_hash: &'a str,
    pub capsule_name: &'a str,
    pub created_by: &'a str,
    pub after: Option<i64>,
    pub before: Option<i64>,
}

/// Runs newest first; the page token carries `created_at/run_id`.
pub async fn list(
    tx: &TenantTx,
    f: &Filter<'_>,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<pb::Run>, String)> {
    let (size, after) = paging::page_params(page_size, page_token)?;
    let mut sql = "SELECT run_json, created_at FROM orch_runs WHERE tenant_id = $1".to_string();
    let mut values: Vec<anumate_store::Value> = vec![tx.tenant_id().into()];
    let mut add = |col: &str, op: &str, v: anumate_store::Value| {
        values.push(v);
        sql.push_str(&format!(" AND {col} {op} ${}", values.len()));
    };
    if f.state != 0 {
        add("state", "=", f.state.into());
    }
    if !f.plan_hash.is_empty() {
        add("plan_hash", "=", f.plan_hash.into());
    }
    if !f.capsule_name.is_empty() {
        add("capsule_name", "=", f.capsule_name.into());
    }
    if !f.created_by.is_empty() {
        add("created_by", "=", f.created_by.into());
    }
    if let Some(t) = f.after {
        add("created_at", ">=", t.into());
    }
    if let Some(t) = f.before {
        add("created_at", "<", t.into());
    }
    if let Some(after) = after {
        let (at, id) = after.split_once('/').ok_or_else(paging::malformed_token)?;
        let at: i64 = at.parse().map_err(|_| paging::malformed_token())?;
        values.push(at.into());
        values.push(id.into());
        sql.push_str(&format!(
            " AND (created_at < ${a} OR (created_at = ${a} AND run_id < ${i}))",
            a = values.len() - 1,
            i = values.len()
        ));
    }
    values.push((size + 1).into());
    sql.push_str(&format!(
        " ORDER BY created_at DESC, run_id DESC LIMIT ${}",
        values.len()
    ));
    let rows = tx.query_all(&sql, values).await?;
    let items = rows
        .iter()
        .map(|r| {
            let run: pb::Run = parse(r, "run_json")?;
            let at: i64 = r.try_get("", "created_at").map_err(db)?;
            Ok((run, at))
        })
        .collect::<Result<Vec<(pb::Run, i64)>>>()?;
    let (items, next) = paging::finish_page(items, size, |(r, at)| format!("{at}/{}", r.run_id));
    Ok((items.into_iter().map(|(r, _)| r).collect(), next))
}

/// Schedules a run for a worker at `due_at` (keeps an earlier time).
pub async fn schedule(tx: &TenantTx, run_id: &str, due_at: i64) -> Result<()> {
    let n = tx
        .execute(
            "UPDATE orch_work SET due_at = CASE WHEN due_at < $3 THEN due_at ELSE $3 END WHERE tenant_id = $1 AND run_id = $2",
            vec![tx.tenant_id().into(), run_id.into(), due_at.into()],
        )
        .await?;
    if n == 0 {
        tx.execute(
            "INSERT INTO orch_work (tenant_id, run_id, due_at, lease_owner, lease_until) VALUES ($1, $2, $3, '', 0)",
            vec![tx.tenant_id().into(), run_id.into(), due_at.into()],
        )
        .await?;
    }
    Ok(())
}

/// Sets the next time a worker looks at the run (replacing the current one).
pub async fn reschedule(tx: &TenantTx, run_id: &str, due_at: i64) -> Result<()> {
    tx.execute(
        "UPDATE orch_work SET due_at = $3 WHERE tenant_id = $1 AND run_id = $2",
        vec![tx.tenant_id().into(), run_id.into(), due_at.into()],
    )
    .await?;
    Ok(())
}

/// Takes the run off the work queue (terminal, paused, or waiting for a human).
pub async fn unschedule(tx: &TenantTx, run_id: &str) -> Result<()> {
    tx.execute(
        "DELETE FROM orch_work WHERE tenant_id = $1 AND run_id = $2",
        vec![tx.tenant_id().into(), run_id.into()],
    )
    .await?;
    Ok(())
}

/// Claims up to `limit` due runs whose lease is free or expired for
/// `owner` until `until`. On PostgreSQL rows another replica is claiming are
/// skipped (`FOR UPDATE SKIP LOCKED`).
pub async fn claim(
    tx: &SystemTx,
    owner: &str,
    now: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<(String, String)>> {
    let skip = if tx.backend() == anumate_store::Backend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let rows = tx
        .query_all(
            &format!(
                "UPDATE orch_work SET lease_owner = $3, lease_until = $4 \
                 WHERE (tenant_id, run_id) IN (SELECT tenant_id, run_id FROM orch_work \
                   WHERE due_at <= $1 AND lease_until < $1 ORDER BY due_at LIMIT $2{skip}) \
                 RETURNING tenant_id, run_id"
            ),
            vec![now.into(), limit.into(), owner.into(), until.into()],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let tenant: String = r.try_get("", "tenant_id").map_err(db)?;
            let run: String = r.try_get("", "run_id").map_err(db)?;
            Ok((tenant, run))
        })
        .collect()
}

/// Extends or releases (`until` = 0) a lease this owner holds.
pub async fn set_lease(
    tx: &SystemTx,
    tenant: &str,
    run_id: &str,
    owner: &str,
    until: i64,
) -> Result<()> {
    tx.execute(
        "UPDATE orch_work SET lease_until = $4 WHERE tenant_id = $1 AND run_id = $2 AND lease_owner = $3",
        vec![tenant.into(), run_id.into(), owner.into(), until.into()],
    )
    .await?;
    Ok(())
}

/// Fences a worker's change of a run and extends the worker's lease in
/// one statement: true when `owner` holds the lease of the queued run, which
/// is then extended to `until`; the row stays locked until the transaction
/// ends, so another replica cannot claim the run between this check and the
/// commit of the change it fences.
pub async fn hold_lease(tx: &TenantTx, run_id: &str, owner: &str, until: i64) -> Result<bool> {
    let n = tx
        .execute(
            "UPDATE orch_work SET lease_until = $4 WHERE tenant_id = $1 AND run_id = $2 AND lease_owner = $3",
            vec![
                tx.tenant_id().into(),
                run_id.into(),
                owner.into(),
                until.into(),
            ],
        )
        .await?;
    Ok(n > 0)
}
