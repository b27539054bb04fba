//! In-memory [`ReplayGuard`] and [`RevocationList`], for tests only: they are
//! per-process, so replicas would not share them. The service stores both in
//! the database.

use std::collections::{HashMap, HashSet};
use std::future::{Future, ready};
use std::sync::Mutex;

use crate::guard::{ReplayError, ReplayGuard, RevocationError, RevocationList};

/// Consumed `jti`s with their expiry, in a mutex.
#[derive(Debug, Default)]
pub struct MemoryReplayGuard {
    seen: Mutex<HashMap<String, i64>>,
}

impl MemoryReplayGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets entries whose `exp` is before `cutoff` (pass the current time
    /// minus the verifiers' leeway); returns how many.
    pub fn purge_expired(&self, cutoff: i64) -> usize {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = seen.len();
        seen.retain(|_, exp| *exp >= cutoff);
        before - seen.len()
    }
}

impl ReplayGuard for MemoryReplayGuard {
    fn check_and_consume(
        &self,
        jti: &str,
        exp: i64,
    ) -> impl Future<Output = Result<(), ReplayError>> + Send {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = if seen.contains_key(jti) {
            Err(ReplayError::Replayed {
                jti: jti.to_owned(),
            })
        } else {
            seen.insert(jti.to_owned(), exp);
            Ok(())
        };
        ready(result)
    }

    fn is_consumed(&self, jti: &str) -> impl Future<Output = Result<bool, ReplayError>> + Send {
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ready(Ok(seen.contains_key(jti)))
    }
}

/// Revoked `jti`s and runs, in a mutex.
#[derive(Debug, Default)]
pub struct MemoryRevocationList {
    inner: Mutex<Revoked>,
}

#[derive(Debug, Default)]
struct Revoked {
    jtis: HashSet<String>,
    runs: HashSet<String>,
}

impl MemoryRevocationList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes one token.
    pub fn revoke_jti(&self, jti: &str) {
        self.lock().jtis.insert(jti.to_owned());
    }

    /// Revokes every token of a run.
    pub fn revoke_run(&self, run: &str) {
        self.lock().runs.insert(run.to_owned());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Revoked> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RevocationList for MemoryRevocationList {
    fn is_revoked(
        &self,
        jti: &str,
        run: &str,
    ) -> impl Future<Output = Result<bool, RevocationError>> + Send {
        let revoked = self.lock();
        ready(Ok(revoked.jtis.contains(jti) || revoked.runs.contains(run)))
    }
}
