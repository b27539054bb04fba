#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Crash safety (issue 16): two orchestrator processes (`anumate dev`, every
//! service in each) on one PostgreSQL database share the runs. Replica A is
//! killed with SIGKILL while both have calls in flight; B takes A's runs
//! over once their leases (2 s in this test's configuration) have expired,
//! re-sends A's in-flight calls with the same idempotency keys, and finishes
//! every run. The mock connector's ledger shows each (run, step) key acted
//! once.

mod crash_support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anumate_proto::orchestrator::v1 as pb;
use crash_support::{
    Orch, assert_exactly_once, execute, get_run, mock_calls, orch, seed, wait_all_ended,
};

const LEASE_SECS: u64 = 2;

fn config() -> String {
    format!(
        "[orchestrator]\nlease_secs = {LEASE_SECS}\npoll_ms = 50\n\n\
         [connectors]\nin_flight_lease_secs = 1\n"
    )
}

/// Steps with a call in flight: (run, step, lease holder).
async fn in_flight(c: &mut Orch, run_ids: &[String]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for id in run_ids {
        let run = get_run(c, id).await;
        for s in &run.steps {
            if let Some(a) = s.attempts.last()
                && a.state() == pb::AttemptState::Running
            {
                out.push((id.clone(), s.step_id.clone(), a.lease_holder.clone()));
            }
        }
    }
    out
}

fn micros_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_runs_are_finished_by_the_other_after_the_lease() {
    let cluster = crash_support::Cluster::new(&config()).await;
    let a = cluster.start("a").await;
    let token = cluster.token();
    // 1.4 s calls: a kill lands mid-call. A run's three independent steps
    // call at once, so a run lasts about one call.
    let plan = seed(&a.url, &token, "1400ms").await;

    // A alone drives the first runs: its lease holder name.
    let mut ca = orch(&a.url, &token);
    let mut ids = Vec::new();
    for j in 0..10 {
        ids.push(execute(&mut ca, &plan, &format!("a{j}")).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let holder_a = loop {
        if let Some((_, _, h)) = in_flight(&mut ca, &ids).await.into_iter().next() {
            break h;
        }
        assert!(Instant::now() < deadline, "A never started a call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // B joins; more runs, through B and through A in turn (each replica
    // claims the runs executed through it first), so both have calls in
    // flight however long B took to start (under load, longer than A's
    // first calls).
    let b = cluster.start("b").await;
    let mut cb = orch(&b.url, &token);
    for j in 0..10 {
        ids.push(execute(&mut cb, &plan, &format!("b{j}")).await.unwrap());
        ids.push(
            execute(&mut ca, &plan, &format!("a-late{j}"))
                .await
                .unwrap(),
        );
    }

    // Kill A the moment both replicas have a call in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    let a_calls = loop {
        let calls = in_flight(&mut cb, &ids).await;
        let (of_a, of_b): (Vec<_>, Vec<_>) = calls.into_iter().partition(|c| c.2 == holder_a);
        if !of_a.is_empty() && !of_b.is_empty() {
            break of_a;
        }
        assert!(
            Instant::now() < deadline,
            "the two replicas never had calls in flight at once"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let killed_at = micros_now();
    let killed = Instant::now();
    a.kill9();
    drop(ca);

    let ended = wait_all_ended(&cluster, &mut cb, &ids, Duration::from_secs(60)).await;
    let all_done = killed.elapsed();
    let calls = mock_calls(&b.url, &token).await;
    let figures = assert_exactly_once(&ended, &calls);

    // Two holders at most (A's calls in flight at the kill show B, which
    // took them over; A may have finished none, a run's steps calling at
    // once); every call A had in flight was finished by B, which started it
    // again only after A's lease had run out.
    let holders: BTreeSet<&str> = ended
        .values()
        .flat_map(|r| r.steps.iter().flat_map(|s| s.attempts.iter()))
        .map(|a| a.lease_holder.as_str())
        .collect();
    assert!(holders.len() <= 2, "{holders:?}");
    let mut takeovers = Vec::new();
    for (run_id, step_id, _) in &a_calls {
        let run = &ended[run_id];
        let step = run.steps.iter().find(|s| &s.step_id == step_id).unwrap();
        let last = step.attempts.last().unwrap();
        if last.lease_holder == holder_a {
            // A recorded it between the look and the kill.
            continue;
        }
        let history = cb
            .list_run_history(pb::ListRunHistoryRequest {
                run_id: run_id.clone(),
                page_size: 500,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        let restarted = history
            .iter()
            .filter(|e| e.r#type == "attempt.started" && &e.step_id == step_id)
            .map(|e| anumate_proto::micros_from_timestamp_saturating(e.time.as_ref().unwrap()))
            .find(|t| *t > killed_at)
            .unwrap_or_else(|| panic!("B never re-sent {run_id}/{step_id}: {history:#?}"));
        takeovers.push(Duration::from_micros(
            u64::try_from(restarted - killed_at).unwrap(),
        ));
    }
    assert!(
        !takeovers.is_empty(),
        "no call of A was left in flight by the kill"
    );
    let first = *takeovers.iter().min().unwrap();
    // A's lease was renewed every LEASE_SECS / 3 while it lived: B may not
    // start A's calls again before the rest of it ran out.
    assert!(
        first >= Duration::from_millis(500),
        "B took A's run over {first:?} after the kill, before the lease ran out"
    );
    // The receipts of the runs A left in flight verify offline.
    let mut taken: Vec<String> = a_calls.iter().map(|c| c.0.clone()).collect();
    taken.sort();
    taken.dedup();
    let receipts = crash_support::verify_receipts(&cluster, &b.url, &token, &taken).await;
    eprintln!(
        "{receipts} receipts of A's {} in-flight runs verified offline",
        taken.len()
    );
    eprintln!(
        "A killed with {} calls in flight ({} left to B); B re-sent them {:?} after the kill \
         (lease {LEASE_SECS} s), all {} runs ended {all_done:.1?} after it; ledger: {figures:?}",
        a_calls.len(),
        takeovers.len(),
        takeovers,
        ended.len()
    );
    let log = cluster.log("b");
    assert!(!log.contains("panicked"), "B panicked:\n{log}");
}

/// Both replicas killed in turn, `kills` times: each life of a replica
/// starts runs through it (an `Execute` the kill cut off is sent again to
/// the other replica, with the same key: the same run), and is killed at a
/// random point while the other keeps working. Every run succeeds, one run
/// per key, each (run, step) key acted once.
async fn rolling_kills(kills: usize) {
    let cluster = crash_support::Cluster::new(&config()).await;
    let mut rng = crash_support::Rng::from_env();
    let mut nodes = [cluster.start("a").await, cluster.start("b").await];
    let token = cluster.token();
    let plan = seed(&nodes[0].url, &token, "20ms").await;
    let mut runs = std::collections::BTreeMap::new();
    let mut pending: Vec<String> = Vec::new();
    for life in 0..kills {
        let victim = life % 2;
        let other = 1 - victim;
        // Cut-off keys go to the survivor; new ones to the victim.
        let mut c = orch(&nodes[other].url, &token);
        for key in std::mem::take(&mut pending) {
            let id = execute(&mut c, &plan, &key)
                .await
                .unwrap_or_else(|| panic!("Execute {key} failed on a live replica"));
            runs.insert(key, id);
        }
        let keys: Vec<String> = (0..6).map(|j| format!("k{life}-{j}")).collect();
        let (url, bearer, plan2) = (nodes[victim].url.clone(), token.clone(), plan.clone());
        let submit = tokio::spawn(async move {
            let mut c = orch(&url, &bearer);
            let mut out = Vec::new();
            for key in keys {
                let id = execute(&mut c, &plan2, &key).await;
                out.push((key, id));
            }
            out
        });
        tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
        // Its replacement starts first (as in a rolling deploy), then it dies.
        let dead = std::mem::replace(&mut nodes[victim], cluster.start(&format!("r{life}")).await);
        dead.kill9();
        for (key, id) in submit.await.unwrap() {
            match id {
                Some(id) => {
                    runs.insert(key, id);
                }
                None => pending.push(key),
            }
        }
    }
    let mut c = orch(&nodes[0].url, &token);
    for key in std::mem::take(&mut pending) {
        let id = execute(&mut c, &plan, &key).await.unwrap();
        runs.insert(key, id);
    }
    let ids: Vec<String> = runs.values().cloned().collect();
    let ended = wait_all_ended(&cluster, &mut c, &ids, Duration::from_secs(90)).await;
    for (key, id) in &runs {
        assert_eq!(&ended[id].idempotency_key, key);
    }
    let calls = mock_calls(&nodes[0].url, &token).await;
    let figures = assert_exactly_once(&ended, &calls);
    eprintln!(
        "{kills} kills of two replicas in turn; all {} runs succeeded; ledger: {figures:?}",
        ended.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_killed_in_turn_ten_times() {
    rolling_kills(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 100 kills"]
async fn two_replicas_killed_in_turn_a_hundred_times() {
    rolling_kills(100).await;
}
