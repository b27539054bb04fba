//! SQL for policies, their versions and decision logs. Every query also filters
//! on the transaction's tenant; on PostgreSQL row-level security enforces it again.

use anumate_errors::{Error, Result};
use anumate_proto::common::v1::PageRequest;
use anumate_proto::policy::v1 as pb;
use anumate_store::{Backend, Migration, QueryResult, TenantTx, paging};

const POLICY_DDL: &str = "CREATE TABLE policies (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        latest_version BIGINT NOT NULL,
        published_version BIGINT NOT NULL,
        revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        deleted_at BIGINT,
        PRIMARY KEY (tenant_id, name)
      );
      CREATE TABLE policy_versions (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('draft', 'published', 'deprecated')),
        source TEXT NOT NULL,
        canonical_json TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        description TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        published_at BIGINT,
        deprecated_at BIGINT,
        PRIMARY KEY (tenant_id, name, version),
        FOREIGN KEY (tenant_id, name) REFERENCES policies (tenant_id, name)
      );
      CREATE INDEX policy_versions_hash ON policy_versions (tenant_id, name, content_hash);
      CREATE TABLE policy_decisions (
        tenant_id TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        principal TEXT NOT NULL,
        effect TEXT NOT NULL,
        policy_set_hash TEXT NOT NULL,
        policies TEXT NOT NULL,
        input_json TEXT NOT NULL,
        decision_json TEXT NOT NULL,
        fuel_used BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, id)
      );
      CREATE INDEX policy_decisions_time ON policy_decisions (tenant_id, created_at)";

/// Policy tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "policy_0001_policies",
    // The same SQL works on both backends.
    postgres: POLICY_DDL,
    sqlite: POLICY_DDL,
    tenant_tables: &["policies", "policy_versions", "policy_decisions"],
}];

/// A policy row and whether it is soft-deleted.
pub struct PolicyRow {
    pub proto: pb::Policy,
    pub revision: i64,
    pub deleted: bool,
}

/// A timestamp from microseconds since the epoch.
pub fn timestamp(micros: i64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn etag(revision: i64) -> String {
    format!("r{revision}")
}

fn status_str(s: pb::PolicyVersionStatus) -> &'static str {
    match s {
        pb::PolicyVersionStatus::Published => "published",
        pb::PolicyVersionStatus::Deprecated => "deprecated",
        _ => "draft",
    }
}

fn status_from(s: &str) -> pb::PolicyVersionStatus {
    match s {
        "published" => pb::PolicyVersionStatus::Published,
        "deprecated" => pb::PolicyVersionStatus::Deprecated,
        _ => pb::PolicyVersionStatus::Draft,
    }
}

fn db(e: anumate_store::DbErr) -> Error {
    Error::internal(e)
}

const POLICY_COLUMNS: &str = "name, description, latest_version, published_version, revision, created_at, updated_at, deleted_at";

fn policy_from(row: &QueryResult) -> Result<PolicyRow> {
    let deleted_at: Option<i64> = row.try_get("", "deleted_at").map_err(db)?;
    let revision: i64 = row.try_get("", "revision").map_err(db)?;
    Ok(PolicyRow {
        proto: pb::Policy {
            name: row.try_get("", "name").map_err(db)?,
            description: row.try_get("", "description").map_err(db)?,
            latest_version: row.try_get("", "latest_version").map_err(db)?,
            published_version: row.try_get("", "published_version").map_err(db)?,
            etag: etag(revision),
            create_time: Some(timestamp(row.try_get("", "created_at").map_err(db)?)),
            update_time: Some(timestamp(row.try_get("", "updated_at").map_err(db)?)),
        },
        revision,
        deleted: deleted_at.is_some(),
    })
}

/// Reads a policy row, locking it for the transaction on PostgreSQL.
pub async fn lock_policy(tx: &TenantTx, name: &str) -> Result<Option<PolicyRow>> {
    let lock = if tx.backend() == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let sql =
        format!("SELECT {POLICY_COLUMNS} FROM policies WHERE tenant_id = $1 AND name = $2{lock}");
    let row = tx
        .query_one(&sql, vec![tx.tenant_id().into(), name.into()])
        .await?;
    row.as_ref().map(policy_from).transpose()
}

/// A policy row whether deleted or not.
pub async fn any_policy(tx: &TenantTx, name: &str) -> Result<Option<PolicyRow>> {
    let sql = format!("SELECT {POLICY_COLUMNS} FROM policies WHERE tenant_id = $1 AND name = $2");
    let row = tx
        .query_one(&sql, vec![tx.tenant_id().into(), name.into()])
        .await?;
    row.as_ref().map(policy_from).transpose()
}

/// A policy that exists and is not deleted, or `NOT_FOUND`.
pub async fn visible_policy(tx: &TenantTx, name: &str) -> Result<pb::Policy> {
    match any_policy(tx, name).await? {
        Some(p) if !p.deleted => Ok(p.proto),
        _ => Err(Error::not_found(format!("policy {name} not found"))),
    }
}

const VERSION_COLUMNS: &str = "name, version, status, source, canonical_json, content_hash, \
     description, created_by, created_at, published_at, deprecated_at";
const VERSION_META_COLUMNS: &str = "name, version, status, '' AS source, '' AS canonical_json, content_hash, \
     description, created_by, created_at, published_at, deprecated_at";

fn version_from(row: &QueryResult) -> Result<pb::PolicyVersion> {
    let status: String = row.try_get("", "status").map_err(db)?;
    let published_at: Option<i64> = row.try_get("", "published_at").map_err(db)?;
    let deprecated_at: Option<i64> = row.try_get("", "deprecated_at").map_err(db)?;
    Ok(pb::PolicyVersion {
        name: row.try_get("", "name").map_err(db)?,
        version: row.try_get("", "version").map_err(db)?,
        status: status_from(&status) as i32,
        source: row.try_get("", "source").map_err(db)?,
        canonical_json: row.try_get("", "canonical_json").map_err(db)?,
        content_hash: row.try_get("", "content_hash").map_err(db)?,
        description: row.try_get("", "description").map_err(db)?,
        rules: Vec::new(),
        test_count: 0,
        created_by: row.try_get("", "created_by").map_err(db)?,
        create_time: Some(timestamp(row.try_get("", "created_at").map_err(db)?)),
        publish_time: published_at.map(timestamp),
        deprecate_time: deprecated_at.map(timestamp),
    })
}

/// One version, with its source.
pub async fn get_version(
    tx: &TenantTx,
    name: &str,
    version: i64,
) -> Result<Option<pb::PolicyVersion>> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM policy_versions WHERE tenant_id = $1 AND name = $2 AND version = $3"
    );
    let row = tx
        .query_one(
            &sql,
            vec![tx.tenant_id().into(), name.into(), version.into()],
        )
        .await?;
    row.as_ref().map(version_from).transpose()
}

/// The version with this content hash, if any.
pub async fn find_by_hash(
    tx: &TenantTx,
    name: &str,
    hash: &str,
) -> Result<Option<pb::PolicyVersion>> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM policy_versions WHERE tenant_id = $1 AND name = $2 AND content_hash = $3 \
         ORDER BY version LIMIT 1"
    );
    let row = tx
        .query_one(&sql, vec![tx.tenant_id().into(), name.into(), hash.into()])
        .await?;
    row.as_ref().map(version_from).transpose()
}

/// Creates the row of a policy's first push; [`update_after_push`] fills it in.
pub async fn insert_policy(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO policies (tenant_id, name, description, latest_version, \
           published_version, revision, created_at, updated_at) \
         VALUES ($1, $2, '', 0, 0, 0, $3, $3)",
        vec![tx.tenant_id().into(), name.into(), now.into()],
    )
    .await
    .map_err(conflict_is_retryable)?;
    Ok(())
}

fn conflict_is_retryable(e: anumate_store::StoreError) -> Error {
    if e.is_conflict() {
        Error::new(
            anumate_errors::ErrorCode::AlreadyExists,
            "a concurrent push created this version; retry",
        )
    } else {
        e.into()
    }
}

/// Inserts a version row.
pub async fn insert_version(tx: &TenantTx, v: &pb::PolicyVersion, now: i64) -> Result<()> {
    let status =
        pb::PolicyVersionStatus::try_from(v.status).unwrap_or(pb::PolicyVersionStatus::Draft);
    let published_at = (status == pb::PolicyVersionStatus::Published).then_some(now);
    tx.execute(
        "INSERT INTO policy_versions (tenant_id, name, version, status, source, canonical_json, content_hash, \
           description, created_by, created_at, published_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        vec![
            tx.tenant_id().into(),
            v.name.as_str().into(),
            v.version.into(),
            status_str(status).into(),
            v.source.as_str().into(),
            v.canonical_json.as_str().into(),
            v.content_hash.as_str().into(),
            v.description.as_str().into(),
            v.created_by.as_str().into(),
            now.into(),
            published_at.into(),
        ],
    )
    .await
    .map_err(conflict_is_retryable)?;
    Ok(())
}

/// Writes the policy row after a push: newest description, version counters, a new revision.
pub async fn update_after_push(
    tx: &TenantTx,
    existing: Option<&PolicyRow>,
    name: &str,
    description: &str,
    latest: i64,
    published: i64,
    now: i64,
) -> Result<pb::Policy> {
    let revision = existing.map_or(1, |c| c.revision + 1);
    let create_time = existing
        .and_then(|c| c.proto.create_time)
        .unwrap_or_else(|| timestamp(now));
    tx.execute(
        "UPDATE policies SET description = $3, latest_version = $4, \
           published_version = $5, revision = $6, updated_at = $7 \
         WHERE tenant_id = $1 AND name = $2",
        vec![
            tx.tenant_id().into(),
            name.into(),
            description.into(),
            latest.into(),
            published.into(),
            revision.into(),
            now.into(),
        ],
    )
    .await?;
    Ok(pb::Policy {
        name: name.to_string(),
        description: description.to_string(),
        latest_version: latest,
        published_version: published,
        etag: etag(revision),
        create_time: Some(create_time),
        update_time: Some(timestamp(now)),
    })
}

/// Sets a version's status and the matching timestamp.
pub async fn set_version_status(
    tx: &TenantTx,
    name: &str,
    version: i64,
    status: pb::PolicyVersionStatus,
    now: i64,
) -> Result<()> {
    let column = if status == pb::PolicyVersionStatus::Published {
        "published_at"
    } else {
        "deprecated_at"
    };
    tx.execute(
        &format!("UPDATE policy_versions SET status = $4, {column} = $5 WHERE tenant_id = $1 AND name = $2 AND version = $3"),
        vec![tx.tenant_id().into(), name.into(), version.into(), status_str(status).into(), now.into()],
    )
    .await?;
    Ok(())
}

/// Bumps the revision and recomputes the published version after a status change.
pub async fn touch_policy(tx: &TenantTx, name: &str, now: i64) -> Result<pb::Policy> {
    tx.execute(
        "UPDATE policies SET revision = revision + 1, updated_at = $3, published_version = COALESCE(( \
           SELECT MAX(version) FROM policy_versions v WHERE v.tenant_id = $1 AND v.name = $2 AND v.status = 'published'), 0) \
         WHERE tenant_id = $1 AND name = $2",
        vec![tx.tenant_id().into(), name.into(), now.into()],
    )
    .await?;
    visible_policy(tx, name).await
}

/// Marks a policy deleted.
pub async fn soft_delete(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    tx.execute(
        "UPDATE policies SET deleted_at = $3, updated_at = $3, revision = revision + 1 WHERE tenant_id = $1 AND name = $2",
        vec![tx.tenant_id().into(), name.into(), now.into()],
    )
    .await?;
    Ok(())
}

/// Page size and the decoded token.
pub fn page_params(page: Option<&PageRequest>) -> Result<(i64, Option<String>)> {
    let (size, token) = page.map_or((0, ""), |p| (p.page_size, p.page_token.as_str()));
    paging::page_params(size, token)
}

/// A page of the tenant's visible policies by name.
pub async fn list_policies(
    tx: &TenantTx,
    status: pb::PolicyVersionStatus,
    size: i64,
    after: Option<&str>,
) -> Result<(Vec<pb::Policy>, String)> {
    let mut sql = format!(
        "SELECT {POLICY_COLUMNS} FROM policies c WHERE c.tenant_id = $1 AND c.deleted_at IS NULL"
    );
    let mut values: Vec<anumate_store::Value> = vec![tx.tenant_id().into()];
    if status != pb::PolicyVersionStatus::Unspecified {
        values.push(status_str(status).into());
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM policy_versions v WHERE v.tenant_id = c.tenant_id AND v.name = c.name \
               AND v.status = ${})",
            values.len()
        ));
    }
    if let Some(after) = after {
        values.push(after.into());
        sql.push_str(&format!(" AND c.name > ${}", values.len()));
    }
    values.push((size + 1).into());
    sql.push_str(&format!(" ORDER BY c.name LIMIT ${}", values.len()));
    let rows = tx.query_all(&sql, values).await?;
    let items = rows
        .iter()
        .map(|r| policy_from(r).map(|c| c.proto))
        .collect::<Result<Vec<_>>>()?;
    Ok(paging::finish_page(items, size, |c| c.name.clone()))
}

/// A page of one policy's versions, newest first, without sources.
pub async fn list_versions(
    tx: &TenantTx,
    name: &str,
    size: i64,
    before: Option<i64>,
) -> Result<(Vec<pb::PolicyVersion>, String)> {
    let sql = format!(
        "SELECT {VERSION_META_COLUMNS} FROM policy_versions WHERE tenant_id = $1 AND name = $2 AND version < $3 \
         ORDER BY version DESC LIMIT $4"
    );
    let rows = tx
        .query_all(
            &sql,
            vec![
                tx.tenant_id().into(),
                name.into(),
                before.unwrap_or(i64::MAX).into(),
                (size + 1).into(),
            ],
        )
        .await?;
    let items = rows.iter().map(version_from).collect::<Result<Vec<_>>>()?;
    Ok(paging::finish_page(items, size, |v| v.version.to_string()))
}

/// One decision log row, already redacted.
pub struct DecisionRow<'a> {
    pub id: &'a str,
    pub principal: &'a str,
    pub effect: &'a str,
    pub policy_set_hash: &'a str,
    pub policies: &'a str,
    pub input_json: &'a str,
    pub decision_json: &'a str,
    pub fuel_used: i64,
}

/// Appends a decision log row.
pub async fn insert_decision(tx: &TenantTx, d: &DecisionRow<'_>, now: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO policy_decisions (tenant_id, id, created_at, principal, effect, policy_set_hash, \
           policies, input_json, decision_json, fuel_used) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        vec![
            tx.tenant_id().into(),
            d.id.into(),
            now.into(),
            d.principal.into(),
            d.effect.into(),
            d.policy_set_hash.into(),
            d.policies.into(),
            d.input_json.into(),
            d.decision_json.into(),
            d.fuel_used.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Deletes the tenant's decision log rows created before `cutoff`; returns
/// how many.
pub async fn purge_decisions(tx: &TenantTx, cutoff: i64) -> Result<u64> {
    Ok(tx
        .execute(
            "DELETE FROM policy_decisions WHERE tenant_id = $1 AND created_at < $2",
            vec![tx.tenant_id().into(), cutoff.into()],
        )
        .await?)
}
