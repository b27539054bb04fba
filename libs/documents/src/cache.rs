//! Reads served from memory: a bounded cache of documents and their
//! versions, keyed by tenant and name, dropped on every change.
//!
//! A version's content never changes once written, but a document row (its
//! latest and published version, labels, etag) and a version's status do.
//! So an entry is a snapshot of one document row with the versions read
//! under it, and every change to the document drops the whole entry:
//!
//! - in this process, right after the change commits ([`Cache::invalidate`]);
//! - in every other process sharing a PostgreSQL database, when the change's
//!   notification arrives ([`crate::Documents::follow_changes`]). Until a
//!   process is subscribed it serves nothing from memory; if its
//!   subscription's connection is lost, it forgets everything once
//!   subscribed again.
//!
//! A read that missed stores what it read only if no change was seen since
//! it started (the epoch), so a read that raced a change never caches the
//! state from before it. Keys carry the tenant, so an entry is never served
//! to another tenant.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;

/// Bytes of documents and versions one kind keeps in memory.
pub const DEFAULT_CAPACITY_BYTES: u64 = 32 << 20;

/// Versions kept per document (the most recently read).
const VERSIONS_PER_DOCUMENT: usize = 8;

/// What the cache holds for one (tenant, name): the document and the
/// versions read while it was current.
pub(crate) struct Snapshot<D, V> {
    pub document: D,
    /// The document's latest version number.
    pub latest: i32,
    /// Its published version number; 0 when none is.
    pub published: i32,
    pub versions: Vec<(i32, V)>,
    weight: u64,
}

impl<D: Message, V: Message> Snapshot<D, V> {
    pub fn new(document: D, latest: i32, published: i32, versions: Vec<(i32, V)>) -> Self {
        // Encoded size plus a fixed overhead per message: close to what the
        // decoded messages hold, and cheap.
        let weight = 256
            + document.encoded_len() as u64
            + versions
                .iter()
                .map(|(_, v)| 256 + v.encoded_len() as u64)
                .sum::<u64>();
        Snapshot {
            document,
            latest,
            published,
            versions,
            weight,
        }
    }

    /// The version numbered `number`, if it was read under this snapshot.
    pub fn version(&self, number: i32) -> Option<&V> {
        self.versions
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, v)| v)
    }
}

#[derive(Clone)]
struct Weight;

impl<D, V> quick_cache::Weighter<String, Arc<Snapshot<D, V>>> for Weight {
    fn weight(&self, _key: &String, value: &Arc<Snapshot<D, V>>) -> u64 {
        value.weight
    }
}

/// The cache of one kind of document.
pub(crate) struct Cache<D, V> {
    entries: quick_cache::sync::Cache<String, Arc<Snapshot<D, V>>, Weight>,
    capacity: u64,
    /// Bumped by every invalidation; a miss caches what it read only if the
    /// epoch it started with is still current.
    epoch: AtomicU64,
    /// False while this process may miss changes made by others (on
    /// PostgreSQL, until it is subscribed to their notifications).
    live: AtomicBool,
    /// Orders "check the epoch, then insert" against "bump the epoch, then
    /// remove", so a stale read cannot slip in between.
    writes: Mutex<()>,
}

impl<D: Message, V: Message + Clone> Cache<D, V> {
    /// An empty cache of `capacity` bytes; `live` when no other process can
    /// change the documents (SQLite).
    pub fn new(capacity: u64, live: bool) -> Self {
        let items = usize::try_from(capacity / 4096).unwrap_or(1024).max(16);
        Cache {
            entries: quick_cache::sync::Cache::with_weighter(items, capacity.max(1), Weight),
            capacity,
            epoch: AtomicU64::new(0),
            live: AtomicBool::new(live),
            writes: Mutex::new(()),
        }
    }

    /// The key of a document of a tenant. Tenants and names are checked
    /// before any lookup and contain no `/` (names are DNS labels).
    pub fn key(tenant: &str, name: &str) -> String {
        let mut key = String::with_capacity(tenant.len() + 1 + name.len());
        key.push_str(tenant);
        key.push('/');
        key.push_str(name);
        key
    }

    /// The epoch a read starts from (pass it to [`Cache::insert`]).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The snapshot of `key`, when the cache is serving.
    pub fn get(&self, key: &str) -> Option<Arc<Snapshot<D, V>>> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        self.entries.get(key)
    }

    /// Stores `snapshot` unless a change was seen since `epoch` or it is too
    /// big to be worth a slot.
    pub fn insert(&self, key: String, snapshot: Snapshot<D, V>, epoch: u64) {
        if snapshot.weight > self.capacity / 8 {
            return;
        }
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        if !self.live.load(Ordering::Acquire) || self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        self.entries.insert(key, Arc::new(snapshot));
    }

    /// Forgets one document (it changed).
    pub fn invalidate(&self, key: &str) {
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.remove(key);
    }

    /// Forgets everything; serves again from memory only when `live`.
    pub fn reset(&self, live: bool) {
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.live.store(live, Ordering::Release);
        self.entries.clear();
    }

    /// Whether reads are served from memory now.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

/// A snapshot with `version` added to those of `previous` (when `previous`
/// is the same document state), keeping the most recent few.
pub(crate) fn with_version<D: Message, V: Message + Clone>(
    previous: Option<&Snapshot<D, V>>,
    document: D,
    (latest, published): (i32, i32),
    number: i32,
    version: V,
) -> Snapshot<D, V> {
    let mut versions = vec![(number, version)];
    if let Some(prev) = previous {
        versions.extend(
            prev.versions
                .iter()
                .filter(|(n, _)| *n != number)
                .take(VERSIONS_PER_DOCUMENT - 1)
                .cloned(),
        );
    }
    Snapshot::new(document, latest, published, versions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::Duration as Msg;

    fn msg(n: i64) -> Msg {
        Msg {
            seconds: n,
            nanos: 0,
        }
    }

    fn snap(n: i64) -> Snapshot<Msg, Msg> {
        Snapshot::new(msg(n), 1, 1, vec![(1, msg(n))])
    }

    #[test]
    fn a_read_that_raced_a_change_is_not_cached() {
        let cache: Cache<Msg, Msg> = Cache::new(1 << 20, true);
        let key = Cache::<Msg, Msg>::key("t1", "refund");
        let epoch = cache.epoch();
        cache.invalidate(&key); // a change committed while the read ran
        cache.insert(key.clone(), snap(1), epoch);
        assert!(cache.get(&key).is_none());
        let epoch = cache.epoch();
        cache.insert(key.clone(), snap(2), epoch);
        assert_eq!(cache.get(&key).map(|s| s.document.seconds), Some(2));
    }

    #[test]
    fn keys_carry_the_tenant() {
        let cache: Cache<Msg, Msg> = Cache::new(1 << 20, true);
        let epoch = cache.epoch();
        cache.insert(Cache::<Msg, Msg>::key("t1", "refund"), snap(1), epoch);
        assert!(cache.get(&Cache::<Msg, Msg>::key("t2", "refund")).is_none());
        assert!(cache.get(&Cache::<Msg, Msg>::key("t1", "refund")).is_some());
    }

    #[test]
    fn nothing_is_served_or_stored_until_live() {
        let cache: Cache<Msg, Msg> = Cache::new(1 << 20, false);
        let key = Cache::<Msg, Msg>::key("t1", "refund");
        cache.insert(key.clone(), snap(1), cache.epoch());
        assert!(cache.get(&key).is_none());
        cache.reset(true);
        cache.insert(key.clone(), snap(1), cache.epoch());
        assert!(cache.get(&key).is_some());
        cache.reset(false); // subscription lost: forget and stop serving
        assert!(cache.get(&key).is_none());
        cache.reset(true);
        assert!(cache.get(&key).is_none(), "forgotten, not just hidden");
    }

    #[test]
    fn memory_is_bounded() {
        let cache: Cache<Msg, Msg> = Cache::new(64 << 10, true);
        for i in 0..10_000 {
            cache.insert(
                Cache::<Msg, Msg>::key("t1", &format!("c{i}")),
                snap(i),
                cache.epoch(),
            );
        }
        assert!(cache.weight() <= 64 << 10, "{} bytes held", cache.weight());
    }

    #[test]
    fn snapshots_keep_the_most_recent_versions() {
        let mut s = with_version(None, msg(0), (20, 20), 1, msg(1));
        for n in 2..=20 {
            s = with_version(Some(&s), msg(0), (20, 20), n, msg(i64::from(n)));
        }
        assert_eq!(s.versions.len(), VERSIONS_PER_DOCUMENT);
        assert!(s.version(20).is_some() && s.version(13).is_some());
        assert!(s.version(12).is_none());
    }
}
