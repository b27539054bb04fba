//! Idempotency keys, one library for every service that acts at most once per
//! key (the connector hub's `Invoke`, the orchestrator's `Execute`).
//!
//! A key lives in a *scope* (the operation, e.g. `connectors.invoke`) of a
//! tenant and remembers the *fingerprint* of the request that claimed it (the
//! SHA-256 of the request's canonical JSON, [`fingerprint`]) and, once
//! recorded, its result, until it expires.
//!
//! The pattern (zero2prod's): inside the caller's write transaction,
//! [`claim`] the key with `INSERT … ON CONFLICT DO NOTHING`. A fresh claim
//! ([`Claim::New`]) lets the caller act and then [`record`] the result in the
//! same transaction, so the claim, the effects and the result commit
//! together or not at all. A concurrent claim of the same key on PostgreSQL
//! waits on the unique index until the first transaction ends and then finds
//! its record. A repeat with the same fingerprint gets [`Claim::Replay`] with
//! the recorded result; the same key with another fingerprint is refused
//! ([`Claim::Reused`], `ALREADY_EXISTS` / `IDEMPOTENCY_KEY_REUSED` via
//! [`reused_error`]). An expired key is claimed afresh. [`purge`] deletes
//! expired keys.
#![forbid(unsafe_code)]

use anumate_errors::{Error, Reason};
use anumate_store::{Migration, QueryResult, StoreError, SystemTx, TenantTx};
use serde_json::Value;

/// Longest accepted key, in characters.
pub const MAX_KEY_LEN: usize = 256;

const DDL: &str = "CREATE TABLE idempotency_keys (
        tenant_id TEXT NOT NULL,
        scope TEXT NOT NULL,
        idem_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        result TEXT,
        created_at BIGINT NOT NULL,
        recorded_at BIGINT,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, scope, idem_key)
      );
      CREATE INDEX idempotency_keys_expiry ON idempotency_keys (tenant_id, expires_at);
      CREATE TABLE idempotency_tenants (
        tenant_id TEXT PRIMARY KEY
      )";

/// The keys table (a tenant table, under RLS on PostgreSQL) and
/// `idempotency_tenants` (tenants that ever claimed a key, for the purge;
/// deliberately not a tenant table: it holds nothing but tenant ids). Every
/// service using this crate includes them; the runner applies them once.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "idempotency_0001_keys",
    postgres: DDL,
    sqlite: DDL,
    tenant_tables: &["idempotency_keys"],
}];

/// `sha256:<hex>` of the RFC 8785 canonical JSON of `request`: equal for
/// requests that mean the same, whatever their key order.
pub fn fingerprint(request: &Value) -> Result<String, Error> {
    let canonical = anumate_crypto::canonical_json(request)
        .map_err(|e| Error::invalid_argument("request", format!("no canonical form: {e}")))?;
    Ok(anumate_crypto::digest(canonical.as_bytes()))
}

/// Checks a caller-supplied key: 1 to [`MAX_KEY_LEN`] printable characters.
pub fn check_key(field: &str, key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::invalid_argument(field, "required"));
    }
    if key.chars().count() > MAX_KEY_LEN {
        return Err(Error::invalid_argument(
            field,
            format!("at most {MAX_KEY_LEN} characters"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::invalid_argument(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// A key as one caller claims it.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    /// The operation (`connectors.invoke`); keys of different scopes never meet.
    pub scope: &'a str,
    /// The caller's key.
    pub key: &'a str,
    /// [`fingerprint`] of the request.
    pub fingerprint: &'a str,
    /// When the key may be forgotten, in microseconds since the epoch.
    pub expires_at: i64,
}

/// A result recorded for a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// What [`record`] stored.
    pub result: Value,
    /// When, in microseconds since the epoch.
    pub recorded_at: i64,
}

/// What [`claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The key is this transaction's: act, then [`record`].
    New,
    /// The same request was recorded before: return this without acting.
    Replay(Recorded),
    /// The key was claimed by a request with another fingerprint.
    Reused {
        /// The fingerprint the key was claimed with.
        fingerprint: String,
    },
    /// Claimed with this fingerprint and committed without a result (a
    /// caller that claims and acts in separate transactions): still in flight.
    InFlight,
}

/// The storage failed.
#[derive(Debug, thiserror::Error)]
#[error("idempotency store: {0}")]
pub struct StoreFailure(#[from] pub StoreError);

impl From<StoreFailure> for Error {
    fn from(e: StoreFailure) -> Self {
        e.0.into()
    }
}

/// `ALREADY_EXISTS` (`IDEMPOTENCY_KEY_REUSED`) for a key reused with another request.
pub fn reused_error(field: &str, key: &str) -> Error {
    Error::because(
        Reason::IdempotencyKeyReused,
        format!("{field} {key:?} was already used for a request with other arguments"),
    )
}

/// Claims `key` in `tx` (see the crate docs).
pub async fn claim(tx: &TenantTx, key: &Key<'_>) -> Result<Claim, StoreFailure> {
    claim_at(tx, key, anumate_store::now_micros()).await
}

/// [`claim`] at `now` (micros), which a fresh claim stores as its claim
/// time: a caller that claims and acts in separate transactions keeps it to
/// tell its own claim from a later one.
pub async fn claim_at(tx: &TenantTx, key: &Key<'_>, now: i64) -> Result<Claim, StoreFailure> {
    let values = vec![
        tx.tenant_id().into(),
        key.scope.into(),
        key.key.into(),
        key.fingerprint.into(),
        now.into(),
        key.expires_at.into(),
    ];
    let inserted = if tx.backend() == anumate_store::Backend::Postgres {
        // One round trip: the key and (for the purge) its tenant.
        let row = tx
            .query_one(
                "WITH k AS (INSERT INTO idempotency_keys (tenant_id, scope, idem_key, fingerprint, \
                   created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6) \
                   ON CONFLICT DO NOTHING RETURNING 1), \
                 t AS (INSERT INTO idempotency_tenants (tenant_id) SELECT $1 \
                   WHERE EXISTS (SELECT 1 FROM k) ON CONFLICT DO NOTHING) \
                 SELECT count(*) AS n FROM k",
                values,
            )
            .await?;
        let n: i64 = match row {
            Some(r) => r
                .try_get("", "n")
                .map_err(|e| StoreFailure(StoreError::from_db(e)))?,
            None => 0,
        };
        n == 1
    } else {
        let n = tx
            .execute(
                "INSERT INTO idempotency_keys (tenant_id, scope, idem_key, fingerprint, created_at, \
                   expires_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                values,
            )
            .await?;
        if n == 1 {
            tx.execute(
                "INSERT INTO idempotency_tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
                vec![tx.tenant_id().into()],
            )
            .await?;
        }
        n == 1
    };
    if inserted {
        return Ok(Claim::New);
    }
    let Some(row) = tx
        .query_one(
            "SELECT fingerprint, result, recorded_at, expires_at FROM idempotency_keys \
             WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3",
            vec![tx.tenant_id().into(), key.scope.into(), key.key.into()],
        )
        .await?
    else {
        // Purged between the insert and the read: a conflict with nothing is
        // not possible inside one transaction on either backend, but be exact.
        return Ok(Claim::InFlight);
    };
    let stored = StoredKey::from_row(&row)?;
    if stored.expires_at <= now {
        // Forgotten: the key starts over with this request.
        tx.execute(
            "UPDATE idempotency_keys SET fingerprint = $4, result = NULL, recorded_at = NULL, \
               created_at = $5, expires_at = $6 \
             WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3",
            vec![
                tx.tenant_id().into(),
                key.scope.into(),
                key.key.into(),
                key.fingerprint.into(),
                now.into(),
                key.expires_at.into(),
            ],
        )
        .await?;
        return Ok(Claim::New);
    }
    if stored.fingerprint != key.fingerprint {
        return Ok(Claim::Reused {
            fingerprint: stored.fingerprint,
        });
    }
    match (stored.result, stored.recorded_at) {
        (Some(text), Some(recorded_at)) => {
            let result = serde_json::from_str(&text).map_err(|e| {
                StoreFailure(StoreError::from_db(anumate_store::DbErr::Custom(format!(
                    "recorded result does not read back: {e}"
                ))))
            })?;
            Ok(Claim::Replay(Recorded {
                result,
                recorded_at,
            }))
        }
        _ => Ok(Claim::InFlight),
    }
}

/// Records `result` for a key claimed in `tx`; returns when it was recorded.
pub async fn record(
    tx: &TenantTx,
    scope: &str,
    key: &str,
    result: &Value,
) -> Result<i64, StoreFailure> {
    let now = anumate_store::now_micros();
    tx.execute(
        "UPDATE idempotency_keys SET result = $4, recorded_at = $5 \
         WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3",
        vec![
            tx.tenant_id().into(),
            scope.into(),
            key.into(),
            result.to_string().into(),
            now.into(),
        ],
    )
    .await?;
    Ok(now)
}

/// Gives a key claimed in `tx` back (the call failed in a way worth
/// retrying): the next claim is [`Claim::New`] even if `tx` commits.
pub async fn release(tx: &TenantTx, scope: &str, key: &str) -> Result<(), StoreFailure> {
    tx.execute(
        "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND scope = $2 AND idem_key = $3",
        vec![tx.tenant_id().into(), scope.into(), key.into()],
    )
    .await?;
    Ok(())
}

/// Deletes the tenant's keys that expired before `now_micros`; returns how many.
pub async fn purge(tx: &TenantTx, now_micros: i64) -> Result<u64, StoreFailure> {
    Ok(tx
        .execute(
            "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND expires_at <= $2",
            vec![tx.tenant_id().into(), now_micros.into()],
        )
        .await?)
}

/// Tenants that ever claimed a key (whose keys [`purge`] should visit).
pub async fn tenants(tx: &SystemTx) -> Result<Vec<String>, StoreFailure> {
    let rows = tx
        .query_all(
            "SELECT tenant_id FROM idempotency_tenants ORDER BY tenant_id",
            vec![],
        )
        .await?;
    rows.iter()
        .map(|r| {
            r.try_get("", "tenant_id")
                .map_err(|e| StoreError::from_db(e).into())
        })
        .collect()
}

struct StoredKey {
    fingerprint: String,
    result: Option<String>,
    recorded_at: Option<i64>,
    expires_at: i64,
}

impl StoredKey {
    fn from_row(row: &QueryResult) -> Result<StoredKey, StoreFailure> {
        let get = |e| StoreFailure(StoreError::from_db(e));
        Ok(StoredKey {
            fingerprint: row.try_get("", "fingerprint").map_err(get)?,
            result: row.try_get("", "result").map_err(get)?,
            recorded_at: row.try_get("", "recorded_at").map_err(get)?,
            expires_at: row.try_get("", "expires_at").map_err(get)?,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_fingerprint_ignores_key_order_but_not_values() {
        let a = fingerprint(&json!({"a": 1, "b": [1, 2]})).unwrap();
        let b = fingerprint(&json!({"b": [1, 2], "a": 1})).unwrap();
        let c = fingerprint(&json!({"a": 2, "b": [1, 2]})).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("sha256:"), "{a}");
    }

    #[test]
    fn keys_are_bounded_and_printable() {
        assert!(check_key("k", "run-1/step-2").is_ok());
        assert!(check_key("k", "").is_err());
        assert!(check_key("k", &"x".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(check_key("k", &"x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(check_key("k", "a\nb").is_err());
    }
}
