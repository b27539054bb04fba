#![allow(clippy::expect_used)] // test-only helpers: a failure to set up is a failed test
//! Throw-away databases for tests: a fresh PostgreSQL database per test (dropped
//! afterwards) or a SQLite file in a temporary directory.
//!
//! PostgreSQL is reached through `ANUMATE_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable`), which must be
//! a role allowed to create databases and roles. As in production, the store
//! serves as a login that owns nothing ([`SERVING_LOGIN`], without a password:
//! the test server trusts local connections) and migrates as the admin role
//! (`owner_url`).

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};

use crate::StoreConfig;

/// The login test stores serve with: no table, no superuser, no BYPASSRLS; a
/// member of the roles the migrations create (`anumate_app`, `anumate_relay`).
pub const SERVING_LOGIN: &str = "anumate_test_server";

/// Roles the serving login switches to; created here when missing, as the
/// migrations would (cluster-wide, so tolerant of a concurrent creator).
const SERVING_ROLES: &[&str] = &["anumate_app", "anumate_relay"];

/// The admin URL tests create their databases with.
pub fn postgres_admin_url() -> String {
    std::env::var("ANUMATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into())
}

/// A database that exists for the lifetime of this value.
pub struct TestDb {
    /// Configuration pointing at it.
    pub config: StoreConfig,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh, empty PostgreSQL database.
    pub async fn postgres() -> TestDb {
        let admin = postgres_admin_url();
        let name = format!("anumate_test_{}", uuid::Uuid::new_v4().simple());
        let db = Database::connect(admin.as_str())
            .await
            .expect("connect to test postgres");
        db.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        ensure_serving_login(&db).await;
        db.close().await.ok();
        let owner_url = replace_db_name(&admin, &name);
        TestDb {
            config: StoreConfig {
                url: with_user(&owner_url, SERVING_LOGIN),
                owner_url,
                ..StoreConfig::default()
            },
            pg_name: Some(name),
            _dir: None,
        }
    }

    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        TestDb {
            config: StoreConfig {
                url,
                ..StoreConfig::default()
            },
            pg_name: None,
            _dir: Some(dir),
        }
    }
}

/// Creates [`SERVING_LOGIN`] and its roles if missing.
async fn ensure_serving_login(db: &DatabaseConnection) {
    let create = |name: &str, login: &str| {
        format!(
            "DO $$ BEGIN \
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN \
                 CREATE ROLE {name} {login} NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE; \
               END IF; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; \
             END $$;"
        )
    };
    db.execute_unprepared(&create(SERVING_LOGIN, "LOGIN"))
        .await
        .expect("create the serving login");
    for role in SERVING_ROLES {
        db.execute_unprepared(&create(role, "NOLOGIN"))
            .await
            .expect("create a serving role");
        // Concurrent grants of the same membership may collide; one wins.
        let grant = format!(
            "DO $$ BEGIN \
               IF NOT pg_has_role('{SERVING_LOGIN}', '{role}', 'MEMBER') THEN \
                 GRANT {role} TO {SERVING_LOGIN}; \
               END IF; \
             EXCEPTION WHEN unique_violation OR duplicate_object THEN NULL; \
             END $$;"
        );
        db.execute_unprepared(&grant)
            .await
            .expect("grant a serving role");
    }
}

/// `url` with `user` as its user (and no password).
fn with_user(url: &str, user: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let host_start = rest
        .find('@')
        .filter(|at| rest.find('/').is_none_or(|slash| *at < slash))
        .map_or(0, |at| at + 1);
    format!("{}{user}@{}", &url[..scheme_end + 3], &rest[host_start..])
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{name}?{q}"),
        None => format!("{prefix}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        let admin = postgres_admin_url();
        // Drop runs outside any runtime guarantee: use a private one on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let db = Database::connect(admin.as_str()).await.ok()?;
                db.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()?;
                db.close().await.ok()
            })
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_is_replaced() {
        assert_eq!(
            super::with_user("postgres://u:pw@h:5432/db?sslmode=disable", "x"),
            "postgres://x@h:5432/db?sslmode=disable"
        );
        assert_eq!(
            super::with_user("postgres://h/db", "x"),
            "postgres://x@h/db"
        );
    }

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            super::replace_db_name("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(
            super::replace_db_name("postgres://u@h/db", "x"),
            "postgres://u@h/x"
        );
    }
}
