//! A bounded map of compiled policy sets (oldest entry evicted first).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::Compiled;

#[derive(Default)]
struct Inner {
    map: HashMap<String, Arc<Compiled>>,
    order: VecDeque<String>,
}

/// Compiled sets by key, at most `capacity` of them.
pub struct Cache {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl Cache {
    /// An empty cache holding up to `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        Cache {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The entry for `key`, compiling it with `make` on a miss. Compilation
    /// runs outside the lock; errors are not cached.
    #[cfg(test)]
    pub fn get_or_try_insert(
        &self,
        key: &str,
        make: impl FnOnce() -> anumate_errors::Result<Compiled>,
    ) -> anumate_errors::Result<Arc<Compiled>> {
        if let Some(hit) = self.get(key) {
            return Ok(hit);
        }
        Ok(self.insert(key, make()?))
    }

    /// The entry for `key`, if cached.
    pub fn get(&self, key: &str) -> Option<Arc<Compiled>> {
        self.lock().map.get(key).cloned()
    }

    /// Caches `compiled` under `key` and returns the entry (the one already
    /// there when another caller raced this one).
    pub fn insert(&self, key: &str, compiled: Compiled) -> Arc<Compiled> {
        let mut inner = self.lock();
        if let Some(raced) = inner.map.get(key) {
            return raced.clone();
        }
        while inner.map.len() >= self.capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.map.remove(&old);
                }
                None => break,
            }
        }
        let compiled = Arc::new(compiled);
        inner.map.insert(key.to_string(), compiled.clone());
        inner.order.push_back(key.to_string());
        compiled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
