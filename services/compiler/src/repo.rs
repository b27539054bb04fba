//! SQL for stored plans, keyed by (tenant, plan hash). Every query filters on
//! the transaction's tenant; on PostgreSQL row-level security enforces it again.

use anumate_errors::{Error, Result};
use anumate_proto::compiler::v1 as pb;
use anumate_store::{Migration, QueryResult, TenantTx, paging};

const PLANS_DDL: &str = "CREATE TABLE plans (
        tenant_id TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        capsule_name TEXT NOT NULL,
        capsule_version BIGINT NOT NULL,
        plan_json TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, plan_hash)
      );
      CREATE INDEX plans_newest ON plans (tenant_id, created_at, plan_hash);
      CREATE INDEX plans_capsule ON plans (tenant_id, capsule_name, capsule_version)";

/// A stored plan is never altered or removed: the compiler serves plans
/// from memory by (tenant, hash), and runs cite them by hash.
const PLANS_WRITE_ONCE_POSTGRES: &str = "CREATE FUNCTION anumate_plans_write_once() RETURNS trigger
        LANGUAGE plpgsql AS $$
      BEGIN
        RAISE EXCEPTION 'table plans is write-once: % refused', TG_OP
          USING ERRCODE = 'insufficient_privilege';
      END $$;
      CREATE TRIGGER plans_write_once BEFORE UPDATE OR DELETE ON plans
        FOR EACH ROW EXECUTE FUNCTION anumate_plans_write_once();
      CREATE TRIGGER plans_no_truncate BEFORE TRUNCATE ON plans
        FOR EACH STATEMENT EXECUTE FUNCTION anumate_plans_write_once();
      COMMENT ON TABLE plans IS 'anumate:append-only'";

const PLANS_WRITE_ONCE_SQLITE: &str = "CREATE TRIGGER plans_no_update BEFORE UPDATE ON plans
        BEGIN SELECT RAISE(ABORT, 'table plans is write-once: UPDATE refused'); END;
      CREATE TRIGGER plans_no_delete BEFORE DELETE ON plans
        BEGIN SELECT RAISE(ABORT, 'table plans is write-once: DELETE refused'); END";

/// Compiler tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "compiler_0001_plans",
        postgres: PLANS_DDL,
        sqlite: PLANS_DDL,
        tenant_tables: &["plans"],
    },
    Migration {
        id: "compiler_0002_plans_write_once",
        postgres: PLANS_WRITE_ONCE_POSTGRES,
        sqlite: PLANS_WRITE_ONCE_SQLITE,
        tenant_tables: &[],
    },
];

fn db(e: anumate_store::DbErr) -> Error {
    Error::internal(e)
}

pub use anumate_proto::timestamp_from_micros as timestamp;

fn plan_from(row: &QueryResult) -> Result<(pb::ExecutablePlan, i64)> {
    let json: String = row.try_get("", "plan_json").map_err(db)?;
    let created_at: i64 = row.try_get("", "created_at").map_err(db)?;
    let mut plan: pb::ExecutablePlan = serde_json::from_str(&json).map_err(Error::internal)?;
    plan.created_by = row.try_get("", "created_by").map_err(db)?;
    plan.create_time = Some(timestamp(created_at));
    Ok((plan, created_at))
}

/// A stored plan.
pub async fn get(tx: &TenantTx, hash: &str) -> Result<Option<pb::ExecutablePlan>> {
    let row = tx
        .query_one(
            "SELECT plan_json, created_by, created_at FROM plans WHERE tenant_id = $1 AND plan_hash = $2",
            vec![tx.tenant_id().into(), hash.into()],
        )
        .await?;
    Ok(row.as_ref().map(plan_from).transpose()?.map(|(p, _)| p))
}

/// Stores a plan; `false` when a plan with this hash is already stored.
pub async fn insert(tx: &TenantTx, plan: &pb::ExecutablePlan, now: i64) -> Result<bool> {
    let stored = pb::ExecutablePlan {
        created_by: String::new(),
        create_time: None,
        ..plan.clone()
    };
    let json = serde_json::to_string(&stored).map_err(Error::internal)?;
    let n = tx
        .execute(
            "INSERT INTO plans (tenant_id, plan_hash, capsule_name, capsule_version, plan_json, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tenant_id, plan_hash) DO NOTHING",
            vec![
                tx.tenant_id().into(),
                plan.plan_hash.as_str().into(),
                plan.capsule_name.as_str().into(),
                i64::from(plan.capsule_version).into(),
                json.into(),
                plan.created_by.as_str().into(),
                now.into(),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// A plan without the fields `ListPlans` leaves out.
pub fn summary(plan: pb::ExecutablePlan) -> pb::ExecutablePlan {
    pb::ExecutablePlan {
        steps: Vec::new(),
        levels: Vec::new(),
        tool_bindings: Vec::new(),
        approval_needs: Vec::new(),
        inputs_schema: None,
        ..plan
    }
}

/// Plans newest first; the page token carries `created_at/plan_hash`.
pub async fn list(
    tx: &TenantTx,
    capsule: &str,
    version: i32,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<pb::ExecutablePlan>, String)> {
    let (size, after) = paging::page_params(page_size, page_token)?;
    let mut sql =
        "SELECT plan_json, created_by, created_at FROM plans WHERE tenant_id = $1".to_string();
    let mut values: Vec<anumate_store::Value> = vec![tx.tenant_id().into()];
    if !capsule.is_empty() {
        values.push(capsule.into());
        sql.push_str(&format!(" AND capsule_name = ${}", values.len()));
        if version > 0 {
            values.push(i64::from(version).into());
            sql.push_str(&format!(" AND capsule_version = ${}", values.len()));
        }
    }
    if let Some(after) = after {
        let (at, hash) = after.split_once('/').ok_or_else(paging::malformed_token)?;
        let at: i64 = at.parse().map_err(|_| paging::malformed_token())?;
        values.push(at.into());
        values.push(hash.into());
        sql.push_str(&format!(
            " AND (created_at < ${a} OR (created_at = ${a} AND plan_hash < ${h}))",
            a = values.len() - 1,
            h = values.len()
        ));
    }
    values.push((size + 1).into());
    sql.push_str(&format!(
        " ORDER BY created_at DESC, plan_hash DESC LIMIT ${}",
        values.len()
    ));
    let rows = tx.query_all(&sql, values).await?;
    let items = rows
        .iter()
        .map(plan_from)
        .collect::<Result<Vec<(pb::ExecutablePlan, i64)>>>()?;
    let (items, next) = paging::finish_page(items, size, |(p, at)| format!("{at}/{}", p.plan_hash));
    Ok((items.into_iter().map(|(p, _)| summary(p)).collect(), next))
}
