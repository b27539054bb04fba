#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Event lag from commit to consumer callback through the outbox relay, and
//! the relay's throughput ceiling, on a real broker (Tansu, started here) and
//! a real PostgreSQL database (`ANUMATE_BENCH_BACKEND=sqlite` for SQLite).
//!
//! `cargo bench -p anumate-events --bench relay_lag`
//! Environment: `RATE` events/s (1000), `SECS` (5), `CEILING_EVENTS` (20000),
//! `POLL_MS` (the relay's idle poll, default from `KafkaConfig`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anumate_events::relay::{KafkaConfig, Relay};
use anumate_events::testing::TestBroker;
use anumate_events::{EventContext, append};
use anumate_proto::events::v1::CapsulePushed;
use anumate_store::Store;
use anumate_store::testing::TestDb;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sea_orm::{ConnectionTrait, Statement};

const TOPIC: &str = "anumate.capsules";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn append_one(store: &Store, i: u64) -> String {
    let key = format!("agg-{}", i % 64);
    let tx = store.write("bench").await.unwrap();
    let id = append(
        &tx,
        &CapsulePushed {
            tenant_id: "bench".into(),
            name: key.clone(),
            version: i as i32,
            ..Default::default()
        },
        EventContext {
            subject: "capsules/bench",
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id.to_string()
}

async fn unsent(store: &Store) -> i64 {
    let db = store.owner_connection();
    db.query_one_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM outbox WHERE sent_at IS NULL",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "n")
    .unwrap()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn consumer(bootstrap: &str, partitions: i32) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(TOPIC, p, Offset::End).unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rate = env("RATE", 1000);
    let secs = env("SECS", 5);
    let ceiling_events = env("CEILING_EVENTS", 20_000);
    let broker = TestBroker::start();
    let db = if std::env::var("ANUMATE_BENCH_BACKEND").as_deref() == Ok("sqlite") {
        TestDb::sqlite()
    } else {
        TestDb::postgres().await
    };
    let store = Store::connect(&db.config).await.unwrap();
    store.migrate(anumate_events::MIGRATIONS).await.unwrap();
    let defaults = KafkaConfig::default();
    let cfg = KafkaConfig {
        brokers: broker.bootstrap(),
        poll_ms: env("POLL_MS", defaults.poll_ms),
        ..defaults
    };
    anumate_events::relay::ensure_topics(&cfg).await.unwrap();

    // --- lag at a fixed rate ------------------------------------------------
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let c = consumer(&broker.bootstrap(), cfg.partitions);
    let total = rate * secs;
    let seen = committed.clone();
    let recv = tokio::spawn(async move {
        let mut lags = Vec::with_capacity(total as usize);
        let deadline = Instant::now() + Duration::from_secs(secs + 30);
        while (lags.len() as u64) < total && Instant::now() < deadline {
            let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_secs(1), c.recv()).await else {
                continue;
            };
            let now = Instant::now();
            let id = msg.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == "ce_id")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            let _ = msg.payload();
            let Some(id) = id else { continue };
            // The commit may be recorded a moment after the event arrives.
            let mut at = None;
            for _ in 0..100 {
                at = seen.lock().unwrap().get(&id).copied();
                if at.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            if let Some(at) = at {
                lags.push(now.saturating_duration_since(at));
            }
        }
        tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
        lags
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let relay = Relay::new(store.clone(), cfg.clone()).unwrap().spawn();
    // Warm-up: the relay connected and its first event delivered (start-up
    // cost is not lag).
    append_one(&store, u64::MAX / 2).await;
    while unsent(&store).await > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Writers: 4 tasks, each paced to rate/4.
    let writers = 4u64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let committed = committed.clone();
        tasks.push(tokio::spawn(async move {
            let per = total / writers;
            let period = Duration::from_secs_f64(writers as f64 / rate as f64);
            let mut next = Instant::now();
            for i in 0..per {
                let id = append_one(&store, i * writers + w).await;
                committed.lock().unwrap().insert(id, Instant::now());
                next += period;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(d).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let write_secs = start.elapsed().as_secs_f64();
    let mut lags = recv.await.unwrap();
    relay.shutdown(Duration::from_secs(5)).await;
    lags.sort();
    println!(
        "lag commit -> consumer callback at {rate}/s target ({:.0}/s achieved, {} events, poll {} ms): \
         p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        total as f64 / write_secs,
        lags.len(),
        cfg.poll_ms,
        pct(&lags, 0.50),
        pct(&lags, 0.95),
        pct(&lags, 0.99),
        pct(&lags, 1.0),
    );

    // --- throughput ceiling -------------------------------------------------
    // A backlog written while no relay runs, then drained by one relay.
    let mut i = 1_000_000u64;
    let fill = Instant::now();
    let mut pending = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        let base = i;
        i += ceiling_events / 8;
        pending.push(tokio::spawn(async move {
            for j in 0..ceiling_events / 8 {
                append_one(&store, base + j).await;
            }
        }));
    }
    for p in pending {
        p.await.unwrap();
    }
    let backlog = unsent(&store).await;
    println!(
        "backlog of {backlog} written in {:.1} s",
        fill.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let relay = Relay::new(store.clone(), cfg.clone()).unwrap().spawn();
    while unsent(&store).await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    relay.shutdown(Duration::from_secs(5)).await;
    println!(
        "relay throughput ceiling: {backlog} events in {secs:.2} s = {:.0} events/s (batch {})",
        backlog as f64 / secs,
        cfg.batch_size
    );
    drop(broker);
}
