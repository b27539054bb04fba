//! A circuit breaker per (tool, host): after `threshold` consecutive
//! retryable failures it opens and calls fail fast (retryable) without
//! reaching the upstream; after `cooldown` one probe goes through
//! (half-open): its success closes the breaker, its failure opens it again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A breaker's state, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through.
    Closed,
    /// Calls fail fast.
    Open,
    /// One probe is in flight; other calls fail fast.
    HalfOpen,
}

#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

/// The breakers of one hub.
#[derive(Debug)]
pub struct Breakers {
    threshold: u32,
    cooldown: Duration,
    entries: Mutex<HashMap<(String, String), Entry>>,
}

impl Breakers {
    /// Breakers opening after `threshold` consecutive failures (0: never) for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breakers {
            threshold,
            cooldown,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<(String, String), Entry>) -> T) -> T {
        // A poisoned lock only means a panic elsewhere; the counts stay usable.
        let mut guard = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    /// Whether a call to (tool, host) may go out at `now`.
    pub fn admit(&self, tool: &str, host: &str, now: Instant) -> bool {
        if self.threshold == 0 {
            return true;
        }
        self.with(|m| {
            let Some(e) = m.get_mut(&(tool.to_owned(), host.to_owned())) else {
                return true;
            };
            match e.opened_at {
                None => true,
                Some(at) if now.duration_since(at) >= self.cooldown && !e.probing => {
                    e.probing = true;
                    true
                }
                Some(_) => false,
            }
        })
    }

    /// Whether (tool, host) is closed and not cooling down: a call goes out
    /// without [`Breakers::admit`] taking a probe.
    pub fn closed(&self, tool: &str, host: &str) -> bool {
        self.threshold == 0
            || self.with(|m| {
                m.get(&(tool.to_owned(), host.to_owned()))
                    .is_none_or(|e| e.opened_at.is_none())
            })
    }

    /// Records the outcome of an admitted call; returns the new state when it changed.
    pub fn record(&self, tool: &str, host: &str, failed: bool, now: Instant) -> Option<State> {
        if self.threshold == 0 {
            return None;
        }
        self.with(|m| {
            let key = (tool.to_owned(), host.to_owned());
            let e = m.entry(key).or_insert(Entry {
                failures: 0,
                opened_at: None,
                probing: false,
            });
            let was_open = e.opened_at.is_some();
            if !failed {
                *e = Entry {
                    failures: 0,
                    opened_at: None,
                    probing: false,
                };
                return was_open.then_some(State::Closed);
            }
            e.failures = e.failures.saturating_add(1);
            if e.probing || e.failures >= self.threshold {
                e.opened_at = Some(now);
                e.probing = false;
                return (!was_open).then_some(State::Open);
            }
            None
        })
    }

    /// Gives back a probe admitted by [`Breakers::admit`] that never reached
    /// the upstream (the call was refused first), so another call may probe.
    pub fn abandon(&self, tool: &str, host: &str) {
        self.with(|m| {
            if let Some(e) = m.get_mut(&(tool.to_owned(), host.to_owned())) {
                e.probing = false;
            }
        });
    }

    /// The state of (tool, host) at `now`.
    pub fn state(&self, tool: &str, host: &str, now: Instant) -> State {
        self.with(|m| match m.get(&(tool.to_owned(), host.to_owned())) {
            Some(Entry { probing: true, .. }) => State::HalfOpen,
            Some(Entry {
                opened_at: Some(at),
                ..
            }) if now.duration_since(*at) < self.cooldown => State::Open,
            Some(Entry {
                opened_at: Some(_), ..
            }) => State::HalfOpen,
            _ => State::Closed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_probes_once_and_closes() {
        let b = Breakers::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(b.admit("t", "h", t0));
            assert_eq!(b.record("t", "h", true, t0), None);
        }
        assert!(b.admit("t", "h", t0));
        assert_eq!(b.record("t", "h", true, t0), Some(State::Open));
        assert!(!b.admit("t", "h", t0 + Duration::from_secs(1)));
        assert_eq!(b.state("t", "h", t0), State::Open);
        // Another tool or host is unaffected.
        assert!(b.admit("t", "other", t0));
        assert!(b.admit("u", "h", t0));

        // After the cooldown one probe goes through, the others wait.
        let later = t0 + Duration::from_secs(11);
        assert!(b.admit("t", "h", later));
        assert!(!b.admit("t", "h", later));
        assert_eq!(b.state("t", "h", later), State::HalfOpen);
        // A failed probe opens it again.
        assert_eq!(b.record("t", "h", true, later), None);
        assert!(!b.admit("t", "h", later));
        // A successful probe closes it.
        let again = later + Duration::from_secs(11);
        assert!(b.admit("t", "h", again));
        assert_eq!(b.record("t", "h", false, again), Some(State::Closed));
        assert!(b.admit("t", "h", again));
        assert_eq!(b.state("t", "h", again), State::Closed);
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breakers::new(2, Duration::from_secs(10));
        let t = Instant::now();
        b.record("t", "h", true, t);
        b.record("t", "h", false, t);
        assert_eq!(b.record("t", "h", true, t), None);
        assert!(b.admit("t", "h", t));
    }
}
