#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The connector hub driven like the orchestrator drives it: real gRPC over
//! TCP behind the real authentication layer, on SQLite and PostgreSQL, with
//! capability tokens minted by a real issuer. The hub reaches the captokens
//! service over gRPC too (its JWKS, `ConsumeToken` as `svc:connectors`), as
//! when it runs in its own process — or, in the `*_in_tx_*` tests, calls
//! it in process and spends tokens in its own claim transaction, as in
//! `anumate dev`. The mock connector's ledger (`ListMockCalls`) shows
//! whether a call acted.

use std::sync::Arc;
use std::time::Duration;

use anumate_auth::{AuthLayer, BearerToken, DevIssuer, Role, ServiceIssuer};
use anumate_captokens::{ArgsBinding, Capability, IssueRequest, Issuer};
use anumate_captokens_service::{CapTokens, CapTokensConfig, CapTokensGrpc, PUBLIC_PATHS};
use anumate_connectors::{ConnectorsConfig, Hub, HubGrpc, StaticTools};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_errors::Reason;
use anumate_proto::captokens::v1 as ctpb;
use anumate_proto::connectors::v1 as pb;
use anumate_service::clients::Grpc;
use anumate_testing::{
    Backend, DevAuth, TestDb, expect_reason, expect_reason_status, migrated_store,
};
use pb::connector_hub_internal_client::ConnectorHubInternalClient;
use pb::connector_hub_service_client::ConnectorHubServiceClient;
use serde_json::{Value, json};
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt as _;

type Authorized = InterceptedService<Channel, BearerToken>;

const AUDIENCE: &str = "anumate-connectors";

struct TestApp {
    url: String,
    opts: HubOpts,
    keys: Arc<KeyRing>,
    users: DevIssuer,
    services: ServiceIssuer,
    authenticator: anumate_auth::Authenticator,
    _db: TestDb,
    _auth_dir: tempfile::TempDir,
}

fn tools() -> StaticTools {
    let doc = |v: Value| serde_json::from_value(v).unwrap();
    StaticTools::new([
        doc(json!({
            "apiVersion": "anumate.dev/v1", "kind": "Tool",
            "metadata": {"name": "payments.transfer"},
            "spec": {"connector": "mock", "side_effect": "write", "idempotent": true,
                     "mock": {"output": {"transfer_id": "tr_${{ args.to }}", "amount": "${{ args.amount }}"}}}
        })),
        doc(json!({
            "apiVersion": "anumate.dev/v1", "kind": "Tool",
            "metadata": {"name": "flaky.call"},
            "spec": {"connector": "mock", "side_effect": "write",
                     "mock": {"output": {"ok": true}, "fail": {"times": 2, "code": "UNAVAILABLE"}}}
        })),
        doc(json!({
            "apiVersion": "anumate.dev/v1", "kind": "Tool",
            "metadata": {"name": "dead.call"},
            "spec": {"connector": "mock", "side_effect": "read",
                     "mock": {"output": {}, "fail": {"times": 1000, "code": "UNAVAILABLE"}}}
        })),
        doc(json!({
            "apiVersion": "anumate.dev/v1", "kind": "Tool",
            "metadata": {"name": "slow.call"},
            "spec": {"connector": "mock", "side_effect": "write",
                     "mock": {"output": {"done": true}, "latency": "2500ms"}}
        })),
        doc(json!({
            "apiVersion": "anumate.dev/v1", "kind": "Tool",
            "metadata": {"name": "broken.call"},
            "spec": {"connector": "mock", "side_effect": "write",
                     "mock": {"output": {"ok": true}, "fail": {"times": 1, "code": "INVALID_ARGUMENT"}}}
        })),
    ])
}

/// How a test's hubs reach the captokens service.
#[derive(Clone, Default)]
struct HubOpts {
    /// In process (tokens spent in the hub's claim transaction), not over gRPC.
    in_process_tokens: bool,
    cfg: ConnectorsConfig,
}

/// A hub server over `store`: the first, a replica, or one after a restart.
/// The same server runs the captokens service over the same database; the
/// hub calls it over gRPC as `svc:connectors`, or in process.
async fn serve_hub(
    store: anumate_store::Store,
    keys: &Arc<KeyRing>,
    authenticator: anumate_auth::Authenticator,
    services: &ServiceIssuer,
    opts: &HubOpts,
) -> String {
    let listener = anumate_testing::bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let tokens = CapTokens::new(store.clone(), keys.clone(), &CapTokensConfig::default()).unwrap();
    let captokens: Arc<dyn anumate_service::clients::CapTokensClient> = if opts.in_process_tokens {
        Arc::new(tokens.clone())
    } else {
        Arc::new(
            Grpc::new(anumate_service::clients::channel("captokens", &url).unwrap())
                .with_service_issuer(services.for_service("connectors").unwrap()),
        )
    };
    let hub = Hub::new(store.clone(), captokens, Arc::new(tools()), &opts.cfg);
    let mut layer = AuthLayer::new(authenticator, anumate_auth::AuthzTable::platform().unwrap());
    for path in PUBLIC_PATHS {
        layer = layer.allow_unauthenticated(*path);
    }
    let (addr, _handle) = anumate_testing::serve_with_layer(
        listener,
        layer,
        Routes::new(HubGrpc::new(hub.clone()).into_server())
            .add_service(HubGrpc::new(hub).into_internal_server())
            .add_service(CapTokensGrpc::new(tokens.clone()).into_server())
            .add_service(CapTokensGrpc::new(tokens).into_internal_server()),
    );
    format!("http://{addr}")
}

fn migrations() -> Vec<anumate_store::Migration> {
    let mut all = anumate_connectors::migrations();
    all.extend(anumate_captokens_service::migrations());
    all
}

async fn spawn_app(backend: Backend) -> TestApp {
    spawn_with(backend, HubOpts::default()).await
}

/// The hub and captokens in one process over one store, as `anumate dev`
/// runs them, waiting at most 1 s for a key in flight.
async fn spawn_in_tx(backend: Backend) -> TestApp {
    let cfg = ConnectorsConfig {
        in_flight_wait_ms: 1_000,
        ..ConnectorsConfig::default()
    };
    spawn_with(
        backend,
        HubOpts {
            in_process_tokens: true,
            cfg,
        },
    )
    .await
}

async fn spawn_with(backend: Backend, opts: HubOpts) -> TestApp {
    let (db, store) = migrated_store(backend, &migrations()).await;
    let keys = Arc::new(KeyRing::new(KeyPair::generate().unwrap()));
    let DevAuth {
        issuer,
        services,
        authenticator,
        dir,
    } = DevAuth::with_service_issuer("orchestrator");
    let services = services.unwrap();
    let url = serve_hub(store, &keys, authenticator.clone(), &services, &opts).await;
    TestApp {
        url,
        opts,
        keys,
        users: issuer,
        services,
        authenticator,
        _db: db,
        _auth_dir: dir,
    }
}

struct Clients {
    hub: ConnectorHubInternalClient<Authorized>,
    calls: ConnectorHubServiceClient<Authorized>,
    tokens: ctpb::capability_tokens_internal_client::CapabilityTokensInternalClient<Authorized>,
    revoker: ctpb::cap_tokens_service_client::CapTokensServiceClient<Authorized>,
}

/// Overrides of a minted capability token.
#[derive(Default)]
struct Mint<'a> {
    tenant: Option<&'a str>,
    audience: Option<&'a str>,
    tool: Option<&'a str>,
    now: Option<i64>,
    ttl: Option<Duration>,
}

impl TestApp {
    async fn channel(&self, token: String) -> Clients {
        let channel = Endpoint::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Clients {
            hub: ConnectorHubInternalClient::with_interceptor(
                channel.clone(),
                BearerToken(token.clone()),
            ),
            calls: ConnectorHubServiceClient::with_interceptor(
                channel.clone(),
                BearerToken(token.clone()),
            ),
            tokens: ctpb::capability_tokens_internal_client::CapabilityTokensInternalClient::with_interceptor(
                channel.clone(),
                BearerToken(token.clone()),
            ),
            revoker: ctpb::cap_tokens_service_client::CapTokensServiceClient::with_interceptor(
                channel,
                BearerToken(token),
            ),
        }
    }

    /// Another hub server over the same database, with its own pool and
    /// process state (a replica, or this one after a restart).
    async fn another_hub(&self) -> String {
        let store = anumate_store::Store::connect(&self._db.config)
            .await
            .unwrap();
        serve_hub(
            store,
            &self.keys,
            self.authenticator.clone(),
            &self.services,
            &self.opts,
        )
        .await
    }

    /// The orchestrator of `tenant`.
    async fn orchestrator(&self, tenant: &str) -> Clients {
        let token = self
            .services
            .for_service("orchestrator")
            .unwrap()
            .mint(tenant, Duration::from_secs(300))
            .unwrap();
        self.channel(token).await
    }

    async fn operator(&self, tenant: &str) -> Clients {
        let token = self
            .users
            .mint(
                tenant,
                "user:op",
                &[Role::Operator],
                Duration::from_secs(300),
            )
            .unwrap();
        self.channel(token).await
    }

    /// A capability token for `tool` with `args` in `tenant`, run `run-1`.
    fn token(&self, tenant: &str, tool: &str, args: &Value, m: Mint<'_>) -> String {
        let cap = Capability {
            tool: m.tool.unwrap_or(tool).to_owned(),
            actions: vec!["call".into()],
            constraints: Default::default(),
        };
        Issuer::new("test-captokens")
            .issue(
                self.keys.as_ref(),
                IssueRequest {
                    subject: "user:alice",
                    audience: m.audience.unwrap_or(AUDIENCE),
                    tenant: m.tenant.unwrap_or(tenant),
                    run: "run-1",
                    step: "step-1",
                    plan_hash: &format!("sha256:{}", "0".repeat(64)),
                    args: ArgsBinding::Args(args),
                    capability: &cap,
                    ttl: m.ttl,
                    single_use: true,
                    now: m.now,
                },
            )
            .unwrap()
            .token
    }
}

fn to_struct(v: &Value) -> pbjson_types::Struct {
    serde_json::from_value(v.clone()).unwrap()
}

fn invoke(tool: &str, args: &Value, key: &str, token: &str) -> pb::InvokeRequest {
    pb::InvokeRequest {
        tool: tool.into(),
        args: Some(to_struct(args)),
        idempotency_key: key.into(),
        capability_token: token.into(),
    }
}

/// A Struct as JSON, whole numbers as integers (a Struct's numbers are doubles).
fn json_of(s: &Option<pbjson_types::Struct>) -> Value {
    anumate_engine::json::struct_json(s.as_ref().unwrap()).unwrap()
}

async fn mock_calls(app: &TestApp, tenant: &str, run: &str) -> Vec<pb::MockCall> {
    app.operator(tenant)
        .await
        .calls
        .list_mock_calls(pb::ListMockCallsRequest {
            run_id: run.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .calls
}

async fn the_same_key_twice_acts_once(app: TestApp) {
    let mut c = app.orchestrator("t1").await;
    let args = json!({"amount": 5, "to": "bob"});
    let tool = "payments.transfer";
    let first = c
        .hub
        .invoke(invoke(
            tool,
            &args,
            "run-1/step-1",
            &app.token("t1", tool, &args, Mint::default()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed);
    assert_eq!(first.connector, "mock");
    assert_eq!(
        json_of(&first.output),
        json!({"transfer_id": "tr_bob", "amount": 5})
    );

    // A retry with a fresh token, and one with the spent token (its answer
    // was lost): the recorded result, nothing acts again.
    for token in [
        app.token("t1", tool, &args, Mint::default()),
        app.token("t1", tool, &args, Mint::default()),
    ] {
        let again = c
            .hub
            .invoke(invoke(tool, &args, "run-1/step-1", &token))
            .await
            .unwrap()
            .into_inner();
        assert!(again.replayed);
        assert_eq!(again.output, first.output);
        let spent = c
            .hub
            .invoke(invoke(tool, &args, "run-1/step-1", &token))
            .await
            .unwrap()
            .into_inner();
        assert!(spent.replayed);
    }

    // The same key with other arguments is refused, even with a valid token.
    let other = json!({"amount": 500, "to": "mallory"});
    let refused = c
        .hub
        .invoke(invoke(
            tool,
            &other,
            "run-1/step-1",
            &app.token("t1", tool, &other, Mint::default()),
        ))
        .await;
    expect_reason(refused, Reason::IdempotencyKeyReused);

    let calls = mock_calls(&app, "t1", "run-1").await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].deliveries, 1);
    assert!(calls[0].acted);
    assert_eq!(calls[0].idempotency_key, "run-1/step-1");
    assert_eq!(calls[0].step_id, "step-1");
    // Another tenant sees nothing.
    assert!(mock_calls(&app, "t2", "").await.is_empty());
}

async fn bad_tokens_are_refused_before_the_connector_is_called(app: TestApp) {
    let mut c = app.orchestrator("t1").await;
    let args = json!({"amount": 5, "to": "bob"});
    let tool = "payments.transfer";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let cases: Vec<(&str, String, Reason)> = vec![
        ("missing", String::new(), Reason::InvalidArgument),
        ("garbage", "not.a.token".into(), Reason::TokenScopeMismatch),
        (
            "expired",
            app.token(
                "t1",
                tool,
                &args,
                Mint {
                    now: Some(now - 600),
                    ttl: Some(Duration::from_secs(60)),
                    ..Default::default()
                },
            ),
            Reason::TokenExpired,
        ),
        (
            "wrong tool",
            app.token(
                "t1",
                tool,
                &args,
                Mint {
                    tool: Some("payments.refund"),
                    ..Default::default()
                },
            ),
            Reason::TokenScopeMismatch,
        ),
        (
            "wrong tenant",
            app.token(
                "t1",
                tool,
                &args,
                Mint {
                    tenant: Some("t2"),
                    ..Default::default()
                },
            ),
            Reason::TokenScopeMismatch,
        ),
        (
            "wrong audience",
            app.token(
                "t1",
                tool,
                &args,
                Mint {
                    audience: Some("other-hub"),
                    ..Default::default()
                },
            ),
            Reason::TokenScopeMismatch,
        ),
        (
            "args tampered",
            app.token(
                "t1",
                tool,
                &json!({"amount": 1, "to": "bob"}),
                Mint::default(),
            ),
            Reason::TokenScopeMismatch,
        ),
    ];
    for (i, (what, token, reason)) in cases.into_iter().enumerate() {
        let result = c
            .hub
            .invoke(invoke(tool, &args, &format!("k-{i}"), &token))
            .await;
        let err = expect_reason(result, reason);
        assert!(!err.message.is_empty(), "{what}");
    }
    // A token signed by another key.
    let stranger = KeyRing::new(KeyPair::generate().unwrap());
    let forged = Issuer::new("x")
        .issue(
            &stranger,
            IssueRequest {
                subject: "user:alice",
                audience: AUDIENCE,
                tenant: "t1",
                run: "run-1",
                step: "step-1",
                plan_hash: &format!("sha256:{}", "0".repeat(64)),
                args: ArgsBinding::Args(&args),
                capability: &Capability {
                    tool: tool.into(),
                    actions: vec!["call".into()],
                    constraints: Default::default(),
                },
                ttl: None,
                single_use: true,
                now: None,
            },
        )
        .unwrap()
        .token;
    expect_reason(
        c.hub.invoke(invoke(tool, &args, "k-forged", &forged)).await,
        Reason::TokenScopeMismatch,
    );

    // A replayed token for another key is refused.
    let token = app.token("t1", tool, &args, Mint::default());
    c.hub
        .invoke(invoke(tool, &args, "k-good", &token))
        .await
        .unwrap();
    expect_reason(
        c.hub.invoke(invoke(tool, &args, "k-replay", &token)).await,
        Reason::TokenAlreadyUsed,
    );

    // Only the one good call reached the mock.
    let calls = mock_calls(&app, "t1", "").await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].idempotency_key, "k-good");

    // A token from the wrong tenant's orchestrator: the caller's tenant wins.
    let mut other = app.orchestrator("t2").await;
    let t1_token = app.token("t1", tool, &args, Mint::default());
    expect_reason(
        other
            .hub
            .invoke(invoke(tool, &args, "k-x", &t1_token))
            .await,
        Reason::TokenScopeMismatch,
    );
    // And the service still serves: the t1 token is unspent.
    c.hub
        .invoke(invoke(tool, &args, "k-x", &t1_token))
        .await
        .unwrap();
}

async fn failures_are_classified_and_retries_act_once(app: TestApp) {
    let mut c = app.orchestrator("t1").await;
    let args = json!({"n": 1});
    // Two scripted UNAVAILABLE deliveries: retryable, the key stays free.
    for attempt in 1..=2 {
        let token = app.token("t1", "flaky.call", &args, Mint::default());
        let status = c
            .hub
            .invoke(invoke("flaky.call", &args, "flaky-1", &token))
            .await
            .unwrap_err();
        let err = anumate_errors::Error::from_status(&status);
        assert_eq!(
            err.reason,
            Reason::ConnectorRetryable,
            "attempt {attempt}: {status:?}"
        );
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(
            info.metadata.get("retryable").map(String::as_str),
            Some("true")
        );
    }
    let token = app.token("t1", "flaky.call", &args, Mint::default());
    let ok = c
        .hub
        .invoke(invoke("flaky.call", &args, "flaky-1", &token))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.replayed);
    let calls = mock_calls(&app, "t1", "").await;
    assert_eq!((calls[0].deliveries, calls[0].acted), (3, true));

    // A permanent failure is recorded: a repeat gets it again without delivery.
    for _ in 0..2 {
        let token = app.token("t1", "broken.call", &args, Mint::default());
        let status = c
            .hub
            .invoke(invoke("broken.call", &args, "broken-1", &token))
            .await
            .unwrap_err();
        let err = anumate_errors::Error::from_status(&status);
        assert_eq!(err.reason, Reason::ConnectorFailed, "{status:?}");
        let info = status.get_error_details().error_info().cloned().unwrap();
        assert_eq!(
            info.metadata.get("retryable").map(String::as_str),
            Some("false")
        );
    }
    let broken: Vec<_> = mock_calls(&app, "t1", "")
        .await
        .into_iter()
        .filter(|c| c.tool == "broken.call")
        .collect();
    assert_eq!((broken[0].deliveries, broken[0].acted), (1, false));

    // Unknown tool: NOT_FOUND, nothing spent (the same token works after).
    let token = app.token("t1", "nope.call", &args, Mint::default());
    expect_reason(
        c.hub
            .invoke(invoke("nope.call", &args, "n-1", &token))
            .await,
        Reason::ToolNotFound,
    );
}

async fn operators_cannot_invoke_and_lists_page(app: TestApp) {
    let args = json!({"amount": 1, "to": "x"});
    let tool = "payments.transfer";
    let mut op = app.operator("t1").await;
    let token = app.token("t1", tool, &args, Mint::default());
    let denied = op
        .hub
        .invoke(invoke(tool, &args, "k", &token))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let mut c = app.orchestrator("t1").await;
    for i in 0..5 {
        let token = app.token("t1", tool, &args, Mint::default());
        c.hub
            .invoke(invoke(tool, &args, &format!("k-{i}"), &token))
            .await
            .unwrap();
    }
    let mut keys = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = op
            .calls
            .list_mock_calls(pb::ListMockCallsRequest {
                page_size: 2,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        keys.extend(page.calls.into_iter().map(|c| c.idempotency_key));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(keys, ["k-4", "k-3", "k-2", "k-1", "k-0"]);
    let bad = op
        .calls
        .list_mock_calls(pb::ListMockCallsRequest {
            page_token: "!!".into(),
            ..Default::default()
        })
        .await;
    expect_reason(bad, Reason::InvalidArgument);
}

async fn a_failing_upstream_opens_its_circuit(app: TestApp) {
    // The breaker gauge is process-wide and keyed by (tool, host): the two
    // backends' runs of this test would overwrite each other's state.
    static GAUGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _gauge = GAUGE.lock().await;
    let mut c = app.orchestrator("t1").await;
    let args = json!({});
    let call = |key: String| {
        let token = app.token("t1", "dead.call", &args, Mint::default());
        invoke("dead.call", &args, &key, &token)
    };
    // The default threshold: 5 consecutive retryable failures reach the mock.
    for i in 0..5 {
        let err = expect_reason(
            c.hub.invoke(call(format!("d-{i}"))).await,
            Reason::ConnectorRetryable,
        );
        assert!(err.message.contains("scripted failure"), "{}", err.message);
    }
    // Then the breaker answers fast, retryable, without reaching the mock.
    let started = std::time::Instant::now();
    let err = expect_reason(
        c.hub.invoke(call("d-open".into())).await,
        Reason::ConnectorRetryable,
    );
    assert!(err.message.contains("circuit open"), "{}", err.message);
    assert!(started.elapsed() < Duration::from_secs(1));
    let calls = mock_calls(&app, "t1", "").await;
    assert_eq!(calls.len(), 5, "{calls:?}");
    assert!(calls.iter().all(|c| c.idempotency_key != "d-open"));
    // The process's metrics (what /metrics serves) show the open breaker,
    // the outcomes per tool and the latency.
    let text = anumate_testing::Metrics::new().encode().unwrap();
    for line in [
        "anumate_connector_breaker_state{tool=\"dead.call\",host=\"mock\"} 2",
        "anumate_connector_invoked_total{tool=\"dead.call\",outcome=\"CONNECTOR_RETRYABLE\"}",
        "anumate_connector_invoked_duration_seconds_count{tool=\"dead.call\"}",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    // Other tools are unaffected.
    let args = json!({"amount": 1, "to": "x"});
    let token = app.token("t1", "payments.transfer", &args, Mint::default());
    c.hub
        .invoke(invoke("payments.transfer", &args, "ok-1", &token))
        .await
        .unwrap();
}

async fn replicas_and_restarts_act_once(mut app: TestApp) {
    // A second replica over the same database (its own pool and process state).
    let replica = app.another_hub().await;
    let args = json!({"amount": 9, "to": "carol"});
    let tool = "payments.transfer";
    let first_url = app.url.clone();
    let mut tasks = Vec::new();
    for i in 0..8 {
        app.url = if i % 2 == 0 {
            first_url.clone()
        } else {
            replica.clone()
        };
        let mut c = app.orchestrator("t1").await;
        let request = invoke(
            tool,
            &args,
            "race-key",
            &app.token("t1", tool, &args, Mint::default()),
        );
        tasks.push(tokio::spawn(async move {
            c.hub.invoke(request).await.unwrap().into_inner()
        }));
    }
    let mut acted = 0;
    let mut outputs = Vec::new();
    for t in tasks {
        let out = t.await.unwrap();
        acted += usize::from(!out.replayed);
        outputs.push(json_of(&out.output));
    }
    assert_eq!(acted, 1, "{outputs:?}");
    assert!(
        outputs
            .iter()
            .all(|o| *o == json!({"transfer_id": "tr_carol", "amount": 9}))
    );

    // After a "restart" (a new server and pool), the key still replays and
    // the mock's ledger still shows one effect, delivered once.
    app.url = app.another_hub().await;
    let mut c = app.orchestrator("t1").await;
    let again = c
        .hub
        .invoke(invoke(
            tool,
            &args,
            "race-key",
            &app.token("t1", tool, &args, Mint::default()),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    let calls = mock_calls(&app, "t1", "").await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!((calls[0].deliveries, calls[0].acted), (1, true));
}

/// A token minted by the captokens service for `args` of `tool` in `run`.
async fn issued(c: &mut Clients, tool: &str, args: &Value, run: &str) -> (String, String) {
    let resp = c
        .tokens
        .issue_token(ctpb::IssueTokenRequest {
            audience: AUDIENCE.into(),
            run_id: run.into(),
            step_id: "step-1".into(),
            plan_hash: format!("sha256:{}", "0".repeat(64)),
            args_sha256: anumate_captokens::args_sha256(args).unwrap(),
            capability: Some(ctpb::Capability {
                tool: tool.into(),
                actions: vec!["call".into()],
                constraints: None,
            }),
            single_use: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (resp.token, resp.claims.unwrap().jti)
}

/// `VerifyToken` with `consume` at the captokens service, as another
/// verifier of the platform would spend the token.
async fn consume_at_captokens(c: &mut Clients, token: &str, tool: &str, args: &Value) -> i32 {
    c.tokens
        .verify_token(ctpb::VerifyTokenRequest {
            token: token.into(),
            audience: AUDIENCE.into(),
            tool: tool.into(),
            action: "call".into(),
            args: Some(to_struct(args)),
            consume: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .verdict
}

async fn tokens_are_single_use_platform_wide_and_revocations_hold(app: TestApp) {
    let mut c = app.orchestrator("t1").await;
    let args = json!({"amount": 7, "to": "dave"});
    let tool = "payments.transfer";

    // Spent at captokens first: the hub refuses it.
    let (a, _) = issued(&mut c, tool, &args, "run-a").await;
    assert_eq!(
        consume_at_captokens(&mut c, &a, tool, &args).await,
        ctpb::TokenVerdict::Valid as i32
    );
    expect_reason(
        c.hub.invoke(invoke(tool, &args, "spent-first", &a)).await,
        Reason::TokenAlreadyUsed,
    );
    // Spent by the hub first: captokens sees it replayed.
    let (b, _) = issued(&mut c, tool, &args, "run-a").await;
    c.hub
        .invoke(invoke(tool, &args, "hub-first", &b))
        .await
        .unwrap();
    assert_eq!(
        consume_at_captokens(&mut c, &b, tool, &args).await,
        ctpb::TokenVerdict::Replayed as i32
    );

    // Revoked one by one, unexpired: refused, nothing called.
    let (revoked, jti) = issued(&mut c, tool, &args, "run-a").await;
    let mut admin = app
        .channel(
            app.users
                .mint("t1", "user:admin", &[Role::Admin], Duration::from_secs(300))
                .unwrap(),
        )
        .await;
    admin
        .revoker
        .revoke_token(ctpb::RevokeTokenRequest {
            target: Some(ctpb::revoke_token_request::Target::Jti(jti)),
            reason: "test".into(),
        })
        .await
        .unwrap();
    expect_reason(
        c.hub
            .invoke(invoke(tool, &args, "revoked-jti", &revoked))
            .await,
        Reason::TokenRevoked,
    );
    // Revoked with its run: refused, nothing called.
    let (doomed, _) = issued(&mut c, tool, &args, "run-doomed").await;
    admin
        .revoker
        .revoke_token(ctpb::RevokeTokenRequest {
            target: Some(ctpb::revoke_token_request::Target::RunId(
                "run-doomed".into(),
            )),
            reason: "test".into(),
        })
        .await
        .unwrap();
    expect_reason(
        c.hub
            .invoke(invoke(tool, &args, "revoked-run", &doomed))
            .await,
        Reason::TokenRevoked,
    );
    // A token of the revoked run minted afterwards is refused too.
    let (later, _) = issued(&mut c, tool, &args, "run-doomed").await;
    expect_reason(
        c.hub
            .invoke(invoke(tool, &args, "revoked-run-2", &later))
            .await,
        Reason::TokenRevoked,
    );

    // The mock's ledger: only the hub-first call acted.
    let keys: Vec<String> = mock_calls(&app, "t1", "")
        .await
        .into_iter()
        .map(|c| c.idempotency_key)
        .collect();
    assert_eq!(keys, ["hub-first"]);
    let text = anumate_testing::Metrics::new().encode().unwrap();
    for line in [
        "anumate_connector_invoked_total{tool=\"payments.transfer\",outcome=\"TOKEN_REVOKED\"}",
        "anumate_connector_invoked_total{tool=\"payments.transfer\",outcome=\"TOKEN_ALREADY_USED\"}",
        "anumate_connector_invoked_total{tool=\"payments.transfer\",outcome=\"ok\"}",
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }

    // A refused call left its key free: a valid token under it acts.
    let (fresh, _) = issued(&mut c, tool, &args, "run-a").await;
    let ok = c
        .hub
        .invoke(invoke(tool, &args, "revoked-jti", &fresh))
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.replayed);
}

/// A second call with a key another call holds waits `in_flight_wait`,
/// then is `CALL_IN_FLIGHT` (retryable, with when the key would be taken
/// over) having done nothing: its token is still unspent, and the key
/// acts once.
async fn a_key_in_flight_is_answered_call_in_flight(app: TestApp) {
    let args = json!({"n": 3});
    let mut first = app.orchestrator("t1").await;
    let token = app.token("t1", "slow.call", &args, Mint::default());
    let acting = tokio::spawn(async move {
        first
            .hub
            .invoke(invoke("slow.call", &args, "slow-1", &token))
            .await
    });
    let args = json!({"n": 3});
    let mut c = app.orchestrator("t1").await;
    // Let the first call claim the key.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = app.token("t1", "slow.call", &args, Mint::default());
    let before = anumate_store::now_micros();
    let status = expect_reason_status(
        c.hub
            .invoke(invoke("slow.call", &args, "slow-1", &second))
            .await,
        Reason::CallInFlight,
    );
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert_eq!(
        info.metadata.get("retryable").map(String::as_str),
        Some("true")
    );
    let lease = info
        .metadata
        .get("lease_expire_time")
        .expect("lease_expire_time");
    let lease = chrono::DateTime::parse_from_rfc3339(lease).unwrap();
    let lease_secs = (lease.timestamp_micros() - before) / 1_000_000;
    // The default lease (300 s) from the first call's claim.
    assert!((290..=300).contains(&lease_secs), "{lease_secs} s");
    // A caller with a shorter deadline than the hub's wait (1 s) hears
    // CALL_IN_FLIGHT before its deadline, not DEADLINE_EXCEEDED.
    let third = app.token("t1", "slow.call", &args, Mint::default());
    let mut request = tonic::Request::new(invoke("slow.call", &args, "slow-1", &third));
    request.set_timeout(Duration::from_millis(500));
    let asked = std::time::Instant::now();
    expect_reason_status(c.hub.invoke(request).await, Reason::CallInFlight);
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );

    // The first call acted; the refused one spent nothing: its token still
    // serves, and the key replays the one effect.
    assert!(!acting.await.unwrap().unwrap().into_inner().replayed);
    let again = c
        .hub
        .invoke(invoke("slow.call", &args, "slow-1", &second))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    let calls = mock_calls(&app, "t1", "").await;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!((calls[0].deliveries, calls[0].acted), (1, true));
    let unspent = c
        .hub
        .invoke(invoke("slow.call", &args, "slow-2", &second))
        .await
        .unwrap()
        .into_inner();
    assert!(!unspent.replayed);
}

anumate_testing::on_both_backends! {
    spawn = spawn_in_tx;
    a_key_in_flight_is_answered_call_in_flight => in_flight_in_tx_sqlite, in_flight_in_tx_postgres;
    tokens_are_single_use_platform_wide_and_revocations_hold => platform_tokens_in_tx_sqlite, platform_tokens_in_tx_postgres;
    the_same_key_twice_acts_once => same_key_in_tx_sqlite, same_key_in_tx_postgres;
    bad_tokens_are_refused_before_the_connector_is_called => bad_tokens_in_tx_sqlite, bad_tokens_in_tx_postgres;
    replicas_and_restarts_act_once => replicas_in_tx_sqlite, replicas_in_tx_postgres;
}

anumate_testing::on_both_backends! {
    replicas_and_restarts_act_once => replicas_sqlite, replicas_postgres;
    a_failing_upstream_opens_its_circuit => breaker_sqlite, breaker_postgres;
    the_same_key_twice_acts_once => same_key_sqlite, same_key_postgres;
    bad_tokens_are_refused_before_the_connector_is_called => bad_tokens_sqlite, bad_tokens_postgres;
    failures_are_classified_and_retries_act_once => failures_sqlite, failures_postgres;
    operators_cannot_invoke_and_lists_page => paging_sqlite, paging_postgres;
    tokens_are_single_use_platform_wide_and_revocations_hold => platform_tokens_sqlite, platform_tokens_postgres;
}
