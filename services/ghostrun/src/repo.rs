//! SQL for stored preflight reports, keyed by (tenant, id). Every query
//! filters on the transaction's tenant; on PostgreSQL row-level security
//! enforces it again.

use anumate_errors::{Error, Result};
use anumate_proto::ghostrun::v1 as pb;
use anumate_store::{Migration, QueryResult, TenantTx, paging};

const DDL: &str = "CREATE TABLE preflights (
        tenant_id TEXT NOT NULL,
        preflight_id TEXT NOT NULL,
        plan_hash TEXT NOT NULL,
        verdict INTEGER NOT NULL,
        risk_level INTEGER NOT NULL,
        report_json TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, preflight_id)
      );
      CREATE INDEX preflights_newest ON preflights (tenant_id, created_at, preflight_id);
      CREATE INDEX preflights_plan ON preflights (tenant_id, plan_hash, created_at)";

/// GhostRun tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "ghostrun_0001_preflights",
    postgres: DDL,
    sqlite: DDL,
    tenant_tables: &["preflights"],
}];

fn db(e: anumate_store::DbErr) -> Error {
    Error::internal(e)
}

fn from_row(row: &QueryResult) -> Result<(pb::PreflightReport, i64)> {
    let json: String = row.try_get("", "report_json").map_err(db)?;
    let at: i64 = row.try_get("", "created_at").map_err(db)?;
    let report: pb::PreflightReport = serde_json::from_str(&json).map_err(Error::internal)?;
    Ok((report, at))
}

/// Stores a report as `json` (its proto3 JSON form).
pub async fn insert(
    tx: &TenantTx,
    report: &pb::PreflightReport,
    json: &str,
    now: i64,
) -> Result<()> {
    let level = report.risk.as_ref().map_or(0, |r| r.level);
    tx.execute(
        "INSERT INTO preflights (tenant_id, preflight_id, plan_hash, verdict, risk_level, report_json, created_by, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        vec![
            tx.tenant_id().into(),
            report.preflight_id.as_str().into(),
            report.plan_hash.as_str().into(),
            report.verdict.into(),
            level.into(),
            json.into(),
            report.created_by.as_str().into(),
            now.into(),
        ],
    )
    .await?;
    Ok(())
}

/// A stored report.
pub async fn get(tx: &TenantTx, id: &str) -> Result<Option<pb::PreflightReport>> {
    let row = tx
        .query_one(
            "SELECT report_json, created_at FROM preflights WHERE tenant_id = $1 AND preflight_id = $2",
            vec![tx.tenant_id().into(), id.into()],
        )
        .await?;
    Ok(row.as_ref().map(from_row).transpose()?.map(|(r, _)| r))
}

/// `ListPreflights` filters.
pub struct Filter<'a> {
    /// Normalised plan hash, or empty.
    pub plan_hash: &'a str,
    /// Verdict, or 0.
    pub verdict: i32,
    /// Lowest risk level, or 0.
    pub min_risk_level: i32,
}

/// Reports newest first, without steps; the page token carries `created_at/id`.
pub async fn list(
    tx: &TenantTx,
    f: &Filter<'_>,
    page_size: i32,
    page_token: &str,
) -> Result<(Vec<pb::PreflightReport>, String)> {
    let (size, after) = paging::page_params(page_size, page_token)?;
    let mut sql = "SELECT report_json, created_at FROM preflights WHERE tenant_id = $1".to_string();
    let mut values: Vec<anumate_store::Value> = vec![tx.tenant_id().into()];
    if !f.plan_hash.is_empty() {
        values.push(f.plan_hash.into());
        sql.push_str(&format!(" AND plan_hash = ${}", values.len()));
    }
    if f.verdict != 0 {
        values.push(f.verdict.into());
        sql.push_str(&format!(" AND verdict = ${}", values.len()));
    }
    if f.min_risk_level != 0 {
        values.push(f.min_risk_level.into());
        sql.push_str(&format!(" AND risk_level >= ${}", values.len()));
    }
    if let Some(after) = after {
        let (at, id) = after.split_once('/').ok_or_else(paging::malformed_token)?;
        let at: i64 = at.parse().map_err(|_| paging::malformed_token())?;
        values.push(at.into());
        values.push(id.into());
        sql.push_str(&format!(
            " AND (created_at < ${a} OR (created_at = ${a} AND preflight_id < ${i}))",
            a = values.len() - 1,
            i = values.len()
        ));
    }
    values.push((size + 1).into());
    sql.push_str(&format!(
        " ORDER BY created_at DESC, preflight_id DESC LIMIT ${}",
        values.len()
    ));
    let rows = tx.query_all(&sql, values).await?;
    let items = rows
        .iter()
        .map(from_row)
        .collect::<Result<Vec<(pb::PreflightReport, i64)>>>()?;
    let (items, next) =
        paging::finish_page(items, size, |(r, at)| format!("{at}/{}", r.preflight_id));
    Ok((
        items
            .into_iter()
            .map(|(r, _)| pb::PreflightReport {
                steps: Vec::new(),
                ..r
            })
            .collect(),
        next,
    ))
}
