//! Storage for every Anumate service: sea-orm over PostgreSQL (production) and
//! SQLite (embedded `anumate dev`), migrations in code, and tenant-scoped
//! transactions.
//!
//! Every repository reads and writes through a [`TenantTx`]. On PostgreSQL
//! opening one runs `set_config('app.tenant_id', $tenant, true)` and switches to
//! the serving role (`anumate_app` by default) for the transaction, in the same
//! round trip as its `BEGIN`; a transaction dropped without commit rolls back
//! with the pool's release ping, so a read costs its queries plus two round
//! trips. Tenant tables
//! have `ENABLE` + `FORCE ROW LEVEL SECURITY` and a policy on
//! `current_setting('app.tenant_id')`, and the serving role neither owns them nor
//! is a superuser or `BYPASSRLS`: a query that forgets its tenant filter still
//! sees only the current tenant's rows.
//!
//! Two logins: the pool connects with `[store] url`, a login that owns no table
//! (a member of the serving role); migrations connect separately with
//! `[store] owner_url`, the tables' owner, and grant the serving role to the
//! serving login. [`Store::check_serving_role`] refuses to serve with a login
//! (or role) that is a superuser, has `BYPASSRLS` or owns a table, so a
//! statement that escapes the role switch (`RESET ROLE`) still cannot alter,
//! drop or bypass anything. SQLite has no RLS; there the repositories' own
//! `tenant_id` filters are the only guard, which is acceptable for a
//! single-user embedded store.
#![forbid(unsafe_code)]

mod group;
mod migrate;
pub mod notify;
pub mod paging;
#[cfg(feature = "testing")]
pub mod testing;
pub mod versioned;

use std::time::Duration;

pub use migrate::{APPEND_ONLY_COMMENT, Migration, MigrationReport};
use sea_orm::sqlx::{self, Postgres, SqlSafeStr as _, Sqlite, pool::PoolConnection};
use sea_orm::{
    ConnAcquireErr, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend,
    RuntimeErr, Statement,
};
pub use sea_orm::{DbErr, QueryResult, Value};
use sea_query_sqlx::SqlxValues;
use serde::{Deserialize, Serialize};
use sqlx_core::transaction::TransactionManager as _;

/// `[store]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user@host:port/db` or `sqlite://path/to/file.db`. Empty means
    /// the embedded SQLite file under the data directory. On PostgreSQL this is
    /// the serving login: it must not own any table (nor be a superuser or
    /// `BYPASSRLS`), or serving refuses to start.
    pub url: String,
    /// PostgreSQL URL of the tables' owner, used only to migrate (`anumate
    /// migrate`, `serve --migrate`); migrating grants `app_role` to the login
    /// of `url`. Empty: migrations connect with `url` (which then owns the
    /// tables and cannot serve).
    pub owner_url: String,
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
            owner_url: String::new(),
            app_role: "anumate_app".into(),
            max_connections: 10,
            connect_timeout_secs: 10,
        }
    }
}

/// How long a pooled connection may sit idle before it is pinged on checkout.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(10);

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
    /// The serving login (or role) owns a table, so it could alter, drop or
    /// disable row-level security on it.
    #[error(
        "role {role} owns table {table} (or may act as its owner); refusing to serve with it: \
         set [store] url to a login that owns no table and [store] owner_url to the owner, for migrations"
    )]
    OwnerRole {
        /// The login or role.
        role: String,
        /// One table it owns.
        table: String,
    },
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
    /// `[store] owner_url`, when it differs from `url`.
    owner_url: Option<String>,
    connect_timeout: Duration,
    /// Group commit of [`Store::write_text`] and [`Store::write_deferred`]
    /// (PostgreSQL only).
    groups: Option<Groups>,
}

/// The queues of the group commit: durable and relaxed writes commit in
/// separate groups.
#[derive(Clone)]
struct Groups {
    durable: std::sync::Arc<group::Group>,
    relaxed: std::sync::Arc<group::Group>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Groups")
    }
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
        let connect_timeout = Duration::from_secs(cfg.connect_timeout_secs);
        let db = Self::pool(&cfg.url, backend, cfg.max_connections, connect_timeout).await?;
        let app_role = match backend {
            Backend::Postgres if !cfg.app_role.is_empty() => Some(cfg.app_role.clone()),
            _ => None,
        };
        let owner_url = match backend {
            Backend::Postgres if !cfg.owner_url.is_empty() && cfg.owner_url != cfg.url => {
                Some(cfg.owner_url.clone())
            }
            _ => None,
        };
        let groups = (backend == Backend::Postgres).then(|| {
            let group = |relaxed| {
                std::sync::Arc::new(group::Group::new(group::Ctx {
                    pool: db.get_postgres_connection_pool().clone(),
                    role: app_role.clone(),
                    relaxed,
                }))
            };
            Groups {
                durable: group(false),
                relaxed: group(true),
            }
        });
        Ok(Store {
            db,
            backend,
            app_role,
            owner_url,
            connect_timeout,
            groups,
        })
    }

    /// The group commit's queues (PostgreSQL only).
    fn groups(&self) -> Result<&Groups, StoreError> {
        self.groups.as_ref().ok_or_else(|| {
            StoreError::Db(DbErr::Custom(
                "group commit is for PostgreSQL stores only".into(),
            ))
        })
    }

    async fn pool(
        url: &str,
        backend: Backend,
        max_connections: u32,
        timeout: Duration,
    ) -> Result<DatabaseConnection, StoreError> {
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.max_connections(max_connections.max(1))
            .connect_timeout(timeout)
            .acquire_timeout(timeout)
            // A ping on every checkout is one more round trip per request;
            // sqlx pings each connection as it is released anyway, so only
            // one idle long enough to have been dropped by a proxy or a
            // restart is checked before use.
            .test_before_acquire_if_idle_for(PING_IF_IDLE_FOR)
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
        Ok(Database::connect(opts).await?)
    }

    /// The database kind.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool's connection as the login of `[store] url`, with no tenant and
    /// no role switch (the name is historical: it is the owner only when `url`
    /// is the owner's, as in `anumate migrate` without `owner_url`). For
    /// cross-tenant work under a dedicated role (the outbox relay) and pings;
    /// request handling must use [`Store::read`] / [`Store::write`].
    pub fn owner_connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// A fresh connection as the tables' owner (`[store] owner_url`, else
    /// `url`): migrations and administration only. Close it when done.
    pub async fn connect_owner(&self) -> Result<DatabaseConnection, StoreError> {
        match &self.owner_url {
            Some(url) => Self::pool(url, self.backend, 1, self.connect_timeout).await,
            None => Ok(self.db.clone()),
        }
    }

    /// Applies `migrations` not yet applied, in order, in one transaction as the
    /// owner, and (PostgreSQL) sets up the serving role, grants and row-level
    /// security, granting the serving role to the serving login when that is
    /// another login than the owner's.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<MigrationReport, StoreError> {
        let Some(_) = &self.owner_url else {
            return migrate::run(self, &self.db, None, migrations).await;
        };
        let owner = self.connect_owner().await?;
        let login = self.login().await?;
        let report = migrate::run(self, &owner, Some(&login), migrations).await;
        owner.close().await.ok();
        report
    }

    /// Grants `role` (a NOLOGIN role a migration created, such as the outbox
    /// relay's) to the serving login, as the owner. Nothing to do when the
    /// serving login is the owner's, or on SQLite.
    pub async fn grant_to_serving_login(&self, role: &str) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres || self.owner_url.is_none() {
            return Ok(());
        }
        let login = self.login().await?;
        let owner = self.connect_owner().await?;
        let res = migrate::grant_membership(&owner, role, &login).await;
        owner.close().await.ok();
        res
    }

    /// The login role of the pool (`session_user`).
    async fn login(&self) -> Result<String, StoreError> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT session_user::text AS who",
            ))
            .await?
            .ok_or_else(|| StoreError::Db(DbErr::RecordNotFound("session_user".into())))?;
        Ok(row.try_get("", "who")?)
    }

    /// Checks that neither the serving login nor the role it switches to can
    /// bypass row-level security (superuser, `BYPASSRLS`) or own a table of
    /// this database (an owner may alter or drop it, or disable its policies).
    pub async fn check_serving_role(&self) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        // The login first (outside a transaction: a login that cannot even
        // switch to the serving role is still refused for what it is), then
        // the role each transaction switches to.
        let login = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                role_check_sql("session_user"),
            ))
            .await?;
        check_role_row(login)?;
        let tx = self.begin(true, Scope::System).await?;
        check_role_row(
            tx.query_one(&role_check_sql("current_user"), vec![])
                .await?,
        )
    }

    /// Opens a read transaction scoped to `tenant`.
    pub async fn read(&self, tenant: &str) -> Result<TenantTx, StoreError> {
        let tx = self.begin(false, Scope::Tenant(tenant)).await?;
        Ok(TenantTx {
            tx,
            tenant: tenant.to_string(),
        })
    }

    /// Opens a write transaction scoped to `tenant`. On SQLite it takes the write
    /// lock up front (`BEGIN IMMEDIATE`) so concurrent writers queue instead of
    /// failing on lock upgrade.
    pub async fn write(&self, tenant: &str) -> Result<TenantTx, StoreError> {
        let tx = self.begin_with(true, Scope::Tenant(tenant), false).await?;
        Ok(TenantTx {
            tx,
            tenant: tenant.to_string(),
        })
    }

    /// Opens a write transaction as [`Store::write`] whose commit does not
    /// wait for its WAL flush on PostgreSQL (`synchronous_commit = off` for
    /// this transaction, set in the same round trip as its `BEGIN`). A
    /// database crash may lose it within `wal_writer_delay` — but never
    /// after any later durable commit, since the WAL is flushed in order: use
    /// it for writes whose loss a crash of the database could cause anyway,
    /// or that a later durable commit of the same flow makes durable. On
    /// SQLite it is [`Store::write`].
    pub async fn write_relaxed(&self, tenant: &str) -> Result<TenantTx, StoreError> {
        let tx = self.begin_with(true, Scope::Tenant(tenant), true).await?;
        Ok(TenantTx {
            tx,
            tenant: tenant.to_string(),
        })
    }

    /// Opens a write transaction as [`Store::write`] whose statements go to
    /// PostgreSQL with its commit: [`TenantTx::execute`] renders each with
    /// its values as literals and queues it (returning 0: nothing is known
    /// before the commit), and [`TenantTx::commit`] sends `BEGIN`, the
    /// tenant, the statements and `COMMIT` as one simple-query batch — one
    /// round trip, as durable as [`Store::write`], in a group commit with
    /// other durable writes of the moment as [`Store::write_text`]'s (each
    /// transaction's statements still all or nothing); an error in any statement
    /// (a unique violation, say) fails the commit and nothing is written.
    /// For a write whose statements need no answer before the next (a row
    /// and its outbox event). Queries are refused, and values must be
    /// numbers, booleans, text or bytes (or NULL). No connection is held
    /// until the commit. On SQLite it is [`Store::write`].
    pub async fn write_deferred(&self, tenant: &str) -> Result<TenantTx, StoreError> {
        if self.backend == Backend::Sqlite {
            return self.write(tenant).await;
        }
        if !valid_tenant(tenant) {
            return Err(StoreError::InvalidTenant);
        }
        Ok(TenantTx {
            tx: Tx {
                conn: tokio::sync::Mutex::new(Conn::Deferred(Deferred {
                    group: self.groups()?.durable.clone(),
                    tenant: tenant.to_owned(),
                    statements: String::new(),
                })),
                backend: self.backend,
                open: true,
            },
            tenant: tenant.to_string(),
        })
    }

    /// Opens a read transaction for cross-tenant system work (which tenants
    /// have work to do, the consumers' dedupe tables). It acts for no tenant:
    /// on PostgreSQL it runs as the serving role with no tenant's rows visible
    /// in tables under row-level security; only tables without it show rows.
    pub async fn system_read(&self) -> Result<SystemTx, StoreError> {
        Ok(SystemTx {
            tx: self.begin(false, Scope::System).await?,
        })
    }

    /// Opens a write transaction for cross-tenant system work, as
    /// [`Store::system_read`] (on SQLite with the write lock taken up front).
    pub async fn system_write(&self) -> Result<SystemTx, StoreError> {
        Ok(SystemTx {
            tx: self.begin(true, Scope::System).await?,
        })
    }

    /// Runs one read query for `tenant` in a single round trip and returns
    /// its rows. On PostgreSQL the transaction's `BEGIN`, tenant (and role),
    /// the query and `COMMIT` go to the server as one simple-query batch (a
    /// [`Store::read`] and a query cost two round trips, and its release
    /// ping a third), so `sql` takes text values only: each `$n` is replaced
    /// by `args[n - 1]` as an escaped string literal (a NUL is refused), and
    /// rows come back in text format (read text columns). `sql` must be one
    /// statement and must not quote a `$`. On SQLite it is [`Store::read`]
    /// and the query with `args` bound.
    pub async fn read_text(
        &self,
        tenant: &str,
        sql: &str,
        args: &[&str],
    ) -> Result<Vec<QueryResult>, StoreError> {
        if self.backend == Backend::Sqlite {
            let tx = self.read(tenant).await?;
            let values = args.iter().map(|a| Value::from(*a)).collect();
            return tx.query_all(sql, values).await;
        }
        self.text_batch(tenant, sql, args).await
    }

    /// Runs one write statement for `tenant` in its own transaction, in a
    /// single round trip on PostgreSQL, as [`Store::read_text`] runs a read
    /// (text values only, rows in text format), and returns the rows it
    /// returns (`RETURNING`). `relaxed`: its commit does not wait for the WAL
    /// flush, as [`Store::write_relaxed`]. On PostgreSQL `sql` may also be
    /// several statements separated by `;`, run in order in the one
    /// transaction (the rows are theirs in order; any error rolls back all).
    /// On PostgreSQL, writes sent at the same moment (by concurrent requests)
    /// commit together in one transaction, one round trip and one WAL flush
    /// (group commit, see the `group` module); each still returns only once
    /// committed, with its own rows or its own error. The column alias
    /// `anumate_group_item` is reserved. On SQLite it is [`Store::write`],
    /// the statement with `args` bound, and a commit (one statement only).
    pub async fn write_text(
        &self,
        tenant: &str,
        sql: &str,
        args: &[&str],
        relaxed: bool,
    ) -> Result<Vec<QueryResult>, StoreError> {
        if self.backend == Backend::Sqlite {
            let tx = self.write(tenant).await?;
            let values = args.iter().map(|a| Value::from(*a)).collect();
            let rows = tx.query_all(sql, values).await?;
            tx.commit().await?;
            return Ok(rows);
        }
        if !valid_tenant(tenant) {
            return Err(StoreError::InvalidTenant);
        }
        let mut literal =
            String::with_capacity(sql.len() + args.iter().map(|a| a.len() + 4).sum::<usize>());
        push_with_literals(&mut literal, sql, args)?;
        let groups = self.groups()?;
        let queue = if relaxed {
            &groups.relaxed
        } else {
            &groups.durable
        };
        queue.write(tenant, literal).await
    }

    /// `BEGIN`, the tenant, `sql` (a read) with `args` as literals and
    /// `COMMIT` as one PostgreSQL simple-query batch; the statement's rows.
    async fn text_batch(
        &self,
        tenant: &str,
        sql: &str,
        args: &[&str],
    ) -> Result<Vec<QueryResult>, StoreError> {
        if !valid_tenant(tenant) {
            return Err(StoreError::InvalidTenant);
        }
        let mut batch = self.begin_sql(tenant, false);
        batch.push_str("; ");
        push_with_literals(&mut batch, sql, args)?;
        batch.push_str("; COMMIT");
        let pool = self.db.get_postgres_connection_pool();
        let mut conn = pool.acquire().await.map_err(acquire_err)?;
        match sqlx::raw_sql(sqlx::AssertSqlSafe(batch))
            .fetch_all(&mut *conn)
            .await
        {
            // The first row is the `set_config` of the tenant.
            Ok(rows) => Ok(rows.into_iter().skip(1).map(QueryResult::from).collect()),
            Err(e) => {
                // The batch stopped inside its transaction: never hand the
                // connection back in it.
                conn.close_on_drop();
                Err(query_err(e))
            }
        }
    }

    async fn begin(&self, write: bool, scope: Scope<'_>) -> Result<Tx, StoreError> {
        self.begin_with(write, scope, false).await
    }

    async fn begin_with(
        &self,
        write: bool,
        scope: Scope<'_>,
        relaxed: bool,
    ) -> Result<Tx, StoreError> {
        let tenant = match scope {
            Scope::Tenant(t)
                if t.is_empty() || t.len() > 128 || t == NO_TENANT || t.contains('\0') =>
            {
                return Err(StoreError::InvalidTenant);
            }
            Scope::Tenant(t) => t,
            Scope::System => NO_TENANT,
        };
        let conn = match self.backend {
            Backend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                let mut conn = pool.acquire().await.map_err(acquire_err)?;
                // One round trip: BEGIN and the transaction's tenant (and
                // role) as one simple-query batch, so the tenant is bound
                // before the transaction's first statement.
                let sql = self.begin_sql(tenant, relaxed);
                if let Err(e) = <Postgres as sqlx::Database>::TransactionManager::begin(
                    &mut conn,
                    Some(sqlx::AssertSqlSafe(sql).into_sql_str()),
                )
                .await
                {
                    // BEGIN may have succeeded and set_config failed: never
                    // hand back a connection inside an aborted transaction.
                    conn.close_on_drop();
                    return Err(begin_err(e));
                }
                Conn::Postgres(conn)
            }
            Backend::Sqlite => {
                let pool = self.db.get_sqlite_connection_pool();
                let mut conn = pool.acquire().await.map_err(acquire_err)?;
                // A writer takes the write lock up front (IMMEDIATE), so
                // concurrent writers queue instead of failing on lock upgrade.
                let statement =
                    write.then(|| sqlx::AssertSqlSafe("BEGIN IMMEDIATE").into_sql_str());
                if let Err(e) =
                    <Sqlite as sqlx::Database>::TransactionManager::begin(&mut conn, statement)
                        .await
                {
                    conn.close_on_drop();
                    return Err(begin_err(e));
                }
                Conn::Sqlite(conn)
            }
        };
        Ok(Tx {
            conn: tokio::sync::Mutex::new(conn),
            backend: self.backend,
            open: true,
        })
    }

    /// [`push_begin`] with this store's role.
    fn begin_sql(&self, tenant: &str, relaxed: bool) -> String {
        let mut sql = String::with_capacity(128 + tenant.len());
        push_begin(&mut sql, tenant, self.app_role.as_deref(), relaxed);
        sql
    }
}

/// Appends `BEGIN; SELECT set_config('app.tenant_id', …, true) AS
/// anumate_group_item[, set_config('role', …, true)][, set_config('synchronous_commit',
/// 'off', true)]`, the start of every PostgreSQL simple-query transaction of
/// the store (the alias marks a write's tenant in a group commit), with the
/// values as escaped literals (a simple query has no parameters).
fn push_begin(sql: &mut String, tenant: &str, role: Option<&str>, relaxed: bool) {
    sql.push_str("BEGIN; SELECT set_config('app.tenant_id', ");
    push_literal(sql, tenant);
    sql.push_str(", true) AS ");
    sql.push_str(group::MARK);
    if let Some(role) = role {
        sql.push_str(", set_config('role', ");
        push_literal(sql, role);
        sql.push_str(", true)");
    }
    if relaxed {
        sql.push_str(", set_config('synchronous_commit', 'off', true)");
    }
}

/// Appends `value` as a PostgreSQL escape-string literal (`E'…'`, quotes and
/// backslashes doubled), which reads the same whatever
/// `standard_conforming_strings` is. `value` must hold no NUL (checked by the
/// callers: tenants are refused, the role comes from the configuration).
fn push_literal(sql: &mut String, value: &str) {
    sql.push_str("E'");
    for c in value.chars() {
        match c {
            '\'' => sql.push_str("''"),
            '\\' => sql.push_str("\\\\"),
            c => sql.push(c),
        }
    }
    sql.push('\'');
}

/// Whether `tenant` may scope a transaction (what [`Store::read`] checks).
fn valid_tenant(tenant: &str) -> bool {
    !(tenant.is_empty() || tenant.len() > 128 || tenant == NO_TENANT || tenant.contains('\0'))
}

/// Appends `sql` with each `$n` replaced by `args[n - 1]` as an escaped
/// literal ([`push_literal`]).
fn push_with_literals(out: &mut String, sql: &str, args: &[&str]) -> Result<(), StoreError> {
    let bad = |what: String| StoreError::Db(DbErr::Custom(what));
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(rest.len() - at - 1, |n| n);
        let n: usize = rest[at + 1..at + 1 + digits]
            .parse()
            .map_err(|_| bad(format!("a bare $ in {sql:?}")))?;
        let arg = n
            .checked_sub(1)
            .and_then(|i| args.get(i))
            .ok_or_else(|| bad(format!("${n} has no value in {sql:?}")))?;
        if arg.contains('\0') {
            return Err(bad(format!("${n} holds a NUL")));
        }
        push_literal(out, arg);
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    Ok(())
}

/// A pool checkout's error as sea-orm reports it.
fn acquire_err(e: sqlx::Error) -> DbErr {
    match e {
        sqlx::Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
        sqlx::Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
        other => DbErr::Conn(RuntimeErr::SqlxError(other.into())),
    }
}

/// A failed BEGIN: the server's refusal is a query error, a lost connection
/// a connection error (so that it reads as unavailable, and transient).
fn begin_err(e: sqlx::Error) -> StoreError {
    match e {
        e @ sqlx::Error::Database(_) => {
            StoreError::Db(DbErr::Query(RuntimeErr::SqlxError(e.into())))
        }
        other => StoreError::Db(DbErr::Conn(RuntimeErr::SqlxError(other.into()))),
    }
}

/// What a transaction acts for.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// One tenant: row-level security shows its rows only.
    Tenant(&'a str),
    /// No tenant: cross-tenant system work.
    System,
}

/// The `app.tenant_id` of a system transaction: never a tenant id (those start
/// with a letter or digit), so row-level security shows no tenant's rows.
const NO_TENANT: &str = "-";

/// Whether `who` (`session_user` or `current_user`) is a superuser, has
/// BYPASSRLS, and one table of this database it owns or may act as the owner of.
fn role_check_sql(who: &str) -> String {
    format!(
        "SELECT r.rolname::text AS who, r.rolsuper AS sup, r.rolbypassrls AS bypass, \
           (SELECT n.nspname || '.' || c.relname FROM pg_class c \
              JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
               AND pg_has_role(r.oid, c.relowner, 'MEMBER') \
             ORDER BY 1 LIMIT 1) AS owned \
         FROM pg_roles r WHERE r.rolname = {who}"
    )
}

fn check_role_row(row: Option<QueryResult>) -> Result<(), StoreError> {
    let Some(row) = row else { return Ok(()) };
    let role: String = row.try_get("", "who")?;
    let sup: bool = row.try_get("", "sup")?;
    let bypass: bool = row.try_get("", "bypass")?;
    if sup || bypass {
        return Err(StoreError::UnsafeRole(role));
    }
    let owned: Option<String> = row.try_get("", "owned")?;
    match owned {
        Some(table) => Err(StoreError::OwnerRole { role, table }),
        None => Ok(()),
    }
}

/// A pooled connection inside a transaction.
enum Conn {
    Postgres(PoolConnection<Postgres>),
    Sqlite(PoolConnection<Sqlite>),
    /// [`Store::write_deferred`]: statements queued for the commit.
    Deferred(Deferred),
}

/// The statements of a deferred transaction and the group commit they go
/// to (with the durable writes of [`Store::write_text`]).
struct Deferred {
    group: std::sync::Arc<group::Group>,
    tenant: String,
    /// Each statement with its literals, `; `-separated.
    statements: String,
}

impl Deferred {
    fn push(&mut self, sql: &str, values: &[Value]) -> Result<(), StoreError> {
        if !self.statements.is_empty() {
            self.statements.push_str("; ");
        }
        push_with_values(&mut self.statements, sql, values)
    }

    async fn commit(&mut self) -> Result<(), StoreError> {
        if self.statements.is_empty() {
            return Ok(());
        }
        let statements = std::mem::take(&mut self.statements);
        self.group.write(&self.tenant, statements).await.map(|_| ())
    }
}

fn deferred_query() -> StoreError {
    StoreError::Db(DbErr::Custom(
        "a deferred transaction (Store::write_deferred) cannot query".into(),
    ))
}

/// Appends `sql` with each `$n` replaced by `values[n - 1]` as a literal:
/// numbers and booleans as such, text as [`push_literal`], bytes as a hex
/// `bytea` literal, NULL; any other kind of value is refused.
fn push_with_values(out: &mut String, sql: &str, values: &[Value]) -> Result<(), StoreError> {
    use std::fmt::Write as _;
    let bad = |what: String| StoreError::Db(DbErr::Custom(what));
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let digits = rest[at + 1..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(rest.len() - at - 1, |n| n);
        let n: usize = rest[at + 1..at + 1 + digits]
            .parse()
            .map_err(|_| bad(format!("a bare $ in {sql:?}")))?;
        let value = n
            .checked_sub(1)
            .and_then(|i| values.get(i))
            .ok_or_else(|| bad(format!("${n} has no value in {sql:?}")))?;
        // Writing to a String cannot fail.
        let _ = match value {
            Value::Bool(Some(b)) => write!(out, "{}", if *b { "TRUE" } else { "FALSE" }),
            Value::TinyInt(Some(v)) => write!(out, "{v}"),
            Value::SmallInt(Some(v)) => write!(out, "{v}"),
            Value::Int(Some(v)) => write!(out, "{v}"),
            Value::BigInt(Some(v)) => write!(out, "{v}"),
            Value::TinyUnsigned(Some(v)) => write!(out, "{v}"),
            Value::SmallUnsigned(Some(v)) => write!(out, "{v}"),
            Value::Unsigned(Some(v)) => write!(out, "{v}"),
            Value::BigUnsigned(Some(v)) => write!(out, "{v}"),
            Value::String(Some(text)) => {
                if text.contains('\0') {
                    return Err(bad(format!("${n} holds a NUL")));
                }
                push_literal(out, text);
                Ok(())
            }
            Value::Bytes(Some(bytes)) => {
                out.push_str("E'\\\\x");
                for b in bytes {
                    let _ = write!(out, "{b:02x}");
                }
                out.push('\'');
                Ok(())
            }
            Value::Bool(None)
            | Value::TinyInt(None)
            | Value::SmallInt(None)
            | Value::Int(None)
            | Value::BigInt(None)
            | Value::TinyUnsigned(None)
            | Value::SmallUnsigned(None)
            | Value::Unsigned(None)
            | Value::BigUnsigned(None)
            | Value::String(None)
            | Value::Bytes(None) => {
                out.push_str("NULL");
                Ok(())
            }
            other => {
                return Err(bad(format!(
                    "${n}: a deferred statement takes numbers, booleans, text or bytes, not {other:?}"
                )));
            }
        };
        rest = &rest[at + 1 + digits..];
    }
    out.push_str(rest);
    Ok(())
}

/// An open transaction and its backend; what [`TenantTx`] and [`SystemTx`]
/// share. It talks to sqlx directly (sea-orm's transactions cannot begin with
/// a custom statement); rows come back as sea-orm's [`QueryResult`].
struct Tx {
    conn: tokio::sync::Mutex<Conn>,
    backend: Backend,
    /// Until committed: dropping an open transaction rolls it back.
    open: bool,
}

/// The statement and values as sqlx binds them (as sea-orm does).
fn bind<DB: sqlx::Database>(sql: &str, values: Vec<Value>) -> sqlx::query::Query<'_, DB, SqlxValues>
where
    SqlxValues: for<'q> sqlx::IntoArguments<DB>,
{
    sqlx::query_with(
        sqlx::AssertSqlSafe(sql),
        SqlxValues(sea_orm::sea_query::Values(values)),
    )
}

fn exec_err(e: sqlx::Error) -> StoreError {
    StoreError::from_db(DbErr::Exec(RuntimeErr::SqlxError(e.into())))
}

fn query_err(e: sqlx::Error) -> StoreError {
    StoreError::from_db(DbErr::Query(RuntimeErr::SqlxError(e.into())))
}

impl Tx {
    async fn execute(&self, sql: &str, values: Vec<Value>) -> Result<u64, StoreError> {
        match &mut *self.conn.lock().await {
            Conn::Postgres(c) => bind::<Postgres>(sql, values)
                .execute(&mut **c)
                .await
                .map(|r| r.rows_affected())
                .map_err(exec_err),
            Conn::Sqlite(c) => bind::<Sqlite>(sql, values)
                .execute(&mut **c)
                .await
                .map(|r| r.rows_affected())
                .map_err(exec_err),
            Conn::Deferred(d) => d.push(sql, &values).map(|()| 0),
        }
    }

    async fn query_one(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Option<QueryResult>, StoreError> {
        match &mut *self.conn.lock().await {
            Conn::Postgres(c) => bind::<Postgres>(sql, values)
                .fetch_optional(&mut **c)
                .await
                .map(|r| r.map(QueryResult::from))
                .map_err(query_err),
            Conn::Sqlite(c) => bind::<Sqlite>(sql, values)
                .fetch_optional(&mut **c)
                .await
                .map(|r| r.map(QueryResult::from))
                .map_err(query_err),
            Conn::Deferred(_) => Err(deferred_query()),
        }
    }

    async fn query_all(
        &self,
        sql: &str,
        values: Vec<Value>,
    ) -> Result<Vec<QueryResult>, StoreError> {
        match &mut *self.conn.lock().await {
            Conn::Postgres(c) => bind::<Postgres>(sql, values)
                .fetch_all(&mut **c)
                .await
                .map(|r| r.into_iter().map(QueryResult::from).collect())
                .map_err(query_err),
            Conn::Sqlite(c) => bind::<Sqlite>(sql, values)
                .fetch_all(&mut **c)
                .await
                .map(|r| r.into_iter().map(QueryResult::from).collect())
                .map_err(query_err),
            Conn::Deferred(_) => Err(deferred_query()),
        }
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        let res = match self.conn.get_mut() {
            Conn::Postgres(c) => <Postgres as sqlx::Database>::TransactionManager::commit(c)
                .await
                .map_err(query_err),
            Conn::Sqlite(c) => <Sqlite as sqlx::Database>::TransactionManager::commit(c)
                .await
                .map_err(query_err),
            Conn::Deferred(d) => {
                // Sent (or refused) as a whole: nothing is left open.
                let res = d.commit().await;
                self.open = false;
                return res;
            }
        };
        // Committed, or failed with the transaction still open (then the drop
        // below rolls it back, as it did before).
        self.open = res.is_err();
        res
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        // Queued, not awaited: the pool's ping as the connection is released
        // flushes it (a read costs no round trip of its own to end).
        match self.conn.get_mut() {
            Conn::Postgres(c) => {
                <Postgres as sqlx::Database>::TransactionManager::start_rollback(c)
            }
            Conn::Sqlite(c) => <Sqlite as sqlx::Database>::TransactionManager::start_rollback(c),
            // Nothing was sent.
            Conn::Deferred(_) => {}
        }
    }
}

/// The statement methods both transaction types offer.
macro_rules! statements {
    ($ty:ident) => {
        impl $ty {
            /// The database kind.
            pub fn backend(&self) -> Backend {
                self.tx.backend
            }

            /// Runs a statement (`$1`, `$2`… placeholders on both backends); returns rows affected.
            pub async fn execute(&self, sql: &str, values: Vec<Value>) -> Result<u64, StoreError> {
                self.tx.execute(sql, values).await
            }

            /// Runs a query returning at most one row.
            pub async fn query_one(
                &self,
                sql: &str,
                values: Vec<Value>,
            ) -> Result<Option<QueryResult>, StoreError> {
                self.tx.query_one(sql, values).await
            }

            /// Runs a query returning all rows.
            pub async fn query_all(
                &self,
                sql: &str,
                values: Vec<Value>,
            ) -> Result<Vec<QueryResult>, StoreError> {
                self.tx.query_all(sql, values).await
            }

            /// Commits.
            pub async fn commit(self) -> Result<(), StoreError> {
                self.tx.commit().await
            }
        }
    };
}

/// A transaction bound to one tenant. Dropped without [`TenantTx::commit`], it
/// rolls back.
pub struct TenantTx {
    tx: Tx,
    tenant: String,
}

impl TenantTx {
    /// The tenant this transaction is scoped to.
    pub fn tenant_id(&self) -> &str {
        &self.tenant
    }
}

statements!(TenantTx);

/// A transaction for cross-tenant system work, acting for no tenant (see
/// [`Store::system_read`]). A distinct type, so tenant code cannot be handed
/// one by mistake. Dropped without [`SystemTx::commit`], it rolls back.
pub struct SystemTx {
    tx: Tx,
}

statements!(SystemTx);

/// Microseconds since the Unix epoch, the timestamp format of every table.
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
