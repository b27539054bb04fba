//! Change notifications between the processes that share a database, for
//! caches of rows that change rarely (PostgreSQL `NOTIFY` / `LISTEN`).
//!
//! A writer calls [`TenantTx::notify`] inside the transaction that changes
//! the rows: PostgreSQL delivers the notification to every listener when, and
//! only if, the transaction commits. A process caching those rows holds a
//! [`Listener`] and drops what a notification names. When the listener's
//! connection is lost, notifications sent meanwhile are lost with it:
//! [`Listener::recv`] subscribes again on a new connection and says so
//! (`Ok(None)`), and the cache must then forget everything it holds.
//!
//! SQLite has no notifications and needs none: it is the store of one server
//! process (`anumate dev`), whose writers tell its caches directly.

use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};

use crate::{Backend, Store, StoreError, TenantTx, Value};

/// Longest payload PostgreSQL accepts in a notification (bytes, minus one).
pub const MAX_PAYLOAD: usize = 7999;

impl TenantTx {
    /// Tells every [`Listener`] on `channel` about `payload` when this
    /// transaction commits (nothing if it rolls back). A no-op on SQLite.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), StoreError> {
        if self.backend() != Backend::Postgres {
            return Ok(());
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(StoreError::Db(sea_orm::DbErr::Custom(format!(
                "notification payload of {} bytes exceeds {MAX_PAYLOAD}",
                payload.len()
            ))));
        }
        self.execute(
            "SELECT pg_notify($1, $2)",
            vec![Value::from(channel), Value::from(payload)],
        )
        .await
        .map(|_| ())
    }
}

/// A subscription to notification channels on a connection of its own.
pub struct Listener {
    inner: PgListener,
}

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The channel it was sent on.
    pub channel: String,
    /// What the writer sent.
    pub payload: String,
}

impl Store {
    /// Subscribes to `channels` on a dedicated connection (not one of the
    /// pool's). `Ok(None)` on SQLite, where writers and caches share one
    /// process. Notifications committed after this returns are delivered.
    pub async fn listen(&self, channels: &[&str]) -> Result<Option<Listener>, StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let options = self
            .db
            .get_postgres_connection_pool()
            .connect_options()
            .as_ref()
            .clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(self.connect_timeout)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::from_db(crate::acquire_err(e)))?;
        let mut inner = PgListener::connect_with(&pool)
            .await
            .map_err(|e| StoreError::from_db(crate::acquire_err(e)))?;
        inner
            .listen_all(channels.iter().copied())
            .await
            .map_err(crate::query_err)?;
        Ok(Some(Listener { inner }))
    }
}

impl Listener {
    /// The next notification. `Ok(None)`: the connection was lost and is
    /// subscribed again, and notifications sent in between are lost (forget
    /// everything cached). `Err`: it could not subscribe again; drop this
    /// listener and retry [`Store::listen`] later.
    pub async fn recv(&mut self) -> Result<Option<Notification>, StoreError> {
        match self.inner.try_recv().await {
            Ok(Some(n)) => Ok(Some(Notification {
                channel: n.channel().to_owned(),
                payload: n.payload().to_owned(),
            })),
            Ok(None) => Ok(None),
            Err(e) => Err(crate::query_err(e)),
        }
    }
}
