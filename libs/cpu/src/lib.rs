//! CPU-heavy request work — parsing and canonicalizing documents, compiling
//! policies and plans, diffing versions — run off the async workers.
//!
//! A handler that computes for milliseconds on a runtime worker stalls every
//! other request scheduled on that worker; a few large requests stall the whole
//! server. [`run`] moves such work to tokio's blocking pool, and a process-wide
//! semaphore lets at most one job per core run at once, so a burst of large
//! requests (from one tenant or many) queues in arrival order instead of taking
//! every blocking thread or starving the runtime. Work is bounded per job by the
//! callers' own limits (document size, fuel, deadlines).
#![forbid(unsafe_code)]

use std::sync::OnceLock;

use anumate_errors::{Error, Result};
use tokio::sync::Semaphore;

/// Jobs allowed to run at once: the number of cores (at least two).
pub fn max_parallel_jobs() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .max(2)
}

fn permits() -> &'static Semaphore {
    static PERMITS: OnceLock<Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| Semaphore::new(max_parallel_jobs()))
}

/// Runs `job` on the blocking pool once a slot is free, and returns its result.
///
/// Dropping the returned future (a cancelled request) before the job starts
/// gives up its place; a job that has started runs to completion and keeps its
/// slot until then, so the bound holds. A panicking job is an `INTERNAL` error.
pub async fn run<T, F>(job: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let permit = permits()
        .acquire()
        .await
        .map_err(|e| Error::internal(format!("cpu job slots closed: {e}")))?;
    // The permit moves into the job: it is released when the job ends, not
    // when a cancelled caller stops waiting for it.
    let handle = tokio::task::spawn_blocking(move || {
        let _slot = permit;
        job()
    });
    match handle.await {
        Ok(result) => result,
        Err(e) => Err(Error::internal(format!("cpu job failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn jobs_run_off_the_runtime_and_at_most_one_per_core() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let total = max_parallel_jobs() * 3;
        let mut jobs = Vec::new();
        for _ in 0..total {
            let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
            jobs.push(tokio::spawn(run(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
                Ok(now)
            })));
        }
        // The single runtime thread stays free while the jobs sleep: a timer
        // fires long before the (at least 300 ms of) jobs are through. Had
        // they run on the runtime thread, none could fire before all ended.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            done.load(Ordering::SeqCst) < total,
            "the runtime thread waited for the jobs"
        );
        for j in jobs {
            j.await.unwrap().unwrap();
        }
        // Never more than one per core at once (how many overlapped in fact
        // depends on the machine's scheduling).
        let peak = peak.load(Ordering::SeqCst);
        assert!((1..=max_parallel_jobs()).contains(&peak), "peak {peak}");
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_internal_error() {
        let err = run::<(), _>(|| panic!("boom")).await.unwrap_err();
        assert_eq!(err.code, anumate_errors::ErrorCode::Internal);
        // The slot came back.
        assert_eq!(run(|| Ok(7)).await.unwrap(), 7);
    }
}
