//! Capsules and their versions, stored as versioned documents
//! ([`anumate_store::versioned`]): the tables, and the mapping of their rows
//! to the contract's messages.

use std::collections::BTreeMap;

use anumate_errors::{Error, Result};
use anumate_proto::common::v1::PageRequest;
use anumate_proto::registry::v1 as pb;
use anumate_store::versioned::{DocumentRow, Schema, Status};
use anumate_store::{Migration, TenantTx, paging};
use sea_orm::FromQueryResult;

const REGISTRY_DDL: &str = "CREATE TABLE capsules (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        labels TEXT NOT NULL,
        latest_version BIGINT NOT NULL,
        published_version BIGINT NOT NULL,
        revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        deleted_at BIGINT,
        PRIMARY KEY (tenant_id, name)
      );
      CREATE TABLE capsule_versions (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('draft', 'published', 'deprecated')),
        source_yaml TEXT NOT NULL,
        canonical_json TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        signature TEXT NOT NULL,
        kid TEXT NOT NULL,
        description TEXT NOT NULL,
        labels TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        published_at BIGINT,
        deprecated_at BIGINT,
        PRIMARY KEY (tenant_id, name, version),
        FOREIGN KEY (tenant_id, name) REFERENCES capsules (tenant_id, name)
      );
      CREATE INDEX capsule_versions_hash ON capsule_versions (tenant_id, name, content_hash);
      CREATE TABLE capsule_labels (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (tenant_id, name, key),
        FOREIGN KEY (tenant_id, name) REFERENCES capsules (tenant_id, name)
      );
      CREATE INDEX capsule_labels_kv ON capsule_labels (tenant_id, key, value)";

/// Registry tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "registry_0001_capsules",
    // The same SQL works on both backends.
    postgres: REGISTRY_DDL,
    sqlite: REGISTRY_DDL,
    tenant_tables: &["capsules", "capsule_versions", "capsule_labels"],
}];

/// Where capsules are stored.
const SCHEMA: Schema = Schema {
    kind: "capsule",
    documents: "capsules",
    versions: "capsule_versions",
    labels: Some("capsule_labels"),
    version_columns: "name, version, status, source_yaml, canonical_json, content_hash, signature, kid, \
         description, labels, created_by, created_at, published_at, deprecated_at",
    version_meta_columns: "name, version, status, '' AS source_yaml, '' AS canonical_json, content_hash, \
         signature, kid, description, labels, created_by, created_at, published_at, deprecated_at",
};

/// A capsule row and whether it is soft-deleted.
pub struct CapsuleRow {
    pub proto: pb::Capsule,
    pub deleted: bool,
    stored: DocumentRow,
}

/// A timestamp from microseconds since the epoch.
pub use anumate_proto::timestamp_from_micros as timestamp;

fn status(s: pb::VersionStatus) -> Status {
    match s {
        pb::VersionStatus::Published => Status::Published,
        pb::VersionStatus::Deprecated => Status::Deprecated,
        _ => Status::Draft,
    }
}

fn status_proto(s: Status) -> pb::VersionStatus {
    match s {
        Status::Published => pb::VersionStatus::Published,
        Status::Deprecated => pb::VersionStatus::Deprecated,
        Status::Draft => pb::VersionStatus::Draft,
    }
}

fn capsule_proto(d: &DocumentRow) -> pb::Capsule {
    pb::Capsule {
        name: d.name.clone(),
        description: d.description.clone(),
        labels: d.label_map(),
        latest_version: d.latest_version,
        published_version: d.published_version,
        etag: d.etag(),
        create_time: Some(timestamp(d.created_at)),
        update_time: Some(timestamp(d.updated_at)),
    }
}

fn capsule_row(d: DocumentRow) -> CapsuleRow {
    CapsuleRow {
        proto: capsule_proto(&d),
        deleted: d.deleted(),
        stored: d,
    }
}

/// A stored capsule version.
#[derive(FromQueryResult)]
struct VersionRow {
    name: String,
    version: i64,
    status: String,
    source_yaml: String,
    canonical_json: String,
    content_hash: String,
    signature: String,
    kid: String,
    description: String,
    labels: String,
    created_by: String,
    created_at: i64,
    published_at: Option<i64>,
    deprecated_at: Option<i64>,
}

impl From<VersionRow> for pb::CapsuleVersion {
    fn from(r: VersionRow) -> Self {
        pb::CapsuleVersion {
            name: r.name,
            version: r.version,
            status: status_proto(Status::from_name(&r.status)) as i32,
            source_yaml: r.source_yaml,
            canonical_json: r.canonical_json,
            content_hash: r.content_hash,
            signature: r.signature,
            kid: r.kid,
            description: r.description,
            labels: serde_json::from_str(&r.labels).unwrap_or_default(),
            created_by: r.created_by,
            create_time: Some(timestamp(r.created_at)),
            publish_time: r.published_at.map(timestamp),
            deprecate_time: r.deprecated_at.map(timestamp),
        }
    }
}

/// Reads a capsule row, locking it for the transaction on PostgreSQL.
pub async fn lock_capsule(tx: &TenantTx, name: &str) -> Result<Option<CapsuleRow>> {
    Ok(SCHEMA.lock_document(tx, name).await?.map(capsule_row))
}

/// A capsule that exists and is not deleted, or `NOT_FOUND`.
pub async fn visible_capsule(tx: &TenantTx, name: &str) -> Result<pb::Capsule> {
    Ok(capsule_proto(&SCHEMA.visible_document(tx, name).await?))
}

/// One version, with its source.
pub async fn get_version(
    tx: &TenantTx,
    name: &str,
    version: i64,
) -> Result<Option<pb::CapsuleVersion>> {
    let row: Option<VersionRow> = SCHEMA.get_version(tx, name, version).await?;
    Ok(row.map(Into::into))
}

/// The version with this content hash, if any.
pub async fn find_by_hash(
    tx: &TenantTx,
    name: &str,
    hash: &str,
) -> Result<Option<pb::CapsuleVersion>> {
    let row: Option<VersionRow> = SCHEMA.find_by_hash(tx, name, hash).await?;
    Ok(row.map(Into::into))
}

/// Creates the row of a capsule's first push; [`update_after_push`] fills it in.
pub async fn insert_capsule(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    SCHEMA.insert_document(tx, name, now).await
}

/// Inserts a version row.
pub async fn insert_version(tx: &TenantTx, v: &pb::CapsuleVersion, now: i64) -> Result<()> {
    let labels: BTreeMap<_, _> = v.labels.iter().collect();
    let status = pb::VersionStatus::try_from(v.status).unwrap_or(pb::VersionStatus::Draft);
    let published_at = (status == pb::VersionStatus::Published).then_some(now);
    SCHEMA
        .insert_version(
            tx,
            &[
                "name",
                "version",
                "status",
                "source_yaml",
                "canonical_json",
                "content_hash",
                "signature",
                "kid",
                "description",
                "labels",
                "created_by",
                "created_at",
                "published_at",
            ],
            vec![
                v.name.as_str().into(),
                v.version.into(),
                self::status(status).as_str().into(),
                v.source_yaml.as_str().into(),
                v.canonical_json.as_str().into(),
                v.content_hash.as_str().into(),
                v.signature.as_str().into(),
                v.kid.as_str().into(),
                v.description.as_str().into(),
                serde_json::to_string(&labels)
                    .unwrap_or_else(|_| "{}".into())
                    .into(),
                v.created_by.as_str().into(),
                now.into(),
                published_at.into(),
            ],
        )
        .await
}

/// Writes the capsule row after a push: newest metadata, version counters, a new revision.
pub async fn update_after_push(
    tx: &TenantTx,
    existing: Option<&CapsuleRow>,
    doc: &anumate_capsule::Capsule,
    latest: i64,
    published: i64,
    now: i64,
) -> Result<pb::Capsule> {
    let row = SCHEMA
        .update_after_push(
            tx,
            existing.map(|c| &c.stored),
            &doc.name,
            &doc.description,
            &doc.labels,
            latest,
            published,
            now,
        )
        .await?;
    Ok(capsule_proto(&row))
}

/// Sets a version's status and the matching timestamp.
pub async fn set_version_status(
    tx: &TenantTx,
    name: &str,
    version: i64,
    status: pb::VersionStatus,
    now: i64,
) -> Result<()> {
    SCHEMA
        .set_version_status(tx, name, version, self::status(status), now)
        .await
}

/// Bumps the revision and recomputes the published version after a status change.
pub async fn touch_capsule(tx: &TenantTx, name: &str, now: i64) -> Result<pb::Capsule> {
    Ok(capsule_proto(&SCHEMA.touch_document(tx, name, now).await?))
}

/// Marks a capsule deleted.
pub async fn soft_delete(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    SCHEMA.soft_delete(tx, name, now).await
}

/// Parses `k=v,k2=v2`.
pub fn parse_label_selector(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(Error::invalid_argument(
                "label_selector",
                format!("{part:?} is not key=value"),
            ));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(Error::invalid_argument(
                "label_selector",
                format!("{part:?} has an empty key"),
            ));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Page size and the decoded token.
pub fn page_params(page: Option<&PageRequest>) -> Result<(i64, Option<String>)> {
    let (size, token) = page.map_or((0, ""), |p| (p.page_size, p.page_token.as_str()));
    paging::page_params(size, token)
}

/// A page of the tenant's visible capsules by name.
pub async fn list_capsules(
    tx: &TenantTx,
    labels: &[(String, String)],
    status: pb::VersionStatus,
    size: i64,
    after: Option<&str>,
) -> Result<(Vec<pb::Capsule>, String)> {
    let status = (status != pb::VersionStatus::Unspecified).then(|| self::status(status));
    let (rows, next) = SCHEMA
        .list_documents(tx, labels, status, size, after)
        .await?;
    Ok((rows.iter().map(capsule_proto).collect(), next))
}

/// A page of one capsule's versions, newest first, without sources.
pub async fn list_versions(
    tx: &TenantTx,
    name: &str,
    size: i64,
    before: Option<i64>,
) -> Result<(Vec<pb::CapsuleVersion>, String)> {
    let (rows, next) = SCHEMA
        .list_versions(tx, name, size, before, |v: &VersionRow| v.version)
        .await?;
    Ok((rows.into_iter().map(Into::into).collect(), next))
}
