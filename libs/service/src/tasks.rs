//! Supervised background tasks: spawned with a cancellation token, a failure
//! or a panic is logged, and shutdown cancels them and awaits them (bounded).

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why a background task stopped before it was cancelled.
pub type TaskError = Box<dyn std::error::Error + Send + Sync>;

/// The background tasks of one server.
#[derive(Debug, Default)]
pub struct Tasks {
    cancel: CancellationToken,
    running: Vec<(&'static str, JoinHandle<()>)>,
}

impl Tasks {
    /// No tasks yet; all of them will share one cancellation token.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// The token every task watches; cancelled by [`Tasks::shutdown`].
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Names of the tasks spawned so far, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.running.iter().map(|(name, _)| *name).collect()
    }

    /// Spawns `task(token)`. The task must return once the token is
    /// cancelled; an error, a panic or an early return is logged (the server
    /// keeps serving without it).
    pub fn spawn<F, Fut>(&mut self, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        // The inner task runs the work, so a panic in it is reported here
        // (as a JoinError) instead of vanishing.
        let inner = tokio::spawn(task(cancel.clone()));
        let supervisor = tokio::spawn(async move {
            match inner.await {
                Ok(Ok(())) if cancel.is_cancelled() => {
                    tracing::debug!(task = name, "background task stopped")
                }
                Ok(Ok(())) => tracing::error!(
                    task = name,
                    "background task ended before shutdown; the server keeps serving without it"
                ),
                Ok(Err(e)) => tracing::error!(
                    task = name,
                    error = %e,
                    "background task failed; the server keeps serving without it"
                ),
                Err(e) => tracing::error!(
                    task = name,
                    error = %e,
                    "background task panicked; the server keeps serving without it"
                ),
            }
        });
        self.running.push((name, supervisor));
    }

    /// Cancels every task and waits up to `timeout` for all of them. Returns
    /// the names of those still running then (left to end with the process,
    /// never aborted mid-write).
    pub async fn shutdown(self, timeout: Duration) -> Vec<&'static str> {
        self.cancel.cancel();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut late = Vec::new();
        for (name, handle) in self.running {
            if tokio::time::timeout_at(deadline, handle).await.is_err() {
                tracing::warn!(
                    task = name,
                    timeout_ms = timeout.as_millis() as u64,
                    "background task did not stop in time"
                );
                late.push(name);
            }
        }
        late
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn shutdown_cancels_and_awaits_every_task() {
        let mut tasks = Tasks::new();
        let cleaned = Arc::new(AtomicBool::new(false));
        let flag = cleaned.clone();
        tasks.spawn("loop", |cancel| async move {
            cancel.cancelled().await;
            // Work after the cancellation still runs: the task is not aborted.
            tokio::time::sleep(Duration::from_millis(20)).await;
            flag.store(true, Ordering::SeqCst);
            Ok(())
        });
        let late = tasks.shutdown(Duration::from_secs(5)).await;
        assert!(late.is_empty(), "{late:?}");
        assert!(cleaned.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_failing_or_panicking_task_leaves_the_others_running() {
        let mut tasks = Tasks::new();
        tasks.spawn("fails", |_| async { Err("boom".into()) });
        tasks.spawn("panics", |_| async { panic!("task panic") });
        let alive = Arc::new(AtomicBool::new(false));
        let flag = alive.clone();
        tasks.spawn("survivor", |cancel| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
            cancel.cancelled().await;
            Ok(())
        });
        // Waits for the survivor rather than a fixed time: a panic's backtrace
        // can hold this one-thread runtime for longer than the survivor's sleep.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !alive.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(alive.load(Ordering::SeqCst), "the survivor ran on");
        assert_eq!(tasks.names(), ["fails", "panics", "survivor"]);
        assert!(tasks.shutdown(Duration::from_secs(5)).await.is_empty());
    }

    #[tokio::test]
    async fn a_task_ignoring_cancellation_is_reported_not_awaited_forever() {
        let mut tasks = Tasks::new();
        tasks.spawn("stubborn", |_| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        });
        let started = std::time::Instant::now();
        let late = tasks.shutdown(Duration::from_millis(100)).await;
        assert_eq!(late, ["stubborn"]);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
