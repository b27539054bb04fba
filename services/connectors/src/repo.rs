//! SQL of the hub: its replay store (consumed single-use token ids) and the
//! mock connector's ledger. Every query filters on the transaction's tenant;
//! on PostgreSQL row-level security enforces it again.

use std::future::Future;

use anumate_captokens::{ReplayError, ReplayGuard, RevocationError, RevocationList};
use anumate_errors::{Error, Result};
use anumate_store::{Migration, QueryResult, StoreError, TenantTx, Value};

use crate::connector::Call;

const DDL: &str = "CREATE TABLE connector_token_replay (
        tenant_id TEXT NOT NULL,
        jti TEXT NOT NULL,
        exp BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, jti)
      );
      CREATE INDEX connector_token_replay_exp ON connector_token_replay (tenant_id, exp);
      CREATE TABLE connector_mock_calls (
        tenant_id TEXT NOT NULL,
        call_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        args TEXT NOT NULL,
        output TEXT,
        deliveries BIGINT NOT NULL,
        first_delivered_at BIGINT NOT NULL,
        last_delivered_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, tool, idem_key)
      );
      CREATE UNIQUE INDEX connector_mock_calls_order ON connector_mock_calls (tenant_id, call_id)";

/// The hub's own tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "connectors_0001_tables",
    postgres: DDL,
    sqlite: DDL,
    tenant_tables: &["connector_token_replay", "connector_mock_calls"],
}];

fn db(e: impl std::fmt::Display) -> Error {
    Error::internal(e)
}

/// The hub's replay store in its transaction: consuming a `jti` is a unique
/// insert, seen by every replica sharing the database, and undone if the
/// transaction (the call) rolls back.
pub struct TxReplay<'a>(pub &'a TenantTx);

impl ReplayGuard for TxReplay<'_> {
    fn check_and_consume(
        &self,
        jti: &str,
        exp: i64,
    ) -> impl Future<Output = std::result::Result<(), ReplayError>> + Send {
        let tx = self.0;
        let values: Vec<Value> = vec![tx.tenant_id().into(), jti.into(), exp.into()];
        let jti = jti.to_owned();
        async move {
            let n = tx
                .execute(
                    "INSERT INTO connector_token_replay (tenant_id, jti, exp) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                    values,
                )
                .await
                .map_err(|e: StoreError| ReplayError::Unavailable(e.to_string()))?;
            if n == 0 {
                return Err(ReplayError::Replayed { jti });
            }
            Ok(())
        }
    }

    fn is_consumed(
        &self,
        jti: &str,
    ) -> impl Future<Output = std::result::Result<bool, ReplayError>> + Send {
        let tx = self.0;
        let values: Vec<Value> = vec![tx.tenant_id().into(), jti.into()];
        async move {
            tx.query_one(
                "SELECT 1 AS hit FROM connector_token_replay WHERE tenant_id = $1 AND jti = $2",
                values,
            )
            .await
            .map(|row| row.is_some())
            .map_err(|e| ReplayError::Unavailable(e.to_string()))
        }
    }
}

/// The hub does not read the captokens service's revocation list (it may
/// live in another database); tokens live at most five minutes.
pub struct NoRevocations;

impl RevocationList for NoRevocations {
    fn is_revoked(
        &self,
        _jti: &str,
        _run: &str,
    ) -> impl Future<Output = std::result::Result<bool, RevocationError>> + Send {
        std::future::ready(Ok(false))
    }
}

/// Deletes the tenant's replay records whose token expired before `cutoff` (seconds).
pub async fn purge_replay(tx: &TenantTx, cutoff: i64) -> Result<u64> {
    Ok(tx
        .execute(
            "DELETE FROM connector_token_replay WHERE tenant_id = $1 AND exp < $2",
            vec![tx.tenant_id().into(), cutoff.into()],
        )
        .await?)
}

/// A mock effect after one more delivery.
pub struct Delivery {
    /// Deliveries so far, this one included.
    pub deliveries: i64,
    /// The output, when the mock acted before.
    pub output: Option<serde_json::Value>,
}

/// Counts one delivery of `call` to the mock tool `tool`.
pub async fn deliver_mock(tx: &TenantTx, tool: &str, call: &Call<'_>) -> Result<Delivery> {
    let now = anumate_store::now_micros();
    // One round trip: the upsert returns the row as it now is.
    let row = tx
        .query_one(
            "INSERT INTO connector_mock_calls (tenant_id, call_id, tool, idem_key, run_id, step_id, \
               args, deliveries, first_delivered_at, last_delivered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $8) \
             ON CONFLICT (tenant_id, tool, idem_key) DO UPDATE SET \
               deliveries = connector_mock_calls.deliveries + 1, last_delivered_at = $8 \
             RETURNING deliveries, output",
            vec![
                tx.tenant_id().into(),
                uuid::Uuid::now_v7().to_string().into(),
                tool.into(),
                call.idempotency_key.into(),
                call.run.into(),
                call.step.into(),
                call.args.to_string().into(),
                now.into(),
            ],
        )
        .await?
        .ok_or_else(|| db("mock call upsert returned no row"))?;
    let output: Option<String> = row.try_get("", "output").map_err(db)?;
    Ok(Delivery {
        deliveries: row.try_get("", "deliveries").map_err(db)?,
        output: output
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(db)?,
    })
}

/// Keeps the output of the mock's one action for `key`.
pub async fn mock_acted(
    tx: &TenantTx,
    tool: &str,
    key: &str,
    output: &serde_json::Value,
) -> Result<()> {
    tx.execute(
        "UPDATE connector_mock_calls SET output = $4 \
         WHERE tenant_id = $1 AND tool = $2 AND idem_key = $3",
        vec![
            tx.tenant_id().into(),
            tool.into(),
            key.into(),
            output.to_string().into(),
        ],
    )
    .await?;
    Ok(())
}

/// One row of the mock ledger.
#[derive(Debug, Clone)]
pub struct MockCallRow {
    pub call_id: String,
    pub tool: String,
    pub idempotency_key: String,
    pub run: String,
    pub step: String,
    pub args: serde_json::Value,
    pub output: Option<serde_json::Value>,
    pub deliveries: i64,
    pub first_delivered_at: i64,
    pub last_delivered_at: i64,
}

/// Filters of a listing (empty: not filtered).
pub struct MockFilter<'a> {
    pub run: &'a str,
    pub tool: &'a str,
    /// Calls with ids below this one (the page token).
    pub before_id: Option<&'a str>,
    pub limit: i64,
}

/// Mock calls, newest first (ids are UUIDv7).
pub async fn list_mock_calls(tx: &TenantTx, f: &MockFilter<'_>) -> Result<Vec<MockCallRow>> {
    let mut sql = String::from(
        "SELECT call_id, tool, idem_key, run_id, step_id, args, output, deliveries, \
           first_delivered_at, last_delivered_at FROM connector_mock_calls WHERE tenant_id = $1",
    );
    let mut values: Vec<Value> = vec![tx.tenant_id().into()];
    let mut push = |clause: &str, value: Value, sql: &mut String| {
        values.push(value);
        sql.push_str(&format!(" AND {clause} ${}", values.len()));
    };
    if !f.run.is_empty() {
        push("run_id =", f.run.into(), &mut sql);
    }
    if !f.tool.is_empty() {
        push("tool =", f.tool.into(), &mut sql);
    }
    if let Some(before) = f.before_id {
        push("call_id <", before.into(), &mut sql);
    }
    values.push(f.limit.into());
    sql.push_str(&format!(" ORDER BY call_id DESC LIMIT ${}", values.len()));
    let rows = tx.query_all(&sql, values).await?;
    rows.iter().map(mock_row).collect()
}

fn mock_row(r: &QueryResult) -> Result<MockCallRow> {
    let json = |text: String| serde_json::from_str(&text).map_err(db);
    let output: Option<String> = r.try_get("", "output").map_err(db)?;
    Ok(MockCallRow {
        call_id: r.try_get("", "call_id").map_err(db)?,
        tool: r.try_get("", "tool").map_err(db)?,
        idempotency_key: r.try_get("", "idem_key").map_err(db)?,
        run: r.try_get("", "run_id").map_err(db)?,
        step: r.try_get("", "step_id").map_err(db)?,
        args: json(r.try_get("", "args").map_err(db)?)?,
        output: output.map(json).transpose()?,
        deliveries: r.try_get("", "deliveries").map_err(db)?,
        first_delivered_at: r.try_get("", "first_delivered_at").map_err(db)?,
        last_delivered_at: r.try_get("", "last_delivered_at").map_err(db)?,
    })
}
