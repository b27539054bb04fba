#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Capsule Registry driven like a client drives it: real gRPC over TCP,
//! behind the real authentication layer, against SQLite and PostgreSQL.
//!
//! Each scenario is one `async fn(TestApp)`; `on_both_backends!` runs it once
//! per database.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anumate_auth::{BearerToken, DEV_AUDIENCE, DevIssuer, Role};
use anumate_crypto::{Jwks, KeyPair, KeyRing, b64url, b64url_decode, sha256_hex, verify_es256};
use anumate_errors::{Error, ErrorCode, Reason};
use anumate_events::OutboxRow;
use anumate_proto::events::v1 as ev;
use anumate_proto::registry::v1 as pb;
use anumate_registry::{Registry, RegistryConfig, RegistryGrpc};
use anumate_testing::{
    self as testing, Backend, DevAuth, Store, TestDb, expect_error, expect_reason, on_both_backends,
};
use pb::registry_service_client::RegistryServiceClient;
use serde_json::json;
use tonic::Status;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Client = RegistryServiceClient<InterceptedService<Channel, BearerToken>>;

const EXAMPLE: &str = include_str!("../../../examples/refund.capsule.yaml");
const EXAMPLE_NAME: &str = "refund-small-orders";
const MIB: usize = 1024 * 1024;
const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";
const AUTHOR: &[Role] = &[Role::Author];

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A running registry and what a test needs to talk to it and look behind it.
struct TestApp {
    addr: SocketAddr,
    /// Mints tokens the server trusts, for any tenant and roles.
    issuer: DevIssuer,
    /// The server's store, for direct assertions on rows.
    store: Store,
    server: tokio::task::JoinHandle<()>,
    // Dropped last: the database and the issuer's key directory.
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(
        backend,
        RegistryConfig {
            max_document_bytes: MIB,
            ..RegistryConfig::default()
        },
    )
    .await
}

async fn spawn_app_with(backend: Backend, cfg: RegistryConfig) -> TestApp {
    let (db, store) = testing::migrated_store(backend, &anumate_registry::migrations()).await;
    let keys = Arc::new(KeyRing::new(KeyPair::generate().expect("registry key")));
    let registry = Registry::new(store.clone(), keys, &cfg);
    let auth = DevAuth::new();
    let (addr, server) = testing::serve(
        auth.authenticator,
        Routes::new(RegistryGrpc::new(registry).into_server()),
    )
    .await;
    TestApp {
        addr,
        issuer: auth.issuer,
        store,
        server,
        _db: db,
        _issuer_dir: auth.dir,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Row counts of one tenant, read through a tenant transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counts {
    capsules: i64,
    versions: i64,
    outbox: i64,
}

impl TestApp {
    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to registry")
    }

    /// A token for `subject` in `tenant` with `roles`, valid for five minutes.
    fn token(&self, tenant: &str, roles: &[Role]) -> String {
        self.issuer
            .mint(tenant, "alice", roles, Duration::from_secs(300))
            .expect("mint")
    }

    /// A client sending `token`.
    async fn client_with_token(&self, token: &str) -> Client {
        RegistryServiceClient::with_interceptor(self.channel().await, BearerToken(token.into()))
    }

    /// A client acting as `alice` in `tenant` with `roles`.
    async fn client(&self, tenant: &str, roles: &[Role]) -> Client {
        self.client_with_token(&self.token(tenant, roles)).await
    }

    async fn counts(&self, tenant: &str) -> Counts {
        let tx = self.store.read(tenant).await.expect("read tx");
        let mut n = [0i64; 3];
        for (i, table) in ["capsules", "capsule_versions", "outbox"]
            .iter()
            .enumerate()
        {
            let row = tx
                .query_one(
                    &format!("SELECT COUNT(*) AS n FROM {table} WHERE tenant_id = $1"),
                    vec![tenant.into()],
                )
                .await
                .expect("count")
                .expect("a row");
            n[i] = row.try_get("", "n").expect("n");
        }
        Counts {
            capsules: n[0],
            versions: n[1],
            outbox: n[2],
        }
    }

    /// The tenant's outbox rows after `after_seq`, oldest first.
    async fn events_after(&self, tenant: &str, after_seq: i64) -> Vec<OutboxRow> {
        let tx = self.store.read(tenant).await.expect("read tx");
        anumate_events::read_after(&tx, after_seq, 1000)
            .await
            .expect("read outbox")
    }

    async fn last_seq(&self, tenant: &str) -> i64 {
        self.events_after(tenant, 0)
            .await
            .last()
            .map_or(0, |r| r.seq)
    }
}

on_both_backends! {
    lifecycle => lifecycle_sqlite, lifecycle_postgres;
    signatures_and_hashes => signatures_and_hashes_sqlite, signatures_and_hashes_postgres;
    idempotent_push => idempotent_push_sqlite, idempotent_push_postgres;
    etags => etags_sqlite, etags_postgres;
    bad_input => bad_input_sqlite, bad_input_postgres;
    authentication_and_roles => authentication_and_roles_sqlite, authentication_and_roles_postgres;
    tenancy => tenancy_sqlite, tenancy_postgres;
    events => events_sqlite, events_postgres;
    concurrent_pushes => concurrent_pushes_sqlite, concurrent_pushes_postgres;
    versions_stop_at_int32 => versions_stop_at_int32_sqlite, versions_stop_at_int32_postgres;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The violations as (field, position).
fn places(err: &Error) -> Vec<(&str, Option<(u32, u32)>)> {
    err.violations
        .iter()
        .map(|v| (v.field.as_str(), v.position))
        .collect()
}

/// A small valid capsule; `timeout_secs` varies its content.
fn small(name: &str, team: &str, timeout_secs: u32) -> String {
    format!(
        "apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: {name}
  labels: {{team: {team}}}
spec:
  tools: [http.get]
  steps:
    - id: fetch
      tool: http.get
      timeout: {timeout_secs}s
"
    )
}

/// A capsule whose `steps` (starting on line 10) are given.
fn with_steps(steps: &str) -> String {
    format!(
        "apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: t
spec:
  inputs:
    order_id: {{type: string, required: true}}
  tools: [http.get, email.send]
  steps:
{steps}"
    )
}

/// An expected violation: field path, line and column, part of the description.
type Expected = (&'static str, (u32, u32), &'static str);

fn push_req(source: &str) -> pb::PushCapsuleRequest {
    pb::PushCapsuleRequest {
        source_yaml: source.into(),
        source_name: String::new(),
        etag: String::new(),
        publish: false,
    }
}

async fn push(client: &mut Client, source: &str) -> pb::PushCapsuleResponse {
    client
        .push_capsule(push_req(source))
        .await
        .expect("push")
        .into_inner()
}

async fn get(
    client: &mut Client,
    name: &str,
    version: &str,
) -> Result<pb::GetCapsuleResponse, Status> {
    client
        .get_capsule(pb::GetCapsuleRequest {
            name: name.into(),
            version: version.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn list(
    client: &mut Client,
    labels: &str,
    status: i32,
    page_size: i32,
    token: &str,
) -> Result<pb::ListCapsulesResponse, Status> {
    client
        .list_capsules(pb::ListCapsulesRequest {
            page_size,
            page_token: token.into(),
            label_selector: labels.into(),
            status,
        })
        .await
        .map(tonic::Response::into_inner)
}

fn names(resp: &pb::ListCapsulesResponse) -> Vec<&str> {
    resp.capsules.iter().map(|c| c.name.as_str()).collect()
}

async fn list_versions(
    client: &mut Client,
    name: &str,
    page_size: i32,
    token: &str,
) -> Result<pb::ListCapsuleVersionsResponse, Status> {
    client
        .list_capsule_versions(pb::ListCapsuleVersionsRequest {
            name: name.into(),
            page_size,
            page_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn diff(
    client: &mut Client,
    name: &str,
    from: i32,
    to: i32,
) -> Result<pb::DiffCapsuleVersionsResponse, Status> {
    client
        .diff_capsule_versions(pb::DiffCapsuleVersionsRequest {
            name: name.into(),
            from_version: from,
            to_version: to,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn publish(
    client: &mut Client,
    name: &str,
    version: i32,
    etag: &str,
) -> Result<pb::PublishCapsuleVersionResponse, Status> {
    client
        .publish_capsule_version(pb::PublishCapsuleVersionRequest {
            name: name.into(),
            version,
            etag: etag.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn deprecate(
    client: &mut Client,
    name: &str,
    version: i32,
    etag: &str,
) -> Result<pb::DeprecateCapsuleVersionResponse, Status> {
    client
        .deprecate_capsule_version(pb::DeprecateCapsuleVersionRequest {
            name: name.into(),
            version,
            etag: etag.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn delete(
    client: &mut Client,
    name: &str,
    etag: &str,
) -> Result<pb::DeleteCapsuleResponse, Status> {
    client
        .delete_capsule(pb::DeleteCapsuleRequest {
            name: name.into(),
            etag: etag.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

const DRAFT: i32 = pb::VersionStatus::Draft as i32;
const PUBLISHED: i32 = pb::VersionStatus::Published as i32;
const DEPRECATED: i32 = pb::VersionStatus::Deprecated as i32;

/// `PushCapsuleRequest.source_yaml` (field 1, a string) sent as a varint.
#[derive(Clone, PartialEq, prost::Message)]
struct WrongWireType {
    #[prost(int64, tag = "1")]
    source_yaml: i64,
}

/// `PushCapsuleRequest.source_yaml` sent as bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8 {
    #[prost(bytes = "vec", tag = "1")]
    source_yaml: Vec<u8>,
}

/// Sends `message` as the body of a `PushCapsule` call, whatever its type.
async fn push_raw<M>(
    app: &TestApp,
    token: &str,
    message: M,
) -> Result<pb::PushCapsuleResponse, Status>
where
    M: prost::Message + Send + Sync + 'static,
{
    let channel = InterceptedService::new(app.channel().await, BearerToken(token.into()));
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let codec = tonic_prost::ProstCodec::<M, pb::PushCapsuleResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/anumate.registry.v1.RegistryService/PushCapsule",
    );
    grpc.unary(tonic::Request::new(message), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------
// 1. The whole lifecycle
// ---------------------------------------------------------------------------

async fn lifecycle(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;

    // Push a draft.
    let v1 = push(&mut c, EXAMPLE).await;
    assert!(v1.created);
    let version = v1.version.clone().unwrap();
    let capsule = v1.capsule.clone().unwrap();
    assert_eq!(
        (version.name.as_str(), version.version, version.status),
        (EXAMPLE_NAME, 1, DRAFT)
    );
    assert_eq!(version.created_by, "alice");
    assert_eq!(
        version.labels.get("team").map(String::as_str),
        Some("payments")
    );
    assert_eq!((capsule.latest_version, capsule.published_version), (1, 0));
    assert!(!capsule.etag.is_empty());

    // The latest version is the draft, with its source; there is no default yet.
    let latest = get(&mut c, EXAMPLE_NAME, "latest").await.unwrap();
    let got = latest.version.unwrap();
    assert_eq!((got.version, got.status), (1, DRAFT));
    assert_eq!(got.source_yaml, EXAMPLE);
    assert_eq!(got.content_hash, version.content_hash);
    expect_reason(
        get(&mut c, EXAMPLE_NAME, "").await,
        Reason::CapsuleVersionNotFound,
    );

    // Publish with the etag; the default (published) version is now 1.
    let published = publish(&mut c, EXAMPLE_NAME, 1, &capsule.etag)
        .await
        .unwrap();
    assert_eq!(published.version.as_ref().unwrap().status, PUBLISHED);
    assert!(published.version.as_ref().unwrap().publish_time.is_some());
    let capsule = published.capsule.unwrap();
    assert_eq!(capsule.published_version, 1);
    for selector in ["", "published"] {
        let got = get(&mut c, EXAMPLE_NAME, selector)
            .await
            .unwrap()
            .version
            .unwrap();
        assert_eq!((got.version, got.status), (1, PUBLISHED), "{selector:?}");
    }

    // Push changed content as version 2 (a draft: the default stays 1).
    let source_v2 = EXAMPLE
        .replace("timeout: 10s", "timeout: 20s")
        .replace("tell the customer", "email the customer");
    let v2 = c
        .push_capsule(pb::PushCapsuleRequest {
            etag: capsule.etag.clone(),
            ..push_req(&source_v2)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v2.created);
    assert_eq!(v2.version.as_ref().unwrap().version, 2);
    let capsule = v2.capsule.unwrap();
    assert_eq!((capsule.latest_version, capsule.published_version), (2, 1));
    assert_eq!(
        get(&mut c, EXAMPLE_NAME, "")
            .await
            .unwrap()
            .version
            .unwrap()
            .version,
        1
    );
    assert_eq!(
        get(&mut c, EXAMPLE_NAME, "latest")
            .await
            .unwrap()
            .version
            .unwrap()
            .version,
        2
    );
    assert_eq!(
        get(&mut c, EXAMPLE_NAME, "2")
            .await
            .unwrap()
            .version
            .unwrap()
            .source_yaml,
        source_v2
    );

    // Diff 1 → 2: the changed leaves and a unified diff of the sources.
    let d = diff(&mut c, EXAMPLE_NAME, 1, 2).await.unwrap();
    let changes: Vec<(&str, i32, &str, &str)> = d
        .changes
        .iter()
        .map(|ch| {
            (
                ch.path.as_str(),
                ch.kind,
                ch.from_json.as_str(),
                ch.to_json.as_str(),
            )
        })
        .collect();
    let changed = pb::DiffChangeKind::Changed as i32;
    assert_eq!(
        changes,
        vec![
            (
                "/metadata/description",
                changed,
                "\"Refund an order below a threshold and tell the customer\"",
                "\"Refund an order below a threshold and email the customer\"",
            ),
            ("/spec/steps/0/timeout", changed, "\"10s\"", "\"20s\""),
        ]
    );
    assert_eq!(d.from_content_hash, version.content_hash);
    assert_eq!(d.to_content_hash, v2.version.as_ref().unwrap().content_hash);
    assert!(
        d.unified_diff.contains("--- refund-small-orders@1"),
        "{}",
        d.unified_diff
    );
    assert!(d.unified_diff.contains("+++ refund-small-orders@2"));
    assert!(d.unified_diff.contains("\n-      timeout: 10s\n"));
    assert!(d.unified_diff.contains("\n+      timeout: 20s\n"));
    expect_reason(
        diff(&mut c, EXAMPLE_NAME, 1, 3).await,
        Reason::CapsuleVersionNotFound,
    );

    // Deprecate 1: nothing is published any more.
    let dep = deprecate(&mut c, EXAMPLE_NAME, 1, &capsule.etag)
        .await
        .unwrap();
    assert_eq!(dep.version.as_ref().unwrap().status, DEPRECATED);
    assert!(dep.version.as_ref().unwrap().deprecate_time.is_some());
    let capsule = dep.capsule.unwrap();
    assert_eq!(capsule.published_version, 0);
    expect_reason(
        get(&mut c, EXAMPLE_NAME, "").await,
        Reason::CapsuleVersionNotFound,
    );
    // A deprecated version cannot come back.
    let err = expect_reason(
        publish(&mut c, EXAMPLE_NAME, 1, &capsule.etag).await,
        Reason::VersionDeprecated,
    );
    assert!(err.message.contains("deprecated"), "{}", err.message);

    // Versions, newest first, without their sources.
    let versions = list_versions(&mut c, EXAMPLE_NAME, 0, "").await.unwrap();
    let summary: Vec<(i32, i32)> = versions
        .versions
        .iter()
        .map(|v| (v.version, v.status))
        .collect();
    assert_eq!(summary, vec![(2, DRAFT), (1, DEPRECATED)]);
    for v in &versions.versions {
        assert!(
            v.source_yaml.is_empty() && v.canonical_json.is_empty(),
            "{v:?}"
        );
        assert!(v.content_hash.starts_with("sha256:"));
        assert!(!v.signature.is_empty());
    }
    assert_eq!(versions.next_page_token, "");
    // One per page: the tokens chain to the end.
    let p1 = list_versions(&mut c, EXAMPLE_NAME, 1, "").await.unwrap();
    assert_eq!(
        p1.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [2]
    );
    let t1 = p1.next_page_token;
    assert!(!t1.is_empty());
    let p2 = list_versions(&mut c, EXAMPLE_NAME, 1, &t1).await.unwrap();
    assert_eq!(
        p2.versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1]
    );
    assert_eq!(p2.next_page_token, "");
    let err = expect_error(
        list_versions(&mut c, EXAMPLE_NAME, 1, "not*base64").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(places(&err), [("page_token", None)]);

    // Two more capsules for the listing.
    push(&mut c, &small("alpha", "support", 5)).await;
    let zeta = c
        .push_capsule(pb::PushCapsuleRequest {
            publish: true,
            ..push_req(&small("zeta", "payments", 5))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(zeta.version.unwrap().status, PUBLISHED);
    assert_eq!(zeta.capsule.unwrap().published_version, 1);

    let all = list(&mut c, "", 0, 0, "").await.unwrap();
    assert_eq!(names(&all), ["alpha", EXAMPLE_NAME, "zeta"]);
    assert_eq!(all.next_page_token, "");
    let payments = list(&mut c, "team=payments", 0, 0, "").await.unwrap();
    assert_eq!(names(&payments), [EXAMPLE_NAME, "zeta"]);
    let both = list(&mut c, "team = payments, nothing=here", 0, 0, "")
        .await
        .unwrap();
    assert!(both.capsules.is_empty());
    assert_eq!(
        names(&list(&mut c, "", PUBLISHED, 0, "").await.unwrap()),
        ["zeta"]
    );
    assert_eq!(
        names(&list(&mut c, "", DRAFT, 0, "").await.unwrap()),
        ["alpha", EXAMPLE_NAME]
    );
    assert_eq!(
        names(&list(&mut c, "", DEPRECATED, 0, "").await.unwrap()),
        [EXAMPLE_NAME]
    );
    assert_eq!(
        names(&list(&mut c, "team=payments", DRAFT, 0, "").await.unwrap()),
        [EXAMPLE_NAME]
    );
    let err = expect_error(
        list(&mut c, "team", 0, 0, "").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(places(&err), [("label_selector", None)]);

    // Pagination: one capsule per page across the three.
    let mut seen = Vec::new();
    let mut token = String::new();
    for page in 0.. {
        assert!(page < 3, "the tokens do not end");
        let resp = list(&mut c, "", 0, 1, &token).await.unwrap();
        assert_eq!(resp.capsules.len(), 1);
        seen.push(resp.capsules[0].name.clone());
        token = resp.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(seen, ["alpha", EXAMPLE_NAME, "zeta"]);
    let err = expect_error(
        list(&mut c, "", 0, 1, "%%%").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(places(&err), [("page_token", None)]);
    let err = expect_error(
        list(&mut c, "", 0, -1, "").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(places(&err), [("page_size", None)]);

    // Delete: gone from reads and lists; the name cannot be reused.
    let before = app.counts(TENANT_A).await;
    let deleted = delete(&mut c, EXAMPLE_NAME, &capsule.etag)
        .await
        .unwrap()
        .capsule
        .unwrap();
    assert_eq!(deleted.name, EXAMPLE_NAME);
    // The response shows the capsule as deleted, not as it was before.
    assert_ne!(deleted.etag, capsule.etag);
    for selector in ["", "latest", "1", "2"] {
        expect_reason(
            get(&mut c, EXAMPLE_NAME, selector).await,
            Reason::CapsuleNotFound,
        );
    }
    expect_reason(
        list_versions(&mut c, EXAMPLE_NAME, 0, "").await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        diff(&mut c, EXAMPLE_NAME, 1, 2).await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        publish(&mut c, EXAMPLE_NAME, 2, "").await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        delete(&mut c, EXAMPLE_NAME, "").await,
        Reason::CapsuleNotFound,
    );
    assert_eq!(
        names(&list(&mut c, "", 0, 0, "").await.unwrap()),
        ["alpha", "zeta"]
    );
    assert_eq!(
        names(&list(&mut c, "team=payments", 0, 0, "").await.unwrap()),
        ["zeta"]
    );
    let err = expect_reason(
        c.push_capsule(push_req(EXAMPLE)).await,
        Reason::DocumentDeleted,
    );
    assert!(err.message.contains("deleted"), "{}", err.message);
    // Soft delete: the rows stay, one more event.
    let after = app.counts(TENANT_A).await;
    assert_eq!(
        after,
        Counts {
            outbox: before.outbox + 1,
            ..before
        }
    );
}

// ---------------------------------------------------------------------------
// 2. Signatures and content hashes
// ---------------------------------------------------------------------------

async fn signatures_and_hashes(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let pushed = push(&mut c, EXAMPLE).await;
    let v = pushed.version.unwrap();

    // The hash is SHA-256 over the canonical JSON, which is RFC 8785 canonical.
    assert_eq!(
        v.content_hash,
        format!("sha256:{}", sha256_hex(v.canonical_json.as_bytes()))
    );
    let parsed: serde_json::Value = serde_json::from_str(&v.canonical_json).unwrap();
    assert_eq!(
        anumate_crypto::canonical_json(&parsed).unwrap(),
        v.canonical_json
    );
    assert_eq!(parsed["metadata"]["name"], EXAMPLE_NAME);

    // The signature verifies with the published keys, and only over this content.
    let keys = c
        .get_capsule_signing_keys(pb::GetCapsuleSigningKeysRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.content_type, "application/json");
    let jwks: Jwks = serde_json::from_slice(&keys.data).unwrap();
    let jwk = jwks.find(&v.kid).expect("signing key in the JWKS");
    let signature = b64url_decode(&v.signature).expect("base64url signature");
    assert!(verify_es256(jwk, v.canonical_json.as_bytes(), &signature));
    assert!(!verify_es256(
        jwk,
        v.canonical_json.replace("10s", "11s").as_bytes(),
        &signature
    ));
    // A stored version read back carries the same signature.
    let got = get(&mut c, EXAMPLE_NAME, "1")
        .await
        .unwrap()
        .version
        .unwrap();
    assert_eq!(
        (got.signature.as_str(), got.kid.as_str()),
        (v.signature.as_str(), v.kid.as_str())
    );

    // Key order, comments and flow style do not change the content.
    let reordered = r#"# the same capsule, written differently
spec:
  steps:
    - tool: http.get
      id: fetch-order
      retry:
        backoff: exponential
        initial: 1s
        max_attempts: 3
      timeout: 10s
      with: {url: "https://orders.example/v1/orders/${{ inputs.order_id }}"}
    - needs: [fetch-order]
      id: refund
      tool: payments.refund
      with: {amount: "${{ inputs.amount_paise }}", order_id: "${{ inputs.order_id }}"}
      if: "${{ steps.fetch-order.output.status == 'paid' }}"
    - with:
        template: refund-done
        to: "${{ steps.fetch-order.output.email }}"
      needs: [refund]
      tool: email.send
      id: notify
  policies: [refund-limits, pii-masking]
  tools: [http.get, payments.refund, email.send]
  inputs:
    amount_paise: {minimum: 1, required: true, type: integer}
    order_id: {pattern: "^ord_[a-z0-9]+$", type: string, required: true}
metadata:
  labels:
    team: payments
  description: "Refund an order below a threshold and tell the customer"
  name: refund-small-orders
kind: Capsule
apiVersion: anumate.dev/v1
"#;
    let validated = c
        .validate_capsule(pb::ValidateCapsuleRequest {
            source_yaml: reordered.into(),
            source_name: "reordered.yaml".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.content_hash, v.content_hash);
    assert_eq!(validated.canonical_json, v.canonical_json);
    let again = push(&mut c, reordered).await;
    assert!(!again.created);
    let again_v = again.version.unwrap();
    assert_eq!(
        (again_v.version, again_v.content_hash.as_str()),
        (1, v.content_hash.as_str())
    );
    // The stored source is the first one pushed.
    assert_eq!(again_v.source_yaml, EXAMPLE);
    assert_eq!(app.counts(TENANT_A).await.versions, 1);
}

// ---------------------------------------------------------------------------
// 3. Idempotent re-push
// ---------------------------------------------------------------------------

/// Versions are `int32` on the wire while the table keeps `BIGINT`: the push
/// that would create version 2^31 is refused and writes nothing.
async fn versions_stop_at_int32(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    push(&mut c, &small("full", "x", 1)).await;
    let tx = app.store.write(TENANT_A).await.unwrap();
    tx.execute(
        "UPDATE capsules SET latest_version = $2 WHERE tenant_id = $1 AND name = 'full'",
        vec![TENANT_A.into(), i64::from(i32::MAX).into()],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let before = app.counts(TENANT_A).await;
    let err = expect_reason(
        c.push_capsule(push_req(&small("full", "x", 2))).await,
        Reason::ResourceExhausted,
    );
    assert!(err.metadata.contains(&("limit".into(), "versions".into())));
    assert_eq!(app.counts(TENANT_A).await, before);
    let listed = list(&mut c, "", 0, 0, "").await.unwrap();
    assert_eq!(listed.capsules[0].latest_version, i32::MAX);
}

async fn idempotent_push(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let first = push(&mut c, EXAMPLE).await;
    assert!(first.created);
    let counts = app.counts(TENANT_A).await;
    assert_eq!(
        counts,
        Counts {
            capsules: 1,
            versions: 1,
            outbox: 1
        }
    );

    // Same content: the same version, nothing written.
    let again = push(&mut c, EXAMPLE).await;
    assert!(!again.created);
    assert_eq!(again.version.as_ref().unwrap().version, 1);
    assert_eq!(again.version.as_ref().unwrap().status, DRAFT);
    assert_eq!(
        again.capsule.as_ref().unwrap().etag,
        first.capsule.as_ref().unwrap().etag
    );
    assert_eq!(app.counts(TENANT_A).await, counts);

    // Same content with publish: publishes that draft (one event), no new version.
    let published = c
        .push_capsule(pb::PushCapsuleRequest {
            publish: true,
            ..push_req(EXAMPLE)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!published.created);
    let v = published.version.unwrap();
    assert_eq!((v.version, v.status), (1, PUBLISHED));
    assert_eq!(published.capsule.unwrap().published_version, 1);
    let seq = app.last_seq(TENANT_A).await;
    let events = app.events_after(TENANT_A, 0).await;
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        [
            "dev.anumate.capsule.pushed.v1",
            "dev.anumate.capsule.published.v1"
        ]
    );
    assert_eq!(
        app.counts(TENANT_A).await,
        Counts {
            outbox: 2,
            ..counts
        }
    );
    assert_eq!(
        get(&mut c, EXAMPLE_NAME, "")
            .await
            .unwrap()
            .version
            .unwrap()
            .version,
        1
    );

    // Publishing the same content again is a no-op.
    let twice = c
        .push_capsule(pb::PushCapsuleRequest {
            publish: true,
            ..push_req(EXAMPLE)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!twice.created);
    assert_eq!(twice.version.unwrap().status, PUBLISHED);
    assert!(app.events_after(TENANT_A, seq).await.is_empty());
    let v = publish(&mut c, EXAMPLE_NAME, 1, "").await.unwrap();
    assert_eq!(v.version.unwrap().status, PUBLISHED);
    assert!(app.events_after(TENANT_A, seq).await.is_empty());
    assert_eq!(
        app.counts(TENANT_A).await,
        Counts {
            outbox: 2,
            ..counts
        }
    );
}

// ---------------------------------------------------------------------------
// 4. Etags
// ---------------------------------------------------------------------------

async fn etags(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;

    // An etag for a capsule that does not exist.
    let err = expect_error(
        c.push_capsule(pb::PushCapsuleRequest {
            etag: "r1".into(),
            ..push_req(EXAMPLE)
        })
        .await,
        ErrorCode::EtagMismatch,
    );
    assert!(err.message.contains("does not exist"), "{}", err.message);
    assert_eq!(
        app.counts(TENANT_A).await,
        Counts {
            capsules: 0,
            versions: 0,
            outbox: 0
        }
    );

    let first = push(&mut c, EXAMPLE).await;
    let etag1 = first.capsule.unwrap().etag;
    // Publishing moves the etag on; etag1 is now stale.
    let etag2 = publish(&mut c, EXAMPLE_NAME, 1, &etag1)
        .await
        .unwrap()
        .capsule
        .unwrap()
        .etag;
    assert_ne!(etag1, etag2);
    let before = app.counts(TENANT_A).await;

    let v2 = EXAMPLE.replace("timeout: 10s", "timeout: 30s");
    let stale_push = c
        .push_capsule(pb::PushCapsuleRequest {
            etag: etag1.clone(),
            ..push_req(&v2)
        })
        .await;
    let err = expect_error(stale_push, ErrorCode::EtagMismatch);
    assert_eq!(err.metadata, [("current_etag".to_string(), etag2.clone())]);
    // Even identical content is refused with a stale etag.
    expect_error(
        c.push_capsule(pb::PushCapsuleRequest {
            etag: etag1.clone(),
            publish: true,
            ..push_req(EXAMPLE)
        })
        .await,
        ErrorCode::EtagMismatch,
    );
    expect_error(
        publish(&mut c, EXAMPLE_NAME, 1, &etag1).await,
        ErrorCode::EtagMismatch,
    );
    expect_error(
        deprecate(&mut c, EXAMPLE_NAME, 1, &etag1).await,
        ErrorCode::EtagMismatch,
    );
    expect_error(
        delete(&mut c, EXAMPLE_NAME, &etag1).await,
        ErrorCode::EtagMismatch,
    );
    expect_error(
        delete(&mut c, EXAMPLE_NAME, "garbage").await,
        ErrorCode::EtagMismatch,
    );

    // Nothing changed.
    assert_eq!(app.counts(TENANT_A).await, before);
    let now = get(&mut c, EXAMPLE_NAME, "latest").await.unwrap();
    assert_eq!(now.capsule.as_ref().unwrap().etag, etag2);
    assert_eq!(now.capsule.as_ref().unwrap().latest_version, 1);
    assert_eq!(now.version.unwrap().status, PUBLISHED);

    // The current etag works.
    let pushed = c
        .push_capsule(pb::PushCapsuleRequest {
            etag: etag2.clone(),
            ..push_req(&v2)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pushed.version.unwrap().version, 2);
    let etag3 = pushed.capsule.unwrap().etag;
    assert_ne!(etag3, etag2);
    let etag4 = deprecate(&mut c, EXAMPLE_NAME, 1, &etag3)
        .await
        .unwrap()
        .capsule
        .unwrap()
        .etag;
    expect_error(
        delete(&mut c, EXAMPLE_NAME, &etag3).await,
        ErrorCode::EtagMismatch,
    );
    delete(&mut c, EXAMPLE_NAME, &etag4).await.unwrap();
}

// ---------------------------------------------------------------------------
// 5. Bad input
// ---------------------------------------------------------------------------

async fn bad_input(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let empty = Counts {
        capsules: 0,
        versions: 0,
        outbox: 0,
    };

    let documents: Vec<(&str, String, Vec<Expected>)> = vec![
        (
            "malformed YAML",
            include_str!("../../../libs/capsule/tests/fixtures/malformed.yaml").to_string(),
            vec![("", (7, 8), "invalid YAML")],
        ),
        (
            "unknown key",
            with_steps("    - id: a\n      tool: http.get\n      timout: 10s\n"),
            vec![(
                "spec.steps[0].timout",
                (12, 7),
                "unknown key \"timout\"; did you mean \"timeout\"?",
            )],
        ),
        (
            "tool outside tools",
            with_steps("    - id: a\n      tool: payments.refund\n"),
            vec![(
                "spec.steps[0].tool",
                (11, 13),
                "tool \"payments.refund\" is not in spec.tools",
            )],
        ),
        (
            "needs a missing step",
            with_steps(
                "    - id: a\n      tool: http.get\n    - id: b\n      tool: http.get\n      needs: [a, nope]\n",
            ),
            vec![(
                "spec.steps[1].needs[1]",
                (14, 18),
                "needs unknown step \"nope\"",
            )],
        ),
        (
            "cyclic needs",
            include_str!("../../../libs/capsule/tests/fixtures/cycle.yaml").to_string(),
            vec![(
                "spec.steps[1].needs[0]",
                (13, 15),
                "needs form a cycle: a -> c -> b -> a",
            )],
        ),
        (
            "duplicate step ids",
            with_steps("    - id: a\n      tool: http.get\n    - id: a\n      tool: http.get\n"),
            vec![("spec.steps[1].id", (12, 11), "duplicate step id \"a\"")],
        ),
        (
            "every problem at once",
            include_str!("../../../libs/capsule/tests/fixtures/five-problems.yaml").to_string(),
            vec![
                ("apiVersion", (1, 13), "unsupported apiVersion"),
                ("metadata.name", (4, 9), "DNS label"),
                ("spec.steps[0].tool", (11, 13), "did you mean \"http.get\"?"),
                ("spec.steps[1].with.to", (15, 18), "unknown input \"email\""),
                ("spec.steps[1].retyr", (16, 7), "did you mean \"retry\"?"),
            ],
        ),
        (
            "empty document",
            String::new(),
            vec![("", (1, 1), "document is empty")],
        ),
    ];
    for (case, source, want) in &documents {
        for publish in [false, true] {
            let result = c
                .push_capsule(pb::PushCapsuleRequest {
                    source_yaml: source.clone(),
                    source_name: "broken.yaml".into(),
                    etag: String::new(),
                    publish,
                })
                .await;
            let err = expect_error(result, ErrorCode::InvalidDocument);
            let shown: Vec<String> = err.violations.iter().map(|v| format!("{v:?}")).collect();
            assert_eq!(err.violations.len(), want.len(), "{case}: {shown:#?}");
            for (got, (field, pos, text)) in err.violations.iter().zip(want) {
                assert_eq!(
                    (got.field.as_str(), got.position),
                    (*field, Some(*pos)),
                    "{case}: {shown:#?}"
                );
                assert!(
                    got.description.contains(text),
                    "{case}: {got:?} lacks {text:?}"
                );
            }
        }
        // ValidateCapsule reports the same problems.
        let validated = c
            .validate_capsule(pb::ValidateCapsuleRequest {
                source_yaml: source.clone(),
                source_name: "broken.yaml".into(),
            })
            .await;
        assert_eq!(
            expect_error(validated, ErrorCode::InvalidDocument)
                .violations
                .len(),
            want.len(),
            "{case}"
        );
        assert_eq!(app.counts(TENANT_A).await, empty, "{case}");
    }

    // Oversize documents. The limit is 1 MiB; 2 MB reaches the registry, which
    // refuses it by size without parsing.
    let padding = |bytes: usize| format!("{}\n# {}\n", small("big", "x", 1), "x".repeat(bytes));
    let err = expect_error(
        c.push_capsule(push_req(&padding(2_000_000))).await,
        ErrorCode::PayloadTooLarge,
    );
    assert!(err.message.contains("limit is 1048576"), "{}", err.message);
    // 10 MB is refused from its length prefix, before it is read or decoded,
    // with the same stable code (tonic alone would say OUT_OF_RANGE).
    let err = expect_error(
        c.push_capsule(push_req(&padding(10_000_000))).await,
        ErrorCode::PayloadTooLarge,
    );
    assert!(err.message.contains("too large"), "{}", err.message);
    assert_eq!(app.counts(TENANT_A).await, empty);

    // Bytes that are not a PushCapsuleRequest: a stable code, not INTERNAL.
    let token = app.token(TENANT_A, AUTHOR);
    let err = expect_error(
        push_raw(&app, &token, WrongWireType { source_yaml: 7 }).await,
        ErrorCode::InvalidArgument,
    );
    assert!(
        err.message.contains("not a valid protobuf message"),
        "{}",
        err.message
    );
    let err = expect_error(
        push_raw(
            &app,
            &token,
            NotUtf8 {
                source_yaml: vec![0xff, 0xfe, b'a'],
            },
        )
        .await,
        ErrorCode::InvalidArgument,
    );
    assert!(
        err.message.contains("not a valid protobuf message"),
        "{}",
        err.message
    );
    assert_eq!(app.counts(TENANT_A).await, empty);

    // Bad request fields.
    expect_reason(
        get(&mut c, "nothing-here", "latest").await,
        Reason::CapsuleNotFound,
    );
    for selector in ["v1", "0", "-3", "1.5", "Latest"] {
        let err = expect_error(
            get(&mut c, "nothing-here", selector).await,
            ErrorCode::InvalidArgument,
        );
        assert_eq!(places(&err), [("version", None)], "{selector}");
    }
    let err = expect_error(
        get(&mut c, "Not_A_Label", "latest").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(places(&err), [("name", None)]);
    let err = expect_error(
        list(&mut c, "", 42, 0, "").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(places(&err), [("status", None)]);
    expect_error(
        diff(&mut c, "nothing-here", 0, 1).await,
        ErrorCode::InvalidArgument,
    );
    expect_reason(
        diff(&mut c, "nothing-here", 1, 2).await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        publish(&mut c, "nothing-here", 1, "").await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        deprecate(&mut c, "nothing-here", 1, "").await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        delete(&mut c, "nothing-here", "").await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        list_versions(&mut c, "nothing-here", 0, "").await,
        Reason::CapsuleNotFound,
    );
    assert_eq!(app.counts(TENANT_A).await, empty);

    // The service is still serving, on the same connection.
    let ok = push(&mut c, EXAMPLE).await;
    assert!(ok.created);
    expect_reason(
        publish(&mut c, EXAMPLE_NAME, 2, "").await,
        Reason::CapsuleVersionNotFound,
    );
    assert_eq!(
        app.counts(TENANT_A).await,
        Counts {
            capsules: 1,
            versions: 1,
            outbox: 1
        }
    );
}

// ---------------------------------------------------------------------------
// 6. Authentication and roles
// ---------------------------------------------------------------------------

async fn authentication_and_roles(app: TestApp) {
    let claims = |iss: &str, exp: i64| {
        json!({
            "iss": iss, "sub": "mallory", "aud": DEV_AUDIENCE, "tenant": TENANT_A,
            "roles": ["admin"], "iat": now_secs() - 600, "nbf": now_secs() - 600, "exp": exp,
        })
    };

    // No token at all.
    let mut anonymous = RegistryServiceClient::new(app.channel().await);
    let err = expect_error(
        anonymous.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::Unauthenticated,
    );
    assert!(
        err.message.contains("missing authorization"),
        "{}",
        err.message
    );
    expect_error(
        anonymous
            .get_capsule_signing_keys(pb::GetCapsuleSigningKeysRequest {})
            .await,
        ErrorCode::Unauthenticated,
    );

    // Expired beyond the 30 s leeway.
    let expired = app
        .issuer
        .sign_claims(&claims(app.issuer.issuer(), now_secs() - 120))
        .unwrap();
    let mut c = app.client_with_token(&expired).await;
    expect_error(
        c.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::TokenExpired,
    );

    // Signed by a key the server does not know.
    let stranger_dir = tempfile::tempdir().unwrap();
    let stranger = DevIssuer::load_or_create(stranger_dir.path()).unwrap();
    let unknown_key = stranger
        .mint(
            TENANT_A,
            "mallory",
            &[Role::Admin],
            Duration::from_secs(300),
        )
        .unwrap();
    let mut c = app.client_with_token(&unknown_key).await;
    expect_error(
        c.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::Unauthenticated,
    );

    // Forged: names the trusted key's kid but is signed by another key.
    let kid = app.issuer.jwks().keys[0].kid.clone().unwrap();
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": kid});
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(
            claims(app.issuer.issuer(), now_secs() + 300)
                .to_string()
                .as_bytes()
        )
    );
    let forged = format!(
        "{input}.{}",
        KeyPair::generate().unwrap().sign_b64url(input.as_bytes())
    );
    let mut c = app.client_with_token(&forged).await;
    let err = expect_error(
        c.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::Unauthenticated,
    );
    assert!(err.message.contains("signature"), "{}", err.message);

    // Tampered: a valid token with its tenant rewritten.
    let valid = app.token(TENANT_B, &[Role::Admin]);
    let parts: Vec<&str> = valid.split('.').collect();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&b64url_decode(parts[1]).unwrap()).unwrap();
    payload["tenant"] = json!(TENANT_A);
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64url(payload.to_string().as_bytes()),
        parts[2]
    );
    let mut c = app.client_with_token(&tampered).await;
    expect_error(
        c.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::Unauthenticated,
    );

    // Another issuer, even signed with the trusted key.
    let other_iss = app
        .issuer
        .sign_claims(&claims("https://evil.example", now_secs() + 300))
        .unwrap();
    let mut c = app.client_with_token(&other_iss).await;
    let err = expect_error(
        c.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::Unauthenticated,
    );
    assert!(err.message.contains("issuer"), "{}", err.message);

    // Not a JWT; no tenant claim.
    let mut c = app.client_with_token("not-a-jwt").await;
    expect_error(
        c.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::Unauthenticated,
    );
    let mut no_tenant = claims(app.issuer.issuer(), now_secs() + 300);
    no_tenant.as_object_mut().unwrap().remove("tenant");
    let mut c = app
        .client_with_token(&app.issuer.sign_claims(&no_tenant).unwrap())
        .await;
    expect_error(
        c.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::Unauthenticated,
    );

    let empty = Counts {
        capsules: 0,
        versions: 0,
        outbox: 0,
    };
    assert_eq!(app.counts(TENANT_A).await, empty);

    // An operator reads but cannot write.
    let mut operator = app.client(TENANT_A, &[Role::Operator]).await;
    let err = expect_error(
        operator.push_capsule(push_req(EXAMPLE)).await,
        ErrorCode::PermissionDenied,
    );
    assert!(
        err.metadata
            .iter()
            .any(|(k, v)| k == "required_roles" && v.contains("author")),
        "{err:?}"
    );
    assert_eq!(app.counts(TENANT_A).await, empty);
    assert!(
        list(&mut operator, "", 0, 0, "")
            .await
            .unwrap()
            .capsules
            .is_empty()
    );

    let mut author = app.client(TENANT_A, AUTHOR).await;
    let pushed = push(&mut author, EXAMPLE).await;
    let etag = pushed.capsule.unwrap().etag;
    assert_eq!(
        get(&mut operator, EXAMPLE_NAME, "latest")
            .await
            .unwrap()
            .version
            .unwrap()
            .version,
        1
    );
    expect_error(
        publish(&mut operator, EXAMPLE_NAME, 1, &etag).await,
        ErrorCode::PermissionDenied,
    );
    expect_error(
        deprecate(&mut operator, EXAMPLE_NAME, 1, &etag).await,
        ErrorCode::PermissionDenied,
    );
    expect_error(
        delete(&mut operator, EXAMPLE_NAME, &etag).await,
        ErrorCode::PermissionDenied,
    );

    // An auditor reads everything and writes nothing.
    let mut auditor = app.client(TENANT_A, &[Role::Auditor]).await;
    assert_eq!(
        names(&list(&mut auditor, "", 0, 0, "").await.unwrap()),
        [EXAMPLE_NAME]
    );
    assert_eq!(
        get(&mut auditor, EXAMPLE_NAME, "1")
            .await
            .unwrap()
            .version
            .unwrap()
            .source_yaml,
        EXAMPLE
    );
    assert_eq!(
        list_versions(&mut auditor, EXAMPLE_NAME, 0, "")
            .await
            .unwrap()
            .versions
            .len(),
        1
    );
    assert!(
        diff(&mut auditor, EXAMPLE_NAME, 1, 1)
            .await
            .unwrap()
            .changes
            .is_empty()
    );
    auditor
        .get_capsule_signing_keys(pb::GetCapsuleSigningKeysRequest {})
        .await
        .unwrap();
    expect_error(
        publish(&mut auditor, EXAMPLE_NAME, 1, &etag).await,
        ErrorCode::PermissionDenied,
    );

    // Admins may write.
    let mut admin = app.client(TENANT_A, &[Role::Admin]).await;
    publish(&mut admin, EXAMPLE_NAME, 1, &etag).await.unwrap();
    assert_eq!(
        app.counts(TENANT_A).await,
        Counts {
            capsules: 1,
            versions: 1,
            outbox: 2
        }
    );
    // A token without roles reads nothing.
    let mut nobody = app.client(TENANT_A, &[]).await;
    expect_error(
        get(&mut nobody, EXAMPLE_NAME, "").await,
        ErrorCode::PermissionDenied,
    );
}

// ---------------------------------------------------------------------------
// 7. Tenancy
// ---------------------------------------------------------------------------

async fn tenancy(app: TestApp) {
    let mut a = app.client(TENANT_A, AUTHOR).await;
    let mut b = app.client(TENANT_B, &[Role::Admin]).await;
    let pushed = a
        .push_capsule(pb::PushCapsuleRequest {
            publish: true,
            ..push_req(EXAMPLE)
        })
        .await
        .unwrap()
        .into_inner();
    let a_etag = pushed.capsule.unwrap().etag;
    let a_hash = pushed.version.unwrap().content_hash;

    // B sees nothing of A's through any read.
    for selector in ["", "latest", "1"] {
        expect_reason(
            get(&mut b, EXAMPLE_NAME, selector).await,
            Reason::CapsuleNotFound,
        );
    }
    assert!(
        list(&mut b, "", 0, 0, "")
            .await
            .unwrap()
            .capsules
            .is_empty()
    );
    assert!(
        list(&mut b, "team=payments", PUBLISHED, 0, "")
            .await
            .unwrap()
            .capsules
            .is_empty()
    );
    expect_reason(
        list_versions(&mut b, EXAMPLE_NAME, 0, "").await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        diff(&mut b, EXAMPLE_NAME, 1, 1).await,
        Reason::CapsuleNotFound,
    );
    // …nor change it.
    expect_reason(
        publish(&mut b, EXAMPLE_NAME, 1, "").await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        deprecate(&mut b, EXAMPLE_NAME, 1, &a_etag).await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        delete(&mut b, EXAMPLE_NAME, "").await,
        Reason::CapsuleNotFound,
    );
    expect_error(
        b.push_capsule(pb::PushCapsuleRequest {
            etag: a_etag.clone(),
            ..push_req(EXAMPLE)
        })
        .await,
        ErrorCode::EtagMismatch,
    );
    assert_eq!(
        app.counts(TENANT_B).await,
        Counts {
            capsules: 0,
            versions: 0,
            outbox: 0
        }
    );

    // B makes its own capsule with the same name, independently.
    let b_source = EXAMPLE.replace("timeout: 10s", "timeout: 45s");
    let b_pushed = push(&mut b, &b_source).await;
    assert!(b_pushed.created);
    assert_eq!(b_pushed.version.as_ref().unwrap().version, 1);
    assert_ne!(b_pushed.version.as_ref().unwrap().content_hash, a_hash);
    // Pushing A's exact content in B is new there too (hashes are per tenant).
    let b_same = push(&mut b, EXAMPLE).await;
    assert!(b_same.created);
    assert_eq!(b_same.version.unwrap().version, 2);
    let b_etag = b_same.capsule.unwrap().etag;
    delete(&mut b, EXAMPLE_NAME, &b_etag).await.unwrap();

    // A's capsule is untouched.
    let got = get(&mut a, EXAMPLE_NAME, "").await.unwrap();
    assert_eq!(got.capsule.as_ref().unwrap().etag, a_etag);
    assert_eq!(got.capsule.as_ref().unwrap().latest_version, 1);
    assert_eq!(got.version.unwrap().content_hash, a_hash);
    assert_eq!(
        names(&list(&mut a, "", 0, 0, "").await.unwrap()),
        [EXAMPLE_NAME]
    );
    assert_eq!(
        app.counts(TENANT_A).await,
        Counts {
            capsules: 1,
            versions: 1,
            outbox: 2
        }
    );
    assert_eq!(
        app.counts(TENANT_B).await,
        Counts {
            capsules: 1,
            versions: 2,
            outbox: 3
        }
    );
    for row in app.events_after(TENANT_B, 0).await {
        assert_eq!(row.tenant_id, TENANT_B);
    }
}

// ---------------------------------------------------------------------------
// 8. Row-level security (PostgreSQL)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_level_security_hides_other_tenants_postgres() {
    use sea_orm::{ConnectionTrait as _, DbBackend, Statement};

    let app = spawn_app(Backend::Postgres).await;
    let mut a = app.client(TENANT_A, AUTHOR).await;
    let mut b = app.client(TENANT_B, AUTHOR).await;
    push(&mut a, EXAMPLE).await;
    push(&mut a, &small("only-a", "x", 1)).await;
    push(&mut b, EXAMPLE).await;

    let tables = ["capsules", "capsule_versions", "capsule_labels", "outbox"];
    let tenants_of = |rows: &[sea_orm::QueryResult]| -> BTreeSet<String> {
        rows.iter()
            .map(|r| r.try_get::<String>("", "tenant_id").unwrap())
            .collect()
    };

    // A tenant transaction, queries with no tenant filter at all: the database
    // returns only that tenant's rows.
    let tx = app.store.read(TENANT_A).await.unwrap();
    let who = tx
        .query_one("SELECT current_user::text AS who", vec![])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who.try_get::<String>("", "who").unwrap(), "anumate_app");
    for table in tables {
        let rows = tx
            .query_all(&format!("SELECT * FROM {table}"), vec![])
            .await
            .unwrap();
        assert!(!rows.is_empty(), "{table}");
        assert_eq!(
            tenants_of(&rows),
            BTreeSet::from([TENANT_A.to_string()]),
            "{table}"
        );
    }
    let names: BTreeSet<String> = tx
        .query_all("SELECT name FROM capsules", vec![])
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("", "name").unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([EXAMPLE_NAME.to_string(), "only-a".to_string()])
    );
    // Updates cannot reach B's rows either.
    let touched = tx
        .execute(
            "UPDATE capsules SET description = 'pwned' WHERE tenant_id = $1",
            vec![TENANT_B.into()],
        )
        .await
        .unwrap();
    assert_eq!(touched, 0);
    drop(tx);

    // Nor can a write claim B's tenant id.
    let tx = app.store.write(TENANT_A).await.unwrap();
    let insert = tx
        .execute(
            "INSERT INTO capsules (tenant_id, name, description, labels, latest_version, published_version, \
               revision, created_at, updated_at) VALUES ($1, 'sneaky', '', '{}', 0, 0, 0, 0, 0)",
            vec![TENANT_B.into()],
        )
        .await;
    assert!(
        insert.is_err(),
        "RLS WITH CHECK let a cross-tenant insert through"
    );
    drop(tx);

    // The owner connection (not subject to RLS) sees both tenants: the filter
    // above was the database's, not the query's.
    let owner = app.store.connect_owner().await.unwrap();
    for table in tables {
        let rows = owner
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT * FROM {table}"),
            ))
            .await
            .unwrap();
        assert_eq!(
            tenants_of(&rows),
            BTreeSet::from([TENANT_A.to_string(), TENANT_B.to_string()]),
            "{table}"
        );
    }
    // B's description was not changed.
    let b_capsule = get(&mut b, EXAMPLE_NAME, "latest")
        .await
        .unwrap()
        .capsule
        .unwrap();
    assert_ne!(b_capsule.description, "pwned");
}

// ---------------------------------------------------------------------------
// 9. Events
// ---------------------------------------------------------------------------

fn decode<M: prost::Message + Default>(row: &OutboxRow) -> M {
    M::decode(row.payload.as_slice()).expect("decodable event payload")
}

async fn events(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let common = |row: &OutboxRow, ty: &str, subject: &str| {
        assert_eq!(row.event_type, ty);
        assert_eq!(row.topic, "anumate.capsules");
        assert_eq!(row.tenant_id, TENANT_A);
        // Keyed by tenant and capsule: another tenant's same-named capsule
        // never shares the key.
        assert_eq!(row.aggregate_key, format!("{TENANT_A}/{EXAMPLE_NAME}"));
        assert_eq!(row.subject, subject);
        assert!(!row.event_id.is_empty());
    };

    // Push a draft: one `pushed`.
    let v1 = push(&mut c, EXAMPLE).await;
    let hash1 = v1.version.unwrap().content_hash;
    let etag = v1.capsule.unwrap().etag;
    let rows = app.events_after(TENANT_A, 0).await;
    assert_eq!(rows.len(), 1);
    common(
        &rows[0],
        "dev.anumate.capsule.pushed.v1",
        "capsules/refund-small-orders/versions/1",
    );
    assert_eq!(
        decode::<ev::CapsulePushed>(&rows[0]),
        ev::CapsulePushed {
            tenant_id: TENANT_A.into(),
            name: EXAMPLE_NAME.into(),
            version: 1,
            content_hash: hash1.clone(),
            actor: "alice".into(),
        }
    );
    let mut seq = rows[0].seq;

    // Publish: one `published`.
    let etag = publish(&mut c, EXAMPLE_NAME, 1, &etag)
        .await
        .unwrap()
        .capsule
        .unwrap()
        .etag;
    let rows = app.events_after(TENANT_A, seq).await;
    assert_eq!(rows.len(), 1);
    common(
        &rows[0],
        "dev.anumate.capsule.published.v1",
        "capsules/refund-small-orders/versions/1",
    );
    assert_eq!(
        decode::<ev::CapsulePublished>(&rows[0]),
        ev::CapsulePublished {
            tenant_id: TENANT_A.into(),
            name: EXAMPLE_NAME.into(),
            version: 1,
            content_hash: hash1.clone(),
            actor: "alice".into(),
        }
    );
    seq = rows[0].seq;

    // Push-and-publish a new version: `pushed` then `published`, in order.
    let v2 = c
        .push_capsule(pb::PushCapsuleRequest {
            etag,
            publish: true,
            ..push_req(&EXAMPLE.replace("timeout: 10s", "timeout: 15s"))
        })
        .await
        .unwrap()
        .into_inner();
    let hash2 = v2.version.unwrap().content_hash;
    let etag = v2.capsule.unwrap().etag;
    let rows = app.events_after(TENANT_A, seq).await;
    assert_eq!(rows.len(), 2);
    common(
        &rows[0],
        "dev.anumate.capsule.pushed.v1",
        "capsules/refund-small-orders/versions/2",
    );
    common(
        &rows[1],
        "dev.anumate.capsule.published.v1",
        "capsules/refund-small-orders/versions/2",
    );
    assert!(rows[0].seq < rows[1].seq);
    assert_eq!(decode::<ev::CapsulePushed>(&rows[0]).version, 2);
    assert_eq!(decode::<ev::CapsulePushed>(&rows[0]).content_hash, hash2);
    assert_eq!(decode::<ev::CapsulePublished>(&rows[1]).version, 2);
    assert_eq!(decode::<ev::CapsulePublished>(&rows[1]).content_hash, hash2);
    seq = rows[1].seq;

    // Failed calls write no events.
    expect_error(
        deprecate(&mut c, EXAMPLE_NAME, 1, "r0").await,
        ErrorCode::EtagMismatch,
    );
    expect_reason(
        publish(&mut c, EXAMPLE_NAME, 9, "").await,
        Reason::CapsuleVersionNotFound,
    );
    assert!(app.events_after(TENANT_A, seq).await.is_empty());

    // Deprecate: one `deprecated`.
    let etag = deprecate(&mut c, EXAMPLE_NAME, 1, &etag)
        .await
        .unwrap()
        .capsule
        .unwrap()
        .etag;
    let rows = app.events_after(TENANT_A, seq).await;
    assert_eq!(rows.len(), 1);
    common(
        &rows[0],
        "dev.anumate.capsule.deprecated.v1",
        "capsules/refund-small-orders/versions/1",
    );
    assert_eq!(
        decode::<ev::CapsuleDeprecated>(&rows[0]),
        ev::CapsuleDeprecated {
            tenant_id: TENANT_A.into(),
            name: EXAMPLE_NAME.into(),
            version: 1,
            actor: "alice".into(),
        }
    );
    seq = rows[0].seq;
    // Deprecating again is a no-op.
    deprecate(&mut c, EXAMPLE_NAME, 1, "").await.unwrap();
    assert!(app.events_after(TENANT_A, seq).await.is_empty());

    // Delete: one `deleted`.
    delete(&mut c, EXAMPLE_NAME, &etag).await.unwrap();
    let rows = app.events_after(TENANT_A, seq).await;
    assert_eq!(rows.len(), 1);
    common(
        &rows[0],
        "dev.anumate.capsule.deleted.v1",
        "capsules/refund-small-orders",
    );
    assert_eq!(
        decode::<ev::CapsuleDeleted>(&rows[0]),
        ev::CapsuleDeleted {
            tenant_id: TENANT_A.into(),
            name: EXAMPLE_NAME.into(),
            actor: "alice".into(),
        }
    );
    assert_eq!(app.counts(TENANT_A).await.outbox, 6);
}

// ---------------------------------------------------------------------------
// 10. Concurrency
// ---------------------------------------------------------------------------

async fn concurrent_pushes(app: TestApp) {
    const N: u32 = 8;
    // The number of versions N pushes make, as the contract counts them.
    let n = i32::try_from(N).unwrap();
    let client = app.client(TENANT_A, AUTHOR).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut c = client.clone();
        tasks.spawn(async move {
            let source = small("race", "x", i + 1);
            let result = c.push_capsule(push_req(&source)).await;
            (i, result.map(tonic::Response::into_inner))
        });
    }
    let mut by_version = std::collections::BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.unwrap();
        let pushed =
            result.unwrap_or_else(|s| panic!("push {i} failed: {:?}", Error::from_status(&s)));
        assert!(pushed.created, "push {i}");
        let v = pushed.version.unwrap();
        assert!(
            by_version.insert(v.version, (i, v.content_hash)).is_none(),
            "version {} twice",
            v.version
        );
    }
    assert_eq!(
        by_version.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );

    // Each stored version is the content its pusher sent.
    let mut c = client.clone();
    for (version, (i, hash)) in &by_version {
        let got = get(&mut c, "race", &version.to_string())
            .await
            .unwrap()
            .version
            .unwrap();
        assert_eq!(&got.content_hash, hash);
        assert_eq!(got.source_yaml, small("race", "x", i + 1));
    }
    let capsule = get(&mut c, "race", "latest")
        .await
        .unwrap()
        .capsule
        .unwrap();
    assert_eq!(capsule.latest_version, n);
    assert_eq!(
        app.counts(TENANT_A).await,
        Counts {
            capsules: 1,
            versions: i64::from(N),
            outbox: i64::from(N)
        }
    );
    let pushed_versions: BTreeSet<i32> = app
        .events_after(TENANT_A, 0)
        .await
        .iter()
        .map(|r| decode::<ev::CapsulePushed>(r).version)
        .collect();
    assert_eq!(pushed_versions, (1..=n).collect());
    let seq = app.last_seq(TENANT_A).await;

    // The same content pushed 8 times at once to a new name: one version.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..N {
        let mut c = client.clone();
        tasks.spawn(async move { c.push_capsule(push_req(&small("twin", "x", 1))).await });
    }
    let mut created = 0;
    while let Some(joined) = tasks.join_next().await {
        let pushed = joined
            .unwrap()
            .unwrap_or_else(|s| panic!("identical push failed: {:?}", Error::from_status(&s)))
            .into_inner();
        assert_eq!(pushed.version.unwrap().version, 1);
        created += usize::from(pushed.created);
    }
    assert_eq!(created, 1);
    assert_eq!(app.events_after(TENANT_A, seq).await.len(), 1);

    // Eight writers holding the same etag: exactly one wins, the others are
    // told the etag moved on, and nothing else is written.
    let etag = capsule.etag.clone();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut c = client.clone();
        let etag = etag.clone();
        tasks.spawn(async move {
            c.push_capsule(pb::PushCapsuleRequest {
                etag,
                ..push_req(&small("race", "y", 100 + i))
            })
            .await
        });
    }
    let (mut won, mut lost) = (Vec::new(), 0);
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            Ok(r) => won.push(r.into_inner().version.unwrap().version),
            Err(status) => {
                expect_error::<()>(Err(status), ErrorCode::EtagMismatch);
                lost += 1;
            }
        }
    }
    assert_eq!((won, lost), (vec![n + 1], N - 1));
    assert_eq!(app.counts(TENANT_A).await.versions, i64::from(N) + 2);
}

// ---------------------------------------------------------------------------
// 11. Bounded CPU work: large diffs
// ---------------------------------------------------------------------------

/// A valid capsule of about 1 MiB: `small(name)` followed by `lines` comment
/// lines tagged `tag` (comments are not content, `timeout_secs` is).
fn padded(name: &str, tag: &str, lines: usize, timeout_secs: u32) -> String {
    let mut s = small(name, "big", timeout_secs);
    for i in 0..lines {
        s.push_str(&format!("# {tag} line {i:06} ......\n"));
    }
    s
}

/// Two unrelated ~1 MiB versions (40,000 lines each, every line different)
/// once took minutes of Myers matching on a runtime worker. With the default
/// 200 ms deadline the diff answers in well under a second, marked
/// approximate, and still turns one source into the other.
async fn large_diffs_answer_quickly(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let (v1, v2) = (
        padded("big", "one", 40_000, 1),
        padded("big", "two", 40_000, 2),
    );
    assert!(v1.len() > 1_000_000 && v1.len() <= MIB, "{}", v1.len());
    push(&mut c, &v1).await;
    push(&mut c, &v2).await;

    let started = std::time::Instant::now();
    let d = diff(&mut c, "big", 1, 2).await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(900), "diff took {took:?}");
    assert!(d.unified_diff_approximate);
    let removed = d
        .unified_diff
        .lines()
        .filter(|l| l.starts_with("-# one"))
        .count();
    let added = d
        .unified_diff
        .lines()
        .filter(|l| l.starts_with("+# two"))
        .count();
    assert_eq!((removed, added), (40_000, 40_000));
    assert_eq!(
        d.changes
            .iter()
            .map(|ch| ch.path.as_str())
            .collect::<Vec<_>>(),
        ["/spec/steps/0/timeout"]
    );

    // Small diffs are exact.
    push(&mut c, &small("little", "x", 1)).await;
    push(&mut c, &small("little", "x", 2)).await;
    let d = diff(&mut c, "little", 1, 2).await.unwrap();
    assert!(!d.unified_diff_approximate);
    assert!(
        d.unified_diff
            .contains("\n-      timeout: 1s\n+      timeout: 2s\n")
    );

    // Over the line limit: refused with the numbers, before any matching.
    let long = format!("{}{}", small("long", "big", 1), "#\n".repeat(50_001));
    push(&mut c, &long).await;
    let err = expect_reason(diff(&mut c, "long", 1, 1).await, Reason::DiffTooLarge);
    assert!(
        err.message.contains("limited to 50000 lines"),
        "{}",
        err.message
    );
    for (k, v) in [
        ("limit", "diff_max_lines"),
        ("max_lines", "50000"),
        ("to_lines", &(50_001 + 11).to_string()),
    ] {
        assert!(
            err.metadata.contains(&(k.to_string(), v.to_string())),
            "{k}={v} in {:?}",
            err.metadata
        );
    }
}

/// While a long diff computes, the same server keeps answering: on a
/// single-threaded runtime, a diff computed on the runtime thread would hold
/// every other request (and this test's own timer) until it finished.
async fn a_running_diff_does_not_block_other_requests(backend: Backend) {
    let app = spawn_app_with(
        backend,
        RegistryConfig {
            max_document_bytes: MIB,
            diff_deadline_ms: 3_000,
            ..RegistryConfig::default()
        },
    )
    .await;
    let mut c = app.client(TENANT_A, AUTHOR).await;
    push(&mut c, &padded("big", "one", 40_000, 1)).await;
    push(&mut c, &padded("big", "two", 40_000, 2)).await;

    let mut d = c.clone();
    let running = tokio::spawn(async move { diff(&mut d, "big", 1, 2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !running.is_finished(),
        "the diff should still be matching lines"
    );
    let started = std::time::Instant::now();
    let got = get(&mut c, "big", "1").await.unwrap();
    assert_eq!(got.version.unwrap().version, 1);
    let took = started.elapsed();
    assert!(
        !running.is_finished(),
        "GetCapsule waited for the diff ({took:?})"
    );
    assert!(took < Duration::from_secs(1), "GetCapsule took {took:?}");
    let d = running.await.unwrap().unwrap();
    assert!(d.unified_diff_approximate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_diffs_answer_quickly_sqlite() {
    large_diffs_answer_quickly(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_diffs_answer_quickly_postgres() {
    large_diffs_answer_quickly(Backend::Postgres).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_running_diff_does_not_block_other_requests_sqlite() {
    a_running_diff_does_not_block_other_requests(Backend::Sqlite).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_running_diff_does_not_block_other_requests_postgres() {
    a_running_diff_does_not_block_other_requests(Backend::Postgres).await;
}

// ---------------------------------------------------------------------------
// Issue 9: one deeply nested `${{ }}` expression aborted the whole server.
// ---------------------------------------------------------------------------

async fn deep_expression(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let cond = "${{ steps.fetch-order.output.status == 'paid' }}";
    let deep = format!(
        "${{{{ {}steps.fetch-order.output.status == 'paid'{} }}}}",
        "(".repeat(3000),
        ")".repeat(3000)
    );
    let source = EXAMPLE.replacen(cond, &deep, 1);
    assert_ne!(source, EXAMPLE);
    let err = expect_error(
        c.validate_capsule(pb::ValidateCapsuleRequest {
            source_yaml: source.clone(),
            source_name: "deep.capsule.yaml".into(),
        })
        .await,
        ErrorCode::InvalidDocument,
    );
    assert_eq!(err.violations.len(), 1, "{err:?}");
    let v = &err.violations[0];
    assert_eq!(v.field, "spec.steps[1].if", "{err:?}");
    assert!(v.description.contains("nesting deeper than 64"), "{err:?}");
    assert!(v.position.is_some(), "{err:?}");
    expect_error(
        c.push_capsule(push_req(&source)).await,
        ErrorCode::InvalidDocument,
    );
    // The same server still answers, on the same connection.
    c.validate_capsule(pb::ValidateCapsuleRequest {
        source_yaml: EXAMPLE.into(),
        source_name: "refund.capsule.yaml".into(),
    })
    .await
    .expect("a normal validation after the deep one");
    push(&mut c, EXAMPLE).await;
}

on_both_backends! {
    deep_expression => deep_expression_sqlite, deep_expression_postgres;
}
