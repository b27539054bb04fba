#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The events service driven like a client drives it: real gRPC over TCP,
//! behind the real authentication layer, next to a real registry in the same
//! process (embedded mode: the history is fed from the outbox), on SQLite and
//! PostgreSQL. Kafka scenarios (replay, the Kafka-fed history) need a broker
//! at `ANUMATE_TEST_KAFKA` (`scripts/test` starts Tansu) and are skipped
//! loudly without one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anumate_auth::{BearerToken, DevIssuer, Role};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_errors::{Error, ErrorCode};
use anumate_events_service::{Events, EventsGrpc, EventsServiceConfig, kafka};
use anumate_proto::events::v1 as pb;
use anumate_proto::registry::v1 as reg;
use anumate_registry::{Registry, RegistryConfig, RegistryGrpc};
use anumate_testing::{self as testing, Backend, DevAuth, Store, TestDb, on_both_backends};
use pb::events_service_client::EventsServiceClient;
use reg::registry_service_client::RegistryServiceClient;
use tonic::Status;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt as _;

type Client = EventsServiceClient<InterceptedService<Channel, BearerToken>>;
type RegClient = RegistryServiceClient<InterceptedService<Channel, BearerToken>>;

struct TestApp {
    addr: SocketAddr,
    issuer: DevIssuer,
    store: Store,
    events: Events,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn config() -> EventsServiceConfig {
    EventsServiceConfig {
        tail_poll_ms: 200,
        feed_poll_ms: 20,
        max_tails: 8,
        ..EventsServiceConfig::default()
    }
}

async fn spawn_app(backend: Backend, replayer: Option<Arc<kafka::Replayer>>) -> TestApp {
    spawn_app_with(backend, replayer, true).await
}

/// `feed`: run the embedded outbox feeder (else the history is fed by
/// whatever the test starts, e.g. the Kafka history consumer).
async fn spawn_app_with(
    backend: Backend,
    replayer: Option<Arc<kafka::Replayer>>,
    feed: bool,
) -> TestApp {
    spawn_app_cfg(backend, replayer, feed, config()).await
}

/// [`spawn_app_with`] serving with `cfg`.
async fn spawn_app_cfg(
    backend: Backend,
    replayer: Option<Arc<kafka::Replayer>>,
    feed: bool,
    cfg: EventsServiceConfig,
) -> TestApp {
    let mut migrations = anumate_registry::migrations();
    migrations.extend_from_slice(anumate_events_service::REPO_MIGRATIONS);
    let (db, store) = testing::migrated_store(backend, &migrations).await;
    let DevAuth {
        issuer,
        authenticator: auth,
        dir: issuer_dir,
        ..
    } = DevAuth::new();
    let keys = Arc::new(KeyRing::new(KeyPair::generate().expect("key")));
    let registry = Registry::new(store.clone(), keys, &RegistryConfig::default());
    let events = Events::new(store.clone(), &cfg, replayer);
    let mut tasks = Vec::new();
    if feed {
        tasks.push(events.spawn_outbox_feed());
    }
    let (addr, server) = testing::serve(
        auth,
        Routes::new(EventsGrpc::new(events.clone()).into_server())
            .add_service(RegistryGrpc::new(registry).into_server()),
    )
    .await;
    tasks.push(server);
    TestApp {
        addr,
        issuer,
        store,
        events,
        tasks,
        _db: db,
        _issuer_dir: issuer_dir,
    }
}

impl TestApp {
    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    fn token(&self, tenant: &str, roles: &[Role]) -> BearerToken {
        BearerToken(
            self.issuer
                .mint(tenant, "alice", roles, Duration::from_secs(300))
                .expect("mint"),
        )
    }

    async fn client(&self, tenant: &str, roles: &[Role]) -> Client {
        EventsServiceClient::with_interceptor(self.channel().await, self.token(tenant, roles))
    }

    async fn registry(&self, tenant: &str) -> RegClient {
        RegistryServiceClient::with_interceptor(
            self.channel().await,
            self.token(tenant, &[Role::Author]),
        )
    }
}

fn capsule(name: &str) -> String {
    format!(
        "apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: {name}
spec:
  tools: [http.get]
  steps:
    - id: fetch
      tool: http.get
"
    )
}

async fn push(app: &TestApp, tenant: &str, name: &str, publish: bool) {
    app.registry(tenant)
        .await
        .push_capsule(reg::PushCapsuleRequest {
            source_yaml: capsule(name),
            publish,
            ..Default::default()
        })
        .await
        .expect("push");
}

type Tail = tonic::Streaming<pb::TailEventsResponse>;

async fn next(tail: &mut Tail) -> pb::TailEventsResponse {
    tokio::time::timeout(Duration::from_secs(10), tail.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// Reads events until the `caught_up` marker.
async fn history(tail: &mut Tail) -> Vec<pb::CloudEvent> {
    let mut out = Vec::new();
    loop {
        let m = next(tail).await;
        if m.caught_up {
            return out;
        }
        out.push(m.event.expect("event"));
    }
}

/// Opens a tail (the caller's tenant, `req`'s filter and start).
async fn open_tail(c: &mut Client, req: pb::TailEventsRequest) -> Tail {
    c.tail_events(req).await.expect("tail").into_inner()
}

/// A tail from after history position `seq` (0: the start).
fn tail_after(seq: i64) -> pb::TailEventsRequest {
    pb::TailEventsRequest {
        start: Some(pb::tail_events_request::Start::AfterSequence(seq)),
        ..Default::default()
    }
}

/// A replay of `topic` from its first event.
fn replay_request(topic: &str, limit: i32) -> pb::ReplayEventsRequest {
    pb::ReplayEventsRequest {
        topic: topic.into(),
        origin: Some(pb::replay_events_request::Origin::FromSequence(0)),
        limit,
    }
}

/// One page of events.
async fn list(c: &mut Client, req: pb::ListEventsRequest) -> pb::ListEventsResponse {
    c.list_events(req).await.expect("list").into_inner()
}

/// Asks for a tail until one opens, for up to `within`: a closed or ended
/// tail gives its place back a moment later (RESOURCE_EXHAUSTED until then).
async fn tail_once_free(c: &mut Client, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match c.tail_events(pb::TailEventsRequest::default()).await {
            Ok(_) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no tail place freed within {within:?}: {e:?}"),
        }
    }
}

/// A tail refused for want of a place, with the error the contract names.
async fn refused_tail(c: &mut Client) -> Status {
    let err = c
        .tail_events(pb::TailEventsRequest::default())
        .await
        .expect_err("no place for another tail");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(error_of(&err).code, ErrorCode::ResourceExhausted);
    assert_eq!(reason_of(&err), "RATE_LIMITED", "{err:?}");
    err
}

/// The specific `ErrorInfo.reason` of an error.
fn reason_of(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn error_of(status: &Status) -> Error {
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.domain, "anumate.dev");
    Error::new(
        ErrorCode::from_reason(&info.reason).expect("known reason"),
        status.message(),
    )
}

/// A server with the embedded feeder and no Kafka replayer.
async fn spawn_without_kafka(backend: Backend) -> TestApp {
    spawn_app(backend, None).await
}

on_both_backends! {
    spawn = spawn_without_kafka;
    tail_shows_a_pushed_capsule_live_and_from_history => tail_live_sqlite, tail_live_postgres;
    filters_tenants_and_bad_input => filters_sqlite, filters_postgres;
    list_pages_through_history => list_sqlite, list_postgres;
    consumed_ids_leave_after_retention => consumed_purge_sqlite, consumed_purge_postgres;
    an_admin_never_reads_another_tenant => cross_tenant_sqlite, cross_tenant_postgres;
    history_keeps_the_retention_window => retention_sqlite, retention_postgres;
}

/// `EventFilter` as clients built before field 2 was removed send it:
/// `tenant_id` naming the tenant to read.
#[derive(Clone, PartialEq, prost::Message)]
struct LegacyFilter {
    #[prost(string, tag = "2")]
    tenant_id: String,
}

/// `ListEventsRequest` with a [`LegacyFilter`].
#[derive(Clone, PartialEq, prost::Message)]
struct LegacyListRequest {
    #[prost(message, optional, tag = "1")]
    filter: Option<LegacyFilter>,
}

/// `TailEventsRequest` with a [`LegacyFilter`], from the start of history.
#[derive(Clone, PartialEq, prost::Message)]
struct LegacyTailRequest {
    #[prost(message, optional, tag = "1")]
    filter: Option<LegacyFilter>,
    #[prost(int64, optional, tag = "3")]
    after_sequence: Option<i64>,
}

/// The tenant comes from the verified token only: an `acme` admin naming
/// `dev` in the filter (as `events tail --tenant dev` used to) gets acme's
/// events, never dev's, whether listing or tailing.
async fn an_admin_never_reads_another_tenant(app: TestApp) {
    push(&app, "dev", "secret", true).await;
    push(&app, "acme", "mine", false).await;
    wait_for_history(&app.store, "dev", 2).await;
    wait_for_history(&app.store, "acme", 1).await;
    let path = |rpc: &'static str| {
        tonic::codegen::http::uri::PathAndQuery::from_static(match rpc {
            "list" => "/anumate.events.v1.EventsService/ListEvents",
            _ => "/anumate.events.v1.EventsService/TailEvents",
        })
    };
    let filter = Some(LegacyFilter {
        tenant_id: "dev".into(),
    });
    let channel = InterceptedService::new(
        app.channel().await,
        app.token("acme", &[Role::Admin, Role::Auditor, Role::Operator]),
    );
    let mut grpc = tonic::client::Grpc::new(channel);

    grpc.ready().await.expect("ready");
    let page = grpc
        .unary(
            tonic::Request::new(LegacyListRequest {
                filter: filter.clone(),
            }),
            path("list"),
            tonic_prost::ProstCodec::<LegacyListRequest, pb::ListEventsResponse>::default(),
        )
        .await
        .expect("list")
        .into_inner();
    let seen: Vec<_> = page
        .events
        .iter()
        .map(|e| (e.tenant_id.as_str(), e.key.as_str()))
        .collect();
    assert_eq!(seen, [("acme", "acme/mine")]);

    grpc.ready().await.expect("ready");
    let mut s = grpc
        .server_streaming(
            tonic::Request::new(LegacyTailRequest {
                filter,
                after_sequence: Some(0),
            }),
            path("tail"),
            tonic_prost::ProstCodec::<LegacyTailRequest, pb::TailEventsResponse>::default(),
        )
        .await
        .expect("tail")
        .into_inner();
    let seen = history(&mut s).await;
    let seen: Vec<_> = seen
        .iter()
        .map(|e| (e.tenant_id.as_str(), e.key.as_str()))
        .collect();
    assert_eq!(seen, [("acme", "acme/mine")]);

    // And through the generated client: nothing but acme's.
    let mut admin = app.client("acme", &[Role::Admin]).await;
    let page = list(&mut admin, pb::ListEventsRequest::default()).await;
    assert!(page.events.iter().all(|e| e.tenant_id == "acme"));
    assert_eq!(page.events.len(), 1);
}

fn event_at(tenant: &str, id: &str, time_micros: i64) -> anumate_events_service::NewEvent {
    anumate_events_service::NewEvent {
        event_id: id.into(),
        tenant_id: tenant.into(),
        source: "/anumate/test".into(),
        topic: "anumate.capsules".into(),
        event_type: "dev.anumate.capsule.pushed.v1".into(),
        key: "k".into(),
        subject: "s".into(),
        content_type: "application/protobuf".into(),
        payload: vec![],
        plan_hash: None,
        traceparent: None,
        time_micros,
        outbox_seq: None,
        replay: false,
    }
}

async fn history_ids(store: &Store, tenant: &str) -> Vec<String> {
    let tx = store.read(tenant).await.expect("tx");
    let rows = tx
        .query_all(
            "SELECT event_id FROM event_history WHERE tenant_id = $1 ORDER BY seq",
            vec![tenant.into()],
        )
        .await
        .expect("query");
    rows.iter()
        .map(|r| r.try_get("", "event_id").expect("id"))
        .collect()
}

/// Waits (up to 10 s) until the tenant's history holds `n` events.
async fn wait_for_history(store: &Store, tenant: &str, n: usize) {
    wait_for_history_within(store, tenant, n, Duration::from_secs(10)).await;
}

/// Waits up to `within` until the tenant's history holds `n` events.
async fn wait_for_history_within(store: &Store, tenant: &str, n: usize, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let have = history_ids(store, tenant).await.len();
        if have >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tenant}: {have} of {n} events in the history after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Events older than `history_retention_hours` leave the history when the
/// tenant's next events are recorded; 0 keeps everything.
async fn history_keeps_the_retention_window(app: TestApp) {
    let hour = 3_600_000_000_i64;
    let now = anumate_store::now_micros();
    for (retention_hours, tenant, kept) in [(1, "ret", &["new"][..]), (0, "keep", &["old", "new"])]
    {
        let events = Events::new(
            app.store.clone(),
            &EventsServiceConfig {
                history_retention_hours: retention_hours,
                ..config()
            },
            None,
        );
        events
            .record(&[
                event_at(tenant, "old", now - 2 * hour),
                event_at(tenant, "new", now),
            ])
            .await
            .expect("record");
        assert_eq!(history_ids(&app.store, tenant).await, kept);
    }
}

/// Open tails are limited per server; a closed tail frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_are_limited_and_released() {
    let app = spawn_app(Backend::Sqlite, None).await;
    let mut c = app.client("t1", &[Role::Auditor]).await;
    let mut open = Vec::new();
    for _ in 0..8 {
        let mut s = open_tail(&mut c, pb::TailEventsRequest::default()).await;
        history(&mut s).await;
        open.push(s);
    }
    refused_tail(&mut c).await;
    drop(open);
    tail_once_free(&mut c, Duration::from_secs(5)).await;
}

/// One tenant cannot take every tail: past `max_tails_per_tenant` it gets
/// RESOURCE_EXHAUSTED while another tenant still tails; closing one of its
/// tails gives the place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_gets_only_its_quota_of_tails() {
    let cfg = EventsServiceConfig {
        max_tails: 8,
        max_tails_per_tenant: 3,
        ..config()
    };
    let app = spawn_app_cfg(Backend::Sqlite, None, true, cfg).await;
    let mut a = app.client("a", &[Role::Auditor]).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = open_tail(&mut a, pb::TailEventsRequest::default()).await;
        history(&mut s).await;
        open.push(s);
    }
    let err = refused_tail(&mut a).await;
    assert!(err.message().contains("at most 3 per tenant"), "{err:?}");

    // Another tenant is not affected.
    let mut b = app.client("b", &[Role::Auditor]).await;
    let mut s = b
        .tail_events(pb::TailEventsRequest::default())
        .await
        .expect("tenant b tails")
        .into_inner();
    assert!(history(&mut s).await.is_empty());

    // A closed tail frees its tenant's place.
    open.pop();
    tail_once_free(&mut a, Duration::from_secs(5)).await;
}

/// A client that stops reading holds its tail for `tail_idle_timeout_secs`
/// only: then the tail ends (its place freed) and the client, once it reads
/// again, gets what was queued and then `STREAM_IDLE` (`UNAVAILABLE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_whose_client_stops_reading_is_ended() {
    let cfg = EventsServiceConfig {
        max_tails_per_tenant: 1,
        tail_idle_timeout_secs: 1,
        ..config()
    };
    let app = spawn_app_cfg(Backend::Sqlite, None, false, cfg).await;
    // More than the channel, the HTTP/2 windows (2 MB a stream) and buffers
    // hold: ~6 MB.
    let now = anumate_store::now_micros();
    let batch: Vec<_> = (0..1500)
        .map(|i| anumate_events_service::NewEvent {
            payload: vec![b'x'; 4096],
            ..event_at("slow", &format!("e{i}"), now)
        })
        .collect();
    app.events.record(&batch).await.expect("record");

    let mut c = app.client("slow", &[Role::Auditor]).await;
    let mut stalled = open_tail(&mut c, tail_after(0)).await;
    // The stalled tail holds the tenant's only place until it times out.
    let t0 = std::time::Instant::now();
    tail_once_free(&mut c, Duration::from_secs(10)).await;
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    // Reading again: the queued events, then the end.
    let mut n = 0;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.message())
            .await
            .expect("the stalled tail ends")
        {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("ended without an error after {n} messages"),
            Err(e) => break e,
        }
    };
    assert!(n < 1500, "all {n} events were sent: the tail never stalled");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(reason_of(&err), "STREAM_IDLE", "{err:?}");
    assert!(err.message().contains("read nothing"), "{err:?}");
}

/// The history consumer's dedupe entries leave after
/// `consumed_retention_hours`; other groups' entries are not its to purge.
async fn consumed_ids_leave_after_retention(app: TestApp) {
    let hour = 3_600_000_000_i64;
    let now = anumate_store::now_micros();
    let events = Events::new(
        app.store.clone(),
        &EventsServiceConfig {
            history_group: "hist".into(),
            consumed_retention_hours: 1,
            ..config()
        },
        None,
    );
    let tx = app.store.system_write().await.expect("tx");
    for (group, id, at) in [
        ("hist", "old", now - 2 * hour),
        ("hist", "new", now),
        ("other", "old", now - 2 * hour),
    ] {
        tx.execute(
            "INSERT INTO consumed_events (group_id, event_id, topic, kafka_partition,                kafka_offset, outcome, consumed_at) VALUES ($1, $2, 't', 0, 0, 'handled', $3)",
            vec![group.into(), id.into(), at.into()],
        )
        .await
        .expect("insert");
    }
    tx.commit().await.expect("commit");
    assert_eq!(kafka::purge_consumed(&events).await.expect("purge"), 1);
    let tx = app.store.system_read().await.expect("tx");
    let rows = tx
        .query_all(
            "SELECT group_id, event_id FROM consumed_events ORDER BY group_id, event_id",
            vec![],
        )
        .await
        .expect("rows");
    let left: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get("", "group_id").expect("group"),
                r.try_get("", "event_id").expect("id"),
            )
        })
        .collect();
    assert_eq!(
        left,
        [
            ("hist".into(), "new".into()),
            ("other".into(), "old".into())
        ]
    );
}

async fn tail_shows_a_pushed_capsule_live_and_from_history(app: TestApp) {
    let mut c = app.client("t1", &[Role::Auditor]).await;
    // Live only: the marker comes first, at once.
    let mut live = open_tail(&mut c, pb::TailEventsRequest::default()).await;
    assert!(history(&mut live).await.is_empty());

    push(&app, "t1", "refund", true).await;
    let pushed = next(&mut live).await.event.expect("event");
    let published = next(&mut live).await.event.expect("event");
    assert_eq!(pushed.r#type, "dev.anumate.capsule.pushed.v1");
    assert_eq!(published.r#type, "dev.anumate.capsule.published.v1");
    assert!(published.sequence > pushed.sequence);
    assert_eq!(published.tenant_id, "t1");
    assert_eq!(published.topic, "anumate.capsules");
    assert_eq!(published.key, "t1/refund");
    assert_eq!(published.subject, "capsules/refund/versions/1");
    assert_eq!(published.source, "/anumate/capsules");
    assert_eq!(published.data_schema, "anumate.events.v1.CapsulePublished");
    assert!(published.outbox_sequence > 0);
    let data: anumate_proto::events::v1::CapsulePublished =
        prost::Message::decode(published.data.as_slice()).expect("decode data");
    assert_eq!((data.name.as_str(), data.version), ("refund", 1));
    let json: serde_json::Value = serde_json::from_str(&published.data_json).expect("json");
    assert_eq!(json["name"], "refund");

    // From the start of history: the same two, then the marker, then live.
    let mut from_start = open_tail(&mut c, tail_after(0)).await;
    let seen = history(&mut from_start).await;
    assert_eq!(
        seen.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        vec![pushed.id.as_str(), published.id.as_str()]
    );
    // Resuming after the first one gives the second.
    let mut resumed = open_tail(&mut c, tail_after(pushed.sequence)).await;
    let seen = history(&mut resumed).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, published.id);

    // Both tails keep following.
    push(&app, "t1", "payout", false).await;
    for tail in [&mut live, &mut from_start, &mut resumed] {
        let e = next(tail).await.event.expect("event");
        assert_eq!(
            (e.r#type.as_str(), e.key.as_str()),
            ("dev.anumate.capsule.pushed.v1", "t1/payout")
        );
    }
}

async fn filters_tenants_and_bad_input(app: TestApp) {
    push(&app, "t1", "refund", true).await;
    push(&app, "t2", "other", false).await;
    // The embedded feeder copies the outbox into the history a moment after
    // the push commits; the filters below read that history.
    wait_for_history(&app.store, "t1", 2).await;
    wait_for_history(&app.store, "t2", 1).await;
    let mut auditor = app.client("t1", &[Role::Auditor]).await;
    let since_start = Some(pb::tail_events_request::Start::AfterSequence(0));

    // Type filter (exact and prefix) and key filter.
    let tail = |types: Vec<&str>, key: &str| pb::TailEventsRequest {
        filter: Some(pb::EventFilter {
            types: types.into_iter().map(String::from).collect(),
            key: key.into(),
            ..Default::default()
        }),
        start: since_start,
    };
    let mut s = open_tail(
        &mut auditor,
        tail(vec!["dev.anumate.capsule.published.v1"], ""),
    )
    .await;
    let seen = history(&mut s).await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].r#type, "dev.anumate.capsule.published.v1");
    let mut s = open_tail(&mut auditor, tail(vec!["dev.anumate.capsule.*"], "refund")).await;
    assert_eq!(history(&mut s).await.len(), 2);
    let mut s = open_tail(&mut auditor, tail(vec!["dev.anumate.run.*"], "")).await;
    assert!(history(&mut s).await.is_empty());

    // Only the caller's tenant (see `an_admin_never_reads_another_tenant`).
    let mut s = open_tail(&mut auditor, tail(vec![], "")).await;
    assert!(history(&mut s).await.iter().all(|e| e.tenant_id == "t1"));

    // Authors cannot read events.
    let mut author = app.client("t1", &[Role::Author]).await;
    let err = author
        .list_events(pb::ListEventsRequest::default())
        .await
        .expect_err("denied");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Bad input: precise errors, and the service keeps serving.
    for (req, field) in [
        (tail(vec!["dev anumate"], ""), "filter.types[0]"),
        (tail(vec![""], ""), "filter.types[0]"),
        (
            pb::TailEventsRequest {
                start: Some(pb::tail_events_request::Start::AfterSequence(-1)),
                ..Default::default()
            },
            "after_sequence",
        ),
        (
            pb::TailEventsRequest {
                start: Some(pb::tail_events_request::Start::Since(
                    pbjson_types::Timestamp {
                        seconds: 0,
                        nanos: -5,
                    },
                )),
                ..Default::default()
            },
            "since",
        ),
    ] {
        let err = auditor.tail_events(req).await.expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let bad = err.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field);
    }
    for (req, field) in [
        (
            pb::ListEventsRequest {
                page_size: 10,
                page_token: "not a token!".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListEventsRequest {
                // Decodes, but is no history position.
                page_token: anumate_store::paging::encode_token("x"),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListEventsRequest {
                page_size: -1,
                ..Default::default()
            },
            "page_size",
        ),
    ] {
        let err = auditor.list_events(req).await.expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let bad = err.get_details_bad_request().expect("BadRequest");
        assert_eq!(bad.field_violations[0].field, field);
    }
    // Replay: admin only, and needs Kafka here.
    let err = auditor
        .replay_events(replay_request("anumate.capsules", 0))
        .await
        .expect_err("denied");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut admin = app.client("t1", &[Role::Admin]).await;
    let err = admin
        .replay_events(replay_request("anumate.nope", 0))
        .await
        .expect_err("invalid");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = admin
        .replay_events(replay_request("anumate.capsules", 0))
        .await
        .expect_err("no kafka");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(error_of(&err).code, ErrorCode::FailedPrecondition);

    // Row-level security: on PostgreSQL a query that forgets its tenant
    // filter still sees only the transaction's tenant.
    if app.store.backend() == Backend::Postgres {
        let tx = app.store.read("t1").await.expect("tx");
        let row = tx
            .query_one("SELECT COUNT(*) AS n, MIN(tenant_id) AS lo, MAX(tenant_id) AS hi FROM event_history", vec![])
            .await
            .expect("count")
            .expect("row");
        let n: i64 = row.try_get("", "n").expect("n");
        let (lo, hi): (String, String) = (
            row.try_get("", "lo").expect("lo"),
            row.try_get("", "hi").expect("hi"),
        );
        assert_eq!((n, lo.as_str(), hi.as_str()), (2, "t1", "t1"));
    }

    // Still serving.
    let page = list(&mut auditor, pb::ListEventsRequest::default()).await;
    assert_eq!(page.events.len(), 2);
}

/// Push-to-tail latency in embedded mode with the default feeder interval:
/// time from sending a push to its event on a live tail, next to the push's
/// own round trip; printed, run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn tail_latency() {
    let app = spawn_app_with(Backend::Sqlite, None, false).await;
    // The defaults, not the test's fast feeder.
    let events = Events::new(app.store.clone(), &EventsServiceConfig::default(), None);
    let feed = events.spawn_outbox_feed();
    let mut rx = events
        .tail(
            &anumate_events_service::Caller {
                tenant: "t1".into(),
                subject: "bench".into(),
            },
            &pb::EventFilter {
                types: vec!["dev.anumate.capsule.pushed.v1".into()],
                ..Default::default()
            },
            anumate_events_service::TailStart::Live,
        )
        .await
        .expect("tail");
    assert!(rx.recv().await.expect("marker").expect("ok").caught_up);
    let mut reg = app.registry("t1").await;
    let (mut rtt, mut lat) = (Vec::new(), Vec::new());
    for i in 0..100 {
        let t = std::time::Instant::now();
        reg.push_capsule(reg::PushCapsuleRequest {
            source_yaml: capsule(&format!("c{i}")),
            ..Default::default()
        })
        .await
        .expect("push");
        rtt.push(t.elapsed());
        rx.recv().await.expect("event").expect("ok");
        lat.push(t.elapsed());
    }
    feed.abort();
    rtt.sort();
    lat.sort();
    println!(
        "push round trip p50 {:?} p95 {:?}; push -> tail p50 {:?} p95 {:?} p99 {:?}",
        rtt[49], rtt[94], lat[49], lat[94], lat[98]
    );
}

async fn list_pages_through_history(app: TestApp) {
    for name in ["a", "b", "c"] {
        push(&app, "t1", name, true).await;
    }
    let mut c = app.client("t1", &[Role::Operator]).await;
    // Wait for the feeder: a tail from the start returns once caught up.
    let want = 6;
    let mut s = open_tail(&mut c, tail_after(0)).await;
    let mut n = history(&mut s).await.len();
    while n < want {
        next(&mut s).await;
        n += 1;
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(
            &mut c,
            pb::ListEventsRequest {
                page_size: 4,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        ids.extend(page.events.iter().map(|e| e.sequence));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(ids.len(), want);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    // Time window: nothing before 1970 + 1 s, everything until now + 1 h.
    let now = chrono::Utc::now().timestamp();
    let page = list(
        &mut c,
        pb::ListEventsRequest {
            until: Some(anumate_proto::timestamp_from_secs(1)),
            ..Default::default()
        },
    )
    .await;
    assert!(page.events.is_empty());
    let page = list(
        &mut c,
        pb::ListEventsRequest {
            since: Some(anumate_proto::timestamp_from_secs(now - 3600)),
            until: Some(anumate_proto::timestamp_from_secs(now + 3600)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page.events.len(), want);
    // Recording is idempotent: the same events again add nothing.
    let tx = app.store.read("t1").await.expect("tx");
    let rows = anumate_events_service::history::query(
        &tx,
        &anumate_events_service::history::Query::default(),
        100,
    )
    .await
    .expect("query");
    drop(tx);
    let again: Vec<_> = rows.into_iter().map(|r| r.event).collect();
    assert_eq!(app.events.record(&again).await.expect("record"), 0);
}

// ---------------------------------------------------------------------------
// Kafka
// ---------------------------------------------------------------------------

fn kafka() -> Option<String> {
    match std::env::var("ANUMATE_TEST_KAFKA") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!(
                "\n*** SKIPPED: ANUMATE_TEST_KAFKA is not set, so this Kafka test did not run. \
                 scripts/test sets it (scripts/tansu start). ***\n"
            );
            None
        }
    }
}

/// A Kafka client configuration for the test broker.
fn kafka_config(bootstrap: &str) -> anumate_events::relay::KafkaConfig {
    anumate_events::relay::KafkaConfig {
        brokers: bootstrap.into(),
        ..Default::default()
    }
}

/// The Kafka history consumer recording into `store`, in a group of its own
/// (so it reads every topic from the start); returns the group too.
fn spawn_history_consumer(store: &Store, bootstrap: &str) -> (String, kafka::HistoryConsumer) {
    let cfg = EventsServiceConfig {
        history_group: format!("history-{}", uuid::Uuid::now_v7()),
        ..config()
    };
    let events = Events::new(store.clone(), &cfg, None);
    let consumer =
        kafka::spawn_history_consumer(&events, &kafka_config(bootstrap)).expect("consumer");
    (cfg.history_group, consumer)
}

/// The tenant's outbox event ids, oldest first.
async fn outbox_ids(store: &Store, tenant: &str) -> Vec<String> {
    let tx = store.read(tenant).await.expect("tx");
    anumate_events::read_after(&tx, 0, 1000)
        .await
        .expect("outbox")
        .into_iter()
        .map(|r| r.event_id)
        .collect()
}

/// Replay republishes the tenant's archived events with their original ids,
/// marked `ce_replay=true` / `ce_replayid`; a deduping consumer handles each
/// id once; the Kafka-fed history records them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_marks_events_and_consumers_dedupe_them() {
    use rdkafka::Message as _;
    use rdkafka::consumer::{Consumer as _, StreamConsumer};
    use rdkafka::message::Headers as _;
    use std::sync::atomic::Ordering;

    let Some(bootstrap) = kafka() else { return };
    let kcfg = kafka_config(&bootstrap);
    let replayer = Arc::new(kafka::Replayer::new(&kcfg).expect("producer"));
    let app = spawn_app(Backend::Sqlite, Some(replayer)).await;
    push(&app, "t1", "refund", true).await;
    push(&app, "t2", "other", true).await;
    let mut admin = app.client("t1", &[Role::Admin]).await;
    let replay = |limit| replay_request("anumate.capsules", limit);
    // Nothing is archived before the relay has sent it.
    let out = admin
        .replay_events(replay(0))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!(out.replayed_count, 0);
    let mut relay = anumate_events::relay::Relay::new(app.store.clone(), kcfg).expect("relay");
    while relay.pass().await.expect("relay pass").sent > 0 {}

    let out = admin
        .replay_events(replay(0))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!((out.replayed_count, out.truncated), (2, false), "{out:?}");
    let out1 = admin
        .replay_events(replay(1))
        .await
        .expect("replay")
        .into_inner();
    assert_eq!((out1.replayed_count, out1.truncated), (1, true));
    assert_eq!(out1.first_sequence, out.first_sequence);

    let ids = outbox_ids(&app.store, "t1").await;
    assert_eq!(ids.len(), 2);

    // On the wire: 2 originals, then 2 + 1 replays, in order (one key).
    let group = format!("raw-{}", uuid::Uuid::now_v7());
    let raw: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create()
        .expect("consumer");
    raw.subscribe(&["anumate.capsules"]).expect("subscribe");
    let mut seen: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 5 {
        let m = tokio::time::timeout_at(deadline, raw.recv())
            .await
            .expect("5 messages within 30 s")
            .expect("recv");
        let header = |name: &str| {
            m.headers().and_then(|h| {
                h.iter()
                    .find(|x| x.key == name)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let Some(id) = header("ce_id").filter(|id| ids.contains(id)) else {
            continue;
        };
        seen.push((id, header("ce_replay"), header("ce_replayid")));
    }
    tokio::task::spawn_blocking(move || drop(raw))
        .await
        .expect("drop");
    let want = vec![
        (ids[0].clone(), None, None),
        (ids[1].clone(), None, None),
        (
            ids[0].clone(),
            Some("true".into()),
            Some(out.replay_id.clone()),
        ),
        (
            ids[1].clone(),
            Some("true".into()),
            Some(out.replay_id.clone()),
        ),
        (
            ids[0].clone(),
            Some("true".into()),
            Some(out1.replay_id.clone()),
        ),
    ];
    assert_eq!(seen, want);

    // A deduping consumer in a fresh group handles each id once: the originals.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let group = format!("dedupe-{}", uuid::Uuid::now_v7());
    let cfg =
        anumate_events::consumer::ConsumerConfig::new(&bootstrap, &group, &["anumate.capsules"]);
    let consumer = anumate_events::consumer::spawn(app.store.clone(), cfg, move |e| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(e);
            Ok::<(), String>(())
        }
    })
    .expect("consumer");
    let mut handled = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while handled.len() < 2 {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("handled within 30 s")
            .expect("open");
        if ids.contains(&e.id) {
            handled.push(e);
        }
    }
    assert!(handled.iter().all(|e| !e.is_replay()));
    let published: anumate_proto::events::v1::CapsulePublished =
        handled[1].decode().expect("decode");
    assert_eq!(published.name, "refund");
    while consumer.stats().duplicates.load(Ordering::Relaxed) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "duplicates not skipped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while let Ok(e) = rx.try_recv() {
        assert!(!ids.contains(&e.id), "{} handled twice", e.id);
    }
    consumer.stop().await;

    // The Kafka-fed history keeps one row per event and knows its outbox
    // position from `ce_sequence`.
    let row = kafka::to_new_event(&handled[1]).expect("row");
    assert!(row.outbox_seq.is_some());
    assert_eq!(app.events.record(&[row]).await.expect("record"), 0);
}

/// With Kafka, the history is fed by the history consumer: events the relay
/// publishes reach a tail through Kafka, once each, with their outbox
/// position; a message that is not an Anumate event goes to the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_fed_history_backs_the_tail() {
    let Some(bootstrap) = kafka() else { return };
    let app = spawn_app_with(Backend::Postgres, None, false).await;
    let (_, consumer) = spawn_history_consumer(&app.store, &bootstrap);
    let mut relay = anumate_events::relay::Relay::new(app.store.clone(), kafka_config(&bootstrap))
        .expect("relay");
    let tenant = format!("k-{}", uuid::Uuid::now_v7().simple());
    push(&app, &tenant, "refund", true).await;
    while relay.pass().await.expect("relay pass").sent > 0 {}

    // The history service of `app` reads the same tables.
    let mut c = app.client(&tenant, &[Role::Auditor]).await;
    let mut tail = open_tail(&mut c, tail_after(0)).await;
    let mut got = history(&mut tail).await;
    while got.len() < 2 {
        // The app's tail polls: it sees rows the consumer recorded.
        got.push(
            tokio::time::timeout(Duration::from_secs(30), tail.message())
                .await
                .expect("events from Kafka within 30 s")
                .expect("ok")
                .expect("open")
                .event
                .expect("event"),
        );
    }
    let ids = outbox_ids(&app.store, &tenant).await;
    assert_eq!(got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(got[1].r#type, "dev.anumate.capsule.published.v1");
    assert_eq!(got[1].source, "/anumate/capsules");
    assert!(got[1].outbox_sequence > 0);
    assert!(!got[1].replay);
    assert_eq!(got[1].data_schema, "anumate.events.v1.CapsulePublished");
    consumer.stop().await;
}

/// Produces one CloudEvent straight to Kafka, as anyone with write access to
/// the topic could: `ce_tenantid` says `header_tenant`, the data (a
/// `CapsulePublished`) says `data_tenant`. Returns its `ce_id`.
async fn produce_capsule_event(bootstrap: &str, header_tenant: &str, data_tenant: &str) -> String {
    use prost::Message as _;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let id = uuid::Uuid::now_v7().to_string();
    let row = anumate_events::OutboxRow {
        seq: 1,
        event_id: id.clone(),
        tenant_id: header_tenant.into(),
        topic: "anumate.capsules".into(),
        event_type: "dev.anumate.capsule.published.v1".into(),
        aggregate_key: "forge".into(),
        subject: "capsules/forge/versions/1".into(),
        payload: pb::CapsulePublished {
            tenant_id: data_tenant.into(),
            name: "forge".into(),
            version: 1,
            ..Default::default()
        }
        .encode_to_vec(),
        plan_hash: None,
        traceparent: None,
        created_at: anumate_store::now_micros(),
    };
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "15000")
        .create()
        .expect("producer");
    let mode = anumate_events::cloudevents::ContentMode::Protobuf;
    producer
        .send(
            FutureRecord::to("anumate.capsules")
                .key("forge")
                .payload(&row.payload)
                .headers(anumate_events::cloudevents::headers(&row, mode)),
            Duration::from_secs(15),
        )
        .await
        .expect("produce");
    tokio::task::spawn_blocking(move || drop(producer))
        .await
        .expect("drop");
    id
}

/// The outcome `consumed_events` holds for `id` in `group` (None: not yet).
async fn consumed_outcome(store: &Store, group: &str, id: &str) -> Option<String> {
    let tx = store.system_read().await.expect("tx");
    tx.query_one(
        "SELECT outcome FROM consumed_events WHERE group_id = $1 AND event_id = $2",
        vec![group.into(), id.into()],
    )
    .await
    .expect("query")
    .map(|r| r.try_get("", "outcome").expect("outcome"))
}

/// A message produced straight to an Anumate topic whose `ce_tenantid`
/// names tenant B while the event inside is tenant A's is not recorded in
/// B's history (nor A's): it is dead-lettered. The same message with
/// matching tenants, produced after it on the same partition, is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_tenant_header_is_not_recorded() {
    let Some(bootstrap) = kafka() else { return };
    let app = spawn_app_with(Backend::Postgres, None, false).await;
    let victim = format!("b-{}", uuid::Uuid::now_v7().simple());
    let attacker = format!("a-{}", uuid::Uuid::now_v7().simple());
    let forged = produce_capsule_event(&bootstrap, &victim, &attacker).await;
    let genuine = produce_capsule_event(&bootstrap, &victim, &victim).await;
    let (group, consumer) = spawn_history_consumer(&app.store, &bootstrap);
    // Same key, same partition: once the genuine one is in, the forged one
    // was handled before it.
    wait_for_history_within(&app.store, &victim, 1, Duration::from_secs(60)).await;
    assert_eq!(
        history_ids(&app.store, &victim).await,
        std::slice::from_ref(&genuine)
    );
    assert!(history_ids(&app.store, &attacker).await.is_empty());
    assert_eq!(
        consumed_outcome(&app.store, &group, &forged)
            .await
            .as_deref(),
        Some("dead_lettered")
    );
    // A tenant admin of the victim sees only the genuine event.
    let mut c = app.client(&victim, &[Role::Admin]).await;
    let page = list(&mut c, pb::ListEventsRequest::default()).await;
    assert_eq!(
        page.events
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        [genuine.as_str()]
    );
    consumer.stop().await;
}

/// A database hiccup while the history consumer writes (here: PostgreSQL
/// lock timeouts for 5 s, as during a failover or a long migration lock) is
/// waited out: the event is recorded once the database answers, never
/// dead-lettered or marked consumed before. The old consumer gave up after
/// five attempts (~3 s) and marked it consumed, so it was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_delays_history_events_without_losing_them() {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let Some(bootstrap) = kafka() else { return };
    let app = spawn_app_with(Backend::Postgres, None, false).await;
    // Sessions of the consumer's store give up on a lock after 200 ms. The
    // lock and the setting are taken as the PostgreSQL superuser.
    let name: String = app
        .store
        .owner_connection()
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT current_database() AS name",
        ))
        .await
        .expect("query")
        .expect("row")
        .try_get("", "name")
        .expect("name");
    let admin = anumate_store::testing::postgres_admin_url();
    let (base, rest) = admin.rsplit_once('/').expect("admin url has a database");
    let query = rest
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    let owner = sea_orm::Database::connect(format!("{base}/{name}{query}"))
        .await
        .expect("connect as superuser");
    owner
        .execute_unprepared(&format!(
            "ALTER DATABASE \"{name}\" SET lock_timeout = '200ms'"
        ))
        .await
        .expect("alter database");
    let store = Store::connect(&app._db.config).await.expect("connect");
    let (group, consumer) = spawn_history_consumer(&store, &bootstrap);
    let tenant = format!("o-{}", uuid::Uuid::now_v7().simple());

    // Caught up with whatever the topics already hold.
    let first = produce_capsule_event(&bootstrap, &tenant, &tenant).await;
    wait_for_history_within(&app.store, &tenant, 1, Duration::from_secs(120)).await;
    assert_eq!(history_ids(&app.store, &tenant).await, [first]);

    // The outage: history writes time out on a lock for 5 s.
    let lock = owner.begin().await.expect("begin");
    lock.execute_unprepared("LOCK TABLE event_history IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let during = produce_capsule_event(&bootstrap, &tenant, &tenant).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        consumed_outcome(&app.store, &group, &during).await,
        None,
        "marked consumed during the outage"
    );
    lock.commit().await.expect("unlock");

    // Else the event written during the outage was lost.
    wait_for_history_within(&app.store, &tenant, 2, Duration::from_secs(30)).await;
    assert_eq!(
        consumed_outcome(&app.store, &group, &during)
            .await
            .as_deref(),
        Some("handled")
    );
    consumer.stop().await;
}
