//! SQL for issued tokens, the replay store, revocations and the audit log.
//! Every query filters on the transaction's tenant; on PostgreSQL row-level
//! security enforces it again.

use std::future::Future;

use anumate_captokens::{ReplayError, ReplayGuard, RevocationError, RevocationList};
use anumate_errors::{Error, Result};
use anumate_store::{Migration, QueryResult, StoreError, SystemTx, TenantTx, Value};

const DDL: &str = "CREATE TABLE captoken_tokens (
        tenant_id TEXT NOT NULL,
        jti TEXT NOT NULL,
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        audience TEXT NOT NULL,
        tool TEXT NOT NULL,
        single_use BOOLEAN NOT NULL,
        exp BIGINT NOT NULL,
        refreshed_from_jti TEXT NOT NULL,
        issued_by TEXT NOT NULL,
        issued_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, jti)
      );
      CREATE INDEX captoken_tokens_run ON captoken_tokens (tenant_id, run_id);
      CREATE TABLE captoken_replay (
        jti TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        exp BIGINT NOT NULL
      );
      CREATE INDEX captoken_replay_exp ON captoken_replay (tenant_id, exp);
      CREATE TABLE captoken_replay_tenants (
        tenant_id TEXT PRIMARY KEY
      );
      CREATE TABLE captoken_revocations (
        revocation_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        jti TEXT,
        run_id TEXT,
        revoked_at BIGINT NOT NULL,
        reason TEXT NOT NULL,
        actor TEXT NOT NULL,
        CHECK ((jti IS NULL) <> (run_id IS NULL))
      );
      CREATE UNIQUE INDEX captoken_revocations_jti ON captoken_revocations (tenant_id, jti);
      CREATE UNIQUE INDEX captoken_revocations_run ON captoken_revocations (tenant_id, run_id);
      CREATE TABLE captoken_audit (
        audit_id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        kind INTEGER NOT NULL,
        jti TEXT NOT NULL,
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        audience TEXT NOT NULL,
        tool TEXT NOT NULL,
        actor TEXT NOT NULL,
        verdict INTEGER NOT NULL,
        reason TEXT NOT NULL,
        refreshed_from_jti TEXT NOT NULL,
        created_at BIGINT NOT NULL
      );
      CREATE INDEX captoken_audit_order ON captoken_audit (tenant_id, audit_id)";

/// Capability token tables. `captoken_replay_tenants` (tenants that ever
/// consumed a token, for the purge) is deliberately not a tenant table: it
/// holds nothing but tenant ids.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "captokens_0001_tables",
        postgres: DDL,
        sqlite: DDL,
        tenant_tables: &[
            "captoken_tokens",
            "captoken_replay",
            "captoken_revocations",
            "captoken_audit",
        ],
    },
    Migration {
        id: "captokens_0002_refresh_root",
        postgres: ROOT_IAT,
        sqlite: ROOT_IAT,
        tenant_tables: &[],
    },
];

/// The `iat` of the first token of a refresh chain (0 on rows written before
/// this column: their own `iat` is not stored, `issued_at` stands in).
const ROOT_IAT: &str = "ALTER TABLE captoken_tokens ADD COLUMN root_iat BIGINT NOT NULL DEFAULT 0";

pub fn db(e: impl std::fmt::Display) -> Error {
    Error::internal(e)
}

/// An issued token, as stored.
pub struct TokenRow {
    pub jti: String,
    pub run: String,
    pub exp: i64,
    /// `iat` of the first token of its refresh chain, seconds.
    pub root_iat: i64,
}

/// What a new issued-token row holds.
pub struct NewToken<'a> {
    pub claims: &'a anumate_captokens::Claims,
    pub refreshed_from_jti: &'a str,
    pub issued_by: &'a str,
    /// `iat` of the chain's first token (its own `iat` when not a refresh).
    pub root_iat: i64,
}

pub async fn insert_token(tx: &TenantTx, t: &NewToken<'_>) -> Result<()> {
    let c = t.claims;
    tx.execute(
        "INSERT INTO captoken_tokens (tenant_id, jti, run_id, step_id, plan_hash, audience, tool, \
           single_use, exp, refreshed_from_jti, issued_by, issued_at, root_iat) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        vec![
            tx.tenant_id().into(),
            c.jti.as_str().into(),
            c.run.as_str().into(),
            c.step.as_str().into(),
            c.plan_hash.as_str().into(),
            c.aud.as_str().into(),
            c.cap.tool.as_str().into(),
            c.single_use.into(),
            c.exp.into(),
            t.refreshed_from_jti.into(),
            t.issued_by.into(),
            anumate_store::now_micros().into(),
            t.root_iat.into(),
        ],
    )
    .await?;
    Ok(())
}

fn token_from(row: &QueryResult) -> Result<TokenRow> {
    Ok(TokenRow {
        jti: row.try_get("", "jti").map_err(db)?,
        run: row.try_get("", "run_id").map_err(db)?,
        exp: row.try_get("", "exp").map_err(db)?,
        root_iat: {
            let root: i64 = row.try_get("", "root_iat").map_err(db)?;
            if root == 0 {
                let issued_micros: i64 = row.try_get("", "issued_at").map_err(db)?;
                issued_micros.div_euclid(1_000_000)
            } else {
                root
            }
        },
    })
}

pub async fn find_token(tx: &TenantTx, jti: &str) -> Result<Option<TokenRow>> {
    tx.query_one(
        "SELECT jti, run_id, exp, root_iat, issued_at FROM captoken_tokens WHERE tenant_id = $1 AND jti = $2",
        vec![tx.tenant_id().into(), jti.into()],
    )
    .await?
    .as_ref()
    .map(token_from)
    .transpose()
}

pub async fn run_tokens(tx: &TenantTx, run: &str) -> Result<Vec<TokenRow>> {
    tx.query_all(
        "SELECT jti, run_id, exp, root_iat, issued_at FROM captoken_tokens WHERE tenant_id = $1 AND run_id = $2 ORDER BY jti",
        vec![tx.tenant_id().into(), run.into()],
    )
    .await?
    .iter()
    .map(token_from)
    .collect()
}

/// A revocation of one token or of a run.
pub struct NewRevocation<'a> {
    pub jti: Option<&'a str>,
    pub run: Option<&'a str>,
    pub reason: &'a str,
    pub actor: &'a str,
}

/// Records a revocation; false when the same token (or run) was revoked before.
pub async fn insert_revocation(tx: &TenantTx, r: &NewRevocation<'_>) -> Result<bool> {
    let n = tx
        .execute(
            "INSERT INTO captoken_revocations (revocation_id, tenant_id, jti, run_id, revoked_at, \
               reason, actor) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            vec![
                uuid::Uuid::now_v7().to_string().into(),
                tx.tenant_id().into(),
                Value::from(r.jti.map(str::to_owned)),
                Value::from(r.run.map(str::to_owned)),
                anumate_store::now_micros().into(),
                r.reason.into(),
                r.actor.into(),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Whether a revocation of exactly this `jti` (or this run) exists.
pub async fn revocation_exists(
    tx: &TenantTx,
    jti: Option<&str>,
    run: Option<&str>,
) -> Result<bool> {
    let (sql, key) = match (jti, run) {
        (Some(jti), _) => (
            "SELECT 1 AS hit FROM captoken_revocations WHERE tenant_id = $1 AND jti = $2",
            jti,
        ),
        (None, Some(run)) => (
            "SELECT 1 AS hit FROM captoken_revocations WHERE tenant_id = $1 AND run_id = $2",
            run,
        ),
        (None, None) => return Ok(false),
    };
    let row = tx
        .query_one(sql, vec![tx.tenant_id().into(), key.into()])
        .await?;
    Ok(row.is_some())
}

/// The `jti`s of the run's tokens that were revoked one by one.
pub async fn revoked_jtis(tx: &TenantTx, run: &str) -> Result<Vec<String>> {
    let rows = tx
        .query_all(
            "SELECT r.jti AS jti FROM captoken_revocations r JOIN captoken_tokens t \
               ON t.tenant_id = r.tenant_id AND t.jti = r.jti \
             WHERE r.tenant_id = $1 AND t.run_id = $2",
            vec![tx.tenant_id().into(), run.into()],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("", "jti").map_err(db))
        .collect()
}

/// The revocation list as seen from one tenant's transaction.
pub struct TxRevocations<'a>(pub &'a TenantTx);

impl RevocationList for TxRevocations<'_> {
    fn is_revoked(
        &self,
        jti: &str,
        run: &str,
    ) -> impl Future<Output = std::result::Result<bool, RevocationError>> + Send {
        let tx = self.0;
        let values: Vec<Value> = vec![tx.tenant_id().into(), jti.into(), run.into()];
        async move {
            tx.query_one(
                "SELECT 1 AS hit FROM captoken_revocations \
                 WHERE tenant_id = $1 AND (jti = $2 OR run_id = $3) LIMIT 1",
                values,
            )
            .await
            .map(|row| row.is_some())
            .map_err(|e| RevocationError(e.to_string()))
        }
    }
}

/// The replay store as seen from one tenant's transaction: a consume is a
/// unique insert on `jti`, which every replica sharing the database sees.
/// A concurrent consume of the same `jti` on PostgreSQL waits for the first
/// transaction and then finds the row.
pub struct TxReplay<'a>(pub &'a TenantTx);

impl ReplayGuard for TxReplay<'_> {
    fn check_and_consume(
        &self,
        jti: &str,
        exp: i64,
    ) -> impl Future<Output = std::result::Result<(), ReplayError>> + Send {
        let tx = self.0;
        let jti = jti.to_owned();
        async move {
            let unavailable = |e: StoreError| ReplayError::Unavailable(e.to_string());
            let n = tx
                .execute(
                    "INSERT INTO captoken_replay (jti, tenant_id, exp) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                    vec![jti.as_str().into(), tx.tenant_id().into(), exp.into()],
                )
                .await
                .map_err(unavailable)?;
            if n == 0 {
                return Err(ReplayError::Replayed { jti });
            }
            tx.execute(
                "INSERT INTO captoken_replay_tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
                vec![tx.tenant_id().into()],
            )
            .await
            .map_err(unavailable)?;
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
                "SELECT 1 AS hit FROM captoken_replay WHERE tenant_id = $1 AND jti = $2",
                values,
            )
            .await
            .map(|row| row.is_some())
            .map_err(|e| ReplayError::Unavailable(e.to_string()))
        }
    }
}

/// What [`consume`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumed {
    /// The single-use token's `jti` is now spent.
    Yes,
    /// Not single-use: only the revocation check, passed.
    NotSingleUse,
    /// The token or its run was revoked.
    Revoked,
    /// The `jti` was spent before.
    Replayed,
}

const REVOKED: &str = "SELECT 1 AS hit FROM captoken_revocations \
     WHERE tenant_id = $1 AND (jti = $2 OR run_id = $3) LIMIT 1";

/// The revocation check and, for a single-use token, the consumption, in
/// one statement (a second only on refusal, to say which).
pub async fn consume(
    tx: &TenantTx,
    jti: &str,
    run: &str,
    exp: i64,
    single_use: bool,
) -> Result<Consumed> {
    let revoked = || async {
        tx.query_one(REVOKED, vec![tx.tenant_id().into(), jti.into(), run.into()])
            .await
            .map(|row| row.is_some())
    };
    if !single_use {
        return Ok(match revoked().await? {
            true => Consumed::Revoked,
            false => Consumed::NotSingleUse,
        });
    }
    let n = tx
        .execute(
            "INSERT INTO captoken_replay (jti, tenant_id, exp) SELECT $1, $2, $3 \
             WHERE NOT EXISTS (SELECT 1 FROM captoken_revocations \
               WHERE tenant_id = $2 AND (jti = $1 OR run_id = $4)) \
             ON CONFLICT DO NOTHING",
            vec![jti.into(), tx.tenant_id().into(), exp.into(), run.into()],
        )
        .await?;
    if n == 1 {
        return Ok(Consumed::Yes);
    }
    Ok(match revoked().await? {
        true => Consumed::Revoked,
        false => Consumed::Replayed,
    })
}

/// Notes the transaction's tenant among those with replay records (for the purge).
pub async fn note_replay_tenant(tx: &TenantTx) -> Result<()> {
    tx.execute(
        "INSERT INTO captoken_replay_tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
        vec![tx.tenant_id().into()],
    )
    .await?;
    Ok(())
}

/// Tenants with replay records.
pub async fn replay_tenants(tx: &SystemTx) -> Result<Vec<String>> {
    let rows = tx
        .query_all(
            "SELECT tenant_id FROM captoken_replay_tenants ORDER BY tenant_id",
            vec![],
        )
        .await?;
    rows.iter()
        .map(|r| r.try_get("", "tenant_id").map_err(db))
        .collect()
}

/// Deletes the tenant's replay records with `exp` before `cutoff`.
pub async fn purge_replay(tx: &TenantTx, cutoff: i64) -> Result<u64> {
    Ok(tx
        .execute(
            "DELETE FROM captoken_replay WHERE tenant_id = $1 AND exp < $2",
            vec![tx.tenant_id().into(), cutoff.into()],
        )
        .await?)
}

/// One audit entry to write.
#[derive(Default)]
pub struct NewAudit<'a> {
    pub kind: i32,
    pub jti: &'a str,
    pub run: &'a str,
    pub step: &'a str,
    pub plan_hash: &'a str,
    pub audience: &'a str,
    pub tool: &'a str,
    pub actor: &'a str,
    pub verdict: i32,
    pub reason: &'a str,
    pub refreshed_from_jti: &'a str,
}

pub async fn insert_audit(tx: &TenantTx, a: &NewAudit<'_>) -> Result<()> {
    tx.execute(
        "INSERT INTO captoken_audit (audit_id, tenant_id, kind, jti, run_id, step_id, plan_hash, \
           audience, tool, actor, verdict, reason, refreshed_from_jti, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        vec![
            uuid::Uuid::now_v7().to_string().into(),
            tx.tenant_id().into(),
            a.kind.into(),
            a.jti.into(),
            a.run.into(),
            a.step.into(),
            a.plan_hash.into(),
            a.audience.into(),
            a.tool.into(),
            a.actor.into(),
            a.verdict.into(),
            a.reason.into(),
            a.refreshed_from_jti.into(),
            anumate_store::now_micros().into(),
        ],
    )
    .await?;
    Ok(())
}

/// Filters of an audit listing (empty / zero: not filtered).
pub struct AuditFilter<'a> {
    pub kind: i32,
    pub jti: &'a str,
    pub run: &'a str,
    /// Micros, inclusive.
    pub start: Option<i64>,
    /// Micros, exclusive.
    pub end: Option<i64>,
    /// Entries with ids below this one (the page token).
    pub before_id: Option<&'a str>,
    pub limit: i64,
}

/// One stored audit entry.
pub struct AuditRow {
    pub audit_id: String,
    pub kind: i32,
    pub jti: String,
    pub run: String,
    pub step: String,
    pub plan_hash: String,
    pub audience: String,
    pub tool: String,
    pub actor: String,
    pub verdict: i32,
    pub reason: String,
    pub refreshed_from_jti: String,
    pub created_at: i64,
}

/// Audit entries, newest first (ids are UUIDv7, so id order is time order).
pub async fn list_audit(tx: &TenantTx, f: &AuditFilter<'_>) -> Result<Vec<AuditRow>> {
    let mut sql = String::from(
        "SELECT audit_id, kind, jti, run_id, step_id, plan_hash, audience, tool, actor, verdict, \
           reason, refreshed_from_jti, created_at FROM captoken_audit WHERE tenant_id = $1",
    );
    let mut values: Vec<Value> = vec![tx.tenant_id().into()];
    let mut push = |clause: &str, value: Value, sql: &mut String| {
        values.push(value);
        sql.push_str(&format!(" AND {clause} ${}", values.len()));
    };
    if f.kind != 0 {
        push("kind =", f.kind.into(), &mut sql);
    }
    if !f.jti.is_empty() {
        push("jti =", f.jti.into(), &mut sql);
    }
    if !f.run.is_empty() {
        push("run_id =", f.run.into(), &mut sql);
    }
    if let Some(start) = f.start {
        push("created_at >=", start.into(), &mut sql);
    }
    if let Some(end) = f.end {
        push("created_at <", end.into(), &mut sql);
    }
    if let Some(before) = f.before_id {
        push("audit_id <", before.into(), &mut sql);
    }
    values.push(f.limit.into());
    sql.push_str(&format!(" ORDER BY audit_id DESC LIMIT ${}", values.len()));
    let rows = tx.query_all(&sql, values).await?;
    rows.iter()
        .map(|r| {
            Ok(AuditRow {
                audit_id: r.try_get("", "audit_id").map_err(db)?,
                kind: r.try_get("", "kind").map_err(db)?,
                jti: r.try_get("", "jti").map_err(db)?,
                run: r.try_get("", "run_id").map_err(db)?,
                step: r.try_get("", "step_id").map_err(db)?,
                plan_hash: r.try_get("", "plan_hash").map_err(db)?,
                audience: r.try_get("", "audience").map_err(db)?,
                tool: r.try_get("", "tool").map_err(db)?,
                actor: r.try_get("", "actor").map_err(db)?,
                verdict: r.try_get("", "verdict").map_err(db)?,
                reason: r.try_get("", "reason").map_err(db)?,
                refreshed_from_jti: r.try_get("", "refreshed_from_jti").map_err(db)?,
                created_at: r.try_get("", "created_at").map_err(db)?,
            })
        })
        .collect()
}
