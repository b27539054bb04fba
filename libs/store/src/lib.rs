//! Storage for every Anumate service: sea-orm over PostgreSQL (production) and
//! SQLite (embedded `anumate dev`), migrations in code, and tenant-scoped
//! transactions.
//!
//! Every repository reads and writes through a [`TenantTx`]. On PostgreSQL
//! opening one runs `set_config('app.tenant_id', $tenant, true)` and switches to
//! the serving role (`anumate_app` by default) for the transaction. Tenant tables
//! have `ENABLE` + `FORCE ROW LEVEL SECURITY` and a policy on
//! `current_setting('app.tenant_id')`, and the serving role neither owns them nor
//! is a superuser or `BYPASSRLS`: a query that forgets its tenant filter still
//! sees only the current tenant's rows. Migrations run as the connecting (owner)
//! role. SQLite has no RLS; there the repositories' own `tenant_id` filters are
//! the only guard, which is acceptable for a single-user embedded store.
#![forbid(unsafe_code)]

mod migrate;
pub mod paging;
#[cfg(feature = "testing")]
pub mod testing;

use std::time::Duration;

pub use migrate::{APPEND_ONLY_COMMENT, Migration, MigrationReport};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    SqliteTransactionMode, Statement, TransactionOptions, TransactionTrait,
};
pub use sea_orm::{DbErr, QueryResult, Value};
use serde::{Deserialize, Serialize};

/// `[store]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user@host:port/db` or `sqlite://path/to/file.db`. Empty means
    /// the embedded SQLite file under the data directory.
    pub url: String,
    /// PostgreSQL role that serves requests (switched to in every transaction
    /// with `set_config('role', …, true)`). Created by `migrate` if missing. Must
    /// not be a superuser or have BYPASSRLS. Empty: use the connecting role as
    /// is (when you connect as a dedicated non-owner login role).
    pub app_role: String,
    /// Pool size.
    pub max_connections: u32,
    /// Seconds to wait for a connection.
    pub connect_timeout_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: String::new(),
            app_role: "anumate_app".into(),
            max_connections: 10,
            connect_timeout_secs: 10,
        }
    }
}

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL, with row-level security.
    Postgres,
    /// SQLite (embedded).
    Sqlite,
}

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `postgres://` nor `sqlite://`.
    #[error("unsupported database url (want postgres:// or sqlite://): {0}")]
    UnsupportedUrl(String),
    /// A database error.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// A unique constraint was violated.
    #[error("unique constraint violated: {0}")]
    Conflict(String),
    /// A migration applied earlier differs from the one in this binary.
    #[error("migration {0} was applied with different content; refusing to continue")]
    MigrationChanged(String),
    /// The serving role could bypass row-level security.
    #[error(
        "role {0} bypasses row-level security (superuser or BYPASSRLS); refusing to serve with it"
    )]
    UnsafeRole(String),
    /// The tenant id is empty or malformed.
    #[error("invalid tenant id")]
    InvalidTenant,
}

impl StoreError {
    /// Classifies a database error: unique violations become [`StoreError::Conflict`].
    pub fn from_db(err: DbErr) -> Self {
        let text = err.to_string();
        if text.contains("UNIQUE constraint failed")
            || text.contains("duplicate key value violates unique constraint")
        {
            StoreError::Conflict(text)
        } else {
            StoreError::Db(err)
        }
    }

    /// True when this is a unique-constraint conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }
}

impl From<StoreError> for anumate_errors::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidTenant => anumate_errors::Error::new(
                anumate_errors::ErrorCode::Unauthenticated,
                "invalid tenant",
            ),
            StoreError::Db(DbErr::ConnectionAcquire(_)) | StoreError::Db(DbErr::Conn(_)) => {
                tracing::warn!(error = %e, "database unavailable");
                anumate_errors::Error::new(
                    anumate_errors::ErrorCode::Unavailable,
                    "database unavailable",
                )
            }
            other => anumate_errors::Error::internal(other),
        }
    }
}

/// A connection pool plus what it needs to open tenant transactions.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    backend: Backend,
    app_role: Option<String>,
}

impl Store {
    /// Connects (creating the SQLite file if missing).
    pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let backend = if cfg.url.starts_with("postgres://") || cfg.url.starts_with("postgresql://")
        {
            Backend::Postgres
        } else if cfg.url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::UnsupportedUrl(cfg.url.clone()));
        };
        let mut opts = ConnectOptions::new(cfg.url.clone());
        opts.max_connections(cfg.max_connections.max(1))
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .acquire_timeout(Duration::from_secs(cfg.connect_timeout_secs))
            .sqlx_logging(false);
        if backend == Backend::Sqlite {
            opts.map_sqlx_sqlite_opts(|o| {
                o.create_if_missing(true)
                    .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true)
            });
        }
        let db = Database::connect(opts).await?;
        let app_role = match backend {
            Backend::Postgres if !cfg.app_role.is_empty() => Some(cfg.app_role.clone()),
            _ => None,
        };
        Ok(Store {
            db,
            backend,
            app_role,
        })
    }

    /// The database kind.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The owner connection: migrations, administration and tests only. Request
    /// handling must use [`Store::read`] / [`Store::write`].
    pub fn owner_connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Applies `migrations` not yet applied, in order, in one transaction, and
    /// (PostgreSQL) sets up the serving role, grants and row-level security.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<MigrationReport, StoreError> {
        migrate::run(self, migrations).await
    }

    /// Checks that the serving role cannot bypass row-level security.
    pub async fn check_serving_role(&self) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let tx = self.begin(true, "-").await?;
        let row = tx
            .query_one(
                "SELECT current_user::text AS who, r.rolsuper AS sup, r.rolbypassrls AS bypass \
                 FROM pg_roles r WHERE r.rolname = current_user",
                vec![],
            )
            .await?;
        let Some(row) = row else { return Ok(()) };
        let who: String = row.try_get("", "who")?;
        let sup: bool = row.try_get("", "sup")?;
        let bypass: bool = row.try_get("", "bypass")?;
        if sup || bypass {
            return Err(StoreError::UnsafeRole(who));
        }
        Ok(())
    }

    /// Opens a read transaction scoped to `tenant`.
    pub async fn read(&self, tenant: &str) -> Result<TenantTx, StoreError> {
        self.begin(false, tenant).await
    }

    /// Opens a write transaction scoped to `tenant`. On SQLite it takes the write
    /// lock up front (`BEGIN IMMEDIATE`) so concurrent writers queue instead of
    /// failing on lock upgrade.
    pub async fn write(&self, tenant: &str) -> Result<TenantTx, StoreError> {
        self.begin(true, tenant).await
    }

    async fn begin(&self, write: bool, tenant: &str) -> Result<TenantTx, StoreError> {
        if tenant.is_empty() || tenant.len() > 128 {
            return Err(StoreError::InvalidTenant);
        }
        let tx = match self.backend {
            Backend::Sqlite if write => {
                self.db
                    .begin_with_options(TransactionOptions {
                        isolation_level: None,
                        access_mode: None,
                        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                    })
                    .await?
            }
            _ => self.db.begin().await?,
        };
        if self.backend == Backend::Postgres {
            let sql = match &self.app_role {
                Some(_) => {
                    "SELECT set_config('app.tenant_id', $1, true), set_config('role', $2, true)"
                }
                None => "SELECT set_config('app.tenant_id', $1, true)",
            };
            let mut values: Vec<Value> = vec![tenant.into()];
            if let Some(role) = &self.app_role {
                values.push(role.as_str().into());
            }
            tx.query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await?;
        }
        Ok(TenantTx {
            tx,
            tenant: tenant.to_string(),
            backend: self.backend,
        })
    }
}

/// A transaction bound to one tenant. Dropped without [`TenantTx::commit`], it
/// rolls back.
pub struct TenantTx {
    tx: DatabaseTransaction,
    tenant: String,
    backend: Backend,
}

impl TenantTx {
    /// The tenant this transaction is scoped to.
    pub fn tenant_id(&self) -> &str {
        &self.tenant
    }

    /// The database kind.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The underlying sea-orm transaction, for entity queries.
    pub fn conn(&self) -> &DatabaseTransaction {
        &self.tx
    }

    fn stmt(&self, sql: &str, values: Vec<Value>) -> Statement {
        let backend = match self.backend {
            Backend::Postgres => DbBackend::Postgres,
            Backend::Sqlite => DbBackend::Sqlite,
        };
        Statement::from_sql_and_values(backend, sql, values)
    }

    /// Runs a statement (`$1`, `$2`… placeholders on both backends); returns rows affected.
    pub async fn execute(&self, sql: &str, values: Vec<Value>) -> Result<u64, StoreError> {
        let res = self
            .tx
            .execute_raw(self.stmt(sql, values))
            .await
            .map_err(StoreError::from_db)?;
        Ok(res.rows_affected())
    }

    /// Runs a query returning at most one row.
    pub async fn query_one(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Option<QueryResult>, StoreError> {
        self.tx
            .query_one_raw(self.stmt(sql, values))
            .await
            .map_err(StoreError::from_db)
    }

    /// Runs a query returning all rows.
    pub async fn query_all(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Vec<QueryResult>, StoreError> {
        self.tx
            .query_all_raw(self.stmt(sql, values))
            .await
            .map_err(StoreError::from_db)
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(StoreError::from_db)
    }
}

/// Microseconds since the Unix epoch, the timestamp format of every table.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
