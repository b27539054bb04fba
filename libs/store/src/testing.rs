#![allow(clippy::expect_used)] // test-only helpers: a failure to set up is a failed test
//! Throw-away databases for tests: a fresh PostgreSQL database per test (dropped
//! afterwards) or a SQLite file in a temporary directory.
//!
//! PostgreSQL is reached through `ANUMATE_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable`), which must be
//! a role allowed to create databases.

use sea_orm::{ConnectionTrait, Database};

use crate::StoreConfig;

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
        db.close().await.ok();
        let url = replace_db_name(&admin, &name);
        TestDb {
            config: StoreConfig {
                url,
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
