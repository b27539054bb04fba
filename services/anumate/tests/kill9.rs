#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Crash safety (issue 16): the serving process (`anumate dev` on
//! PostgreSQL, and on SQLite, every service in one process) is killed with SIGKILL at
//! random points while runs execute, and restarted, again and again. New
//! runs are started in every life of the process (an `Execute` the kill cut
//! off is sent again with the same idempotency key after the restart), so
//! kills land in `Execute`, before a step, mid-call at the hub and mid-way
//! through the takeover of the previous life's runs. Afterwards every run
//! has succeeded, there is one run per idempotency key, and the mock
//! connector's ledger holds exactly one effect per (run, step) key: it may
//! have been delivered more than once (re-sent after a crash, with the same
//! key), it acted once, and its output is the step's.
//!
//! The test configuration shortens the orchestrator's run lease and the
//! hub's in-flight key lease to one second each, so a restarted process
//! takes its dead predecessor's runs and keys over quickly. With a hub
//! lease longer than the hub's wait, a re-sent call finds its key still held
//! by the dead process and is answered `CALL_IN_FLIGHT`: see
//! `kill9_while_the_hub_holds_the_dead_calls_keys`.
//!
//! The kill points come from a seed the test prints; `ANUMATE_CRASH_SEED`
//! replays one.

mod crash_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anumate_proto::orchestrator::v1 as pb;
use anumate_store::Backend;
use crash_support::{
    Cluster, Rng, assert_exactly_once, execute, mock_calls, orch, seed, verify_receipts,
    wait_all_ended,
};

/// The orchestrator's run lease and the hub's in-flight key lease: 1 s.
const CONFIG: &str = "[orchestrator]\nlease_secs = 1\npoll_ms = 50\n\n\
                      [connectors]\nin_flight_lease_secs = 1\n";

/// Kills with SIGKILL `kills` times, starting `runs_per_life` new runs in
/// every life of the process (more when they all ended before the kill).
/// The mock tools answer after `latency`. Returns the process's log,
/// across its lives.
async fn kill_and_restart(
    backend: Backend,
    config: &str,
    kills: usize,
    runs_per_life: usize,
    latency: &str,
) -> String {
    let cluster = Cluster::on(backend, config).await;
    let mut rng = Rng::from_env();
    let began = Instant::now();
    let mut node = cluster.start("dev").await;
    let token = cluster.token();
    let plan = seed(&node.url, &token, latency).await;

    // Idempotency key → run id, once an `Execute` answered.
    let mut runs: BTreeMap<String, String> = BTreeMap::new();
    // Keys whose `Execute` did not answer (yet).
    let mut pending: Vec<String> = Vec::new();
    let mut lost_executes = 0;
    // Kills that found runs under way (pending or running) just before.
    let mut kills_mid_run = 0;
    for life in 0..kills {
        let mut submits = Vec::new();
        let mut batches = 0;
        // Up to 1.2 s: before about 0.7 s this life's new runs are under
        // way; later the previous life's runs are being taken over (their
        // 1 s lease ran from before the kill). A life whose runs all ended
        // before its kill point gets more runs and a later kill point.
        let mut delay = Duration::from_millis(rng.below(1200));
        let in_flight = loop {
            pending.extend((0..runs_per_life).map(|j| format!("k{life}-{batches}-{j}")));
            batches += 1;
            let batch = std::mem::take(&mut pending);
            let (url, bearer, plan) = (node.url.clone(), token.clone(), plan.clone());
            submits.push(tokio::spawn(async move {
                let mut c = orch(&url, &bearer);
                let mut out = Vec::new();
                for key in batch {
                    let id = execute(&mut c, &plan, &key).await;
                    out.push((key, id));
                }
                out
            }));
            tokio::time::sleep(delay).await;
            let in_flight = unfinished(&node.url, &token).await;
            if in_flight > 0 || batches == 3 {
                break in_flight;
            }
            delay = Duration::from_millis(rng.below(400));
        };
        node.kill9();
        if in_flight > 0 {
            kills_mid_run += 1;
        }
        for submit in submits {
            for (key, id) in submit.await.unwrap() {
                match id {
                    Some(id) => {
                        runs.insert(key, id);
                    }
                    None => {
                        lost_executes += 1;
                        pending.push(key);
                    }
                }
            }
        }
        node = cluster.start("dev").await;
    }
    let killed_at = began.elapsed();

    // The last life: the cut-off `Execute`s again, then everything ends.
    let mut c = orch(&node.url, &token);
    for key in std::mem::take(&mut pending) {
        let id = execute(&mut c, &plan, &key)
            .await
            .unwrap_or_else(|| panic!("Execute {key} failed on a live server"));
        runs.insert(key, id);
    }
    let ids: Vec<String> = runs.values().cloned().collect();
    let ended = wait_all_ended(&cluster, &mut c, &ids, Duration::from_secs(120)).await;
    let finished_at = began.elapsed();

    // One run per key: a retried `Execute` returned the run it had created.
    let mut listed = 0;
    let mut page_token = String::new();
    loop {
        let page = c
            .list_runs(pb::ListRunsRequest {
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        listed += page.runs.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(listed, runs.len(), "runs beyond one per idempotency key");
    for (key, id) in &runs {
        assert_eq!(&ended[id].idempotency_key, key);
    }

    let calls = mock_calls(&node.url, &token).await;
    let figures = assert_exactly_once(&ended, &calls);

    // The receipts of the runs whose calls were re-sent (and a few
    // others) verify offline.
    let mut sample: Vec<String> = calls
        .iter()
        .filter(|c| c.deliveries > 1)
        .map(|c| c.run_id.clone())
        .collect();
    sample.extend(ids.iter().step_by(ids.len() / 4 + 1).cloned());
    sample.sort();
    sample.dedup();
    sample.truncate(12);
    let receipts = verify_receipts(&cluster, &node.url, &token, &sample).await;
    eprintln!(
        "{kills} kills in {killed_at:.1?}, all {} runs ended after {finished_at:.1?}; \
         {kills_mid_run} kills with runs under way; {lost_executes} Execute calls cut off \
         and re-sent; ledger: {figures:?}; {receipts} receipts of {} runs verified offline",
        runs.len(),
        sample.len()
    );
    assert!(
        kills_mid_run * 4 >= kills * 3,
        "only {kills_mid_run} of {kills} kills found runs under way"
    );
    let log = cluster.log("dev");
    assert!(!log.contains("panicked"), "a process panicked:\n{log}");
    log
}

/// How many runs are pending or running (0 when the server does not answer).
async fn unfinished(url: &str, token: &anumate_auth::BearerToken) -> usize {
    let mut c = orch(url, token);
    let mut n = 0;
    for state in [pb::RunState::Pending, pb::RunState::Running] {
        if let Ok(page) = c
            .list_runs(pb::ListRunsRequest {
                page_size: 500,
                state: state as i32,
                ..Default::default()
            })
            .await
        {
            n += page.into_inner().runs.len();
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_twenty_times_every_run_ends_and_acts_once() {
    kill_and_restart(Backend::Postgres, CONFIG, 20, 6, "20ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 200 kills (about 3 minutes)"]
async fn kill9_two_hundred_times_every_run_ends_and_acts_once() {
    kill_and_restart(Backend::Postgres, CONFIG, 200, 6, "20ms").await;
}

/// `anumate dev` as most people run it: on its SQLite file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_on_sqlite_twenty_times_every_run_ends_and_acts_once() {
    kill_and_restart(Backend::Sqlite, CONFIG, 20, 6, "20ms").await;
}

/// A kill between the hub's claim of a key and its record leaves the key
/// held by the dead process. Here the hub keeps such a key for 5 s (its
/// default is 300 s) and waits 0.5 s for a held key (default 10 s: longer
/// than a life of the process here, so the answer would rarely arrive
/// before the next kill), so the restarted orchestrator's re-sent call is
/// answered `CALL_IN_FLIGHT` (with the hub's `lease_expire_time`), which is
/// what the hub answers with its defaults too, only later. The step then waits,
/// durably (`WAITING_RETRY` until just after that time, across further
/// kills), and is re-sent with the same key and a fresh token without
/// spending an attempt: every run still succeeds (a step here is allowed a
/// single attempt) and every key acted once. Before the fix the run failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_the_hub_holds_the_dead_calls_keys() {
    let log = kill_and_restart(
        Backend::Postgres,
        "[orchestrator]\nlease_secs = 1\npoll_ms = 50\n\n[connectors]\nin_flight_lease_secs = 5\nin_flight_wait_ms = 500\n",
        20,
        6,
        // Calls long enough for most kills to land mid-call.
        "150ms",
    )
    .await;
    let waits = log.matches("CALL_IN_FLIGHT; waiting").count();
    eprintln!("{waits} re-sent calls were answered CALL_IN_FLIGHT and waited");
    assert!(
        waits > 0,
        "no kill left a key held in the hub: the path under test was not taken"
    );
}
