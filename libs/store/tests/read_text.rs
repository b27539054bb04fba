#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `Store::read_text`: one-round-trip reads, against real PostgreSQL and
//! SQLite.

use anumate_store::{Backend, Migration, Store, testing::TestDb};

const NOTES: Migration = Migration {
    id: "test_0001_notes",
    postgres: "CREATE TABLE notes (id BIGSERIAL PRIMARY KEY, tenant_id TEXT NOT NULL, body TEXT NOT NULL)",
    sqlite: "CREATE TABLE notes (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id TEXT NOT NULL, body TEXT NOT NULL)",
    tenant_tables: &["notes"],
};

/// Quotes, backslashes, a placeholder look-alike, a comment opener and
/// non-ASCII text: each must arrive as the very value.
const NASTY: &str = "it's a \\'test\\' $1 -- /* ; DROP TABLE notes; \u{e9}\u{1f600}";

async fn store(db: &TestDb) -> Store {
    let store = Store::connect(&db.config).await.expect("connect");
    store.migrate(&[NOTES]).await.expect("migrate");
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

async fn bodies(store: &Store, tenant: &str, sql: &str, args: &[&str]) -> Vec<String> {
    store
        .read_text(tenant, sql, args)
        .await
        .expect("read_text")
        .iter()
        .map(|r| r.try_get::<String>("", "body").expect("body"))
        .collect()
}

async fn reads_values_as_given_and_keeps_serving(db: TestDb) {
    let store = store(&db).await;
    insert(&store, "tenant-a", NASTY).await;
    insert(&store, "tenant-a", "plain").await;
    insert(&store, "tenant-b", NASTY).await;

    // The value arrives intact: it matches the stored row, and only it.
    assert_eq!(
        bodies(
            &store,
            "tenant-a",
            "SELECT body FROM notes WHERE tenant_id = $1 AND body = $2",
            &["tenant-a", NASTY],
        )
        .await,
        vec![NASTY]
    );
    // `$2` before `$1`, and `$10` is not `$1` followed by a 0.
    assert_eq!(
        bodies(
            &store,
            "tenant-a",
            "SELECT body FROM notes WHERE body = $2 AND tenant_id = $1",
            &["tenant-a", "plain"],
        )
        .await,
        vec!["plain"]
    );
    if store.backend() == Backend::Postgres {
        literal_checks(&store).await;
    }

    // A failing statement is an error, and the pool's connections are not
    // left inside its transaction: later reads and writes work.
    for _ in 0..12 {
        assert!(
            store
                .read_text("tenant-a", "SELECT nope FROM notes WHERE body = $1", &["x"])
                .await
                .is_err()
        );
    }
    insert(&store, "tenant-a", "after").await;
    assert_eq!(
        bodies(
            &store,
            "tenant-a",
            "SELECT body FROM notes WHERE tenant_id = $1 ORDER BY id",
            &["tenant-a"],
        )
        .await,
        vec![NASTY, "plain", "after"]
    );

    // A bad tenant is refused as by `read`.
    assert!(store.read_text("", "SELECT 1", &[]).await.is_err());
}

/// PostgreSQL fills values in as literals: a placeholder without a value
/// and a NUL are refused before anything is sent.
async fn literal_checks(store: &Store) {
    let err = store
        .read_text(
            "tenant-a",
            "SELECT body FROM notes WHERE body = $10",
            &["x"],
        )
        .await
        .expect_err("no tenth value");
    assert!(err.to_string().contains("$10 has no value"), "{err}");

    // A NUL is refused before anything is sent.
    let err = store
        .read_text(
            "tenant-a",
            "SELECT body FROM notes WHERE body = $1",
            &["a\0b"],
        )
        .await
        .expect_err("NUL refused");
    assert!(err.to_string().contains("NUL"), "{err}");
}

#[tokio::test]
async fn read_text_postgres() {
    let db = TestDb::postgres().await;
    // Row-level security applies: a query without a tenant filter sees the
    // transaction's tenant's rows only.
    {
        let store = store(&db).await;
        insert(&store, "tenant-x", "x1").await;
        insert(&store, "tenant-y", "y1").await;
        assert_eq!(
            bodies(
                &store,
                "tenant-x",
                "SELECT body FROM notes ORDER BY id",
                &[]
            )
            .await,
            vec!["x1"]
        );
        assert_eq!(
            bodies(
                &store,
                "tenant-y",
                "SELECT body FROM notes ORDER BY id",
                &[]
            )
            .await,
            vec!["y1"]
        );
    }
    reads_values_as_given_and_keeps_serving(TestDb::postgres().await).await;
}

#[tokio::test]
async fn read_text_sqlite() {
    reads_values_as_given_and_keeps_serving(TestDb::sqlite()).await;
}
