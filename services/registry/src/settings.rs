//! Tenant settings (`anumate.registry.v1.TenantSettingsService`): one row
//! per tenant under row-level security, a tenant without a row reading the
//! defaults, and a column left NULL reading its default too. Reads are served
//! from a small per-tenant cache that every change drops: in this process
//! right after the change commits, in every other process sharing a
//! PostgreSQL database when the change's notification arrives
//! ([`TenantSettingsStore::follow_changes`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anumate_documents::Actor;
use anumate_errors::{Error, ErrorCode, Result, Violation};
use anumate_proto::events::v1 as ev;
use anumate_proto::registry::v1 as pb;
use anumate_proto::timestamp_from_micros as timestamp;
use anumate_service::clients::TenantSettings;
use anumate_store::{Backend, Migration, Store, TenantTx, Value};
use tokio_util::sync::CancellationToken;

const DDL: &str = "CREATE TABLE tenant_settings (
        tenant_id TEXT NOT NULL PRIMARY KEY,
        require_preflight BIGINT,
        preflight_citation_ttl_s BIGINT,
        approval_default_expiry_s BIGINT,
        idempotency_retention_s BIGINT,
        run_retention_s BIGINT,
        revision BIGINT NOT NULL,
        updated_by TEXT NOT NULL,
        updated_at BIGINT NOT NULL
      )";

/// The settings table (NULL columns read as their defaults).
pub const MIGRATION: Migration = Migration {
    id: "registry_0003_tenant_settings",
    postgres: DDL,
    sqlite: DDL,
    tenant_tables: &["tenant_settings"],
};

/// The notification channel of settings changes (payload: the tenant id).
const CHANNEL: &str = "anumate_tenant_settings";

/// Tenants whose settings the cache keeps; past it, it starts over.
const CACHE_TENANTS: usize = 10_000;

/// One settable field: its name in `TenantSettings` and update masks, its
/// column, and (durations) its bounds in seconds.
struct Field {
    name: &'static str,
    column: &'static str,
    bounds: Option<(u64, u64)>,
}

const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// Every settable field, in `TenantSettings` order.
const FIELDS: [Field; 5] = [
    Field {
        name: "require_preflight",
        column: "require_preflight",
        bounds: None,
    },
    Field {
        name: "preflight_citation_ttl",
        column: "preflight_citation_ttl_s",
        bounds: Some((MINUTE, 7 * DAY)),
    },
    Field {
        name: "approval_default_expiry",
        column: "approval_default_expiry_s",
        bounds: Some((MINUTE, 30 * DAY)),
    },
    Field {
        name: "idempotency_retention",
        column: "idempotency_retention_s",
        bounds: Some((HOUR, 400 * DAY)),
    },
    Field {
        name: "run_retention",
        column: "run_retention_s",
        bounds: Some((HOUR, 400 * DAY)),
    },
];

/// A stored row: each column `None` when it reads as its default.
#[derive(Debug, Clone, Default)]
struct Row {
    values: [Option<i64>; 5],
    revision: i64,
    updated_at: Option<i64>,
}

impl Row {
    fn from_query(r: &anumate_store::QueryResult) -> Result<Row> {
        let mut values = [None; 5];
        for (slot, field) in values.iter_mut().zip(FIELDS.iter()) {
            *slot = r
                .try_get::<Option<i64>>("", field.column)
                .map_err(Error::internal)?;
        }
        Ok(Row {
            values,
            revision: r.try_get("", "revision").map_err(Error::internal)?,
            updated_at: Some(r.try_get("", "updated_at").map_err(Error::internal)?),
        })
    }

    /// The contract's message, defaults filled in.
    fn to_proto(&self) -> pb::TenantSettings {
        let d = TenantSettings::default();
        let dur = |v: Option<i64>, default: Duration| {
            Some(pbjson_types::Duration {
                seconds: v.unwrap_or(default.as_secs() as i64),
                nanos: 0,
            })
        };
        pb::TenantSettings {
            require_preflight: Some(self.values[0].map_or(d.require_preflight, |v| v != 0)),
            preflight_citation_ttl: dur(self.values[1], d.preflight_citation_ttl),
            approval_default_expiry: dur(self.values[2], d.approval_default_expiry),
            idempotency_retention: dur(self.values[3], d.idempotency_retention),
            run_retention: dur(self.values[4], d.run_retention),
            etag: anumate_store::versioned::etag(self.revision),
            update_time: self.updated_at.filter(|_| self.revision > 0).map(timestamp),
        }
    }
}

/// The value `field` takes from `settings` (`None`: back to its default),
/// or the violation that refuses it.
fn new_value(index: usize, settings: &pb::TenantSettings) -> Result<Option<i64>, Violation> {
    let field = &FIELDS[index];
    let duration = match index {
        0 => return Ok(settings.require_preflight.map(i64::from)),
        1 => settings.preflight_citation_ttl.as_ref(),
        2 => settings.approval_default_expiry.as_ref(),
        3 => settings.idempotency_retention.as_ref(),
        _ => settings.run_retention.as_ref(),
    };
    let Some(d) = duration else {
        return Ok(None);
    };
    let path = format!("settings.{}", field.name);
    let (min, max) = field.bounds.unwrap_or((0, u64::MAX));
    if d.nanos != 0 {
        return Err(Violation::new(path, "must be whole seconds"));
    }
    match u64::try_from(d.seconds) {
        Ok(s) if (min..=max).contains(&s) => Ok(Some(d.seconds)),
        _ => Err(Violation::new(
            path,
            format!(
                "must be from {} to {}, got {}s",
                human(min),
                human(max),
                d.seconds
            ),
        )),
    }
}

/// `90s`, `1m`, `7d`: the largest whole unit.
fn human(secs: u64) -> String {
    match secs {
        s if s % DAY == 0 => format!("{}d", s / DAY),
        s if s % HOUR == 0 => format!("{}h", s / HOUR),
        s if s % MINUTE == 0 => format!("{}m", s / MINUTE),
        s => format!("{s}s"),
    }
}

/// The mask's fields, as indexes into [`FIELDS`] (sorted, once each), or
/// `INVALID_ARGUMENT` naming `update_mask` with every unknown path.
fn mask_fields(mask: Option<&pbjson_types::FieldMask>) -> Result<Vec<usize>> {
    let paths = mask.map(|m| m.paths.as_slice()).unwrap_or_default();
    if paths.is_empty() {
        return Err(Error::invalid_argument(
            "update_mask",
            format!(
                "name the fields to change (the service never guesses): {}",
                field_names()
            ),
        ));
    }
    let mut fields = Vec::new();
    let mut unknown = Vec::new();
    for path in paths {
        match FIELDS.iter().position(|f| f.name == path) {
            Some(i) => fields.push(i),
            None => unknown.push(Violation::new(
                "update_mask",
                format!(
                    "{:?} is not a settable field; settable: {}",
                    truncate(path),
                    field_names()
                ),
            )),
        }
    }
    if !unknown.is_empty() {
        let names: Vec<String> = paths
            .iter()
            .filter(|p| !FIELDS.iter().any(|f| f.name == p.as_str()))
            .map(|p| format!("{:?}", truncate(p)))
            .collect();
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!(
                "update_mask: unknown field(s) {}; settable: {}",
                names.join(", "),
                field_names()
            ),
        )
        .with_violations(unknown));
    }
    fields.sort_unstable();
    fields.dedup();
    Ok(fields)
}

/// A path as echoed in an error (at most 64 characters of it).
fn truncate(path: &str) -> &str {
    match path.char_indices().nth(64) {
        Some((i, _)) => &path[..i],
        None => path,
    }
}

fn field_names() -> String {
    FIELDS.iter().map(|f| f.name).collect::<Vec<_>>().join(", ")
}

/// Tenant settings over a store, with their read cache.
#[derive(Clone)]
pub struct TenantSettingsStore {
    store: Store,
    cache: Arc<SettingsCache>,
}

/// Each tenant's settings as last read, dropped on every change.
struct SettingsCache {
    entries: Mutex<HashMap<String, pb::TenantSettings>>,
    /// Bumped by every invalidation; a read caches what it read only if the
    /// epoch it started with is still current.
    epoch: AtomicU64,
    /// False while other processes' changes may be missed (PostgreSQL, until
    /// subscribed to their notifications).
    live: AtomicBool,
}

impl SettingsCache {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, pb::TenantSettings>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, tenant: &str) -> Option<pb::TenantSettings> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        self.entries().get(tenant).cloned()
    }

    fn insert(&self, tenant: &str, settings: pb::TenantSettings, epoch: u64) {
        let mut entries = self.entries();
        if !self.live.load(Ordering::Acquire) || self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if entries.len() >= CACHE_TENANTS {
            entries.clear();
        }
        entries.insert(tenant.to_owned(), settings);
    }

    fn invalidate(&self, tenant: &str) {
        let mut entries = self.entries();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        entries.remove(tenant);
    }

    /// Forgets everything; serves again only when `live`.
    fn reset(&self, live: bool) {
        let mut entries = self.entries();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.live.store(live, Ordering::Release);
        entries.clear();
    }
}

impl TenantSettingsStore {
    /// Settings over `store`. On PostgreSQL the cache serves nothing until
    /// [`TenantSettingsStore::follow_changes`] runs.
    pub fn new(store: Store) -> TenantSettingsStore {
        let live = store.backend() == Backend::Sqlite;
        TenantSettingsStore {
            store,
            cache: Arc::new(SettingsCache {
                entries: Mutex::new(HashMap::new()),
                epoch: AtomicU64::new(0),
                live: AtomicBool::new(live),
            }),
        }
    }

    /// Whether reads may be served from memory (on PostgreSQL: subscribed
    /// to other processes' changes).
    pub fn cache_is_live(&self) -> bool {
        self.cache.live.load(Ordering::Acquire)
    }

    /// The tenant's settings, defaults filled in (from the cache when it
    /// holds them).
    pub async fn get(&self, tenant: &str) -> Result<pb::TenantSettings> {
        if let Some(hit) = self.cache.get(tenant) {
            return Ok(hit);
        }
        let epoch = self.cache.epoch.load(Ordering::Acquire);
        let tx = self.store.read(tenant).await?;
        let settings = read_row(&tx, false).await?.to_proto();
        drop(tx);
        self.cache.insert(tenant, settings.clone(), epoch);
        Ok(settings)
    }

    /// [`TenantSettingsStore::get`] in Rust types.
    pub async fn get_typed(&self, tenant: &str) -> Result<TenantSettings> {
        Ok(TenantSettings::from_proto(&self.get(tenant).await?))
    }

    /// Changes the fields `mask` names (see the contract), records the
    /// change event, and returns the settings after it.
    pub async fn update(
        &self,
        actor: &Actor,
        settings: Option<&pb::TenantSettings>,
        mask: Option<&pbjson_types::FieldMask>,
        etag: &str,
    ) -> Result<pb::TenantSettings> {
        let fields = mask_fields(mask)?;
        let empty = pb::TenantSettings::default();
        let settings = settings.unwrap_or(&empty);
        let mut values = Vec::with_capacity(fields.len());
        let mut violations = Vec::new();
        for &i in &fields {
            match new_value(i, settings) {
                Ok(v) => values.push((i, v)),
                Err(v) => violations.push(v),
            }
        }
        if !violations.is_empty() {
            let message = violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::new(ErrorCode::InvalidArgument, message).with_violations(violations));
        }

        let tx = self.store.write(&actor.tenant).await?;
        // A tenant without a row gets one reading the defaults (revision 0,
        // the same etag), so the row can be locked whether or not it existed.
        tx.execute(
            "INSERT INTO tenant_settings (tenant_id, revision, updated_by, updated_at)
             VALUES ($1, 0, '', 0) ON CONFLICT (tenant_id) DO NOTHING",
            vec![Value::from(actor.tenant.as_str())],
        )
        .await?;
        let mut row = read_row(&tx, true).await?;
        let current = anumate_store::versioned::etag(row.revision);
        if !etag.is_empty() && etag != current {
            return Err(Error::new(
                ErrorCode::EtagMismatch,
                format!(
                    "the tenant settings changed: etag is {current}, request carried {}; re-read and retry",
                    truncate(etag)
                ),
            )
            .with_metadata("current_etag", current));
        }
        for (i, v) in values {
            row.values[i] = v;
        }
        row.revision += 1;
        let now = anumate_store::now_micros();
        row.updated_at = Some(now);
        let mut params: Vec<Value> = row.values.iter().map(|v| Value::from(*v)).collect();
        params.extend([
            Value::from(row.revision),
            Value::from(actor.subject.as_str()),
            Value::from(now),
            Value::from(actor.tenant.as_str()),
        ]);
        tx.execute(
            "UPDATE tenant_settings SET require_preflight = $1, preflight_citation_ttl_s = $2,
               approval_default_expiry_s = $3, idempotency_retention_s = $4,
               run_retention_s = $5, revision = $6, updated_by = $7, updated_at = $8
             WHERE tenant_id = $9",
            params,
        )
        .await?;
        let result = row.to_proto();
        let event = ev::TenantSettingsChanged {
            tenant_id: actor.tenant.clone(),
            settings: Some(result.clone()),
            changed_fields: fields.iter().map(|&i| FIELDS[i].name.to_owned()).collect(),
            actor: actor.subject.clone(),
        };
        let ctx = anumate_events::EventContext {
            subject: "settings",
            ..Default::default()
        };
        anumate_events::append(&tx, &event, ctx).await?;
        tx.notify(CHANNEL, &actor.tenant).await?;
        let committed = tx.commit().await;
        // Dropped whether or not the commit went through: a commit that
        // failed may still have committed.
        self.cache.invalidate(&actor.tenant);
        committed?;
        Ok(result)
    }

    /// Keeps the cache true to changes other processes make, until `cancel`
    /// (as `anumate_documents::Documents::follow_changes` does): subscribes
    /// to their notifications (PostgreSQL) and drops the tenant each names;
    /// the cache serves reads only while subscribed. On SQLite it only waits.
    pub async fn follow_changes(
        &self,
        cancel: CancellationToken,
    ) -> std::result::Result<(), anumate_store::StoreError> {
        if self.store.backend() != Backend::Postgres {
            cancel.cancelled().await;
            return Ok(());
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let listening = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                l = self.store.listen(&[CHANNEL]) => l,
            };
            match listening {
                Ok(Some(mut listener)) => {
                    self.cache.reset(true);
                    backoff = Duration::from_millis(100);
                    loop {
                        let next = tokio::select! {
                            _ = cancel.cancelled() => {
                                self.cache.reset(false);
                                return Ok(());
                            }
                            n = listener.recv() => n,
                        };
                        match next {
                            Ok(Some(n)) => self.cache.invalidate(&n.payload),
                            Ok(None) => self.cache.reset(true),
                            Err(e) => {
                                self.cache.reset(false);
                                tracing::warn!(error = %e, channel = CHANNEL, "lost the change notifications; settings reads go to the database until subscribed again");
                                break;
                            }
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.cache.reset(false);
                    tracing::warn!(error = %e, channel = CHANNEL, retry_in = ?backoff, "cannot subscribe to change notifications; settings reads go to the database");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// The tenant's row (locked when `lock`, on PostgreSQL), or the defaults.
async fn read_row(tx: &TenantTx, lock: bool) -> Result<Row> {
    let lock = if lock && tx.backend() == Backend::Postgres {
        " FOR UPDATE"
    } else {
        ""
    };
    let sql = format!(
        "SELECT require_preflight, preflight_citation_ttl_s, approval_default_expiry_s,
           idempotency_retention_s, run_retention_s, revision, updated_at
         FROM tenant_settings WHERE tenant_id = $1{lock}"
    );
    match tx
        .query_one(&sql, vec![Value::from(tx.tenant_id())])
        .await?
    {
        Some(r) => Row::from_query(&r),
        None => Ok(Row::default()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_match_the_contract_comments() {
        let p = Row::default().to_proto();
        assert_eq!(p.require_preflight, Some(true));
        assert_eq!(p.preflight_citation_ttl.unwrap().seconds, 3600);
        assert_eq!(p.run_retention.unwrap().seconds, 30 * 86400);
        assert_eq!(p.etag, "r0");
        assert!(p.update_time.is_none());
        assert_eq!(TenantSettings::from_proto(&p), TenantSettings::default());
    }

    #[test]
    fn bounds_are_named_in_units() {
        assert_eq!(human(60), "1m");
        assert_eq!(human(7 * DAY), "7d");
        assert_eq!(human(90), "90s");
    }
}
