//! SQL for the receipt log. Every query on a tenant table also filters on the
//! transaction's tenant; on PostgreSQL row-level security enforces it again.
//!
//! `receipts`, `receipt_tree_nodes` and `receipt_checkpoints` are write-once:
//! triggers refuse UPDATE, DELETE (and TRUNCATE on PostgreSQL) for every role,
//! and on PostgreSQL the serving role keeps only SELECT and INSERT (the
//! `anumate:append-only` table comment, see `anumate_store::APPEND_ONLY_COMMENT`).
//! `receipt_logs` holds one mutable head row per tenant (size, last checkpoint
//! size); it is the per-tenant append lock and the checkpointer's work list, so
//! it has no row-level security (it holds no receipt data).

use std::collections::HashMap;

use anumate_errors::{Error, Result};
use anumate_receipt::Hash;
use anumate_store::{Backend, Migration, QueryResult, SystemTx, TenantTx, Value};

const TABLES: &str = "CREATE TABLE receipt_logs (
        tenant_id TEXT PRIMARY KEY,
        size BIGINT NOT NULL,
        checkpoint_size BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
      );
      CREATE TABLE receipts (
        tenant_id TEXT NOT NULL,
        leaf_index BIGINT NOT NULL,
        receipt_id TEXT NOT NULL,
        dedupe_key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        kind TEXT NOT NULL,
        run_id TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        issued_at BIGINT NOT NULL,
        statement_json TEXT NOT NULL,
        signature TEXT NOT NULL,
        kid TEXT NOT NULL,
        leaf_hash TEXT NOT NULL,
        content_json TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, leaf_index),
        UNIQUE (tenant_id, receipt_id),
        UNIQUE (tenant_id, dedupe_key)
      );
      CREATE INDEX receipts_run ON receipts (tenant_id, run_id);
      CREATE TABLE receipt_tree_nodes (
        tenant_id TEXT NOT NULL,
        level INTEGER NOT NULL,
        node_index BIGINT NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (tenant_id, level, node_index)
      );
      CREATE TABLE receipt_checkpoints (
        tenant_id TEXT NOT NULL,
        size BIGINT NOT NULL,
        root TEXT NOT NULL,
        note TEXT NOT NULL,
        kid TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, size)
      )";

const POSTGRES_WRITE_ONCE: &str = "CREATE FUNCTION anumate_receipts_write_once() RETURNS trigger
        LANGUAGE plpgsql AS $$
      BEGIN
        RAISE EXCEPTION 'table % is write-once: % refused', TG_TABLE_NAME, TG_OP
          USING ERRCODE = 'insufficient_privilege';
      END $$;
      CREATE TRIGGER receipts_write_once BEFORE UPDATE OR DELETE ON receipts
        FOR EACH ROW EXECUTE FUNCTION anumate_receipts_write_once();
      CREATE TRIGGER receipts_no_truncate BEFORE TRUNCATE ON receipts
        FOR EACH STATEMENT EXECUTE FUNCTION anumate_receipts_write_once();
      CREATE TRIGGER receipt_tree_nodes_write_once BEFORE UPDATE OR DELETE ON receipt_tree_nodes
        FOR EACH ROW EXECUTE FUNCTION anumate_receipts_write_once();
      CREATE TRIGGER receipt_tree_nodes_no_truncate BEFORE TRUNCATE ON receipt_tree_nodes
        FOR EACH STATEMENT EXECUTE FUNCTION anumate_receipts_write_once();
      CREATE TRIGGER receipt_checkpoints_write_once BEFORE UPDATE OR DELETE ON receipt_checkpoints
        FOR EACH ROW EXECUTE FUNCTION anumate_receipts_write_once();
      CREATE TRIGGER receipt_checkpoints_no_truncate BEFORE TRUNCATE ON receipt_checkpoints
        FOR EACH STATEMENT EXECUTE FUNCTION anumate_receipts_write_once();
      COMMENT ON TABLE receipts IS 'anumate:append-only';
      COMMENT ON TABLE receipt_tree_nodes IS 'anumate:append-only';
      COMMENT ON TABLE receipt_checkpoints IS 'anumate:append-only'";

const SQLITE_WRITE_ONCE: &str = "CREATE TRIGGER receipts_no_update BEFORE UPDATE ON receipts
        BEGIN SELECT RAISE(ABORT, 'table receipts is write-once: UPDATE refused'); END;
      CREATE TRIGGER receipts_no_delete BEFORE DELETE ON receipts
        BEGIN SELECT RAISE(ABORT, 'table receipts is write-once: DELETE refused'); END;
      CREATE TRIGGER receipt_tree_nodes_no_update BEFORE UPDATE ON receipt_tree_nodes
        BEGIN SELECT RAISE(ABORT, 'table receipt_tree_nodes is write-once: UPDATE refused'); END;
      CREATE TRIGGER receipt_tree_nodes_no_delete BEFORE DELETE ON receipt_tree_nodes
        BEGIN SELECT RAISE(ABORT, 'table receipt_tree_nodes is write-once: DELETE refused'); END;
      CREATE TRIGGER receipt_checkpoints_no_update BEFORE UPDATE ON receipt_checkpoints
        BEGIN SELECT RAISE(ABORT, 'table receipt_checkpoints is write-once: UPDATE refused'); END;
      CREATE TRIGGER receipt_checkpoints_no_delete BEFORE DELETE ON receipt_checkpoints
        BEGIN SELECT RAISE(ABORT, 'table receipt_checkpoints is write-once: DELETE refused'); END";

/// Receipt bodies, apart from the write-once log so retention can remove them:
/// `receipt_contents` refuses UPDATE (a body is never altered) but allows
/// DELETE; `receipt_archives` records each retention pass and is write-once.
/// Receipts appended before this migration keep their body in
/// `receipts.content_json`, which retention cannot remove.
const CONTENTS: &str = "CREATE TABLE receipt_contents (
        tenant_id TEXT NOT NULL,
        receipt_id TEXT NOT NULL,
        issued_at BIGINT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (tenant_id, receipt_id)
      );
      CREATE INDEX receipt_contents_issued ON receipt_contents (tenant_id, issued_at);
      CREATE TABLE receipt_archives (
        tenant_id TEXT NOT NULL,
        archive_id TEXT NOT NULL,
        cutoff BIGINT NOT NULL,
        removed BIGINT NOT NULL,
        archived_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, archive_id)
      )";

const POSTGRES_CONTENTS_RULES: &str =
    "CREATE TRIGGER receipt_contents_no_update BEFORE UPDATE ON receipt_contents
        FOR EACH ROW EXECUTE FUNCTION anumate_receipts_write_once();
      CREATE TRIGGER receipt_archives_write_once BEFORE UPDATE OR DELETE ON receipt_archives
        FOR EACH ROW EXECUTE FUNCTION anumate_receipts_write_once();
      COMMENT ON TABLE receipt_archives IS 'anumate:append-only'";

const SQLITE_CONTENTS_RULES: &str =
    "CREATE TRIGGER receipt_contents_no_update BEFORE UPDATE ON receipt_contents
        BEGIN SELECT RAISE(ABORT, 'table receipt_contents is write-once: UPDATE refused'); END;
      CREATE TRIGGER receipt_archives_no_update BEFORE UPDATE ON receipt_archives
        BEGIN SELECT RAISE(ABORT, 'table receipt_archives is write-once: UPDATE refused'); END;
      CREATE TRIGGER receipt_archives_no_delete BEFORE DELETE ON receipt_archives
        BEGIN SELECT RAISE(ABORT, 'table receipt_archives is write-once: DELETE refused'); END";

/// The serving role's narrow paths (PostgreSQL). `receipt_contents` becomes
/// append-only for it (no UPDATE, DELETE or TRUNCATE): bodies go only through
/// `anumate_receipts_remove_contents(cutoff, archive_id, now)`, a security-
/// definer function that removes the transaction tenant's bodies older than a
/// cutoff and always records the pass in write-once `receipt_archives` — no
/// single body can be picked out, and no removal goes unrecorded.
/// `receipt_logs` heads only move forward, within the transaction's tenant,
/// and are never deleted.
const POSTGRES_NARROW_WRITES: &str = "CREATE FUNCTION anumate_receipts_remove_contents(
          p_cutoff BIGINT, p_archive_id TEXT, p_now BIGINT) RETURNS BIGINT
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public AS $$
      DECLARE
        t TEXT := current_setting('app.tenant_id', true);
        n BIGINT;
      BEGIN
        IF t IS NULL OR t = '' OR t = '-' THEN
          RAISE EXCEPTION 'receipt bodies are removed within one tenant''s transaction'
            USING ERRCODE = 'insufficient_privilege';
        END IF;
        DELETE FROM receipt_contents WHERE tenant_id = t AND issued_at < p_cutoff;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n > 0 THEN
          INSERT INTO receipt_archives (tenant_id, archive_id, cutoff, removed, archived_at)
            VALUES (t, p_archive_id, p_cutoff, n, p_now);
        END IF;
        RETURN n;
      END $$;
      COMMENT ON TABLE receipt_contents IS 'anumate:append-only';
      CREATE FUNCTION anumate_receipt_logs_forward() RETURNS trigger
        LANGUAGE plpgsql AS $$
      BEGIN
        IF TG_OP <> 'UPDATE' THEN
          RAISE EXCEPTION 'receipt_logs: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF NEW.tenant_id <> OLD.tenant_id
           OR OLD.tenant_id IS DISTINCT FROM current_setting('app.tenant_id', true)
           OR NEW.size < OLD.size
           OR NEW.checkpoint_size < OLD.checkpoint_size
           OR NEW.checkpoint_size > NEW.size THEN
          RAISE EXCEPTION 'receipt_logs: a head only moves forward, in its own tenant''s transaction'
            USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER receipt_logs_forward BEFORE UPDATE OR DELETE ON receipt_logs
        FOR EACH ROW EXECUTE FUNCTION anumate_receipt_logs_forward();
      CREATE TRIGGER receipt_logs_no_truncate BEFORE TRUNCATE ON receipt_logs
        FOR EACH STATEMENT EXECUTE FUNCTION anumate_receipt_logs_forward()";

/// SQLite has one login: heads only move forward and are never deleted.
const SQLITE_NARROW_WRITES: &str =
    "CREATE TRIGGER receipt_logs_forward BEFORE UPDATE ON receipt_logs
        WHEN NEW.tenant_id <> OLD.tenant_id OR NEW.size < OLD.size
          OR NEW.checkpoint_size < OLD.checkpoint_size OR NEW.checkpoint_size > NEW.size
        BEGIN SELECT RAISE(ABORT, 'receipt_logs: a head only moves forward'); END;
      CREATE TRIGGER receipt_logs_no_delete BEFORE DELETE ON receipt_logs
        BEGIN SELECT RAISE(ABORT, 'receipt_logs: DELETE refused'); END";

/// Receipt log tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "receipts_0001_log",
        postgres: TABLES,
        sqlite: TABLES,
        tenant_tables: &["receipts", "receipt_tree_nodes", "receipt_checkpoints"],
    },
    Migration {
        id: "receipts_0002_write_once",
        postgres: POSTGRES_WRITE_ONCE,
        sqlite: SQLITE_WRITE_ONCE,
        tenant_tables: &[],
    },
    Migration {
        id: "receipts_0003_contents",
        postgres: CONTENTS,
        sqlite: CONTENTS,
        tenant_tables: &["receipt_contents", "receipt_archives"],
    },
    Migration {
        id: "receipts_0005_narrow_writes",
        postgres: POSTGRES_NARROW_WRITES,
        sqlite: SQLITE_NARROW_WRITES,
        tenant_tables: &[],
    },
    Migration {
        id: "receipts_0004_contents_rules",
        postgres: POSTGRES_CONTENTS_RULES,
        sqlite: SQLITE_CONTENTS_RULES,
        tenant_tables: &[],
    },
];

pub fn db(e: anumate_store::DbErr) -> Error {
    Error::internal(e)
}

/// A tenant's log head.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub size: u64,
    pub checkpoint_size: u64,
}

fn to_u64(v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::internal(format!("negative size {v} in the log")))
}

fn to_i64(v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::internal(format!("log size {v} out of range")))
}

/// Locks the tenant's head row for the transaction (`FOR UPDATE` on
/// PostgreSQL; SQLite write transactions are exclusive), creating it first if
/// the tenant has no log yet.
pub async fn lock_head(tx: &TenantTx) -> Result<Head> {
    let lock = if tx.backend() == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let select =
        format!("SELECT size, checkpoint_size FROM receipt_logs WHERE tenant_id = $1{lock}");
    let mut row = tx.query_one(&select, vec![tx.tenant_id().into()]).await?;
    if row.is_none() {
        tx.execute(
            "INSERT INTO receipt_logs (tenant_id, size, checkpoint_size, updated_at) \
             VALUES ($1, 0, 0, $2) ON CONFLICT (tenant_id) DO NOTHING",
            vec![tx.tenant_id().into(), anumate_store::now_micros().into()],
        )
        .await?;
        row = tx.query_one(&select, vec![tx.tenant_id().into()]).await?;
    }
    let row = row.ok_or_else(|| Error::internal("receipt log head vanished"))?;
    Ok(Head {
        size: to_u64(row.try_get("", "size").map_err(db)?)?,
        checkpoint_size: to_u64(row.try_get("", "checkpoint_size").map_err(db)?)?,
    })
}

/// Sets the head's size (inside the transaction holding its lock; [`append_batch`] on SQLite).
async fn set_head_size(tx: &TenantTx, size: u64) -> Result<()> {
    tx.execute(
        "UPDATE receipt_logs SET size = $2, updated_at = $3 WHERE tenant_id = $1",
        vec![
            tx.tenant_id().into(),
            to_i64(size)?.into(),
            anumate_store::now_micros().into(),
        ],
    )
    .await?;
    Ok(())
}

/// Records that a checkpoint of `size` was published.
pub async fn set_checkpoint_size(tx: &TenantTx, size: u64) -> Result<()> {
    tx.execute(
        "UPDATE receipt_logs SET checkpoint_size = $2, updated_at = $3 WHERE tenant_id = $1",
        vec![
            tx.tenant_id().into(),
            to_i64(size)?.into(),
            anumate_store::now_micros().into(),
        ],
    )
    .await?;
    Ok(())
}

/// Tenants whose log has leaves no checkpoint covers yet. Reads across
/// tenants: `receipt_logs` has no row-level security.
pub async fn tenants_behind(tx: &SystemTx) -> Result<Vec<String>> {
    let rows = tx
        .query_all(
            "SELECT tenant_id FROM receipt_logs WHERE size > checkpoint_size ORDER BY tenant_id",
            vec![],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("", "tenant_id").map_err(db))
        .collect()
}

/// Every tenant with a log.
pub async fn all_tenants(tx: &SystemTx) -> Result<Vec<String>> {
    let rows = tx
        .query_all(
            "SELECT tenant_id FROM receipt_logs ORDER BY tenant_id",
            vec![],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("", "tenant_id").map_err(db))
        .collect()
}

/// Removes the bodies of the tenant's receipts issued before `cutoff` (Unix
/// microseconds) and records the pass; returns how many were removed.
pub async fn remove_contents_before(tx: &TenantTx, cutoff: i64) -> Result<u64> {
    let archive_id = uuid::Uuid::now_v7().to_string();
    let now = anumate_store::now_micros();
    if tx.backend() == Backend::Postgres {
        // The serving role cannot DELETE bodies itself (see POSTGRES_NARROW_WRITES).
        let row = tx
            .query_one(
                "SELECT anumate_receipts_remove_contents($1, $2, $3) AS removed",
                vec![cutoff.into(), archive_id.into(), now.into()],
            )
            .await?
            .ok_or_else(|| Error::internal("retention function returned no row"))?;
        let removed: i64 = row.try_get("", "removed").map_err(db)?;
        return to_u64(removed);
    }
    let removed = tx
        .execute(
            "DELETE FROM receipt_contents WHERE tenant_id = $1 AND issued_at < $2",
            vec![tx.tenant_id().into(), cutoff.into()],
        )
        .await?;
    if removed > 0 {
        tx.execute(
            "INSERT INTO receipt_archives (tenant_id, archive_id, cutoff, removed, archived_at) \
             VALUES ($1, $2, $3, $4, $5)",
            vec![
                tx.tenant_id().into(),
                archive_id.into(),
                cutoff.into(),
                to_i64(removed)?.into(),
                now.into(),
            ],
        )
        .await?;
    }
    Ok(removed)
}

fn parse_hash(text: &str) -> Result<Hash> {
    hex::decode(text)
        .ok()
        .and_then(|b| Hash::try_from(b).ok())
        .ok_or_else(|| Error::internal("stored hash is not 32 bytes of hex"))
}

/// Reads the nodes `(level, index)` that exist among `wanted`.
///
/// PostgreSQL gets one statement with the wanted positions as arrays, each
/// looked up by its own primary-key probe (the `LATERAL … LIMIT 1` keeps that
/// plan even when the table has no statistics yet); SQLite gets chunks of
/// `OR`ed pairs.
pub async fn nodes(tx: &TenantTx, wanted: &[(u32, u64)]) -> Result<HashMap<(u32, u64), Hash>> {
    let mut rows = Vec::new();
    if tx.backend() == Backend::Postgres {
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        let levels = wanted
            .iter()
            .map(|(level, _)| i32::try_from(*level).map_err(Error::internal))
            .collect::<Result<Vec<i32>>>()?;
        let indexes = wanted
            .iter()
            .map(|(_, index)| to_i64(*index))
            .collect::<Result<Vec<i64>>>()?;
        rows = tx
            .query_all(
                "SELECT n.level, n.node_index, n.hash \
                 FROM unnest($2::int[], $3::bigint[]) AS w(level, node_index) \
                 CROSS JOIN LATERAL (SELECT t.level, t.node_index, t.hash FROM receipt_tree_nodes t \
                   WHERE t.tenant_id = $1 AND t.level = w.level AND t.node_index = w.node_index \
                   LIMIT 1) n",
                vec![
                    tx.tenant_id().into(),
                    Value::from(levels),
                    Value::from(indexes),
                ],
            )
            .await?;
    } else {
        for chunk in wanted.chunks(100) {
            let mut sql = String::from(
                "SELECT level, node_index, hash FROM receipt_tree_nodes WHERE tenant_id = $1 AND (",
            );
            let mut values: Vec<Value> = vec![tx.tenant_id().into()];
            for (i, (level, index)) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push_str(" OR ");
                }
                let n = values.len();
                sql.push_str(&format!("(level = ${} AND node_index = ${})", n + 1, n + 2));
                values.push(i32::try_from(*level).map_err(Error::internal)?.into());
                values.push(to_i64(*index)?.into());
            }
            sql.push(')');
            rows.extend(tx.query_all(&sql, values).await?);
        }
    }
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let level: i32 = row.try_get("", "level").map_err(db)?;
        let index: i64 = row.try_get("", "node_index").map_err(db)?;
        let hash: String = row.try_get("", "hash").map_err(db)?;
        out.insert(
            (
                u32::try_from(level).map_err(Error::internal)?,
                to_u64(index)?,
            ),
            parse_hash(&hash)?,
        );
    }
    Ok(out)
}

/// Inserts newly completed tree nodes, several per statement ([`append_batch`] on SQLite).
async fn insert_nodes(tx: &TenantTx, nodes: &[(u32, u64, Hash)]) -> Result<()> {
    for chunk in nodes.chunks(200) {
        let mut sql = String::from(
            "INSERT INTO receipt_tree_nodes (tenant_id, level, node_index, hash) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 4);
        for (i, (level, index, hash)) in chunk.iter().enumerate() {
            let n = values.len();
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("(${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4));
            values.push(tx.tenant_id().into());
            values.push(i32::try_from(*level).map_err(Error::internal)?.into());
            values.push(to_i64(*index)?.into());
            values.push(hex::encode(hash).into());
        }
        tx.execute(&sql, values).await?;
    }
    Ok(())
}

/// Writes a batch's new receipts, their bodies, the tree nodes they completed
/// and the head's new size (inside the transaction holding the head's lock).
///
/// On PostgreSQL this is one statement whatever the batch's size: columns go
/// as arrays through `unnest`, so the statement text never changes, stays
/// prepared on each connection and is planned once. SQLite (in-process, cheap
/// to prepare) takes multi-row `VALUES`.
pub async fn append_batch(
    tx: &TenantTx,
    receipts: &[NewReceipt<'_>],
    nodes: &[(u32, u64, Hash)],
    size: u64,
) -> Result<()> {
    if receipts.is_empty() && nodes.is_empty() {
        return Ok(());
    }
    if tx.backend() == Backend::Sqlite {
        insert_receipts(tx, receipts).await?;
        insert_nodes(tx, nodes).await?;
        return set_head_size(tx, size).await;
    }
    let values = pg_batch_values(tx, receipts, nodes, size)?;
    tx.execute(PG_APPEND_BATCH, values).await?;
    Ok(())
}

/// The values of [`PG_APPEND_BATCH`] (`$1`–`$19`).
fn pg_batch_values(
    tx: &TenantTx,
    receipts: &[NewReceipt<'_>],
    nodes: &[(u32, u64, Hash)],
    size: u64,
) -> Result<Vec<Value>> {
    let texts = |f: for<'r, 's> fn(&'r NewReceipt<'s>) -> &'s str| -> Value {
        Value::from(
            receipts
                .iter()
                .map(|r| f(r).to_string())
                .collect::<Vec<_>>(),
        )
    };
    let leaf_indexes = receipts
        .iter()
        .map(|r| to_i64(r.leaf_index))
        .collect::<Result<Vec<i64>>>()?;
    let levels = nodes
        .iter()
        .map(|(level, _, _)| i32::try_from(*level).map_err(Error::internal))
        .collect::<Result<Vec<i32>>>()?;
    let node_indexes = nodes
        .iter()
        .map(|(_, index, _)| to_i64(*index))
        .collect::<Result<Vec<i64>>>()?;
    Ok(vec![
        tx.tenant_id().into(),
        Value::from(leaf_indexes),
        texts(|r| r.receipt_id),
        texts(|r| r.dedupe_key),
        texts(|r| r.request_hash),
        texts(|r| r.kind),
        texts(|r| r.run_id),
        texts(|r| r.plan_hash),
        Value::from(receipts.iter().map(|r| r.issued_at).collect::<Vec<i64>>()),
        texts(|r| r.statement_json),
        texts(|r| r.signature),
        texts(|r| r.kid),
        Value::from(
            receipts
                .iter()
                .map(|r| hex::encode(r.leaf_hash))
                .collect::<Vec<_>>(),
        ),
        texts(|r| r.content_json),
        anumate_store::now_micros().into(),
        Value::from(levels),
        Value::from(node_indexes),
        Value::from(
            nodes
                .iter()
                .map(|(_, _, hash)| hex::encode(hash))
                .collect::<Vec<_>>(),
        ),
        to_i64(size)?.into(),
    ])
}

/// [`append_batch`] on PostgreSQL: `$1` tenant, `$2`–`$13` the receipts'
/// columns, `$14` their bodies, `$15` now, `$16`–`$18` the nodes, `$19` the
/// new size. Every data-modifying `WITH` part runs to completion.
const PG_APPEND_BATCH: &str = "WITH new_receipts AS (
        INSERT INTO receipts (tenant_id, leaf_index, receipt_id, dedupe_key, request_hash, kind,
          run_id, plan_hash, issued_at, statement_json, signature, kid, leaf_hash, content_json,
          created_at)
        SELECT $1, u.*, '', $15
        FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
          $8::text[], $9::bigint[], $10::text[], $11::text[], $12::text[], $13::text[]) AS u
      ), new_contents AS (
        INSERT INTO receipt_contents (tenant_id, receipt_id, issued_at, body)
        SELECT $1, u.* FROM unnest($3::text[], $9::bigint[], $14::text[]) AS u
      ), new_nodes AS (
        INSERT INTO receipt_tree_nodes (tenant_id, level, node_index, hash)
        SELECT $1, u.* FROM unnest($16::int[], $17::bigint[], $18::text[]) AS u
      )
      UPDATE receipt_logs SET size = $19, updated_at = $15 WHERE tenant_id = $1";

/// What [`append_batch_at`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// The batch is stored and the head moved; the head's checkpoint size.
    Stored(u64),
    /// Nothing was written: the head moved (another replica appended) or
    /// every dedupe key of the batch is stored (a retry). The transaction is untouched,
    /// so the checked append may follow in it.
    Refused,
    /// Part of the batch was written (some of its dedupe keys were stored,
    /// or taken by a transaction that committed while this one waited): the
    /// transaction must be rolled back.
    Partial,
}

/// [`append_batch`] on PostgreSQL for a log believed to be `expected` long
/// (the size this process last committed), without locking and reading the
/// head and looking up the dedupe keys first: one statement locks the head
/// and, only if its size is still `expected` and none of the dedupe keys is
/// stored, stores the batch and moves the head ([`Guarded`]). When it
/// refuses, the caller appends the checked way ([`lock_head`],
/// [`by_dedupe_keys`], [`append_batch`]).
pub async fn append_batch_at(
    tx: &TenantTx,
    receipts: &[NewReceipt<'_>],
    nodes: &[(u32, u64, Hash)],
    expected: u64,
    size: u64,
) -> Result<Guarded> {
    let mut values = pg_batch_values(tx, receipts, nodes, size)?;
    values.push(to_i64(expected)?.into());
    let row = tx
        .query_one(PG_APPEND_BATCH_AT, values)
        .await?
        .ok_or_else(|| Error::internal("the guarded append returned no row"))?;
    let stored: i64 = row.try_get("", "stored").map_err(db)?;
    let checkpoint_size: Option<i64> = row.try_get("", "checkpoint_size").map_err(db)?;
    Ok(match checkpoint_size {
        None => Guarded::Refused,
        Some(_) if stored == 0 => Guarded::Refused,
        Some(c) if usize::try_from(stored).ok() == Some(receipts.len()) => {
            Guarded::Stored(to_u64(c)?)
        }
        Some(_) => Guarded::Partial,
    })
}

/// [`append_batch_at`]'s statement: [`PG_APPEND_BATCH`]'s values and `$20`
/// the expected size. The head is locked first (every part reads `head`), so
/// a concurrent appender makes it wait and then refuse, never interleave.
///
/// Stored dedupe keys are found by the receipts' own insert (`ON CONFLICT
/// DO NOTHING`, which looks each key up in the unique index), not by a
/// query: a query's plan may scan all of the tenant's receipts when the
/// table's statistics predate the tenant (a new tenant looks like one row),
/// once per append. The bodies, nodes and head move only when every receipt
/// was inserted, so a batch whose keys are all stored writes nothing (the
/// transaction is untouched) and one with some stored wrote only receipts
/// (`Partial`: roll back).
const PG_APPEND_BATCH_AT: &str = "WITH head AS MATERIALIZED (
        SELECT checkpoint_size FROM receipt_logs WHERE tenant_id = $1 AND size = $20
        FOR UPDATE
      ), new_receipts AS (
        INSERT INTO receipts (tenant_id, leaf_index, receipt_id, dedupe_key, request_hash, kind,
          run_id, plan_hash, issued_at, statement_json, signature, kid, leaf_hash, content_json,
          created_at)
        SELECT $1, u.*, '', $15
        FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
          $8::text[], $9::bigint[], $10::text[], $11::text[], $12::text[], $13::text[]) AS u
        WHERE EXISTS (SELECT 1 FROM head)
        ON CONFLICT DO NOTHING
        RETURNING 1
      ), complete AS MATERIALIZED (
        SELECT (SELECT count(*) FROM new_receipts) = cardinality($3::text[]) AS ok
      ), new_contents AS (
        INSERT INTO receipt_contents (tenant_id, receipt_id, issued_at, body)
        SELECT $1, u.* FROM unnest($3::text[], $9::bigint[], $14::text[]) AS u
        WHERE (SELECT ok FROM complete)
      ), new_nodes AS (
        INSERT INTO receipt_tree_nodes (tenant_id, level, node_index, hash)
        SELECT $1, u.* FROM unnest($16::int[], $17::bigint[], $18::text[]) AS u
        WHERE (SELECT ok FROM complete)
      ), moved AS (
        UPDATE receipt_logs SET size = $19, updated_at = $15
        WHERE tenant_id = $1 AND (SELECT ok FROM complete)
      )
      SELECT (SELECT count(*) FROM new_receipts) AS stored,
        (SELECT checkpoint_size FROM head) AS checkpoint_size";

/// A stored receipt.
#[derive(Debug, Clone)]
pub struct ReceiptRow {
    pub leaf_index: u64,
    pub request_hash: String,
    pub issued_at: i64,
    pub statement_json: String,
    pub signature: String,
    pub kid: String,
    pub leaf_hash: Hash,
    pub content_json: String,
}

/// A receipt to insert.
pub struct NewReceipt<'a> {
    pub leaf_index: u64,
    pub receipt_id: &'a str,
    pub dedupe_key: &'a str,
    pub request_hash: &'a str,
    pub kind: &'a str,
    pub run_id: &'a str,
    pub plan_hash: &'a str,
    pub issued_at: i64,
    pub statement_json: &'a str,
    pub signature: &'a str,
    pub kid: &'a str,
    pub leaf_hash: &'a Hash,
    pub content_json: &'a str,
}

/// Inserts receipts and their bodies, several per statement ([`append_batch`] on SQLite).
async fn insert_receipts(tx: &TenantTx, receipts: &[NewReceipt<'_>]) -> Result<()> {
    for chunk in receipts.chunks(50) {
        let mut sql = String::from(
            "INSERT INTO receipts (tenant_id, leaf_index, receipt_id, dedupe_key, request_hash, kind, \
               run_id, plan_hash, issued_at, statement_json, signature, kid, leaf_hash, content_json, created_at) \
             VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 15);
        let now = anumate_store::now_micros();
        for (i, r) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let n = values.len();
            let params: Vec<String> = (1..=15).map(|k| format!("${}", n + k)).collect();
            sql.push_str(&format!("({})", params.join(", ")));
            values.extend([
                tx.tenant_id().into(),
                to_i64(r.leaf_index)?.into(),
                r.receipt_id.into(),
                r.dedupe_key.into(),
                r.request_hash.into(),
                r.kind.into(),
                r.run_id.into(),
                r.plan_hash.into(),
                r.issued_at.into(),
                r.statement_json.into(),
                r.signature.into(),
                r.kid.into(),
                hex::encode(r.leaf_hash).into(),
                "".into(),
                now.into(),
            ]);
        }
        tx.execute(&sql, values).await?;
        // The bodies, apart, so retention can remove them.
        let mut sql = String::from(
            "INSERT INTO receipt_contents (tenant_id, receipt_id, issued_at, body) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 4);
        for (i, r) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            let n = values.len();
            sql.push_str(&format!("(${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4));
            values.extend([
                tx.tenant_id().into(),
                r.receipt_id.into(),
                r.issued_at.into(),
                r.content_json.into(),
            ]);
        }
        tx.execute(&sql, values).await?;
    }
    Ok(())
}

/// A receipt's columns; `content_json` is its body (legacy rows keep it in
/// `receipts`), or empty once retention removed it.
const RECEIPT_COLUMNS: &str = "leaf_index, request_hash, issued_at, statement_json, signature, kid, \
     leaf_hash, CASE WHEN content_json <> '' THEN content_json ELSE COALESCE((SELECT c.body \
     FROM receipt_contents c WHERE c.tenant_id = receipts.tenant_id \
     AND c.receipt_id = receipts.receipt_id), '') END AS content_json";

fn receipt_from(row: &QueryResult) -> Result<ReceiptRow> {
    let leaf_hash: String = row.try_get("", "leaf_hash").map_err(db)?;
    Ok(ReceiptRow {
        leaf_index: to_u64(row.try_get("", "leaf_index").map_err(db)?)?,
        request_hash: row.try_get("", "request_hash").map_err(db)?,
        issued_at: row.try_get("", "issued_at").map_err(db)?,
        statement_json: row.try_get("", "statement_json").map_err(db)?,
        signature: row.try_get("", "signature").map_err(db)?,
        kid: row.try_get("", "kid").map_err(db)?,
        leaf_hash: parse_hash(&leaf_hash)?,
        content_json: row.try_get("", "content_json").map_err(db)?,
    })
}

/// The stored receipts of any of `keys`, by dedupe key (one statement with an
/// array on PostgreSQL, chunks of `IN` lists on SQLite).
pub async fn by_dedupe_keys(tx: &TenantTx, keys: &[&str]) -> Result<HashMap<String, ReceiptRow>> {
    let mut out = HashMap::new();
    let mut rows = Vec::new();
    if tx.backend() == Backend::Postgres {
        let sql = format!(
            "SELECT dedupe_key, {RECEIPT_COLUMNS} FROM receipts \
             WHERE tenant_id = $1 AND dedupe_key = ANY($2::text[])"
        );
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        rows = tx
            .query_all(&sql, vec![tx.tenant_id().into(), Value::from(keys)])
            .await?;
    } else {
        for chunk in keys.chunks(200) {
            let params: Vec<String> = (2..chunk.len() + 2).map(|k| format!("${k}")).collect();
            let sql = format!(
                "SELECT dedupe_key, {RECEIPT_COLUMNS} FROM receipts WHERE tenant_id = $1 AND dedupe_key IN ({})",
                params.join(", ")
            );
            let mut values: Vec<Value> = vec![tx.tenant_id().into()];
            values.extend(chunk.iter().map(|k| Value::from(*k)));
            rows.extend(tx.query_all(&sql, values).await?);
        }
    }
    for row in rows {
        let key: String = row.try_get("", "dedupe_key").map_err(db)?;
        out.insert(key, receipt_from(&row)?);
    }
    Ok(out)
}

pub async fn by_id(tx: &TenantTx, receipt_id: &str) -> Result<Option<ReceiptRow>> {
    let sql =
        format!("SELECT {RECEIPT_COLUMNS} FROM receipts WHERE tenant_id = $1 AND receipt_id = $2");
    let row = tx
        .query_one(&sql, vec![tx.tenant_id().into(), receipt_id.into()])
        .await?;
    row.as_ref().map(receipt_from).transpose()
}

/// List filters, already validated.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub kind: Option<String>,
    pub run_id: Option<String>,
    pub plan_hash: Option<String>,
    pub start_micros: Option<i64>,
    pub end_micros: Option<i64>,
}

/// Receipts matching `filter`, newest first below `before` (a leaf index) or
/// oldest first above `after`.
pub async fn list(
    tx: &TenantTx,
    filter: &Filter,
    cursor: Option<u64>,
    newest_first: bool,
    limit: i64,
) -> Result<Vec<ReceiptRow>> {
    let mut sql = format!("SELECT {RECEIPT_COLUMNS} FROM receipts WHERE tenant_id = $1");
    let mut values: Vec<Value> = vec![tx.tenant_id().into()];
    let cond = |sql: &mut String, values: &mut Vec<Value>, text: &str, v: Value| {
        values.push(v);
        sql.push_str(&format!(" AND {text} ${}", values.len()));
    };
    if let Some(k) = &filter.kind {
        cond(&mut sql, &mut values, "kind =", k.as_str().into());
    }
    if let Some(r) = &filter.run_id {
        cond(&mut sql, &mut values, "run_id =", r.as_str().into());
    }
    if let Some(p) = &filter.plan_hash {
        cond(&mut sql, &mut values, "plan_hash =", p.as_str().into());
    }
    if let Some(t) = filter.start_micros {
        cond(&mut sql, &mut values, "issued_at >=", t.into());
    }
    if let Some(t) = filter.end_micros {
        cond(&mut sql, &mut values, "issued_at <", t.into());
    }
    if let Some(c) = cursor {
        let op = if newest_first {
            "leaf_index <"
        } else {
            "leaf_index >"
        };
        cond(&mut sql, &mut values, op, to_i64(c)?.into());
    }
    values.push(limit.into());
    sql.push_str(&format!(
        " ORDER BY leaf_index {} LIMIT ${}",
        if newest_first { "DESC" } else { "ASC" },
        values.len()
    ));
    tx.query_all(&sql, values)
        .await?
        .iter()
        .map(receipt_from)
        .collect()
}

/// A stored checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointRow {
    pub size: u64,
    pub root: Hash,
    pub note: String,
    pub kid: String,
    pub created_at: i64,
}

pub async fn insert_checkpoint(tx: &TenantTx, c: &CheckpointRow) -> Result<()> {
    tx.execute(
        "INSERT INTO receipt_checkpoints (tenant_id, size, root, note, kid, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        vec![
            tx.tenant_id().into(),
            to_i64(c.size)?.into(),
            hex::encode(c.root).into(),
            c.note.as_str().into(),
            c.kid.as_str().into(),
            c.created_at.into(),
        ],
    )
    .await?;
    Ok(())
}

/// The checkpoint of `size`, or the latest when `size` is `None`.
pub async fn checkpoint(tx: &TenantTx, size: Option<u64>) -> Result<Option<CheckpointRow>> {
    let (sql, values): (&str, Vec<Value>) = match size {
        Some(s) => (
            "SELECT size, root, note, kid, created_at FROM receipt_checkpoints \
             WHERE tenant_id = $1 AND size = $2",
            vec![tx.tenant_id().into(), to_i64(s)?.into()],
        ),
        None => (
            "SELECT size, root, note, kid, created_at FROM receipt_checkpoints \
             WHERE tenant_id = $1 ORDER BY size DESC LIMIT 1",
            vec![tx.tenant_id().into()],
        ),
    };
    let Some(row) = tx.query_one(sql, values).await? else {
        return Ok(None);
    };
    let root: String = row.try_get("", "root").map_err(db)?;
    Ok(Some(CheckpointRow {
        size: to_u64(row.try_get("", "size").map_err(db)?)?,
        root: parse_hash(&root)?,
        note: row.try_get("", "note").map_err(db)?,
        kid: row.try_get("", "kid").map_err(db)?,
        created_at: row.try_get("", "created_at").map_err(db)?,
    }))
}
