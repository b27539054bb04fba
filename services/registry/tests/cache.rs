#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Reads served from memory never cross tenants and never outlive a change:
//! the registry as a client sees it (real gRPC, both databases), and on
//! PostgreSQL two registries sharing one database, where a change made
//! through one reaches the other's cache.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anumate_auth::{BearerToken, DevIssuer, Role};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_errors::Reason;
use anumate_proto::registry::v1 as pb;
use anumate_registry::{Registry, RegistryConfig, RegistryGrpc};
use anumate_testing::{self as testing, Backend, DevAuth, Store, TestDb, expect_reason};
use pb::registry_service_client::RegistryServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = RegistryServiceClient<InterceptedService<Channel, BearerToken>>;

/// One registry process: its server, its cache follower and its store.
struct Replica {
    addr: SocketAddr,
    registry: Registry,
    server: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

impl Replica {
    async fn start(store: Store, keys: Arc<KeyRing>, auth: &DevAuth) -> Replica {
        let registry = Registry::new(store, keys, &RegistryConfig::default());
        let cancel = CancellationToken::new();
        let documents = registry.documents().clone();
        let token = cancel.clone();
        tokio::spawn(async move { documents.follow_changes(token).await });
        let (addr, server) = testing::serve(
            auth.authenticator.clone(),
            Routes::new(RegistryGrpc::new(registry.clone()).into_server()),
        )
        .await;
        // On PostgreSQL nothing is served from memory before it is subscribed.
        for _ in 0..500 {
            if registry.documents().cache_is_live() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            registry.documents().cache_is_live(),
            "cache never went live"
        );
        Replica {
            addr,
            registry,
            server,
            cancel,
        }
    }

    async fn client(&self, issuer: &DevIssuer, tenant: &str, roles: &[Role]) -> Client {
        let token = issuer
            .mint(tenant, "alice", roles, Duration::from_secs(300))
            .unwrap();
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        RegistryServiceClient::with_interceptor(channel, BearerToken(token))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.server.abort();
    }
}

fn capsule(name: &str, team: &str) -> String {
    format!(
        "apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: {name}
  description: owned by {team}
  labels: {{team: {team}}}
spec:
  tools: [http.get]
  steps:
    - id: fetch
      tool: http.get
"
    )
}

async fn push(client: &mut Client, source: &str, publish: bool) -> pb::PushCapsuleResponse {
    client
        .push_capsule(pb::PushCapsuleRequest {
            source_yaml: source.into(),
            publish,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn get(
    client: &mut Client,
    name: &str,
    version: &str,
) -> tonic::Result<pb::GetCapsuleResponse> {
    client
        .get_capsule(pb::GetCapsuleRequest {
            name: name.into(),
            version: version.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn description(resp: &pb::GetCapsuleResponse) -> &str {
    &resp.capsule.as_ref().unwrap().description
}

async fn setup(backend: Backend) -> (TestDb, Store, Arc<KeyRing>, DevAuth) {
    let (db, store) = testing::migrated_store(backend, &anumate_registry::migrations()).await;
    let keys = Arc::new(KeyRing::new(KeyPair::generate().unwrap()));
    (db, store, keys, DevAuth::new())
}

/// Changes a capsule's description behind the service's back (in the
/// database, telling no cache), to tell a read from memory from a read of
/// the database.
async fn tamper(store: &Store, tenant: &str, name: &str, description: &str) {
    let tx = store.write(tenant).await.unwrap();
    let changed = tx
        .execute(
            "UPDATE capsules SET description = $2 WHERE tenant_id = $1 AND name = $3",
            vec![tenant.into(), description.into(), name.into()],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(changed, 1, "the row was changed");
}

async fn same_name_in_two_tenants_and_changes_seen_at_once(backend: Backend) {
    let (_db, store, keys, auth) = setup(backend).await;
    let replica = Replica::start(store.clone(), keys, &auth).await;
    let mut a = replica
        .client(&auth.issuer, "tenant-a", &[Role::Author])
        .await;
    let mut b = replica
        .client(&auth.issuer, "tenant-b", &[Role::Author])
        .await;

    // The same name in two tenants, each read (and cached) by its tenant.
    push(&mut a, &capsule("refund", "team-a"), true).await;
    push(&mut b, &capsule("refund", "team-b"), true).await;
    for _ in 0..3 {
        assert_eq!(
            description(&get(&mut a, "refund", "").await.unwrap()),
            "owned by team-a"
        );
        assert_eq!(
            description(&get(&mut b, "refund", "").await.unwrap()),
            "owned by team-b"
        );
    }

    // Served from memory: a change behind the service's back is not seen
    // (on PostgreSQL the push's own notification comes back to this process
    // and may drop the first read's entry: then read and check again)...
    eventually("serving from memory", || {
        let (mut a, store) = (a.clone(), store.clone());
        async move {
            tamper(&store, "tenant-a", "refund", "owned by team-a").await;
            get(&mut a, "refund", "").await.unwrap();
            tamper(&store, "tenant-a", "refund", "tampered").await;
            description(&get(&mut a, "refund", "").await.unwrap()) == "owned by team-a"
        }
    })
    .await;

    // ...but every change through the service is, at once.
    let v2 = push(&mut a, &capsule("refund", "team-a2"), false).await;
    let latest = get(&mut a, "refund", "latest").await.unwrap();
    assert_eq!(latest.version.as_ref().unwrap().version, 2);
    assert_eq!(description(&latest), "owned by team-a2");
    let published = get(&mut a, "refund", "published").await.unwrap();
    assert_eq!(published.version.as_ref().unwrap().version, 1);

    // Deprecating the published version: "published" no longer finds it, and
    // version 1 reads as deprecated.
    let etag = v2.capsule.unwrap().etag;
    a.deprecate_capsule_version(pb::DeprecateCapsuleVersionRequest {
        name: "refund".into(),
        version: 1,
        etag,
    })
    .await
    .unwrap();
    expect_reason(
        get(&mut a, "refund", "").await,
        Reason::CapsuleVersionNotFound,
    );
    let v1 = get(&mut a, "refund", "1").await.unwrap();
    assert_eq!(
        v1.version.unwrap().status,
        pb::VersionStatus::Deprecated as i32
    );

    // Deleting: gone for every selector; tenant B's capsule of the same name stays.
    let etag = get(&mut a, "refund", "latest")
        .await
        .unwrap()
        .capsule
        .unwrap()
        .etag;
    a.delete_capsule(pb::DeleteCapsuleRequest {
        name: "refund".into(),
        etag,
    })
    .await
    .unwrap();
    for selector in ["", "latest", "1", "2"] {
        expect_reason(
            get(&mut a, "refund", selector).await,
            Reason::CapsuleNotFound,
        );
    }
    assert_eq!(
        description(&get(&mut b, "refund", "").await.unwrap()),
        "owned by team-b"
    );
    drop(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_in_two_tenants_and_changes_seen_at_once_sqlite() {
    same_name_in_two_tenants_and_changes_seen_at_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_name_in_two_tenants_and_changes_seen_at_once_postgres() {
    same_name_in_two_tenants_and_changes_seen_at_once(Backend::Postgres).await;
}

/// Polls `read` until it returns true (a notification crosses processes in
/// well under a second).
async fn eventually<F, Fut>(what: &str, mut read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if read().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not seen within 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_the_others_cache_postgres() {
    let (db, store, keys, auth) = setup(Backend::Postgres).await;
    let other_store = Store::connect(&db.config).await.unwrap();
    let one = Replica::start(store.clone(), keys.clone(), &auth).await;
    let two = Replica::start(other_store, keys, &auth).await;
    let mut c1 = one.client(&auth.issuer, "tenant-a", &[Role::Author]).await;
    let mut c2 = two.client(&auth.issuer, "tenant-a", &[Role::Author]).await;

    let pushed = push(&mut c1, &capsule("refund", "team-a"), true).await;
    // Replica two caches version 1 as published, proved by a change behind
    // both replicas' backs that it does not see. (The push's own
    // notification may reach replica two after its first read and drop that
    // entry: then read and check again.)
    eventually("replica two serving from memory", || {
        let (mut c2, store) = (c2.clone(), store.clone());
        async move {
            tamper(&store, "tenant-a", "refund", "owned by team-a").await;
            get(&mut c2, "refund", "").await.unwrap();
            tamper(&store, "tenant-a", "refund", "tampered").await;
            description(&get(&mut c2, "refund", "").await.unwrap()) == "owned by team-a"
        }
    })
    .await;

    // Deprecated through replica one: replica two stops serving it.
    c1.deprecate_capsule_version(pb::DeprecateCapsuleVersionRequest {
        name: "refund".into(),
        version: 1,
        etag: pushed.capsule.unwrap().etag,
    })
    .await
    .unwrap();
    eventually("the deprecation on replica two", || {
        let mut c2 = c2.clone();
        async move { get(&mut c2, "refund", "").await.is_err() }
    })
    .await;
    expect_reason(
        get(&mut c2, "refund", "").await,
        Reason::CapsuleVersionNotFound,
    );

    // Deleted through replica one: replica two answers NOT_FOUND.
    get(&mut c2, "refund", "1").await.unwrap();
    let etag = get(&mut c1, "refund", "latest")
        .await
        .unwrap()
        .capsule
        .unwrap()
        .etag;
    c1.delete_capsule(pb::DeleteCapsuleRequest {
        name: "refund".into(),
        etag,
    })
    .await
    .unwrap();
    eventually("the deletion on replica two", || {
        let mut c2 = c2.clone();
        async move { get(&mut c2, "refund", "1").await.is_err() }
    })
    .await;
    expect_reason(get(&mut c2, "refund", "1").await, Reason::CapsuleNotFound);
    assert!(one.registry.documents().cache_is_live() && two.registry.documents().cache_is_live());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_subscription_a_postgres_replica_reads_the_database() {
    let (_db, store, keys, auth) = setup(Backend::Postgres).await;
    // No follower running: another process's changes could be missed, so
    // nothing is served from memory.
    let registry = Registry::new(store.clone(), keys, &RegistryConfig::default());
    assert!(!registry.documents().cache_is_live());
    let (addr, server) = testing::serve(
        auth.authenticator.clone(),
        Routes::new(RegistryGrpc::new(registry).into_server()),
    )
    .await;
    let token = auth
        .issuer
        .mint(
            "tenant-a",
            "alice",
            &[Role::Author],
            Duration::from_secs(300),
        )
        .unwrap();
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = RegistryServiceClient::with_interceptor(channel, BearerToken(token));
    push(&mut c, &capsule("refund", "team-a"), true).await;
    get(&mut c, "refund", "").await.unwrap();
    tamper(&store, "tenant-a", "refund", "changed").await;
    assert_eq!(
        description(&get(&mut c, "refund", "").await.unwrap()),
        "changed"
    );
    server.abort();
}
