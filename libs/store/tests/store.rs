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

/// Serving as the tables' owner is refused at start-up, naming the role; the
/// serving login the store uses otherwise can neither alter nor drop a table,
/// even after leaving the per-transaction role (`RESET ROLE`).
#[tokio::test]
async fn postgres_serving_login_is_not_the_owner() {
    use sea_orm::ConnectionTrait as _;
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    store
        .check_serving_role()
        .await
        .expect("the serving login owns nothing");

    // The owner's login (the URL migrations use) is refused.
    let owner = Store::connect(&anumate_store::StoreConfig {
        url: db.config.owner_url.clone(),
        owner_url: String::new(),
        ..db.config.clone()
    })
    .await
    .expect("connect as the owner");
    let err = owner
        .check_serving_role()
        .await
        .expect_err("the owner must not serve");
    let text = err.to_string();
    assert!(text.contains("postgres"), "{text}");

    // A non-superuser owner is refused for owning a table, by name.
    let admin = store.connect_owner().await.expect("owner connection");
    admin
        .execute_unprepared(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anumate_test_owner') \
             THEN CREATE ROLE anumate_test_owner LOGIN NOSUPERUSER NOBYPASSRLS; END IF; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
             CREATE TABLE owned_elsewhere (x INT); \
             ALTER TABLE owned_elsewhere OWNER TO anumate_test_owner",
        )
        .await
        .expect("a table owned by a plain role");
    let as_owner = Store::connect(&anumate_store::StoreConfig {
        url: db
            .config
            .url
            .replace(anumate_store::testing::SERVING_LOGIN, "anumate_test_owner"),
        owner_url: String::new(),
        ..db.config.clone()
    })
    .await
    .expect("connect as the plain owner");
    let text = as_owner
        .check_serving_role()
        .await
        .expect_err("a table owner must not serve")
        .to_string();
    assert!(
        text.contains("anumate_test_owner") && text.contains("owned_elsewhere"),
        "{text}"
    );
    admin
        .execute_unprepared("DROP TABLE owned_elsewhere")
        .await
        .expect("drop");

    // The serving login: no DDL on the tables, inside or outside the role switch.
    for sql in [
        "ALTER TABLE notes DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE notes NO FORCE ROW LEVEL SECURITY",
        "DROP TABLE notes",
        "TRUNCATE notes",
    ] {
        let tx = store.write("tenant-a").await.expect("tx");
        let err = tx.execute(sql, vec![]).await.expect_err(sql);
        assert!(
            err.to_string().contains("must be owner")
                || err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
        drop(tx);
        let err = store
            .owner_connection()
            .execute_unprepared(&format!("RESET ROLE; {sql}"))
            .await
            .expect_err(sql);
        assert!(
            err.to_string().contains("must be owner")
                || err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
    }
    insert(&store, "tenant-a", "still here").await;
    assert_eq!(
        bodies_without_filter(&store, "tenant-a").await,
        vec!["still here"]
    );
}

/// A table of cross-tenant work, without row-level security.
const JOBS: Migration = Migration {
    id: "test_0002_jobs",
    postgres: "CREATE TABLE jobs (name TEXT PRIMARY KEY)",
    sqlite: "CREATE TABLE jobs (name TEXT PRIMARY KEY)",
    tenant_tables: &[],
};

async fn job_names(store: &Store) -> Vec<String> {
    let tx = store.system_read().await.expect("system tx");
    let rows = tx
        .query_all("SELECT name FROM jobs ORDER BY name", vec![])
        .await
        .expect("select");
    rows.iter()
        .map(|r| r.try_get::<String>("", "name").expect("name"))
        .collect()
}

/// System transactions act for no tenant: on PostgreSQL they see no tenant's
/// rows and cannot write one, but read and write tables without RLS; they
/// commit or roll back like any other; no tenant id reaches that scope.
async fn system_transactions(db: &TestDb) {
    let store = store(db).await;
    store.migrate(&[NOTES, JOBS]).await.expect("migrate jobs");
    insert(&store, "tenant-a", "a1").await;

    let tx = store.system_write().await.expect("system tx");
    tx.execute("INSERT INTO jobs (name) VALUES ('kept')", vec![])
        .await
        .expect("insert job");
    tx.commit().await.expect("commit");
    {
        let tx = store.system_write().await.expect("system tx");
        tx.execute("INSERT INTO jobs (name) VALUES ('lost')", vec![])
            .await
            .expect("insert job");
        // dropped without commit
    }
    assert_eq!(job_names(&store).await, vec!["kept"]);

    // The pseudo-tenant of system work is not a tenant a caller can name.
    assert!(matches!(
        store.read("-").await,
        Err(anumate_store::StoreError::InvalidTenant)
    ));

    if store.backend() == Backend::Postgres {
        let tx = store.system_read().await.expect("system tx");
        let rows = tx
            .query_all("SELECT body FROM notes", vec![])
            .await
            .expect("select");
        assert!(rows.is_empty(), "a system tx saw tenant rows");
        drop(tx);
        let tx = store.system_write().await.expect("system tx");
        let err = tx
            .execute(
                "INSERT INTO notes (tenant_id, body) VALUES ('tenant-a', 'sneaky')",
                vec![],
            )
            .await
            .expect_err("a system tx must not write tenant rows");
        assert!(err.to_string().contains("row-level security"), "{err}");
    }
    assert_eq!(bodies_without_filter(&store, "tenant-a").await, vec!["a1"]);
}

#[tokio::test]
async fn system_transactions_postgres() {
    system_transactions(&TestDb::postgres().await).await;
}

#[tokio::test]
async fn system_transactions_sqlite() {
    system_transactions(&TestDb::sqlite()).await;
}

/// BEGIN and the tenant go to PostgreSQL as one simple query with the tenant
/// as a literal: quotes and backslashes must reach `app.tenant_id` as they
/// are (and row-level security must see exactly that tenant), a NUL is refused.
#[tokio::test]
async fn postgres_tenant_literal_is_escaped() {
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    let odd = r"t'; SET ROLE postgres; --\'";
    insert(&store, odd, "odd").await;
    insert(&store, "t", "plain").await;
    assert_eq!(bodies_without_filter(&store, odd).await, vec!["odd"]);
    assert_eq!(bodies_without_filter(&store, "t").await, vec!["plain"]);
    let tx = store.read(odd).await.expect("tx");
    let row = tx
        .query_one(
            "SELECT current_setting('app.tenant_id') AS t, current_user::text AS u",
            vec![],
        )
        .await
        .expect("select")
        .expect("row");
    assert_eq!(row.try_get::<String>("", "t").expect("t"), odd);
    assert_eq!(row.try_get::<String>("", "u").expect("u"), "anumate_app");
    drop(tx);
    assert!(matches!(
        store.read("a\0b").await,
        Err(anumate_store::StoreError::InvalidTenant)
    ));
}

/// A transaction dropped without commit is rolled back (queued, flushed when
/// the connection goes back to the pool), and the connection serves the next
/// transaction with the next tenant.
#[tokio::test]
async fn postgres_dropped_transaction_rolls_back_and_the_connection_is_reused() {
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    for i in 0..20 {
        let tx = store.write("tenant-a").await.expect("tx");
        tx.execute(
            "INSERT INTO notes (tenant_id, body) VALUES ($1, $2)",
            vec!["tenant-a".into(), format!("dropped {i}").into()],
        )
        .await
        .expect("insert");
        drop(tx);
        assert!(bodies_without_filter(&store, "tenant-a").await.is_empty());
        assert!(bodies_without_filter(&store, "tenant-b").await.is_empty());
    }
    insert(&store, "tenant-b", "kept").await;
    assert_eq!(
        bodies_without_filter(&store, "tenant-b").await,
        vec!["kept"]
    );
    assert!(bodies_without_filter(&store, "tenant-a").await.is_empty());
}

/// A relaxed write transaction commits without waiting for its WAL flush
/// (`synchronous_commit = off` for it alone, set with its `BEGIN`), keeps its
/// tenant, and leaves the connection's next transaction durable again.
#[tokio::test]
async fn postgres_relaxed_write_is_relaxed_for_itself_only() {
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    let setting = |tx: anumate_store::TenantTx| async move {
        let row = tx
            .query_one(
                "SELECT current_setting('synchronous_commit') AS s, \
                 current_setting('app.tenant_id') AS t",
                vec![],
            )
            .await
            .expect("select")
            .expect("row");
        let s: String = row.try_get("", "s").expect("s");
        let t: String = row.try_get("", "t").expect("t");
        tx.commit().await.expect("commit");
        (s, t)
    };
    for _ in 0..5 {
        let relaxed = store.write_relaxed("tenant-a").await.expect("tx");
        relaxed
            .execute(
                "INSERT INTO notes (tenant_id, body) VALUES ($1, $2)",
                vec!["tenant-a".into(), "relaxed".into()],
            )
            .await
            .expect("insert");
        assert_eq!(
            setting(relaxed).await,
            ("off".to_owned(), "tenant-a".to_owned())
        );
        let durable = store.write("tenant-b").await.expect("tx");
        assert_eq!(
            setting(durable).await,
            ("on".to_owned(), "tenant-b".to_owned())
        );
    }
    assert_eq!(bodies_without_filter(&store, "tenant-a").await.len(), 5);
    assert!(bodies_without_filter(&store, "tenant-b").await.is_empty());
}

/// `write_text`: one statement in its own transaction (one round trip on
/// PostgreSQL), rows back, a failing statement writes nothing and the store
/// keeps serving; relaxed or not, what it wrote is there.
async fn write_text_writes_one_statement(store: &Store) {
    for relaxed in [false, true] {
        let rows = store
            .write_text(
                "tenant-a",
                "INSERT INTO notes (tenant_id, body) VALUES ($1, $2) RETURNING body",
                &["tenant-a", "it's \\ odd"],
                relaxed,
            )
            .await
            .expect("write_text");
        assert_eq!(rows.len(), 1);
        let body: String = rows[0].try_get("", "body").expect("body");
        assert_eq!(body, "it's \\ odd");
    }
    // NOT NULL violated: nothing written, the next call works.
    let failed = store
        .write_text(
            "tenant-a",
            "INSERT INTO notes (tenant_id, body) VALUES ($1, NULLIF($2, ''))",
            &["tenant-a", ""],
            true,
        )
        .await;
    assert!(failed.is_err());
    assert_eq!(bodies_without_filter(store, "tenant-a").await.len(), 2);
}

#[tokio::test]
async fn write_text_postgres() {
    let db = TestDb::postgres().await;
    write_text_writes_one_statement(&store(&db).await).await;
}

#[tokio::test]
async fn write_text_sqlite() {
    let db = TestDb::sqlite();
    write_text_writes_one_statement(&store(&db).await).await;
}

/// One round of concurrent `write_text` calls on PostgreSQL: `good` writes
/// per tenant of `tenants` (half relaxed) and `bad` ones (NOT NULL
/// violated) started together. Returns (writes, distinct transactions of
/// the good writes).
async fn concurrent_writes(
    store: &Store,
    round: usize,
    tenants: &[&str],
    good: usize,
    bad: usize,
) -> (usize, usize) {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(tenants.len() * (good + bad)));
    let mut tasks = Vec::new();
    for tenant in tenants {
        for i in 0..good + bad {
            let (store, barrier, tenant) = (store.clone(), barrier.clone(), tenant.to_string());
            tasks.push(tokio::spawn(async move {
                let body = if i < good {
                    format!("{tenant} {round}-{i} it's")
                } else {
                    String::new()
                };
                barrier.wait().await;
                let rows = store
                    .write_text(
                        &tenant,
                        "INSERT INTO notes (tenant_id, body) VALUES ($1, NULLIF($2, '')) \
                         RETURNING body, CAST(txid_current() AS TEXT) AS tx, \
                           (SELECT CAST(count(*) AS TEXT) FROM notes WHERE tenant_id <> $1) AS others",
                        &[&tenant, &body],
                        i % 2 == 0,
                    )
                    .await;
                (i < good, body, rows)
            }));
        }
    }
    let mut txs = std::collections::HashSet::new();
    let mut writes = 0;
    for task in tasks {
        let (ok, body, rows) = task.await.expect("task");
        if !ok {
            // Its own error, whatever group it was in.
            let err = rows.expect_err("a NULL body is refused");
            assert!(err.to_string().contains("null value"), "{err}");
            continue;
        }
        let rows = rows.expect("a good write commits whatever group it was in");
        assert_eq!(rows.len(), 1, "{body}: its own row, and only it");
        let got: String = rows[0].try_get("", "body").expect("body");
        assert_eq!(got, body);
        let others: String = rows[0].try_get("", "others").expect("others");
        assert_eq!(others, "0", "{body}: another tenant's rows were visible");
        txs.insert(rows[0].try_get::<String>("", "tx").expect("tx"));
        writes += 1;
    }
    (writes, txs.len())
}

/// Group commit: concurrent `write_text` calls of several tenants share
/// transactions (fails without it: one transaction per call), yet each
/// write runs as its own tenant (row-level security shows it no other
/// tenant's rows, and its insert passes the tenant check), gets its own
/// rows or its own error (a refused write in a group does not take the
/// others down), and a caller that goes away cancels no one else's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_write_text_groups_concurrent_writes() {
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    let tenants = ["tenant-a", "tenant-b", "tenant-c"];
    let mut grouped = false;
    for round in 0..10 {
        let (writes, txs) = concurrent_writes(&store, round, &tenants, 14, 0).await;
        assert_eq!(writes, 42);
        grouped |= txs < writes;
        if grouped && round >= 2 {
            break;
        }
    }
    assert!(grouped, "42 simultaneous writes never shared a transaction");
    // Refused writes among them: each its own error, the others commit.
    let (writes, _) = concurrent_writes(&store, 10, &tenants, 12, 2).await;
    assert_eq!(writes, 36);
    // Callers that go away: the others' writes still commit, and the store
    // keeps serving.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .write_text(
                    "tenant-a",
                    "INSERT INTO notes (tenant_id, body) VALUES ($1, $2) RETURNING body",
                    &["tenant-a", &format!("kept-{i}")],
                    false,
                )
                .await
        }));
    }
    for task in tasks.iter().step_by(3) {
        task.abort();
    }
    let mut kept = 0;
    for task in tasks {
        if let Ok(rows) = task.await {
            rows.expect("a write whose caller stayed commits");
            kept += 1;
        }
    }
    assert!(kept >= 13, "{kept}");
    let bodies = bodies_without_filter(&store, "tenant-a").await;
    assert!(
        bodies
            .iter()
            .all(|b| b.starts_with("tenant-a") || b.starts_with("kept-"))
    );
    assert!(bodies.iter().filter(|b| b.starts_with("kept-")).count() >= kept);
    for tenant in tenants {
        let rows = bodies_without_filter(&store, tenant).await;
        assert!(rows.iter().filter(|b| b.starts_with(tenant)).count() >= 42);
        assert!(
            !rows.iter().any(|b| b.is_empty()),
            "a refused write left a row"
        );
    }
}

/// `write_deferred`: the statements go with the commit (one round trip on
/// PostgreSQL), their values as literals (text with quotes and backslashes,
/// bytes, numbers, NULL); dropped uncommitted, nothing is written; a failing
/// statement fails the commit and nothing of the batch stays, and the store
/// keeps serving.
async fn write_deferred_commits_all_or_nothing(store: &Store) {
    let hex = match store.backend() {
        anumate_store::Backend::Postgres => "encode($2, 'hex')",
        anumate_store::Backend::Sqlite => "lower(hex($2))",
    };
    let tx = store.write_deferred("tenant-a").await.expect("tx");
    tx.execute(
        "INSERT INTO notes (tenant_id, body) VALUES ($1, $2)",
        vec!["tenant-a".into(), "it's \\ odd $1".into()],
    )
    .await
    .expect("first");
    tx.execute(
        &format!(
            "INSERT INTO notes (tenant_id, body) VALUES ($1, {hex} || '/' || CAST($3 AS TEXT) \
             || '/' || COALESCE($4, 'null') || '/' || CAST($5 AS TEXT))"
        ),
        vec![
            "tenant-a".into(),
            vec![0u8, 0xff, b'\''].into(),
            (-42i64).into(),
            anumate_store::Value::String(None),
            7i32.into(),
        ],
    )
    .await
    .expect("second");
    tx.commit().await.expect("commit");
    assert_eq!(
        bodies_without_filter(store, "tenant-a").await,
        ["it's \\ odd $1", "00ff27/-42/null/7"]
    );

    let dropped = store.write_deferred("tenant-a").await.expect("tx");
    dropped
        .execute(
            "INSERT INTO notes (tenant_id, body) VALUES ($1, $2)",
            vec!["tenant-a".into(), "dropped".into()],
        )
        .await
        .expect("queued");
    drop(dropped);

    // NOT NULL violated by the second statement (seen at the commit on
    // PostgreSQL, at once on SQLite): the first is not written.
    let failing = store.write_deferred("tenant-a").await.expect("tx");
    let mut queued = Ok(0);
    for body in [Some("kept?"), None] {
        queued = failing
            .execute(
                "INSERT INTO notes (tenant_id, body) VALUES ($1, $2)",
                vec!["tenant-a".into(), body.map(str::to_owned).into()],
            )
            .await;
        if queued.is_err() {
            break;
        }
    }
    match queued {
        Ok(_) => assert!(failing.commit().await.is_err()),
        Err(_) => drop(failing),
    }
    assert_eq!(bodies_without_filter(store, "tenant-a").await.len(), 2);
}

#[tokio::test]
async fn write_deferred_postgres() {
    let db = TestDb::postgres().await;
    write_deferred_commits_all_or_nothing(&store(&db).await).await;
}

#[tokio::test]
async fn write_deferred_sqlite() {
    let db = TestDb::sqlite();
    write_deferred_commits_all_or_nothing(&store(&db).await).await;
}
