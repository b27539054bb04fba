#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The outbox relay against a real Kafka-protocol broker (Tansu, one per test
//! on a free port) and real databases: what a Kafka consumer of Anumate sees.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anumate_crypto::{KeyPair, KeyRing};
use anumate_events::relay::{KafkaConfig, Relay};
use anumate_events::testing::TestBroker;
use anumate_events::{EventContext, append};
use anumate_proto::events::v1::{CapsulePublished, CapsulePushed};
use anumate_registry::{Actor, Registry, RegistryConfig};
use anumate_store::testing::TestDb;
use anumate_store::{Backend, Store};
use prost::Message as _;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::{Headers as _, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const EXAMPLE: &str = include_str!("../../../examples/refund.capsule.yaml");

/// One message as a consumer sees it.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    headers: HashMap<String, String>,
    value: Vec<u8>,
}

impl Received {
    fn h(&self, k: &str) -> &str {
        self.headers.get(k).map(String::as_str).unwrap_or("")
    }
}

/// The topic every event of these tests goes to.
const TOPIC: &str = "anumate.capsules";

async fn test_db(backend: Backend) -> TestDb {
    match backend {
        Backend::Postgres => TestDb::postgres().await,
        Backend::Sqlite => TestDb::sqlite(),
    }
}

async fn store(db: &TestDb) -> Store {
    let store = Store::connect(&db.config).await.unwrap();
    store
        .migrate(&anumate_registry::migrations())
        .await
        .unwrap();
    store
}

fn kafka(bootstrap: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: bootstrap.into(),
        partitions: 3,
        poll_ms: 10,
        message_timeout_ms: 2_000,
        max_backoff_ms: 500,
        ..KafkaConfig::default()
    }
}

/// Reads [`TOPIC`] from the beginning until `done` says so or `timeout` passes.
async fn consume(
    bootstrap: &str,
    timeout: Duration,
    done: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let topic = TOPIC;
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("topic.metadata.refresh.interval.ms", "500")
        .create()
        .unwrap();
    // Assigned, not subscribed: no group rebalance to wait for.
    let mut tpl = TopicPartitionList::new();
    let deadline = Instant::now() + timeout;
    while tpl.count() == 0 {
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            for t in md.topics() {
                for p in t.partitions() {
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                        .unwrap();
                }
            }
        }
        if tpl.count() == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while !done(&out) && Instant::now() < deadline {
        let Ok(msg) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        else {
            continue;
        };
        let Ok(msg) = msg else { continue };
        let mut headers = HashMap::new();
        if let Some(hs) = msg.headers() {
            for h in hs.iter() {
                headers.insert(
                    h.key.to_string(),
                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        out.push(Received {
            key: String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned(),
            headers,
            value: msg.payload().unwrap_or_default().to_vec(),
        });
    }
    // The consumer's destructor blocks: not on an async worker.
    tokio::task::spawn_blocking(move || drop(consumer))
        .await
        .unwrap();
    out
}

/// Column `v` of the one row `sql` returns, read as the owner (all tenants).
async fn owner_value<T: sea_orm::TryGetable>(store: &Store, sql: &str) -> T {
    use sea_orm::{ConnectionTrait, Statement};
    let db = store.owner_connection();
    let row = db
        .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "v").unwrap()
}

async fn unsent(store: &Store) -> i64 {
    owner_value(
        store,
        "SELECT COUNT(*) AS v FROM outbox WHERE sent_at IS NULL",
    )
    .await
}

async fn wait_all_sent(store: &Store, timeout: Duration) {
    wait_unsent_at_most(store, 0, timeout).await;
}

/// Waits up to `timeout` until at most `left` events are unsent.
async fn wait_unsent_at_most(store: &Store, left: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = unsent(store).await;
        if n <= left {
            return;
        }
        assert!(Instant::now() < deadline, "{n} events still unsent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appends `n` state changes spread over `keys` aggregates of `tenant`; the
/// version field counts per key, so order can be checked downstream.
async fn changes(store: &Store, tenant: &str, keys: usize, n: usize, start: usize) {
    for i in start..start + n {
        let key = format!("agg-{}", i % keys);
        append_pushed(store, tenant, &key, (i / keys) as i32, 0).await;
    }
}

/// Appends one `CapsulePushed` of `key` at `version` in its own transaction,
/// padded with `pad` bytes.
async fn append_pushed(store: &Store, tenant: &str, key: &str, version: i32, pad: usize) {
    let tx = store.write(tenant).await.unwrap();
    append(
        &tx,
        &CapsulePushed {
            tenant_id: tenant.into(),
            name: key.into(),
            version,
            content_hash: "x".repeat(pad),
            ..Default::default()
        },
        EventContext {
            subject: &format!("capsules/{key}"),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// `done` for [`consume`]: `n` distinct events (by `ce_id`) arrived.
fn distinct_at_least(n: usize) -> impl Fn(&[Received]) -> bool {
    move |m| m.iter().map(|r| r.h("ce_id")).collect::<HashSet<_>>().len() >= n
}

/// Dedupes by `ce_id` (first occurrence wins) and checks that every key's
/// versions arrive in increasing order; returns the distinct events.
fn dedupe_and_check_order(msgs: &[Received]) -> Vec<Received> {
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for m in msgs {
        let id = m.h("ce_id").to_string();
        if let Some(first) = seen.get(&id) {
            // A redelivery is the very same event.
            assert_eq!(first, &m.value, "duplicate ce_id {id} with other data");
            continue;
        }
        seen.insert(id, m.value.clone());
        out.push(m.clone());
    }
    let mut last: HashMap<(String, String), i32> = HashMap::new();
    for m in &out {
        let ev = CapsulePushed::decode(m.value.as_slice()).unwrap();
        assert_eq!(
            m.key,
            format!("{}/{}", ev.tenant_id, ev.name),
            "key is tenant/aggregate"
        );
        let k = (ev.tenant_id.clone(), m.key.clone());
        if let Some(prev) = last.get(&k) {
            assert!(
                ev.version > *prev,
                "{k:?}: version {} after {prev}",
                ev.version
            );
        }
        last.insert(k, ev.version);
    }
    out
}

async fn capsule_published_arrives(backend: Backend) {
    let broker = TestBroker::start();
    let db = test_db(backend).await;
    let store = store(&db).await;
    let registry = Registry::new(
        store.clone(),
        Arc::new(KeyRing::new(KeyPair::generate().unwrap())),
        &RegistryConfig::default(),
    );
    let actor = Actor {
        tenant: "tenant-e2e".into(),
        subject: "alice".into(),
    };
    registry
        .push(&actor, EXAMPLE, "refund.capsule.yaml", "", true)
        .await
        .unwrap();
    // The same capsule (same name) in another tenant: its own key.
    let other = Actor {
        tenant: "tenant-other".into(),
        subject: "bob".into(),
    };
    registry
        .push(&other, EXAMPLE, "refund.capsule.yaml", "", true)
        .await
        .unwrap();
    let relay = Relay::new(store.clone(), kafka(&broker.bootstrap()))
        .unwrap()
        .spawn();
    let published = |r: &&Received| r.h("ce_type") == "dev.anumate.capsule.published.v1";
    let msgs = consume(&broker.bootstrap(), Duration::from_secs(20), |m| {
        m.iter().filter(published).count() >= 2
    })
    .await;
    relay.shutdown(Duration::from_secs(5)).await;
    let m = msgs
        .iter()
        .filter(published)
        .find(|r| r.h("ce_tenantid") == "tenant-e2e")
        .expect("capsule.published arrives");
    let theirs = msgs
        .iter()
        .filter(published)
        .find(|r| r.h("ce_tenantid") == "tenant-other")
        .expect("the other tenant's capsule.published arrives");
    assert_eq!(m.h("ce_specversion"), "1.0");
    uuid::Uuid::parse_str(m.h("ce_id")).expect("ce_id is the outbox event id");
    assert_eq!(m.h("ce_source"), "/anumate/capsules");
    assert_eq!(m.h("content-type"), "application/protobuf");
    assert_eq!(m.h("ce_tenantid"), "tenant-e2e");
    chrono::DateTime::parse_from_rfc3339(m.h("ce_time")).expect("ce_time is RFC 3339");
    let ev = CapsulePublished::decode(m.value.as_slice()).expect("value is the proto message");
    assert_eq!(ev.tenant_id, "tenant-e2e");
    assert_eq!(
        m.key,
        "tenant-e2e/".to_string() + &ev.name,
        "key = tenant/aggregate"
    );
    assert_eq!(
        m.h("ce_subject"),
        format!("capsules/{}/versions/{}", ev.name, ev.version)
    );
    assert!(!ev.content_hash.is_empty());
    // Two tenants' same-named capsules never share a key (nor a compacted history).
    let their_ev = CapsulePublished::decode(theirs.value.as_slice()).expect("proto");
    assert_eq!(their_ev.name, ev.name);
    assert_eq!(theirs.key, format!("tenant-other/{}", ev.name));
    assert_ne!(theirs.key, m.key);
    // The pushed event came first, on the same key.
    let first = msgs
        .iter()
        .find(|r| r.key == m.key)
        .expect("first of the key");
    assert_eq!(first.h("ce_type"), "dev.anumate.capsule.pushed.v1");
    wait_all_sent(&store, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_capsule_arrives_as_cloudevent_postgres() {
    capsule_published_arrives(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_capsule_arrives_as_cloudevent_sqlite() {
    capsule_published_arrives(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_content_type_per_topic() {
    let broker = TestBroker::start();
    let db = TestDb::sqlite();
    let store = store(&db).await;
    changes(&store, "t1", 1, 1, 0).await;
    let mut cfg = kafka(&broker.bootstrap());
    cfg.json_topics = vec![TOPIC.into()];
    let mut relay = Relay::new(store.clone(), cfg).unwrap();
    anumate_events::relay::ensure_topics(&kafka(&broker.bootstrap()))
        .await
        .unwrap();
    assert_eq!(relay.pass().await.unwrap().sent, 1);
    let msgs = consume(&broker.bootstrap(), Duration::from_secs(15), |m| {
        !m.is_empty()
    })
    .await;
    assert_eq!(msgs[0].h("content-type"), "application/json");
    let v: serde_json::Value = serde_json::from_slice(&msgs[0].value).unwrap();
    assert_eq!(v["name"], "agg-0");
    assert_eq!(v["tenantId"], "t1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_nothing_and_keeps_order() {
    let mut broker = TestBroker::start();
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    let relay = Relay::new(store.clone(), kafka(&broker.bootstrap()))
        .unwrap()
        .spawn();
    // Up and relaying first.
    changes(&store, "t1", 10, 10, 0).await;
    wait_all_sent(&store, Duration::from_secs(15)).await;

    broker.stop();
    changes(&store, "t1", 10, 250, 10).await;
    changes(&store, "t2", 10, 250, 0).await;
    // The relay fails against the dead broker and keeps the rows.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(unsent(&store).await, 500, "events wait in the outbox");
    // ... and says so: the backlog (looked at about once a second, failing
    // or not) and how long the oldest row has waited.
    let stats = relay.stats();
    let until = |want: i64| {
        let stats = stats.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while stats.backlog.load(Ordering::Relaxed) != want {
                assert!(
                    Instant::now() < deadline,
                    "backlog {} never became {want}",
                    stats.backlog.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until(500).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let lag = stats.lag_seconds(anumate_store::now_micros());
    assert!(lag > 1.0, "the oldest unsent row waited {lag} s");

    broker.restart();
    wait_all_sent(&store, Duration::from_secs(30)).await;
    until(0).await;
    assert_eq!(stats.lag_seconds(anumate_store::now_micros()), 0.0);
    relay.shutdown(Duration::from_secs(5)).await;
    // The memory broker lost the first 10: the 500 are all it holds.
    let msgs = consume(
        &broker.bootstrap(),
        Duration::from_secs(30),
        distinct_at_least(500),
    )
    .await;
    let distinct = dedupe_and_check_order(&msgs);
    assert_eq!(distinct.len(), 500, "all 500 changes arrive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_crash_before_mark_sent_only_repeats_the_same_ids() {
    let broker = TestBroker::start();
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    changes(&store, "t1", 4, 20, 0).await;
    let cfg = kafka(&broker.bootstrap());
    anumate_events::relay::ensure_topics(&cfg).await.unwrap();

    let mut crashing = Relay::new(store.clone(), cfg.clone()).unwrap();
    let report = crashing.pass_then_crash().await.unwrap();
    assert_eq!(report.fetched, 20);
    drop(crashing);
    assert_eq!(unsent(&store).await, 20, "nothing was marked sent");

    let mut restarted = Relay::new(store.clone(), cfg).unwrap();
    assert_eq!(restarted.pass().await.unwrap().sent, 20);
    assert_eq!(unsent(&store).await, 0);

    let msgs = consume(&broker.bootstrap(), Duration::from_secs(15), |m| {
        m.len() >= 40
    })
    .await;
    assert_eq!(msgs.len(), 40, "every event published twice");
    let distinct = dedupe_and_check_order(&msgs);
    assert_eq!(distinct.len(), 20, "dedupe by ce_id leaves each event once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_database_skip_nothing() {
    let broker = TestBroker::start();
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    let mut cfg = kafka(&broker.bootstrap());
    cfg.batch_size = 25;
    anumate_events::relay::ensure_topics(&cfg).await.unwrap();
    let a = Relay::new(store.clone(), cfg.clone()).unwrap().spawn();
    let b = Relay::new(store.clone(), cfg).unwrap().spawn();
    let (s1, s2) = (store.clone(), store.clone());
    let w1 = tokio::spawn(async move { changes(&s1, "t1", 5, 150, 0).await });
    let w2 = tokio::spawn(async move { changes(&s2, "t2", 5, 150, 0).await });
    w1.await.unwrap();
    w2.await.unwrap();
    wait_all_sent(&store, Duration::from_secs(30)).await;
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
    let msgs = consume(
        &broker.bootstrap(),
        Duration::from_secs(30),
        distinct_at_least(300),
    )
    .await;
    let distinct = dedupe_and_check_order(&msgs);
    assert_eq!(distinct.len(), 300, "none skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_of_the_writing_span_reaches_the_header() {
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing::Instrument as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = TestBroker::start();
    let db = TestDb::sqlite();
    let store = store(&db).await;
    let span = tracing::info_span!("push");
    let trace_id = format!("{:032x}", span.context().span().span_context().trace_id());
    changes(&store, "t1", 1, 1, 0).instrument(span).await;

    let cfg = kafka(&broker.bootstrap());
    anumate_events::relay::ensure_topics(&cfg).await.unwrap();
    let mut relay = Relay::new(store.clone(), cfg).unwrap();
    assert_eq!(relay.pass().await.unwrap().sent, 1);
    let msgs = consume(&broker.bootstrap(), Duration::from_secs(15), |m| {
        !m.is_empty()
    })
    .await;
    let tp = msgs[0].h("ce_traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "W3C traceparent: {tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], trace_id, "the writing span's trace");
}

#[tokio::test]
async fn relay_role_reads_every_tenants_outbox_and_nothing_else() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    changes(&store, "t1", 1, 1, 0).await;
    changes(&store, "t2", 1, 1, 0).await;
    // The serving role sees its own tenant's rows only.
    let tx = store.read("t1").await.unwrap();
    assert_eq!(
        anumate_events::read_after(&tx, 0, 10).await.unwrap().len(),
        1
    );
    let n = tx
        .query_one("SELECT COUNT(*) AS n FROM outbox", vec![])
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(n, 1, "RLS still hides other tenants from the serving role");
    drop(tx);
    let as_relay = |sql: &'static str| {
        let store = store.clone();
        async move {
            let tx = store.owner_connection().begin().await.unwrap();
            tx.execute_unprepared("SELECT set_config('role', 'anumate_relay', true)")
                .await
                .unwrap();
            tx.query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
                .await
        }
    };
    assert_eq!(as_relay("SELECT seq FROM outbox").await.unwrap().len(), 2);
    let denied = as_relay("SELECT * FROM capsules").await.unwrap_err();
    assert!(denied.to_string().contains("permission denied"), "{denied}");
}

/// Appends one `CapsulePushed` of `key` at `version`, padded with `pad` bytes
/// (to make it larger than the producer takes); returns its outbox seq.
async fn push(store: &Store, tenant: &str, key: &str, version: i32, pad: usize) -> i64 {
    append_pushed(store, tenant, key, version, pad).await;
    let tx = store.read(tenant).await.unwrap();
    let rows = anumate_events::read_after(&tx, 0, 10_000).await.unwrap();
    rows.last().unwrap().seq
}

/// The versions of `key` among [`versions`], in arrival order.
fn versions_of(msgs: &[Received], key: &str) -> Vec<i32> {
    versions(msgs)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

/// `(key, version)` of each distinct event received, in arrival order.
fn versions(msgs: &[Received]) -> Vec<(String, i32)> {
    dedupe_and_check_order(msgs)
        .iter()
        .map(|m| {
            let ev = CapsulePushed::decode(m.value.as_slice()).unwrap();
            (m.key.clone(), ev.version)
        })
        .collect()
}

async fn failing_row_holds_back_its_key(backend: Backend) {
    let broker = TestBroker::start();
    let db = test_db(backend).await;
    let store = store(&db).await;
    let mut cfg = kafka(&broker.bootstrap());
    cfg.max_message_bytes = 10_000;
    anumate_events::relay::ensure_topics(&cfg).await.unwrap();
    // "big": v0 larger than the producer takes, then v1; "small": v0..v2.
    let big0 = push(&store, "t1", "big", 0, 20_000).await;
    push(&store, "t1", "big", 1, 0).await;
    for v in 0..3 {
        push(&store, "t1", "small", v, 0).await;
    }
    let mut relay = Relay::new(store.clone(), cfg.clone()).unwrap();
    let first = relay.pass().await;
    let second = relay.pass().await;
    let msgs = consume(&broker.bootstrap(), Duration::from_secs(5), |_| false).await;
    let got = versions(&msgs);
    assert!(
        !got.iter().any(|(k, _)| k == "t1/big"),
        "a later row of the failing key went out before it: {got:?}"
    );
    assert_eq!(
        versions_of(&msgs, "t1/small"),
        vec![0, 1, 2],
        "the other key flows"
    );
    let first = first.unwrap();
    assert_eq!((first.sent, first.quarantined), (3, 1), "{first:?}");
    assert!(first.held_back >= 1, "{first:?}");
    assert_eq!(second.unwrap().sent, 0, "big v1 stays held");

    // The operator raises the limit and releases the row: the key resumes in
    // order.
    let q = anumate_events::relay::quarantined(&store, &cfg.relay_role, 10)
        .await
        .unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].seq, big0);
    assert_eq!(q[0].aggregate_key, "t1/big");
    assert!(q[0].last_error.contains("MessageSizeTooLarge"), "{q:?}");
    cfg.max_message_bytes = 1_000_000;
    let mut relay = Relay::new(store.clone(), cfg.clone()).unwrap();
    assert_eq!(
        anumate_events::relay::requeue(&store, &cfg.relay_role, &[big0, big0 + 100])
            .await
            .unwrap(),
        1
    );
    assert_eq!(relay.pass().await.unwrap().sent, 2);
    assert_eq!(unsent(&store).await, 0);
    let msgs = consume(&broker.bootstrap(), Duration::from_secs(15), |m| {
        m.len() >= 5
    })
    .await;
    assert_eq!(
        versions_of(&msgs, "t1/big"),
        vec![0, 1],
        "released in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_holds_back_later_rows_of_its_key_postgres() {
    failing_row_holds_back_its_key(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_holds_back_later_rows_of_its_key_sqlite() {
    failing_row_holds_back_its_key(Backend::Sqlite).await;
}

/// The longest wait from commit to `sent_at` of the rows sent, milliseconds.
async fn max_lag_ms(store: &Store) -> i64 {
    let lag: Option<i64> = owner_value(
        store,
        "SELECT MAX(sent_at - created_at) AS v FROM outbox WHERE sent_at IS NOT NULL",
    )
    .await;
    lag.unwrap_or(0) / 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_is_quarantined_and_other_keys_keep_their_pace() {
    let broker = TestBroker::start();
    let db = TestDb::postgres().await;
    let store = store(&db).await;
    let mut cfg = kafka(&broker.bootstrap());
    // The production back-off: the old relay waited this long between
    // passes while a poison row failed every pass.
    cfg.max_backoff_ms = 5_000;
    cfg.quarantine_after_attempts = 3;
    anumate_events::relay::ensure_topics(&cfg).await.unwrap();
    let relay = Relay::new(store.clone(), cfg.clone()).unwrap().spawn();
    // Above librdkafka's default message.max.bytes (1,000,000).
    let poison = push(&store, "t1", "poison", 0, 1_100_000).await;
    push(&store, "t1", "poison", 1, 0).await;
    let started = Instant::now();
    for i in 0..40 {
        push(&store, "t1", &format!("agg-{}", i % 4), i / 4, 0).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // All but the poison row and the one it holds: other keys did not stall.
    wait_unsent_at_most(&store, 2, Duration::from_secs(15)).await;
    let elapsed = started.elapsed();
    let lag = max_lag_ms(&store).await;
    // Old relay: every pass failed on the poison row and backed off up to
    // 5 s, so rows of other keys waited seconds.
    assert!(lag < 1_000, "an event waited {lag} ms behind a poison row");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    let stats = relay.stats();
    relay.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        stats.quarantined.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let q = anumate_events::relay::quarantined(&store, &cfg.relay_role, 10)
        .await
        .unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!((q[0].seq, q[0].attempts), (poison, 1), "permanent: at once");
    assert_eq!(
        unsent(&store).await,
        2,
        "the poison row and the one it holds"
    );

    let msgs = consume(&broker.bootstrap(), Duration::from_secs(15), |m| {
        m.len() >= 40
    })
    .await;
    let got = versions(&msgs);
    assert_eq!(got.len(), 40, "all other events arrive");
    assert!(!got.iter().any(|(k, _)| k == "t1/poison"));
}
