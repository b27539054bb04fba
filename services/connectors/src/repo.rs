//! SQL of the hub: taking over a stale idempotency claim, and the mock
//! connector's ledger. Every query filters on the transaction's tenant;
//! on PostgreSQL row-level security enforces it again.

use anumate_errors::{Error, Result};
use anumate_store::{Migration, QueryResult, TenantTx, Value};

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

/// The hub's own tables. The hub's own replay store
/// (`connector_token_replay`) is gone: tokens are spent in the captokens
/// service's, shared by the whole platform.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "connectors_0001_tables",
        postgres: DDL,
        sqlite: DDL,
        tenant_tables: &["connector_token_replay", "connector_mock_calls"],
    },
    Migration {
        id: "connectors_0002_drop_token_replay",
        postgres: DROP_REPLAY,
        sqlite: DROP_REPLAY,
        tenant_tables: &[],
    },
    Migration {
        id: "connectors_0003_claim_and_spend",
        postgres: CLAIM_AND_SPEND,
        sqlite: "SELECT 1",
        tenant_tables: &[],
    },
    Migration {
        id: "connectors_0004_record_and_deliver",
        postgres: RECORD_AND_DELIVER,
        sqlite: "SELECT 1",
        tenant_tables: &[],
    },
];

/// [`record_held`] and [`deliver_mock`] on PostgreSQL, as functions for the
/// same reason as [`CLAIM_AND_SPEND`].
const RECORD_AND_DELIVER: &str = "CREATE FUNCTION anumate_connectors_record(
        p_tenant TEXT, p_scope TEXT, p_key TEXT, p_claimed_at BIGINT, p_result TEXT,
        p_now BIGINT) RETURNS TEXT
        LANGUAGE plpgsql AS $$
      BEGIN
        UPDATE idempotency_keys SET result = p_result, recorded_at = p_now
          WHERE tenant_id = p_tenant AND scope = p_scope AND idem_key = p_key
            AND created_at = p_claimed_at AND result IS NULL;
        IF FOUND THEN
          RETURN 'recorded';
        END IF;
        RETURN 'lost';
      END $$;
      CREATE FUNCTION anumate_connectors_deliver_mock(
        p_tenant TEXT, p_call_id TEXT, p_tool TEXT, p_key TEXT, p_run TEXT, p_step TEXT,
        p_args TEXT, p_now BIGINT, p_fail_times BIGINT, p_output TEXT,
        OUT r_deliveries TEXT, OUT r_output TEXT)
        LANGUAGE plpgsql AS $$
      DECLARE
        n BIGINT;
      BEGIN
        INSERT INTO connector_mock_calls AS m (tenant_id, call_id, tool, idem_key, run_id,
            step_id, args, output, deliveries, first_delivered_at, last_delivered_at)
          VALUES (p_tenant, p_call_id, p_tool, p_key, p_run, p_step, p_args,
            CASE WHEN p_fail_times < 1 THEN NULLIF(p_output, '') END, 1, p_now, p_now)
          ON CONFLICT (tenant_id, tool, idem_key) DO UPDATE SET
            deliveries = m.deliveries + 1,
            last_delivered_at = p_now,
            output = COALESCE(m.output,
              CASE WHEN m.deliveries + 1 > p_fail_times THEN NULLIF(p_output, '') END)
          RETURNING m.deliveries, m.output INTO n, r_output;
        r_deliveries := CAST(n AS TEXT);
      END $$";

/// [`claim_and_spend`] on PostgreSQL, as a function so that its statements
/// are planned once per connection (a batch of literal SQL is parsed and
/// planned on every call). It runs as the caller (the serving role, under
/// row-level security). The spend is the captokens service's
/// `repo::consume` (revocation by jti or run, then the replay record);
/// the tenant is noted for both purges as they note it.
const CLAIM_AND_SPEND: &str = "CREATE FUNCTION anumate_connectors_claim_and_spend(
        p_tenant TEXT, p_scope TEXT, p_key TEXT, p_fingerprint TEXT, p_now BIGINT,
        p_expires BIGINT, p_jti TEXT, p_run TEXT, p_exp BIGINT) RETURNS TEXT
        LANGUAGE plpgsql AS $$
      BEGIN
        INSERT INTO idempotency_keys (tenant_id, scope, idem_key, fingerprint, created_at, expires_at)
          VALUES (p_tenant, p_scope, p_key, p_fingerprint, p_now, p_expires)
          ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
          RETURN 'taken';
        END IF;
        INSERT INTO idempotency_tenants (tenant_id) VALUES (p_tenant) ON CONFLICT DO NOTHING;
        INSERT INTO captoken_replay (jti, tenant_id, exp)
          SELECT p_jti, p_tenant, p_exp WHERE NOT EXISTS (SELECT 1 FROM captoken_revocations r
            WHERE r.tenant_id = p_tenant AND (r.jti = p_jti OR r.run_id = p_run))
          ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
          DELETE FROM idempotency_keys
            WHERE tenant_id = p_tenant AND scope = p_scope AND idem_key = p_key;
          RETURN 'refused';
        END IF;
        INSERT INTO captoken_replay_tenants (tenant_id) VALUES (p_tenant) ON CONFLICT DO NOTHING;
        RETURN 'held';
      END $$";

const DROP_REPLAY: &str = "DROP TABLE IF EXISTS connector_token_replay";

fn db(e: impl std::fmt::Display) -> Error {
    Error::internal(e)
}

/// Takes over a key of `scope` claimed with `fingerprint` and left without a
/// result since before `cutoff` (micros): its claimer crashed or hung. True
/// when this transaction now holds the claim, as claimed at `now`.
pub async fn take_over_stale(
    tx: &TenantTx,
    scope: &str,
    key: &str,
    fingerprint: &str,
    now: i64,
    cutoff: i64,
) -> Result<bool> {
    let n = tx
        .execute(
            "UPDATE idempotency_keys SET created_at = $5 \
             WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3 AND fingerprint = $4 \
               AND result IS NULL AND created_at < $6",
            vec![
                tx.tenant_id().into(),
                scope.into(),
                key.into(),
                fingerprint.into(),
                now.into(),
                cutoff.into(),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// When the key was claimed (or last taken over), while it has no result.
pub async fn claimed_at(tx: &TenantTx, scope: &str, key: &str) -> Result<Option<i64>> {
    let row = tx
        .query_one(
            "SELECT created_at FROM idempotency_keys \
             WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3 AND result IS NULL",
            vec![tx.tenant_id().into(), scope.into(), key.into()],
        )
        .await?;
    row.map(|r| r.try_get("", "created_at").map_err(db))
        .transpose()
}

/// Frees the key the call that claimed it at `claimed_at` holds; a key
/// taken over since (another claim time) or recorded stays.
pub async fn release_held(tx: &TenantTx, scope: &str, key: &str, claimed_at: i64) -> Result<()> {
    tx.execute(
        "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3 \
           AND created_at = $4 AND result IS NULL",
        vec![
            tx.tenant_id().into(),
            scope.into(),
            key.into(),
            claimed_at.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Records `result` for the key the call that claimed it at `claimed_at`
/// holds, in one relaxed round trip (see `Hub::record`); `None` when it no
/// longer does (taken over: nothing is written).
pub async fn record_held(
    store: &anumate_store::Store,
    tenant: &str,
    scope: &str,
    key: &str,
    claimed_at: i64,
    result: &serde_json::Value,
) -> Result<Option<i64>> {
    let now = anumate_store::now_micros();
    let sql = match store.backend() {
        anumate_store::Backend::Postgres => {
            "SELECT anumate_connectors_record($1, $2, $3, CAST($4 AS BIGINT), $5, \
               CAST($6 AS BIGINT)) AS outcome"
        }
        anumate_store::Backend::Sqlite => {
            "UPDATE idempotency_keys SET result = $5, recorded_at = CAST($6 AS BIGINT) \
             WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3 \
               AND created_at = CAST($4 AS BIGINT) AND result IS NULL \
             RETURNING 'recorded' AS outcome"
        }
    };
    let rows = store
        .write_text(
            tenant,
            sql,
            &[
                tenant,
                scope,
                key,
                &claimed_at.to_string(),
                &result.to_string(),
                &now.to_string(),
            ],
            true,
        )
        .await?;
    let recorded = match rows.first() {
        Some(row) => row.try_get::<String>("", "outcome").map_err(db)? == "recorded",
        None => false,
    };
    Ok(recorded.then_some(now))
}

/// What [`claim_and_spend`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastClaim {
    /// The key is this call's and the token is spent: committed together.
    Held,
    /// The key was claimed before (recorded, in flight, reused or
    /// expired): nothing was written; the full claim decides.
    Taken,
    /// The key was free but the token is revoked or spent before: nothing
    /// stays (the claim is undone in the same transaction).
    Refused,
}

/// Claims `key` (free) and spends the single-use token `jti` of `run`
/// (expiring at `exp`, seconds) in the captokens service's replay store,
/// which lives in this store (`CapTokensClient::consumes_in_transaction`):
/// BEGIN, the tenant, the claim and spend ([`CLAIM_AND_SPEND`]) and COMMIT
/// as one durable PostgreSQL batch, one round trip where `claim_at` and
/// `consume_in` take four. The key is held if and only if the token is
/// spent: a claim whose spend is refused is deleted before the commit.
/// PostgreSQL only.
pub async fn claim_and_spend(
    store: &anumate_store::Store,
    tenant: &str,
    key: &anumate_idempotency::Key<'_>,
    now: i64,
    jti: &str,
    run: &str,
    exp: i64,
) -> Result<FastClaim> {
    let rows = store
        .write_text(
            tenant,
            "SELECT anumate_connectors_claim_and_spend($1, $2, $3, $4, CAST($5 AS BIGINT), \
               CAST($6 AS BIGINT), $7, $8, CAST($9 AS BIGINT)) AS outcome",
            &[
                tenant,
                key.scope,
                key.key,
                key.fingerprint,
                &now.to_string(),
                &key.expires_at.to_string(),
                jti,
                run,
                &exp.to_string(),
            ],
            false,
        )
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| db("the claim and spend returned no row"))?;
    let outcome: String = row.try_get("", "outcome").map_err(db)?;
    Ok(match outcome.as_str() {
        "held" => FastClaim::Held,
        "refused" => FastClaim::Refused,
        _ => FastClaim::Taken,
    })
}

/// A mock effect after one more delivery.
pub struct Delivery {
    /// Deliveries so far, this one included.
    pub deliveries: i64,
    /// The output, when the mock acted before.
    pub output: Option<serde_json::Value>,
}

/// Counts one delivery of `call` to the mock tool `tool`, in its own short
/// transaction (the mock stands for an upstream API with its own database),
/// and acts with `output` (keeps it) unless it acted before or this is one
/// of the first `fail_times` deliveries: one statement.
pub async fn deliver_mock(
    call: &Call<'_>,
    tool: &str,
    fail_times: u32,
    output: Option<&serde_json::Value>,
) -> Result<Delivery> {
    // One round trip, relaxed (`Store::write_text`): a database crash may
    // forget the delivery as it may forget the hub's claim; a restart of the
    // hub does not. Numbers travel as text, cast where used.
    let now = anumate_store::now_micros().to_string();
    let fail_times = fail_times.to_string();
    let output = output.map(serde_json::Value::to_string).unwrap_or_default();
    let call_id = uuid::Uuid::now_v7().to_string();
    let args = call.args.to_string();
    let rows = call
        .store
        .write_text(
            call.tenant,
            match call.store.backend() {
                anumate_store::Backend::Postgres => {
                    "SELECT r_deliveries AS deliveries, r_output AS output \
                     FROM anumate_connectors_deliver_mock($1, $2, $3, $4, $5, $6, $7, \
                       CAST($8 AS BIGINT), CAST($9 AS BIGINT), $10)"
                }
                anumate_store::Backend::Sqlite => {
            "INSERT INTO connector_mock_calls (tenant_id, call_id, tool, idem_key, run_id, step_id, \
               args, output, deliveries, first_delivered_at, last_delivered_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, \
               CASE WHEN CAST($9 AS BIGINT) < 1 THEN NULLIF($10, '') END, 1, \
               CAST($8 AS BIGINT), CAST($8 AS BIGINT)) \
             ON CONFLICT (tenant_id, tool, idem_key) DO UPDATE SET \
               deliveries = connector_mock_calls.deliveries + 1, \
               last_delivered_at = CAST($8 AS BIGINT), \
               output = COALESCE(connector_mock_calls.output, \
                 CASE WHEN connector_mock_calls.deliveries + 1 > CAST($9 AS BIGINT) \
                   THEN NULLIF($10, '') END) \
             RETURNING CAST(deliveries AS TEXT) AS deliveries, output"
                }
            },
            &[
                call.tenant,
                &call_id,
                tool,
                call.idempotency_key,
                call.run,
                call.step,
                &args,
                &now,
                &fail_times,
                &output,
            ],
            true,
        )
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| db("mock call upsert returned no row"))?;
    let deliveries: String = row.try_get("", "deliveries").map_err(db)?;
    let output: Option<String> = row.try_get("", "output").map_err(db)?;
    Ok(Delivery {
        deliveries: deliveries.parse().map_err(db)?,
        output: output
            .map(|text| serde_json::from_str(&text))
            .transpose()
            .map_err(db)?,
    })
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
