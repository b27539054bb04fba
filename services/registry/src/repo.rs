//! SQL for capsules and their versions. Every query also filters on the
//! transaction's tenant; on PostgreSQL row-level security enforces it again.

use std::collections::BTreeMap;

use anumate_errors::{Error, Result};
use anumate_proto::common::v1::PageRequest;
use anumate_proto::registry::v1 as pb;
use anumate_store::{Backend, Migration, QueryResult, TenantTx, paging};

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

/// A capsule row and whether it is soft-deleted.
pub struct CapsuleRow {
    pub proto: pb::Capsule,
    pub revision: i64,
    pub deleted: bool,
}

pub fn timestamp(micros: i64) -> pbjson_types::Timestamp {
    pbjson_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn etag(revision: i64) -> String {
    format!("r{revision}")
}

fn status_str(s: pb::VersionStatus) -> &'static str {
    match s {
        pb::VersionStatus::Published => "published",
        pb::VersionStatus::Deprecated => "deprecated",
        _ => "draft",
    }
}

fn status_from(s: &str) -> pb::VersionStatus {
    match s {
        "published" => pb::VersionStatus::Published,
        "deprecated" => pb::VersionStatus::Deprecated,
        _ => pb::VersionStatus::Draft,
    }
}

fn db(e: anumate_store::DbErr) -> Error {
    Error::internal(e)
}

fn labels_from_json(text: &str) -> std::collections::HashMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

const CAPSULE_COLUMNS: &str = "name, description, labels, latest_version, published_version, revision, created_at, updated_at, deleted_at";

fn capsule_from(row: &QueryResult) -> Result<CapsuleRow> {
    let deleted_at: Option<i64> = row.try_get("", "deleted_at").map_err(db)?;
    let labels: String = row.try_get("", "labels").map_err(db)?;
    let revision: i64 = row.try_get("", "revision").map_err(db)?;
    Ok(CapsuleRow {
        proto: pb::Capsule {
            name: row.try_get("", "name").map_err(db)?,
            description: row.try_get("", "description").map_err(db)?,
            labels: labels_from_json(&labels),
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

/// Reads a capsule row, locking it for the transaction on PostgreSQL.
pub async fn lock_capsule(tx: &TenantTx, name: &str) -> Result<Option<CapsuleRow>> {
    let lock = if tx.backend() == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let sql =
        format!("SELECT {CAPSULE_COLUMNS} FROM capsules WHERE tenant_id = $1 AND name = $2{lock}");
    let row = tx
        .query_one(&sql, vec![tx.tenant_id().into(), name.into()])
        .await?;
    row.as_ref().map(capsule_from).transpose()
}

/// A capsule that exists and is not deleted, or `NOT_FOUND`.
pub async fn visible_capsule(tx: &TenantTx, name: &str) -> Result<pb::Capsule> {
    let sql = format!(
        "SELECT {CAPSULE_COLUMNS} FROM capsules WHERE tenant_id = $1 AND name = $2 AND deleted_at IS NULL"
    );
    let row = tx
        .query_one(&sql, vec![tx.tenant_id().into(), name.into()])
        .await?;
    match row {
        Some(row) => Ok(capsule_from(&row)?.proto),
        None => Err(Error::not_found(format!("capsule {name} not found"))),
    }
}

const VERSION_COLUMNS: &str = "name, version, status, source_yaml, canonical_json, content_hash, signature, kid, \
     description, labels, created_by, created_at, published_at, deprecated_at";
const VERSION_META_COLUMNS: &str = "name, version, status, '' AS source_yaml, '' AS canonical_json, content_hash, \
     signature, kid, description, labels, created_by, created_at, published_at, deprecated_at";

fn version_from(row: &QueryResult) -> Result<pb::CapsuleVersion> {
    let status: String = row.try_get("", "status").map_err(db)?;
    let labels: String = row.try_get("", "labels").map_err(db)?;
    let published_at: Option<i64> = row.try_get("", "published_at").map_err(db)?;
    let deprecated_at: Option<i64> = row.try_get("", "deprecated_at").map_err(db)?;
    Ok(pb::CapsuleVersion {
        name: row.try_get("", "name").map_err(db)?,
        version: row.try_get("", "version").map_err(db)?,
        status: status_from(&status) as i32,
        source_yaml: row.try_get("", "source_yaml").map_err(db)?,
        canonical_json: row.try_get("", "canonical_json").map_err(db)?,
        content_hash: row.try_get("", "content_hash").map_err(db)?,
        signature: row.try_get("", "signature").map_err(db)?,
        kid: row.try_get("", "kid").map_err(db)?,
        description: row.try_get("", "description").map_err(db)?,
        labels: labels_from_json(&labels),
        created_by: row.try_get("", "created_by").map_err(db)?,
        create_time: Some(timestamp(row.try_get("", "created_at").map_err(db)?)),
        publish_time: published_at.map(timestamp),
        deprecate_time: deprecated_at.map(timestamp),
    })
}

/// One version, with or without its source.
pub async fn get_version(
    tx: &TenantTx,
    name: &str,
    version: i64,
) -> Result<Option<pb::CapsuleVersion>> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM capsule_versions WHERE tenant_id = $1 AND name = $2 AND version = $3"
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
) -> Result<Option<pb::CapsuleVersion>> {
    let sql = format!(
        "SELECT {VERSION_COLUMNS} FROM capsule_versions WHERE tenant_id = $1 AND name = $2 AND content_hash = $3 \
         ORDER BY version LIMIT 1"
    );
    let row = tx
        .query_one(&sql, vec![tx.tenant_id().into(), name.into(), hash.into()])
        .await?;
    row.as_ref().map(version_from).transpose()
}

/// Creates the row of a capsule's first push; [`update_after_push`] fills it in.
pub async fn insert_capsule(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO capsules (tenant_id, name, description, labels, latest_version, \
           published_version, revision, created_at, updated_at) \
         VALUES ($1, $2, '', '{}', 0, 0, 0, $3, $3)",
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

pub async fn insert_version(tx: &TenantTx, v: &pb::CapsuleVersion, now: i64) -> Result<()> {
    let labels: BTreeMap<_, _> = v.labels.iter().collect();
    let status = pb::VersionStatus::try_from(v.status).unwrap_or(pb::VersionStatus::Draft);
    let published_at = (status == pb::VersionStatus::Published).then_some(now);
    tx.execute(
        "INSERT INTO capsule_versions (tenant_id, name, version, status, source_yaml, canonical_json, content_hash, \
           signature, kid, description, labels, created_by, created_at, published_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        vec![
            tx.tenant_id().into(),
            v.name.as_str().into(),
            v.version.into(),
            status_str(status).into(),
            v.source_yaml.as_str().into(),
            v.canonical_json.as_str().into(),
            v.content_hash.as_str().into(),
            v.signature.as_str().into(),
            v.kid.as_str().into(),
            v.description.as_str().into(),
            serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into()).into(),
            v.created_by.as_str().into(),
            now.into(),
            published_at.into(),
        ],
    )
    .await
    .map_err(conflict_is_retryable)?;
    Ok(())
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
    let labels_json = serde_json::to_string(&doc.labels).unwrap_or_else(|_| "{}".into());
    let revision = existing.map_or(1, |c| c.revision + 1);
    let create_time = existing
        .and_then(|c| c.proto.create_time)
        .unwrap_or_else(|| timestamp(now));
    tx.execute(
        "UPDATE capsules SET description = $3, labels = $4, latest_version = $5, \
           published_version = $6, revision = $7, updated_at = $8 \
         WHERE tenant_id = $1 AND name = $2",
        vec![
            tx.tenant_id().into(),
            doc.name.as_str().into(),
            doc.description.as_str().into(),
            labels_json.into(),
            latest.into(),
            published.into(),
            revision.into(),
            now.into(),
        ],
    )
    .await?;
    tx.execute(
        "DELETE FROM capsule_labels WHERE tenant_id = $1 AND name = $2",
        vec![tx.tenant_id().into(), doc.name.as_str().into()],
    )
    .await?;
    for (k, v) in &doc.labels {
        tx.execute(
            "INSERT INTO capsule_labels (tenant_id, name, key, value) VALUES ($1, $2, $3, $4)",
            vec![
                tx.tenant_id().into(),
                doc.name.as_str().into(),
                k.as_str().into(),
                v.as_str().into(),
            ],
        )
        .await?;
    }
    Ok(pb::Capsule {
        name: doc.name.clone(),
        description: doc.description.clone(),
        labels: doc.labels.clone().into_iter().collect(),
        latest_version: latest,
        published_version: published,
        etag: etag(revision),
        create_time: Some(create_time),
        update_time: Some(timestamp(now)),
    })
}

pub async fn set_version_status(
    tx: &TenantTx,
    name: &str,
    version: i64,
    status: pb::VersionStatus,
    now: i64,
) -> Result<()> {
    let column = if status == pb::VersionStatus::Published {
        "published_at"
    } else {
        "deprecated_at"
    };
    tx.execute(
        &format!("UPDATE capsule_versions SET status = $4, {column} = $5 WHERE tenant_id = $1 AND name = $2 AND version = $3"),
        vec![tx.tenant_id().into(), name.into(), version.into(), status_str(status).into(), now.into()],
    )
    .await?;
    Ok(())
}

/// Bumps the revision and recomputes the published version after a status change.
pub async fn touch_capsule(tx: &TenantTx, name: &str, now: i64) -> Result<pb::Capsule> {
    tx.execute(
        "UPDATE capsules SET revision = revision + 1, updated_at = $3, published_version = COALESCE(( \
           SELECT MAX(version) FROM capsule_versions v WHERE v.tenant_id = $1 AND v.name = $2 AND v.status = 'published'), 0) \
         WHERE tenant_id = $1 AND name = $2",
        vec![tx.tenant_id().into(), name.into(), now.into()],
    )
    .await?;
    visible_capsule(tx, name).await
}

pub async fn soft_delete(tx: &TenantTx, name: &str, now: i64) -> Result<()> {
    tx.execute(
        "UPDATE capsules SET deleted_at = $3, updated_at = $3, revision = revision + 1 WHERE tenant_id = $1 AND name = $2",
        vec![tx.tenant_id().into(), name.into(), now.into()],
    )
    .await?;
    Ok(())
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

pub async fn list_capsules(
    tx: &TenantTx,
    labels: &[(String, String)],
    status: pb::VersionStatus,
    size: i64,
    after: Option<&str>,
) -> Result<(Vec<pb::Capsule>, String)> {
    let mut sql = format!(
        "SELECT {CAPSULE_COLUMNS} FROM capsules c WHERE c.tenant_id = $1 AND c.deleted_at IS NULL"
    );
    let mut values: Vec<anumate_store::Value> = vec![tx.tenant_id().into()];
    for (k, v) in labels {
        values.push(k.as_str().into());
        values.push(v.as_str().into());
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM capsule_labels l WHERE l.tenant_id = c.tenant_id AND l.name = c.name \
               AND l.key = ${} AND l.value = ${})",
            values.len() - 1,
            values.len()
        ));
    }
    if status != pb::VersionStatus::Unspecified {
        values.push(status_str(status).into());
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM capsule_versions v WHERE v.tenant_id = c.tenant_id AND v.name = c.name \
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
        .map(|r| capsule_from(r).map(|c| c.proto))
        .collect::<Result<Vec<_>>>()?;
    Ok(paging::finish_page(items, size, |c| c.name.clone()))
}

pub async fn list_versions(
    tx: &TenantTx,
    name: &str,
    size: i64,
    before: Option<i64>,
) -> Result<(Vec<pb::CapsuleVersion>, String)> {
    let sql = format!(
        "SELECT {VERSION_META_COLUMNS} FROM capsule_versions WHERE tenant_id = $1 AND name = $2 AND version < $3 \
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
