#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The consumer API against a real broker (`ANUMATE_TEST_KAFKA`, or a Tansu
//! of the test's own): a poison message is retried, dead-lettered with its
//! reason and the consumer keeps going; a CloudEvent id seen twice reaches the
//! handler once; a message that is no CloudEvent is dead-lettered at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anumate_events::consumer::{self, ConsumerConfig, DLQ_REASON_HEADER};
use anumate_store::Store;
use anumate_store::testing::TestDb;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

fn broker() -> (Option<anumate_events::testing::TestBroker>, String) {
    match anumate_events::testing::shared_broker() {
        Some(b) => (None, b),
        None => {
            let b = anumate_events::testing::TestBroker::start();
            let addr = b.bootstrap();
            (Some(b), addr)
        }
    }
}

async fn store() -> (TestDb, Store) {
    let db = TestDb::sqlite();
    let store = Store::connect(&db.config).await.expect("connect");
    store.migrate(consumer::MIGRATIONS).await.expect("migrate");
    (db, store)
}

async fn produce(bootstrap: &str, topic: &str, ce_id: Option<&str>, data: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "ce_type",
        value: Some("dev.anumate.test.thing.v1"),
    });
    if let Some(id) = ce_id {
        headers = headers
            .insert(Header {
                key: "ce_id",
                value: Some(id),
            })
            .insert(Header {
                key: "ce_tenantid",
                value: Some("t1"),
            });
    }
    producer
        .send(
            FutureRecord::to(topic)
                .key("k")
                .payload(data)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .expect("produce");
}

fn config(bootstrap: &str, topic: &str) -> ConsumerConfig {
    let mut cfg = ConsumerConfig::new(bootstrap, &format!("g-{}", uuid::Uuid::now_v7()), &[topic]);
    cfg.max_attempts = 3;
    cfg.initial_backoff = Duration::from_millis(20);
    cfg.max_backoff = Duration::from_millis(50);
    cfg
}

/// Messages on the DLQ whose `anumate_dlq_topic` is `topic`: (ce_id, headers).
async fn dead_letters(bootstrap: &str, topic: &str, want: usize) -> Vec<Vec<(String, String)>> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("dlq-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("consumer");
    c.subscribe(&[consumer::DLQ_TOPIC]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while out.len() < want {
        let m = tokio::time::timeout_at(deadline, c.recv())
            .await
            .expect("dead letters within 30 s")
            .expect("recv");
        let headers: Vec<(String, String)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| {
                        (
                            x.key.to_string(),
                            String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if headers
            .iter()
            .any(|(k, v)| k == "anumate_dlq_topic" && v == topic)
        {
            out.push(headers);
        }
    }
    tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
    out
}

fn get<'a>(headers: &'a [(String, String)], key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_the_dlq_with_its_reason_and_the_consumer_keeps_going() {
    let (_broker, bootstrap) = broker();
    let (_db, store) = store().await;
    let topic = format!("test.consumer.{}", uuid::Uuid::now_v7().simple());
    produce(&bootstrap, &topic, Some("ok-1"), b"fine").await;
    produce(&bootstrap, &topic, Some("poison"), b"bad").await;
    produce(&bootstrap, &topic, None, b"not a cloudevent").await;
    produce(&bootstrap, &topic, Some("ok-2"), b"fine").await;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = consumer::spawn(store.clone(), config(&bootstrap, &topic), move |e| {
        let tx = tx.clone();
        async move {
            if e.data == b"bad" {
                return Err(format!("cannot process {}: bad data", e.id));
            }
            let _ = tx.send(e.id.clone());
            Ok(())
        }
    })
    .expect("consumer");
    let mut ok = Vec::new();
    while ok.len() < 2 {
        ok.push(
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("handled within 30 s")
                .expect("open"),
        );
    }
    // Kept going past the poison message, in order.
    assert_eq!(ok, vec!["ok-1", "ok-2"]);
    let stats = handle.stats();
    // Counted once its outcome is recorded, just after the handler returns.
    for _ in 0..100 {
        if stats.handled.load(Ordering::Relaxed) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.handled.load(Ordering::Relaxed), 2);
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 2);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 3);

    let dead = dead_letters(&bootstrap, &topic, 2).await;
    let poison = dead
        .iter()
        .find(|h| get(h, "ce_id") == Some("poison"))
        .expect("poison dead-lettered");
    assert_eq!(
        get(poison, DLQ_REASON_HEADER),
        Some("cannot process poison: bad data")
    );
    assert_eq!(get(poison, "anumate_dlq_attempts"), Some("3"));
    assert_eq!(get(poison, "anumate_dlq_offset"), Some("1"));
    // One key, one partition: the poison message was its second message.
    assert!(
        get(poison, "anumate_dlq_partition")
            .unwrap()
            .parse::<i32>()
            .is_ok()
    );
    assert_eq!(
        get(poison, "ce_tenantid"),
        Some("t1"),
        "original headers kept"
    );
    let stray = dead
        .iter()
        .find(|h| get(h, "ce_id").is_none())
        .expect("non-CloudEvent dead-lettered");
    assert_eq!(
        get(stray, DLQ_REASON_HEADER),
        Some("not a CloudEvent: no ce_id header")
    );

    // The outcome is remembered: a redelivered poison message is not retried.
    handle.stop().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut cfg = config(&bootstrap, &topic);
    cfg.group_id = format!("{}-again", cfg.group_id);
    let tx2 = tx.clone();
    let again = consumer::spawn(store.clone(), cfg, move |e| {
        let tx = tx2.clone();
        async move {
            let _ = tx.send(e.id.clone());
            Ok::<(), String>(())
        }
    })
    .expect("consumer");
    // A fresh group is a fresh dedupe scope: everything with an id is handled.
    let mut ids = Vec::new();
    while ids.len() < 3 {
        ids.push(
            tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .expect("handled")
                .expect("open"),
        );
    }
    assert_eq!(ids, vec!["ok-1", "poison", "ok-2"]);
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_cloudevent_id_reaches_the_handler_once() {
    let (_broker, bootstrap) = broker();
    let (_db, store) = store().await;
    let topic = format!("test.dedupe.{}", uuid::Uuid::now_v7().simple());
    for id in ["a", "a", "b", "a", "b", "c"] {
        produce(&bootstrap, &topic, Some(id), id.as_bytes()).await;
    }
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = calls.clone();
    let cfg = config(&bootstrap, &topic);
    let group = cfg.group_id.clone();
    let handle = consumer::spawn(store.clone(), cfg.clone(), move |e| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(e.id.clone());
            Ok::<(), String>(())
        }
    })
    .expect("consumer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while handle.stats().duplicates.load(Ordering::Relaxed) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not consumed in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.stop().await;
    assert_eq!(*calls.lock().unwrap(), vec!["a", "b", "c"]);

    // Dedupe is in the database: a consumer of the same group started afresh
    // and handed the same ids again (a redelivery) skips them.
    produce(&bootstrap, &topic, Some("b"), b"b").await;
    produce(&bootstrap, &topic, Some("d"), b"d").await;
    let seen = calls.clone();
    let mut cfg2 = cfg;
    cfg2.group_id = group;
    let handle = consumer::spawn(store.clone(), cfg2, move |e| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(e.id.clone());
            Ok::<(), String>(())
        }
    })
    .expect("consumer");
    while calls.lock().unwrap().len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline + Duration::from_secs(30),
            "d not consumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.stop().await;
    assert_eq!(*calls.lock().unwrap(), vec!["a", "b", "c", "d"]);
}
