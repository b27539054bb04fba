//! Versioned documents: a named document per tenant with numbered versions
//! that move draft → published → deprecated, an etag (the row's revision),
//! soft delete, and paging by name or by version: the SQL. The capsule
//! registry and the policy service store their documents this way; each names
//! its tables and columns in a [`Schema`] and maps its version rows itself.
//! The lifecycle over it (push, publish, delete, with their events) is
//! `anumate-documents`.
//!
//! Every query also filters on the transaction's tenant; on PostgreSQL
//! row-level security enforces it again.

use std::collections::{BTreeMap, HashMap};

use anumate_errors::{Error, ErrorCode, Result};
use sea_orm::FromQueryResult;

use crate::{Backend, StoreError, TenantTx, Value, paging};

/// Where a kind of versioned document is stored.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// The document's name in messages ("capsule", "policy").
    pub kind: &'static str,
    /// One row per document: `tenant_id, name, description, latest_version,
    /// published_version, revision, created_at, updated_at, deleted_at`, and a
    /// `labels` JSON column when `labels` is set.
    pub documents: &'static str,
    /// One row per version: `tenant_id, name, version, status, content_hash,
    /// created_at, published_at, deprecated_at` and the kind's own columns.
    pub versions: &'static str,
    /// The label index (`tenant_id, name, key, value`), for kinds with labels.
    pub labels: Option<&'static str>,
    /// The version columns a version row is read from.
    pub version_columns: &'static str,
    /// The same without the (large) sources, for listings.
    pub version_meta_columns: &'static str,
}

/// A version's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Pushed, not yet in force.
    Draft,
    /// In force.
    Published,
    /// Retired.
    Deprecated,
}

impl Status {
    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Published => "published",
            Status::Deprecated => "deprecated",
        }
    }

    /// From its stored name (anything unknown reads as a draft).
    pub fn from_name(s: &str) -> Status {
        match s {
            "published" => Status::Published,
            "deprecated" => Status::Deprecated,
            _ => Status::Draft,
        }
    }
}

/// A document row.
#[derive(Debug, Clone, FromQueryResult)]
pub struct DocumentRow {
    pub name: String,
    pub description: String,
    /// JSON object of the labels (`{}` for kinds without labels).
    pub labels: String,
    pub latest_version: i64,
    pub published_version: i64,
    pub revision: i64,
    pub created_at: i64,
    pub updated_at: i64,
    pub deleted_at: Option<i64>,
}

impl DocumentRow {
    /// Whether it is soft-deleted.
    pub fn deleted(&self) -> bool {
        self.deleted_at.is_some()
    }

    /// The etag clients send back for optimistic concurrency.
    pub fn etag(&self) -> String {
        etag(self.revision)
    }

    /// The labels (none when the stored JSON is unreadable).
    pub fn label_map(&self) -> HashMap<String, String> {
        serde_json::from_str(&self.labels).unwrap_or_default()
    }
}

/// The etag of a revision.
pub fn etag(revision: i64) -> String {
    format!("r{revision}")
}

fn db(e: sea_orm::DbErr) -> Error {
    Error::internal(e)
}

impl Schema {
    fn document_columns(&self) -> &'static str {
        if self.labels.is_some() {
            "name, description, labels, latest_version, published_version, revision, created_at, updated_at, deleted_at"
        } else {
            "name, description, '{}' AS labels, latest_version, published_version, revision, created_at, updated_at, deleted_at"
        }
    }

    async fn one<T: FromQueryResult>(
        &self,
        tx: &TenantTx,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Option<T>> {
        let row = tx.query_one(sql, values).await?;
        row.map(|r| T::from_query_result(&r, "").map_err(db))
            .transpose()
    }

    async fn all<T: FromQueryResult>(
        &self,
        tx: &TenantTx,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Vec<T>> {
        tx.query_all(sql, values)
            .await?
            .iter()
            .map(|r| T::from_query_result(r, "").map_err(db))
            .collect()
    }

    /// Reads a document row, deleted or not, locking it for the transaction
    /// on PostgreSQL.
    pub async fn lock_document(&self, tx: &TenantTx, name: &str) -> Result<Option<DocumentRow>> {
        let lock = if tx.backend() == Backend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {} FROM {} WHERE tenant_id = $1 AND name = $2{lock}",
            self.document_columns(),
            self.documents
        );
        self.one(tx, &sql, vec![tx.tenant_id().into(), name.into()])
            .await
    }

    /// A document row, deleted or not.
    pub async fn any_document(&self, tx: &TenantTx, name: &str) -> Result<Option<DocumentRow>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE tenant_id = $1 AND name = $2",
            self.document_columns(),
            self.documents
        );
        self.one(tx, &sql, vec![tx.tenant_id().into(), name.into()])
            .await
    }

    /// A document that exists and is not deleted, or `NOT_FOUND`.
    pub async fn visible_document(&self, tx: &TenantTx, name: &str) -> Result<DocumentRow> {
        match self.any_document(tx, name).await? {
            Some(d) if !d.deleted() => Ok(d),
            _ => Err(Error::not_found(format!("{} {name} not found", self.kind))),
        }
    }

    /// One version, with its source.
    pub async fn get_version<V: FromQueryResult>(
        &self,
        tx: &TenantTx,
        name: &str,
        version: i64,
    ) -> Result<Option<V>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE tenant_id = $1 AND name = $2 AND version = $3",
            self.version_columns, self.versions
        );
        self.one(
            tx,
            &sql,
            vec![tx.tenant_id().into(), name.into(), version.into()],
        )
        .await
    }

    /// The oldest version with this content hash, if any.
    pub async fn find_by_hash<V: FromQueryResult>(
        &self,
        tx: &TenantTx,
        name: &str,
        hash: &str,
    ) -> Result<Option<V>> {
        let sql = format!(
            "SELECT {} FROM {} WHERE tenant_id = $1 AND name = $2 AND content_hash = $3 \
             ORDER BY version LIMIT 1",
            self.version_columns, self.versions
        );
        self.one(
            tx,
            &sql,
            vec![tx.tenant_id().into(), name.into(), hash.into()],
        )
        .await
    }

    /// Creates the row of a document's first push; [`Schema::update_after_push`]
    /// fills it in.
    pub async fn insert_document(&self, tx: &TenantTx, name: &str, now: i64) -> Result<()> {
        let (labels_col, labels_val) = if self.labels.is_some() {
            (" labels,", " '{}',")
        } else {
            ("", "")
        };
        let sql = format!(
            "INSERT INTO {} (tenant_id, name, description,{labels_col} latest_version, \
               published_version, revision, created_at, updated_at) \
             VALUES ($1, $2, '',{labels_val} 0, 0, 0, $3, $3)",
            self.documents
        );
        tx.execute(&sql, vec![tx.tenant_id().into(), name.into(), now.into()])
            .await
            .map_err(conflict_is_retryable)?;
        Ok(())
    }

    /// Inserts a version row: `columns` (after `tenant_id`) with their
    /// `values`; a concurrent push of the same version is `ALREADY_EXISTS`.
    pub async fn insert_version(
        &self,
        tx: &TenantTx,
        columns: &[&str],
        values: Vec<Value>,
    ) -> Result<()> {
        let placeholders: Vec<String> = (1..=columns.len() + 1).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {} (tenant_id, {}) VALUES ({})",
            self.versions,
            columns.join(", "),
            placeholders.join(", ")
        );
        let mut all = Vec::with_capacity(values.len() + 1);
        all.push(tx.tenant_id().into());
        all.extend(values);
        tx.execute(&sql, all).await.map_err(conflict_is_retryable)?;
        Ok(())
    }

    /// Writes the document row after a push: newest description (and
    /// labels), version counters, a new revision. Returns the row as written.
    #[allow(clippy::too_many_arguments)]
    pub async fn update_after_push(
        &self,
        tx: &TenantTx,
        existing: Option<&DocumentRow>,
        name: &str,
        description: &str,
        labels: &BTreeMap<String, String>,
        latest: i64,
        published: i64,
        now: i64,
    ) -> Result<DocumentRow> {
        let labels_json = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
        let revision = existing.map_or(1, |d| d.revision + 1);
        let created_at = existing.map_or(now, |d| d.created_at);
        let mut values: Vec<Value> = vec![
            tx.tenant_id().into(),
            name.into(),
            description.into(),
            latest.into(),
            published.into(),
            revision.into(),
            now.into(),
        ];
        let labels_set = if self.labels.is_some() {
            values.push(labels_json.clone().into());
            ", labels = $8"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE {} SET description = $3, latest_version = $4, published_version = $5, \
               revision = $6, updated_at = $7{labels_set} \
             WHERE tenant_id = $1 AND name = $2",
            self.documents
        );
        tx.execute(&sql, values).await?;
        if let Some(table) = self.labels {
            tx.execute(
                &format!("DELETE FROM {table} WHERE tenant_id = $1 AND name = $2"),
                vec![tx.tenant_id().into(), name.into()],
            )
            .await?;
            for (k, v) in labels {
                tx.execute(
                    &format!(
                        "INSERT INTO {table} (tenant_id, name, key, value) VALUES ($1, $2, $3, $4)"
                    ),
                    vec![
                        tx.tenant_id().into(),
                        name.into(),
                        k.as_str().into(),
                        v.as_str().into(),
                    ],
                )
                .await?;
            }
        }
        Ok(DocumentRow {
            name: name.to_owned(),
            description: description.to_owned(),
            labels: if self.labels.is_some() {
                labels_json
            } else {
                "{}".into()
            },
            latest_version: latest,
            published_version: published,
            revision,
            created_at,
            updated_at: now,
            deleted_at: None,
        })
    }

    /// Sets a version's status (published or deprecated) and its timestamp.
    pub async fn set_version_status(
        &self,
        tx: &TenantTx,
        name: &str,
        version: i64,
        status: Status,
        now: i64,
    ) -> Result<()> {
        let column = if status == Status::Published {
            "published_at"
        } else {
            "deprecated_at"
        };
        tx.execute(
            &format!(
                "UPDATE {} SET status = $4, {column} = $5 WHERE tenant_id = $1 AND name = $2 AND version = $3",
                self.versions
            ),
            vec![
                tx.tenant_id().into(),
                name.into(),
                version.into(),
                status.as_str().into(),
                now.into(),
            ],
        )
        .await?;
        Ok(())
    }

    /// Bumps the revision and recomputes the published version after a
    /// status change; returns the visible document.
    pub async fn touch_document(&self, tx: &TenantTx, name: &str, now: i64) -> Result<DocumentRow> {
        tx.execute(
            &format!(
                "UPDATE {} SET revision = revision + 1, updated_at = $3, published_version = COALESCE(( \
                   SELECT MAX(version) FROM {} v WHERE v.tenant_id = $1 AND v.name = $2 AND v.status = 'published'), 0) \
                 WHERE tenant_id = $1 AND name = $2",
                self.documents, self.versions
            ),
            vec![tx.tenant_id().into(), name.into(), now.into()],
        )
        .await?;
        self.visible_document(tx, name).await
    }

    /// Marks a document deleted (a new revision).
    pub async fn soft_delete(&self, tx: &TenantTx, name: &str, now: i64) -> Result<()> {
        tx.execute(
            &format!(
                "UPDATE {} SET deleted_at = $3, updated_at = $3, revision = revision + 1 \
                 WHERE tenant_id = $1 AND name = $2",
                self.documents
            ),
            vec![tx.tenant_id().into(), name.into(), now.into()],
        )
        .await?;
        Ok(())
    }

    /// A page of the tenant's visible documents by name: those carrying every
    /// label in `labels` and, with `status`, having a version in that state.
    pub async fn list_documents(
        &self,
        tx: &TenantTx,
        labels: &[(String, String)],
        status: Option<Status>,
        size: i64,
        after: Option<&str>,
    ) -> Result<(Vec<DocumentRow>, String)> {
        let mut sql = format!(
            "SELECT {} FROM {} c WHERE c.tenant_id = $1 AND c.deleted_at IS NULL",
            self.document_columns(),
            self.documents
        );
        let mut values: Vec<Value> = vec![tx.tenant_id().into()];
        if !labels.is_empty() {
            let Some(table) = self.labels else {
                return Err(Error::invalid_argument(
                    "label_selector",
                    format!("{} documents have no labels", self.kind),
                ));
            };
            for (k, v) in labels {
                values.push(k.as_str().into());
                values.push(v.as_str().into());
                sql.push_str(&format!(
                    " AND EXISTS (SELECT 1 FROM {table} l WHERE l.tenant_id = c.tenant_id AND l.name = c.name \
                       AND l.key = ${} AND l.value = ${})",
                    values.len() - 1,
                    values.len()
                ));
            }
        }
        if let Some(status) = status {
            values.push(status.as_str().into());
            sql.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM {} v WHERE v.tenant_id = c.tenant_id AND v.name = c.name \
                   AND v.status = ${})",
                self.versions,
                values.len()
            ));
        }
        if let Some(after) = after {
            values.push(after.into());
            sql.push_str(&format!(" AND c.name > ${}", values.len()));
        }
        values.push((size + 1).into());
        sql.push_str(&format!(" ORDER BY c.name LIMIT ${}", values.len()));
        let items: Vec<DocumentRow> = self.all(tx, &sql, values).await?;
        Ok(paging::finish_page(items, size, |d| d.name.clone()))
    }

    /// A page of one document's versions, newest first, without sources;
    /// `version_of` reads a row's version number for the page token.
    pub async fn list_versions<V: FromQueryResult>(
        &self,
        tx: &TenantTx,
        name: &str,
        size: i64,
        before: Option<i64>,
        version_of: impl Fn(&V) -> i64,
    ) -> Result<(Vec<V>, String)> {
        let sql = format!(
            "SELECT {} FROM {} WHERE tenant_id = $1 AND name = $2 AND version < $3 \
             ORDER BY version DESC LIMIT $4",
            self.version_meta_columns, self.versions
        );
        let items: Vec<V> = self
            .all(
                tx,
                &sql,
                vec![
                    tx.tenant_id().into(),
                    name.into(),
                    before.unwrap_or(i64::MAX).into(),
                    (size + 1).into(),
                ],
            )
            .await?;
        Ok(paging::finish_page(items, size, |v| {
            version_of(v).to_string()
        }))
    }
}

fn conflict_is_retryable(e: StoreError) -> Error {
    if e.is_conflict() {
        Error::new(
            ErrorCode::AlreadyExists,
            "a concurrent push created this version; retry",
        )
    } else {
        e.into()
    }
}
