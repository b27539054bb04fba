//! Policies and their versions, stored as versioned documents
//! ([`anumate_store::versioned`]), and the decision log. Every query also
//! filters on the transaction's tenant; on PostgreSQL row-level security
//! enforces it again.

use std::collections::BTreeMap;

use anumate_errors::Result;
use anumate_proto::common::v1::PageRequest;
use anumate_proto::policy::v1 as pb;
use anumate_store::versioned::{DocumentRow, Schema, Status};
use anumate_store::{Migration, TenantTx, paging};
use sea_orm::FromQueryResult;

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

/// Where policies are stored.
const SCHEMA: Schema = Schema {
    kind: "policy",
    documents: "policies",
    versions: "policy_versions",
    labels: None,
    version_columns: "name, version, status, source, canonical_json, content_hash, \
         description, created_by, created_at, published_at, deprecated_at",
    version_meta_columns: "name, version, status, '' AS source, '' AS canonical_json, content_hash, \
         description, created_by, created_at, published_at, deprecated_at",
};

/// A policy row and whether it is soft-deleted.
pub struct PolicyRow {
    pub proto: pb::Policy,
    pub deleted: bool,
    stored: DocumentRow,
}

/// A timestamp from microseconds since the epoch.
pub use anumate_proto::timestamp_from_micros as timestamp;

fn status(s: pb::PolicyVersionStatus) -> Status {
    match s {
        pb::PolicyVersionStatus::Published => Status::Published,
        pb::PolicyVersionStatus::Deprecated => Status::Deprecated,
        _ => Status::Draft,
    }
}

fn status_proto(s: Status) -> pb::PolicyVersionStatus {
    match s {
        Status::Published => pb::PolicyVersionStatus::Published,
        Status::Deprecated => pb::PolicyVersionStatus::Deprecated,
        Status::Draft => pb::PolicyVersionStatus::Draft,
    }
}

fn policy_proto(d: &DocumentRow) -> pb::Policy {
    pb::Policy {
        name: d.name.clone(),
        description: d.description.clone(),
        latest_version: d.latest_version,
        published_version: d.published_version,
        etag: d.etag(),
        create_time: Some(timestamp(d.created_at)),
        update_time: Some(timestamp(d.updated_at)),
    }
}

fn policy_row(d: DocumentRow) -> PolicyRow {
    PolicyRow {
        proto: policy_proto(&d),
        deleted: d.deleted(),
        stored: d,
    }
}

/// A stored policy version.
#[derive(FromQueryResult)]
struct VersionRow {
    name: String,
    version: i64,
    status: String,
    source: String,
    canonical_json: String,
    content_hash: String,
    description: String,
    created_by: String,
    created_at: i64,
    published_at: Option<i64>,
    deprecated_at: Option<i64>,
}

impl From<VersionRow> for pb::PolicyVersion {
    fn from(r: VersionRow) -> Self {
        pb::PolicyVersion {
            name: r.name,
            version: r.version,
            status: status_proto(Status::from_name(&r.status)) as i32,
            source: r.source,
            canonical_json: r.canonical_json,
            content_hash: r.content_hash,
            description: r.description,
            rules: Vec::new(),
            test_count: 0,
            created_by: r.created_by,
            create_time: Some(timestamp(r.created_at)),
            publish_time: r.published_at.map(timestamp),
            deprecate_time: r.deprecated_at.map(timestamp),
        }
    }
}

/// Reads a policy row, locking it for the transaction on PostgreSQL.
pub async fn lock_policy(tx: &TenantTx, name: &str) -> Result<Option<PolicyRow>> {
    Ok(SCHEMA.lock_document(tx, name).await?.map(policy_row))
}

/// A policy that exists and is not deleted, or `NOT_FOUND`.
pub async fn visible_policy(tx: &TenantTx, name: &str) -> Result<pb::Policy> {
    Ok(policy_proto(&SCHEMA.visible_document(tx, name).await?))
}

/// One version, with its source.
pub async fn get_version(
    tx: &TenantTx,
    name: &str,
    version: i64,
) -> Result<Option<pb::PolicyVersion>> {
    let row: Option<VersionRow> = SCHEMA.get_version(tx, name, version).await?;
    Ok(row.map(Into::into))
}

/// The version with this content hash, if any.
pub async fn find_by_hash(
    tx: &TenantTx,
    name: &str,
    hash: &str,
) -> Result<Option<pb::PolicyVersion>> {
    let row: Option<VersionRow> = SCHEMA.find_by_hash(tx, name, hash).await?;
    Ok(row.map(Into::into))
}

/// Creates the row of a policy's first push; [`update_after_push`] fills it in.
pub async fn insert_policy(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    SCHEMA.insert_document(tx, name, now).await
}

/// Inserts a version row.
pub async fn insert_version(tx: &TenantTx, v: &pb::PolicyVersion, now: i64) -> Result<()> {
    let status =
        pb::PolicyVersionStatus::try_from(v.status).unwrap_or(pb::PolicyVersionStatus::Draft);
    let published_at = (status == pb::PolicyVersionStatus::Published).then_some(now);
    SCHEMA
        .insert_version(
            tx,
            &[
                "name",
                "version",
                "status",
                "source",
                "canonical_json",
                "content_hash",
                "description",
                "created_by",
                "created_at",
                "published_at",
            ],
            vec![
                v.name.as_str().into(),
                v.version.into(),
                self::status(status).as_str().into(),
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
    let row = SCHEMA
        .update_after_push(
            tx,
            existing.map(|p| &p.stored),
            name,
            description,
            &BTreeMap::new(),
            latest,
            published,
            now,
        )
        .await?;
    Ok(policy_proto(&row))
}

/// Sets a version's status and the matching timestamp.
pub async fn set_version_status(
    tx: &TenantTx,
    name: &str,
    version: i64,
    status: pb::PolicyVersionStatus,
    now: i64,
) -> Result<()> {
    SCHEMA
        .set_version_status(tx, name, version, self::status(status), now)
        .await
}

/// Bumps the revision and recomputes the published version after a status change.
pub async fn touch_policy(tx: &TenantTx, name: &str, now: i64) -> Result<pb::Policy> {
    Ok(policy_proto(&SCHEMA.touch_document(tx, name, now).await?))
}

/// Marks a policy deleted.
pub async fn soft_delete(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    SCHEMA.soft_delete(tx, name, now).await
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
    let status = (status != pb::PolicyVersionStatus::Unspecified).then(|| self::status(status));
    let (rows, next) = SCHEMA.list_documents(tx, &[], status, size, after).await?;
    Ok((rows.iter().map(policy_proto).collect(), next))
}

/// A page of one policy's versions, newest first, without sources.
pub async fn list_versions(
    tx: &TenantTx,
    name: &str,
    size: i64,
    before: Option<i64>,
) -> Result<(Vec<pb::PolicyVersion>, String)> {
    let (rows, next) = SCHEMA
        .list_versions(tx, name, size, before, |v: &VersionRow| v.version)
        .await?;
    Ok((rows.into_iter().map(Into::into).collect(), next))
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
