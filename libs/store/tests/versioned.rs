#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Versioned documents on both backends: the lifecycle, etags, soft delete,
//! paging by name and by version, label and status filters, and a concurrent
//! push of the same version.

use std::collections::BTreeMap;

use anumate_errors::ErrorCode;
use anumate_store::versioned::{DocumentRow, Schema, Status};
use anumate_store::{Backend, Migration, Store, TenantTx, testing::TestDb};
use sea_orm::FromQueryResult;

const DDL: &str = "CREATE TABLE notes (
        tenant_id TEXT NOT NULL, name TEXT NOT NULL, description TEXT NOT NULL, labels TEXT NOT NULL,
        latest_version BIGINT NOT NULL, published_version BIGINT NOT NULL, revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL, updated_at BIGINT NOT NULL, deleted_at BIGINT,
        PRIMARY KEY (tenant_id, name));
      CREATE TABLE note_versions (
        tenant_id TEXT NOT NULL, name TEXT NOT NULL, version BIGINT NOT NULL, status TEXT NOT NULL,
        body TEXT NOT NULL, content_hash TEXT NOT NULL, created_at BIGINT NOT NULL,
        published_at BIGINT, deprecated_at BIGINT,
        PRIMARY KEY (tenant_id, name, version));
      CREATE TABLE note_labels (
        tenant_id TEXT NOT NULL, name TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (tenant_id, name, key))";

const NOTES: Migration = Migration {
    id: "test_0001_versioned_notes",
    postgres: DDL,
    sqlite: DDL,
    tenant_tables: &["notes", "note_versions", "note_labels"],
};

const SCHEMA: Schema = Schema {
    kind: "note",
    documents: "notes",
    versions: "note_versions",
    labels: Some("note_labels"),
    version_columns: "name, version, status, body, content_hash, published_at",
    version_meta_columns: "name, version, status, '' AS body, content_hash, published_at",
};

/// The same tables read as a kind without labels.
const UNLABELLED: Schema = Schema {
    labels: None,
    ..SCHEMA
};

#[derive(Debug, FromQueryResult)]
struct Version {
    version: i64,
    status: String,
    body: String,
    content_hash: String,
    published_at: Option<i64>,
}

const T: &str = "tenant-a";

async fn store(backend: Backend) -> (TestDb, Store) {
    let db = match backend {
        Backend::Sqlite => TestDb::sqlite(),
        Backend::Postgres => TestDb::postgres().await,
    };
    let store = Store::connect(&db.config).await.expect("connect");
    store.migrate(&[NOTES]).await.expect("migrate");
    (db, store)
}

/// Pushes version `latest` of `name` as the services do: lock, create on
/// first push, insert the version, update the document.
async fn push(
    tx: &TenantTx,
    name: &str,
    body: &str,
    labels: &[(&str, &str)],
    now: i64,
) -> DocumentRow {
    let existing = SCHEMA.lock_document(tx, name).await.expect("lock");
    if existing.is_none() {
        SCHEMA.insert_document(tx, name, now).await.expect("insert");
    }
    let latest = existing.as_ref().map_or(1, |d| d.latest_version + 1);
    SCHEMA
        .insert_version(
            tx,
            &[
                "name",
                "version",
                "status",
                "body",
                "content_hash",
                "created_at",
            ],
            vec![
                name.into(),
                latest.into(),
                Status::Draft.as_str().into(),
                body.into(),
                format!("h-{body}").into(),
                now.into(),
            ],
        )
        .await
        .expect("insert version");
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    SCHEMA
        .update_after_push(
            tx,
            existing.as_ref(),
            name,
            &format!("about {name}"),
            &labels,
            latest,
            existing.as_ref().map_or(0, |d| d.published_version),
            now,
        )
        .await
        .expect("update")
}

async fn scenario(backend: Backend) {
    let (_db, store) = store(backend).await;
    let tx = store.write(T).await.expect("tx");

    // Lifecycle and etags: each push and each status change is a new revision.
    let first = push(&tx, "alpha", "one", &[("team", "red")], 10).await;
    assert_eq!((first.latest_version, first.etag()), (1, "r1".to_owned()));
    let second = push(&tx, "alpha", "two", &[("team", "blue")], 20).await;
    assert_eq!((second.latest_version, second.etag()), (2, "r2".to_owned()));
    assert_eq!(second.created_at, 10, "creation time survives pushes");
    assert_eq!(second.label_map()["team"], "blue");
    SCHEMA
        .set_version_status(&tx, "alpha", 1, Status::Published, 30)
        .await
        .unwrap();
    let touched = SCHEMA.touch_document(&tx, "alpha", 30).await.unwrap();
    assert_eq!(
        (touched.published_version, touched.etag()),
        (1, "r3".into())
    );
    let v1: Version = SCHEMA.get_version(&tx, "alpha", 1).await.unwrap().unwrap();
    assert_eq!(
        (v1.status.as_str(), v1.published_at),
        ("published", Some(30))
    );
    assert_eq!(v1.body, "one");
    let by_hash: Version = SCHEMA
        .find_by_hash(&tx, "alpha", "h-two")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(by_hash.version, 2);
    assert!(
        SCHEMA
            .find_by_hash::<Version>(&tx, "alpha", "h-none")
            .await
            .unwrap()
            .is_none()
    );

    tx.commit().await.unwrap();

    // The same version pushed twice (a concurrent push) is retryable; the
    // transaction is then abandoned (PostgreSQL aborts it).
    let tx = store.write(T).await.expect("tx");
    let err = SCHEMA
        .insert_version(
            &tx,
            &[
                "name",
                "version",
                "status",
                "body",
                "content_hash",
                "created_at",
            ],
            vec![
                "alpha".into(),
                2i64.into(),
                "draft".into(),
                "x".into(),
                "h-x".into(),
                40i64.into(),
            ],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);
    drop(tx);

    // Paging by name, filters, soft delete.
    let tx = store.write(T).await.expect("tx");
    push(&tx, "beta", "b", &[("team", "blue")], 50).await;
    push(&tx, "gamma", "g", &[], 60).await;
    let (page, next) = SCHEMA
        .list_documents(&tx, &[], None, 2, None)
        .await
        .unwrap();
    let names: Vec<_> = page.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(!next.is_empty());
    let (page, next) = SCHEMA
        .list_documents(&tx, &[], None, 2, Some("beta"))
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].name, "gamma");
    assert!(next.is_empty());
    let blue = [("team".to_owned(), "blue".to_owned())];
    let (page, _) = SCHEMA
        .list_documents(&tx, &blue, None, 10, None)
        .await
        .unwrap();
    assert_eq!(page.len(), 2, "the label index follows the latest push");
    let (page, _) = SCHEMA
        .list_documents(&tx, &[], Some(Status::Published), 10, None)
        .await
        .unwrap();
    assert_eq!(page.iter().map(|d| &d.name).collect::<Vec<_>>(), ["alpha"]);
    let err = UNLABELLED
        .list_documents(&tx, &blue, None, 10, None)
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);

    SCHEMA.soft_delete(&tx, "beta", 70).await.unwrap();
    let err = SCHEMA.visible_document(&tx, "beta").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert_eq!(err.message, "note beta not found");
    let deleted = SCHEMA.any_document(&tx, "beta").await.unwrap().unwrap();
    assert!(deleted.deleted());
    let (page, _) = SCHEMA
        .list_documents(&tx, &blue, None, 10, None)
        .await
        .unwrap();
    assert_eq!(page.len(), 1, "deleted documents are not listed");

    // Paging by version, newest first, without bodies.
    for i in 0..3 {
        push(&tx, "alpha", &format!("more{i}"), &[], 80 + i).await;
    }
    let (page, next) = SCHEMA
        .list_versions(&tx, "alpha", 3, None, |v: &Version| v.version)
        .await
        .unwrap();
    let versions: Vec<_> = page.iter().map(|v| v.version).collect();
    assert_eq!(versions, [5, 4, 3]);
    assert!(
        page.iter()
            .all(|v| v.body.is_empty() && !v.content_hash.is_empty())
    );
    assert!(!next.is_empty());
    let (page, next) = SCHEMA
        .list_versions(&tx, "alpha", 3, Some(3), |v: &Version| v.version)
        .await
        .unwrap();
    assert_eq!(page.iter().map(|v| v.version).collect::<Vec<_>>(), [2, 1]);
    assert!(next.is_empty());
    tx.commit().await.unwrap();

    // Another tenant sees none of it.
    let other = store.read("tenant-b").await.unwrap();
    let (page, _) = SCHEMA
        .list_documents(&other, &[], None, 10, None)
        .await
        .unwrap();
    assert!(page.is_empty());
    assert!(
        SCHEMA
            .any_document(&other, "alpha")
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn versioned_documents_sqlite() {
    scenario(Backend::Sqlite).await;
}

#[tokio::test]
async fn versioned_documents_postgres() {
    scenario(Backend::Postgres).await;
}
