#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Store behaviour against real PostgreSQL and SQLite.

use anumate_store::{Backend, Migration, Store, testing::TestDb};

const NOTES: Migration = Migration {
    id: "test_0001_notes",
    postgres: "CREATE TABLE notes (id BIGSERIAL PRIMARY KEY, tenant_id TEXT NOT NULL, body TEXT NOT NULL)",
    sqlite: "CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id TEXT NOT NULL, body TEXT NOT NULL)",
    tenant_tables: &["notes"],
};

async fn store(db: &TestDb) -> Store {
    let store = Store::connect(&db.config).await.expect("connect");
    let report = store.migrate(&[NOTES]).await.expect("migrate");
    assert_eq!(report.applied, vec!["test_0001_notes"]);
    store
}

async fn insert(store: &Store, tenant: &str, body: &str) {
    let tx = store.write(tenant).await.expect("tx");
    tx.execute(
        "INSERT INTO notes (tenant_id, body) VALUES ($1, $2)",
        vec![tenant.into(), body.into()],
    )
    .await
    .expect("insert");
    tx.commit().await.expect("commit");
}

async fn bodies_without_filter(store: &Store, tenant: &str) -> Vec<String> {
    let tx = store.read(tenant).await.expect("tx");
    let rows = tx
        .query_all("SELECT * FROM notes ORDER BY id", vec![])
        .await
        .expect("select");
    rows.iter()
        .map(|r| r.try_get::<String>("", "body").expect("body"))
        .collect()
}

#[tokio::test]
async fn postgres_rls_hides_other_tenants_rows_from_unfiltered_queries() {
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    assert_eq!(store.backend(), Backend::Postgres);
    store
        .check_serving_role()
        .await
        .expect("serving role is not privileged");
    insert(&store, "tenant-a", "a1").await;
    insert(&store, "tenant-b", "b1").await;
    insert(&store, "tenant-a", "a2").await;

    assert_eq!(
        bodies_without_filter(&store, "tenant-a").await,
        vec!["a1", "a2"]
    );
    assert_eq!(bodies_without_filter(&store, "tenant-b").await, vec!["b1"]);

    // Writing a row for another tenant is refused by the policy's WITH CHECK.
    let tx = store.write("tenant-a").await.expect("tx");
    let err = tx
        .execute(
            "INSERT INTO notes (tenant_id, body) VALUES ('tenant-b', 'sneaky')",
            vec![],
        )
        .await
        .expect_err("cross-tenant insert must fail");
    assert!(err.to_string().contains("row-level security"), "{err}");
    drop(tx);

    // Updates and deletes cannot reach the other tenant's rows either.
    let tx = store.write("tenant-a").await.expect("tx");
    assert_eq!(
        tx.execute("DELETE FROM notes", vec![])
            .await
            .expect("delete"),
        2
    );
    tx.commit().await.expect("commit");
    assert_eq!(bodies_without_filter(&store, "tenant-b").await, vec!["b1"]);
}

#[tokio::test]
async fn postgres_migrations_are_idempotent_and_detect_edits() {
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    let again = store.migrate(&[NOTES]).await.expect("second run");
    assert!(again.applied.is_empty());
    assert_eq!(again.already_applied, 1);
    let edited = Migration {
        sqlite: "CREATE TABLE other (x TEXT)",
        ..NOTES
    };
    let err = store
        .migrate(&[edited])
        .await
        .expect_err("edited migration");
    assert!(err.to_string().contains("test_0001_notes"));
}

#[tokio::test]
async fn sqlite_scopes_by_code_and_commits_or_rolls_back() {
    let db = TestDb::sqlite();
    let store = store(&db).await;
    assert_eq!(store.backend(), Backend::Sqlite);
    insert(&store, "tenant-a", "a1").await;
    {
        let tx = store.write("tenant-a").await.expect("tx");
        tx.execute(
            "INSERT INTO notes (tenant_id, body) VALUES ($1, $2)",
            vec!["tenant-a".into(), "lost".into()],
        )
        .await
        .expect("insert");
        // dropped without commit
    }
    let tx = store.read("tenant-a").await.expect("tx");
    let rows = tx
        .query_all(
            "SELECT body FROM notes WHERE tenant_id = $1",
            vec![tx.tenant_id().into()],
        )
        .await
        .expect("select");
    assert_eq!(rows.len(), 1);
}

#[tokio::test]
async fn empty_tenant_is_refused() {
    let db = TestDb::sqlite();
    let store = store(&db).await;
    assert!(store.read("").await.is_err());
}
