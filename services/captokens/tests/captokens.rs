#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The capability token service driven like a client drives it: real gRPC over
//! TCP, behind the real authentication layer, against SQLite and PostgreSQL.
//!
//! Each scenario is one `async fn(TestApp)`; `on_both_backends!` runs it once
//! per database.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anumate_auth::{AuthLayer, Authenticator, BearerToken, DevIssuer, Role, ServiceIssuer};
use anumate_captokens::{ArgsBinding, Capability, Constraint, IssueRequest, Issuer};
use anumate_captokens_service::{CapTokens, CapTokensConfig, CapTokensGrpc, PUBLIC_PATHS};
use anumate_crypto::{KeyPair, KeyRing, b64url};
use anumate_errors::{ErrorCode, Reason};
use anumate_proto::captokens::v1 as pb;
use anumate_proto::events::v1 as ev;
use anumate_proto::google::api::HttpBody;
use anumate_testing::{
    self as testing, Backend, DevAuth, Store, TestDb, expect_reason_status as expect_reason,
    expect_status as expect_error, on_both_backends,
};
use pb::TokenVerdict as Verdict;
use pb::cap_tokens_service_client::CapTokensServiceClient;
use pb::capability_tokens_internal_client::CapabilityTokensInternalClient;
use pb::revoke_token_request::Target;
use prost::Message as _;
use serde_json::json;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Authorized = InterceptedService<Channel, BearerToken>;
type Reply<T> = Result<tonic::Response<T>, tonic::Status>;

/// One caller's clients of both services the module serves: the public
/// `CapTokensService` and the service-only `CapabilityTokensInternal`.
#[derive(Clone)]
struct Client {
    public: CapTokensServiceClient<Authorized>,
    internal: CapabilityTokensInternalClient<Authorized>,
}

impl Client {
    async fn issue_token(&mut self, r: pb::IssueTokenRequest) -> Reply<pb::IssueTokenResponse> {
        self.internal.issue_token(r).await
    }

    async fn verify_token(&mut self, r: pb::VerifyTokenRequest) -> Reply<pb::VerifyTokenResponse> {
        self.internal.verify_token(r).await
    }

    async fn refresh_token(
        &mut self,
        r: pb::RefreshTokenRequest,
    ) -> Reply<pb::RefreshTokenResponse> {
        self.internal.refresh_token(r).await
    }

    async fn revoke_token(&mut self, r: pb::RevokeTokenRequest) -> Reply<pb::RevokeTokenResponse> {
        self.public.revoke_token(r).await
    }

    async fn get_jwks(&mut self, r: pb::GetJwksRequest) -> Reply<HttpBody> {
        self.public.get_jwks(r).await
    }

    async fn list_token_audit(
        &mut self,
        r: pb::ListTokenAuditRequest,
    ) -> Reply<pb::ListTokenAuditResponse> {
        self.public.list_token_audit(r).await
    }
}

const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";
const ORCHESTRATOR: &str = "svc:orchestrator";
const CONNECTOR: &str = "svc:connector-payments";
const AUDIENCE: &str = "connector:payments";
const TOOL: &str = "payments.refund";
const PLAN: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const ISS: &str = "https://captokens.test";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// One running server over a shared database.
struct Server {
    addr: SocketAddr,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// A running service and what a test needs to talk to it and look behind it.
struct TestApp {
    server: Server,
    issuer: DevIssuer,
    /// The platform's service issuer: `svc:<name>` identities.
    services: ServiceIssuer,
    auth: Authenticator,
    keys: Arc<KeyRing>,
    store: Store,
    tokens: CapTokens,
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

fn config() -> CapTokensConfig {
    CapTokensConfig {
        issuer: ISS.into(),
        ..CapTokensConfig::default()
    }
}

async fn serve(tokens: CapTokens, auth: Authenticator) -> Server {
    let mut layer = AuthLayer::new(auth, anumate_auth::AuthzTable::platform().unwrap());
    for path in PUBLIC_PATHS {
        layer = layer.allow_unauthenticated(*path);
    }
    let (addr, handle) = testing::serve_with_layer(
        testing::bind().await,
        layer,
        Routes::new(CapTokensGrpc::new(tokens.clone()).into_server())
            .add_service(CapTokensGrpc::new(tokens).into_internal_server()),
    );
    Server { addr, handle }
}

async fn spawn_app(backend: Backend) -> TestApp {
    let (db, store) =
        testing::migrated_store(backend, &anumate_captokens_service::migrations()).await;
    let keys = Arc::new(KeyRing::new(KeyPair::generate().expect("key")));
    let tokens = CapTokens::new(store.clone(), keys.clone(), &config()).expect("service");

    let DevAuth {
        issuer,
        services,
        authenticator: auth,
        dir: issuer_dir,
    } = DevAuth::with_service_issuer("orchestrator");
    let services = services.expect("service issuer");
    let server = serve(tokens.clone(), auth.clone()).await;
    TestApp {
        server,
        issuer,
        services,
        auth,
        keys,
        store,
        tokens,
        _db: db,
        _issuer_dir: issuer_dir,
    }
}

impl TestApp {
    /// A second replica: its own connection pool and service over the same
    /// database and keys.
    async fn replica(&self) -> Server {
        let store = Store::connect(&self._db.config).await.expect("connect");
        let tokens = CapTokens::new(store, self.keys.clone(), &config()).expect("service");
        serve(tokens, self.auth.clone()).await
    }

    /// A client of the server at `addr`: `svc:<name>` subjects get a token
    /// of the platform's service issuer, others a user token with `roles`.
    async fn client_at(
        &self,
        addr: SocketAddr,
        tenant: &str,
        subject: &str,
        roles: &[Role],
    ) -> Client {
        let token = match subject.strip_prefix("svc:") {
            Some(name) => self
                .services
                .for_service(name)
                .expect("service name")
                .mint(tenant, Duration::from_secs(300))
                .expect("mint"),
            None => self.user_token(tenant, subject, roles),
        };
        client_with(addr, token).await
    }

    /// A token of the user issuer, whatever its subject.
    fn user_token(&self, tenant: &str, subject: &str, roles: &[Role]) -> String {
        self.issuer
            .mint(tenant, subject, roles, Duration::from_secs(300))
            .expect("mint")
    }

    async fn client(&self, tenant: &str, subject: &str, roles: &[Role]) -> Client {
        self.client_at(self.server.addr, tenant, subject, roles)
            .await
    }

    /// A channel to the server, to call without any credential.
    async fn anonymous_channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.server.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect")
    }

    /// A client of `CapTokensService` without any credential.
    async fn anonymous(&self) -> CapTokensServiceClient<Channel> {
        CapTokensServiceClient::new(self.anonymous_channel().await)
    }

    /// A client of `CapabilityTokensInternal` without any credential.
    async fn anonymous_internal(&self) -> CapabilityTokensInternalClient<Channel> {
        CapabilityTokensInternalClient::new(self.anonymous_channel().await)
    }

    async fn orchestrator(&self, tenant: &str) -> Client {
        self.client(tenant, ORCHESTRATOR, &[]).await
    }

    async fn connector(&self, tenant: &str) -> Client {
        self.client(tenant, CONNECTOR, &[]).await
    }

    async fn count(&self, tenant: &str, table: &str) -> i64 {
        let tx = self.store.read(tenant).await.expect("read tx");
        let row = tx
            .query_one(
                &format!("SELECT COUNT(*) AS n FROM {table} WHERE tenant_id = $1"),
                vec![tenant.into()],
            )
            .await
            .expect("count")
            .expect("a row");
        row.try_get("", "n").expect("n")
    }

    async fn counts(&self, tenant: &str) -> [i64; 4] {
        [
            self.count(tenant, "captoken_tokens").await,
            self.count(tenant, "captoken_audit").await,
            self.count(tenant, "captoken_revocations").await,
            self.count(tenant, "outbox").await,
        ]
    }

    async fn event_types(&self, tenant: &str) -> Vec<(String, Vec<u8>)> {
        let tx = self.store.read(tenant).await.expect("read tx");
        anumate_events::read_after(&tx, 0, 1000)
            .await
            .expect("outbox")
            .into_iter()
            .map(|r| (r.event_type, r.payload))
            .collect()
    }

    /// A token minted directly with the service's keys, for times the RPC
    /// would not allow.
    fn mint_at(&self, tenant: &str, now: i64) -> String {
        let cap = capability();
        let args = args(100);
        Issuer::new(ISS)
            .issue(
                self.keys.as_ref(),
                IssueRequest {
                    subject: "alice",
                    audience: AUDIENCE,
                    tenant,
                    run: "run-1",
                    step: "refund",
                    plan_hash: PLAN,
                    args: ArgsBinding::Args(&args),
                    capability: &cap,
                    ttl: Some(Duration::from_secs(60)),
                    single_use: false,
                    now: Some(now),
                },
            )
            .expect("issue")
            .token
    }
}

async fn client_with(addr: SocketAddr, token: String) -> Client {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    Client {
        public: CapTokensServiceClient::with_interceptor(
            channel.clone(),
            BearerToken(token.clone()),
        ),
        internal: CapabilityTokensInternalClient::with_interceptor(channel, BearerToken(token)),
    }
}

on_both_backends! {
    issue_and_verify => issue_and_verify_sqlite, issue_and_verify_postgres;
    every_rejection_has_its_verdict => rejections_sqlite, rejections_postgres;
    roles => roles_sqlite, roles_postgres;
    cross_tenant => cross_tenant_sqlite, cross_tenant_postgres;
    bad_input_writes_nothing => bad_input_sqlite, bad_input_postgres;
    refresh_and_revoke => refresh_and_revoke_sqlite, refresh_and_revoke_postgres;
    tokens_bind_what_the_platform_approved => bound_sqlite, bound_postgres;
    refresh_races_and_chains => refresh_races_sqlite, refresh_races_postgres;
    audit_and_events => audit_and_events_sqlite, audit_and_events_postgres;
    purge => purge_sqlite, purge_postgres;
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn capability() -> Capability {
    Capability::new(TOOL, ["call"]).constrain("/amount", Constraint::max(500))
}

fn args(amount: i64) -> serde_json::Value {
    json!({"order": "o-1", "amount": amount})
}

fn to_struct(v: &serde_json::Value) -> pbjson_types::Struct {
    serde_json::from_value(v.clone()).expect("struct")
}

fn hash(v: &serde_json::Value) -> String {
    anumate_captokens::args_sha256(v).expect("hash")
}

fn issue_request(run: &str, single_use: bool) -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        audience: AUDIENCE.into(),
        subject: "alice".into(),
        run_id: run.into(),
        step_id: "refund".into(),
        plan_hash: PLAN.into(),
        args_sha256: hash(&args(100)),
        capability: Some(pb::Capability {
            tool: TOOL.into(),
            actions: vec!["call".into()],
            constraints: Some(to_struct(&json!({"/amount": {"max": 500}}))),
        }),
        ttl: ttl(120),
        single_use,
    }
}

fn verify_request(token: &str) -> pb::VerifyTokenRequest {
    pb::VerifyTokenRequest {
        token: token.into(),
        audience: AUDIENCE.into(),
        tool: TOOL.into(),
        action: "call".into(),
        args_sha256: String::new(),
        args: Some(to_struct(&args(100))),
        plan_hash: PLAN.into(),
        run_id: String::new(),
        step_id: String::new(),
        consume: false,
    }
}

/// [`verify_request`] that also consumes a single-use token.
fn consume_request(token: &str) -> pb::VerifyTokenRequest {
    pb::VerifyTokenRequest {
        consume: true,
        ..verify_request(token)
    }
}

/// A TTL of whole seconds.
fn ttl(seconds: i64) -> Option<pbjson_types::Duration> {
    Some(pbjson_types::Duration { seconds, nanos: 0 })
}

fn refresh_request(token: &str, ttl: Option<pbjson_types::Duration>) -> pb::RefreshTokenRequest {
    pb::RefreshTokenRequest {
        token: token.into(),
        ttl,
    }
}

fn revoke_request(target: Target, reason: &str) -> pb::RevokeTokenRequest {
    pb::RevokeTokenRequest {
        target: Some(target),
        reason: reason.into(),
    }
}

/// The audit entries `req` lists, newest first.
async fn audit_entries(
    client: &mut Client,
    req: pb::ListTokenAuditRequest,
) -> Vec<pb::TokenAuditEntry> {
    client
        .list_token_audit(req)
        .await
        .expect("list audit")
        .into_inner()
        .entries
}

async fn issue(client: &mut Client, run: &str, single_use: bool) -> pb::IssueTokenResponse {
    client
        .issue_token(issue_request(run, single_use))
        .await
        .expect("issue")
        .into_inner()
}

async fn verdict(client: &mut Client, req: pb::VerifyTokenRequest) -> (Verdict, String) {
    let r = client.verify_token(req).await.expect("verify").into_inner();
    (
        Verdict::try_from(r.verdict).expect("known verdict"),
        r.message,
    )
}

/// Replaces the signature of `token` with `sig`, and the header with `header`.
fn forge(token: &str, header: &serde_json::Value, sig: &[u8]) -> String {
    let claims = token.split('.').nth(1).expect("claims");
    format!(
        "{}.{claims}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(sig)
    )
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

async fn issue_and_verify(app: TestApp) {
    let mut orch = app.orchestrator(TENANT_A).await;
    let mut conn = app.connector(TENANT_A).await;
    let issued = issue(&mut orch, "run-1", true).await;
    let claims = issued.claims.clone().expect("claims");
    assert_eq!(claims.tenant_id, TENANT_A);
    assert_eq!(claims.issuer, ISS);
    assert_eq!(claims.kid, app.keys.active().kid());
    assert!(claims.single_use);
    let ttl = claims.expire_time.unwrap().seconds - claims.issue_time.unwrap().seconds;
    assert_eq!(ttl, 120);
    // Digests are `sha256:<hex>` in the claims, whichever spelling was sent.
    assert_eq!(claims.args_sha256, hash(&args(100)));
    let colon_free = orch
        .issue_token(pb::IssueTokenRequest {
            plan_hash: PLAN.trim_start_matches("sha256:").to_owned(),
            args_sha256: hash(&args(100)).replace("sha256:", "sha256-"),
            ..issue_request("run-1", false)
        })
        .await
        .unwrap()
        .into_inner()
        .claims
        .unwrap();
    assert_eq!(colon_free.plan_hash, PLAN);
    assert_eq!(colon_free.args_sha256, claims.args_sha256);

    // A dry check leaves it usable.
    let r = conn
        .verify_token(verify_request(&issued.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.verdict, Verdict::Valid as i32, "{}", r.message);
    assert!(!r.consumed);
    assert_eq!(r.claims.unwrap().jti, claims.jti);

    let consume = pb::VerifyTokenRequest {
        consume: true,
        run_id: "run-1".into(),
        step_id: "refund".into(),
        args_sha256: hash(&args(100)),
        ..verify_request(&issued.token)
    };
    let r = conn
        .verify_token(consume.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.verdict, Verdict::Valid as i32, "{}", r.message);
    assert!(r.consumed);
    assert_eq!(verdict(&mut conn, consume).await.0, Verdict::Replayed);
    assert_eq!(
        verdict(&mut conn, verify_request(&issued.token)).await.0,
        Verdict::Replayed
    );

    // A reusable token can be consumed repeatedly (consume is a no-op).
    let reusable = issue(&mut orch, "run-1", false).await;
    for _ in 0..2 {
        let r = conn
            .verify_token(consume_request(&reusable.token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.verdict, Verdict::Valid as i32);
        assert!(!r.consumed);
    }

    // The JWKS verifies the token offline; it needs no credential.
    // It is a JWKS document (what a JOSE library fetches from the route),
    // cacheable for `jwks_max_age_secs`.
    let jwks = app
        .anonymous()
        .await
        .get_jwks(pb::GetJwksRequest {})
        .await
        .expect("jwks without credentials");
    assert_eq!(
        jwks.metadata().get("cache-control").unwrap(),
        "public, max-age=300"
    );
    let jwks = jwks.into_inner();
    assert_eq!(jwks.content_type, "application/json");
    let set: anumate_crypto::Jwks = serde_json::from_slice(&jwks.data).unwrap();
    let offline = anumate_captokens::Verifier::from_jwks(&set).unwrap();
    let a = args(100);
    offline
        .verify(
            &reusable.token,
            &anumate_captokens::Expectation::new(AUDIENCE, TENANT_A, TOOL).args(&a),
        )
        .expect("offline verify");
}

async fn every_rejection_has_its_verdict(app: TestApp) {
    let mut orch = app.orchestrator(TENANT_A).await;
    let mut conn = app.connector(TENANT_A).await;
    let mut conn_b = app.connector(TENANT_B).await;
    let token = issue(&mut orch, "run-1", true).await.token;
    let now = anumate_store::now_micros() / 1_000_000;
    let mut seen = BTreeSet::new();
    let mut check = |v: (Verdict, String), want: Verdict| {
        assert_eq!(v.0, want, "{}", v.1);
        assert!(!v.1.is_empty());
        assert!(seen.insert(want as i32), "{want:?} twice");
    };

    // `token`'s verify request with one thing changed.
    let changed = |change: fn(&mut pb::VerifyTokenRequest)| {
        let mut req = verify_request(&token);
        change(&mut req);
        req
    };
    // (verified in tenant B, request, verdict)
    let cases = [
        (false, verify_request("not-a-token"), Verdict::Malformed),
        (
            false,
            verify_request(&app.mint_at(TENANT_A, now - 600)),
            Verdict::Expired,
        ),
        (
            false,
            verify_request(&app.mint_at(TENANT_A, now + 600)),
            Verdict::NotYetValid,
        ),
        (
            false,
            changed(|r| r.audience = "connector:other".into()),
            Verdict::WrongAudience,
        ),
        (true, verify_request(&token), Verdict::WrongTenant),
        (
            false,
            changed(|r| r.run_id = "run-2".into()),
            Verdict::BindingMismatch,
        ),
        (
            false,
            changed(|r| r.tool = "payments.charge".into()),
            Verdict::CapabilityMismatch,
        ),
        (
            false,
            changed(|r| r.args = Some(to_struct(&args(501)))),
            Verdict::ConstraintViolated,
        ),
        (
            false,
            changed(|r| r.args = Some(to_struct(&args(99)))),
            Verdict::ArgsMismatch,
        ),
    ];
    for (in_b, req, want) in cases {
        let client = if in_b { &mut conn_b } else { &mut conn };
        check(verdict(client, req).await, want);
    }
    // Unknown kid: signed by a key the service does not know.
    let stranger = KeyRing::new(KeyPair::generate().unwrap());
    let cap = capability();
    let a = args(100);
    let foreign = Issuer::new(ISS)
        .issue(
            &stranger,
            IssueRequest {
                subject: "alice",
                audience: AUDIENCE,
                tenant: TENANT_A,
                run: "run-1",
                step: "refund",
                plan_hash: PLAN,
                args: ArgsBinding::Args(&a),
                capability: &cap,
                ttl: None,
                single_use: false,
                now: None,
            },
        )
        .unwrap()
        .token;
    check(
        verdict(&mut conn, verify_request(&foreign)).await,
        Verdict::UnknownKey,
    );
    // alg none and HS256 (keyed with the public key, the classic confusion).
    let kid = app.keys.active().kid();
    let none = forge(
        &token,
        &json!({"alg": "none", "typ": "JWT", "kid": kid}),
        b"",
    );
    check(
        verdict(&mut conn, verify_request(&none)).await,
        Verdict::UnsupportedAlgorithm,
    );
    let hs = forge(
        &token,
        &json!({"alg": "HS256", "typ": "JWT", "kid": kid}),
        &[7u8; 32],
    );
    assert_eq!(
        verdict(&mut conn, verify_request(&hs)).await.0,
        Verdict::UnsupportedAlgorithm
    );
    // Truncated signature: malformed; a flipped bit: bad signature.
    let truncated = &token[..token.len() - 4];
    assert_eq!(
        verdict(&mut conn, verify_request(truncated)).await.0,
        Verdict::Malformed
    );
    let parts: Vec<&str> = token.split('.').collect();
    let mut sig = anumate_crypto::b64url_decode(parts[2]).unwrap();
    sig[10] ^= 0x01;
    let flipped = format!("{}.{}.{}", parts[0], parts[1], b64url(&sig));
    check(
        verdict(&mut conn, verify_request(&flipped)).await,
        Verdict::BadSignature,
    );
    // Revoked by jti and by run.
    let by_jti = issue(&mut orch, "run-1", false).await;
    let jti = by_jti.claims.unwrap().jti;
    let revoked = orch
        .revoke_token(revoke_request(Target::Jti(jti.clone()), "test"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_jtis, vec![jti]);
    check(
        verdict(&mut conn, verify_request(&by_jti.token)).await,
        Verdict::Revoked,
    );
    let by_run = issue(&mut orch, "run-9", false).await;
    let revoked = orch
        .revoke_token(revoke_request(
            Target::RunId("run-9".into()),
            "run cancelled",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_jtis, vec![by_run.claims.unwrap().jti]);
    assert_eq!(
        verdict(&mut conn, verify_request(&by_run.token)).await.0,
        Verdict::Revoked
    );
    // Replayed.
    let consume = consume_request(&token);
    assert_eq!(verdict(&mut conn, consume.clone()).await.0, Verdict::Valid);
    check(verdict(&mut conn, consume).await, Verdict::Replayed);

    // Every verdict but UNSPECIFIED and VALID was produced, each by its own case.
    let all: BTreeSet<i32> = (2..=15).collect();
    assert_eq!(seen, all);
    // Each failure is audited in the verifier's tenant.
    assert!(app.count(TENANT_A, "captoken_audit").await >= 15);
    assert_eq!(app.count(TENANT_B, "captoken_audit").await, 1);
}

async fn roles(app: TestApp) {
    let mut author = app.client(TENANT_A, "bob", &[Role::Author]).await;
    expect_error(
        author.issue_token(issue_request("run-1", true)).await,
        ErrorCode::PermissionDenied,
    );
    let mut operator = app.client(TENANT_A, "olga", &[Role::Operator]).await;
    let mut orchestrator = app.orchestrator(TENANT_A).await;
    let issued = issue(&mut orchestrator, "run-1", true).await;
    expect_error(
        author.verify_token(verify_request(&issued.token)).await,
        ErrorCode::PermissionDenied,
    );
    // Spending a token is for the connector hub only: neither a user nor
    // another platform service (here the orchestrator that issued it) may.
    for caller in [&mut author, &mut orchestrator] {
        expect_error(
            caller
                .internal
                .consume_token(pb::ConsumeTokenRequest {
                    token: issued.token.clone(),
                })
                .await,
            ErrorCode::PermissionDenied,
        );
    }
    expect_error(
        author
            .revoke_token(revoke_request(Target::RunId("run-1".into()), ""))
            .await,
        ErrorCode::PermissionDenied,
    );
    expect_error(
        operator
            .list_token_audit(pb::ListTokenAuditRequest::default())
            .await,
        ErrorCode::PermissionDenied,
    );
    let mut auditor = app.client(TENANT_A, "aud", &[Role::Auditor]).await;
    expect_error(
        auditor.issue_token(issue_request("run-1", true)).await,
        ErrorCode::PermissionDenied,
    );
    let audit = audit_entries(&mut auditor, pb::ListTokenAuditRequest::default()).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].actor, ORCHESTRATOR);
    assert_eq!(audit[0].reason, "");
    // Only the permitted issue was written.
    assert_eq!(app.count(TENANT_A, "captoken_tokens").await, 1);
    // No credential at all.
    expect_error(
        app.anonymous_internal()
            .await
            .issue_token(issue_request("run-1", true))
            .await,
        ErrorCode::Unauthenticated,
    );
}

async fn cross_tenant(app: TestApp) {
    let mut orch_a = app.orchestrator(TENANT_A).await;
    let mut orch_b = app.orchestrator(TENANT_B).await;
    let issued = issue(&mut orch_a, "run-1", true).await;
    let jti = issued.claims.clone().unwrap().jti;
    let (v, _) = verdict(&mut orch_b, consume_request(&issued.token)).await;
    assert_eq!(v, Verdict::WrongTenant);
    expect_reason(
        orch_b
            .revoke_token(revoke_request(Target::Jti(jti.clone()), ""))
            .await,
        Reason::TokenNotFound,
    );
    expect_reason(
        orch_b
            .revoke_token(revoke_request(Target::RunId("run-1".into()), ""))
            .await,
        Reason::TokenNotFound,
    );
    expect_reason(
        orch_b
            .refresh_token(refresh_request(&issued.token, None))
            .await,
        Reason::TokenNotFound,
    );
    // A's token is untouched: still consumable in A.
    let mut conn_a = app.connector(TENANT_A).await;
    assert_eq!(
        verdict(&mut conn_a, consume_request(&issued.token)).await.0,
        Verdict::Valid
    );
    // B's audit shows only B's verify failures, never A's issue.
    let mut auditor_b = app.client(TENANT_B, "aud", &[Role::Auditor]).await;
    let entries = audit_entries(&mut auditor_b, pb::ListTokenAuditRequest::default()).await;
    assert!(!entries.is_empty());
    assert!(
        entries
            .iter()
            .all(|e| e.kind == pb::AuditKind::VerifyFailed as i32)
    );
    assert_eq!(app.count(TENANT_B, "captoken_tokens").await, 0);
    assert_eq!(app.count(TENANT_B, "captoken_revocations").await, 0);
}

async fn bad_input_writes_nothing(app: TestApp) {
    let mut orch = app.orchestrator(TENANT_A).await;
    let issued = issue(&mut orch, "run-1", true).await;
    let before = app.counts(TENANT_A).await;

    // Issue requests that each break one rule.
    let issue_with = |change: fn(&mut pb::IssueTokenRequest)| {
        let mut req = issue_request("run-1", true);
        change(&mut req);
        req
    };
    for req in [
        issue_with(|r| r.ttl = ttl(301)),
        issue_with(|r| r.ttl = ttl(-1)),
        issue_with(|r| r.run_id.clear()),
        issue_with(|r| r.args_sha256 = "xyz".into()),
        issue_with(|r| r.plan_hash = "sha256:not-hex".into()),
        issue_with(|r| {
            r.capability.as_mut().unwrap().constraints =
                Some(to_struct(&json!({"/amount": {"maximum": 5}})));
        }),
        issue_with(|r| r.capability = None),
    ] {
        expect_error(orch.issue_token(req).await, ErrorCode::InvalidArgument);
    }

    // Malformed Struct args: a value with no kind, and a NaN.
    let with_amount = |kind| {
        let mut s = to_struct(&args(100));
        s.fields
            .insert("amount".into(), pbjson_types::Value { kind });
        s
    };
    let nan = Some(pbjson_types::value::Kind::NumberValue(f64::NAN));
    for req in [
        pb::VerifyTokenRequest {
            args: Some(with_amount(None)),
            ..consume_request(&issued.token)
        },
        pb::VerifyTokenRequest {
            args: Some(with_amount(nan)),
            ..verify_request(&issued.token)
        },
        pb::VerifyTokenRequest {
            audience: String::new(),
            ..verify_request(&issued.token)
        },
        pb::VerifyTokenRequest {
            token: String::new(),
            ..verify_request(&issued.token)
        },
    ] {
        expect_error(orch.verify_token(req).await, ErrorCode::InvalidArgument);
    }
    expect_error(
        orch.revoke_token(pb::RevokeTokenRequest {
            target: None,
            reason: String::new(),
        })
        .await,
        ErrorCode::InvalidArgument,
    );
    expect_error(
        orch.refresh_token(refresh_request(&issued.token, ttl(400)))
            .await,
        ErrorCode::InvalidArgument,
    );
    let mut auditor = app.client(TENANT_A, "aud", &[Role::Auditor]).await;
    for req in [
        pb::ListTokenAuditRequest {
            kind: 99,
            ..Default::default()
        },
        pb::ListTokenAuditRequest {
            page_size: 10,
            page_token: "garbage".into(),
            ..Default::default()
        },
        pb::ListTokenAuditRequest {
            page_size: -1,
            ..Default::default()
        },
    ] {
        let field = if req.page_size < 0 {
            "page_size"
        } else if req.page_token.is_empty() {
            "kind"
        } else {
            "page_token"
        };
        let status = expect_error(
            auditor.list_token_audit(req).await,
            ErrorCode::InvalidArgument,
        );
        let e = anumate_errors::Error::from_status(&status);
        assert_eq!(e.violations[0].field, field, "{e:?}");
    }
    // Oversize requests are refused before decoding; the service keeps serving.
    let huge = json!({"order": "x".repeat(300 * 1024), "amount": 1});
    expect_error(
        orch.verify_token(pb::VerifyTokenRequest {
            args: Some(to_struct(&huge)),
            ..consume_request(&issued.token)
        })
        .await,
        ErrorCode::PayloadTooLarge,
    );
    // Nothing was written, and the token was not consumed.
    assert_eq!(app.counts(TENANT_A).await, before);
    assert_eq!(app.count(TENANT_A, "captoken_replay").await, 0);
    let mut conn = app.connector(TENANT_A).await;
    assert_eq!(
        verdict(&mut conn, consume_request(&issued.token)).await.0,
        Verdict::Valid
    );
}

async fn refresh_and_revoke(app: TestApp) {
    let mut orch = app.orchestrator(TENANT_A).await;
    let mut conn = app.connector(TENANT_A).await;
    let old = issue(&mut orch, "run-1", true).await;
    let old_jti = old.claims.clone().unwrap().jti;
    let fresh = orch
        .refresh_token(refresh_request(&old.token, ttl(30)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.revoked_jti, old_jti);
    let c = fresh.claims.clone().unwrap();
    assert_ne!(c.jti, old_jti);
    assert_eq!(c.run_id, "run-1");
    assert!(c.single_use);
    assert_eq!(
        c.expire_time.unwrap().seconds - c.issue_time.unwrap().seconds,
        30
    );
    assert_eq!(
        verdict(&mut conn, verify_request(&old.token)).await.0,
        Verdict::Revoked
    );
    assert_eq!(
        verdict(&mut conn, verify_request(&fresh.token)).await.0,
        Verdict::Valid
    );
    let again = orch.refresh_token(refresh_request(&old.token, None)).await;
    expect_reason(again, Reason::TokenRevoked);
    expect_error(
        orch.refresh_token(refresh_request("garbage", None)).await,
        ErrorCode::Unauthenticated,
    );
    // An expired token cannot be refreshed: its own class, TOKEN_EXPIRED.
    let now = anumate_store::now_micros() / 1_000_000;
    expect_reason(
        orch.refresh_token(refresh_request(&app.mint_at(TENANT_A, now - 600), None))
            .await,
        Reason::TokenExpired,
    );
    // A consumed token cannot be refreshed.
    assert_eq!(
        verdict(&mut conn, consume_request(&fresh.token)).await.0,
        Verdict::Valid
    );
    expect_reason(
        orch.refresh_token(refresh_request(&fresh.token, None))
            .await,
        Reason::TokenAlreadyUsed,
    );

    // Revoking twice is a no-op; unknown jti is NOT_FOUND.
    let t = issue(&mut orch, "run-2", false).await;
    let jti = t.claims.unwrap().jti;
    let revoke = |target| revoke_request(target, "why");
    let r = orch
        .revoke_token(revoke(Target::Jti(jti.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_jtis, vec![jti.clone()]);
    let r = orch
        .revoke_token(revoke(Target::Jti(jti.clone())))
        .await
        .unwrap()
        .into_inner();
    assert!(r.revoked_jtis.is_empty());
    expect_reason(
        orch.revoke_token(revoke(Target::Jti("nope".into()))).await,
        Reason::TokenNotFound,
    );
    // By run: only the tokens not already revoked are newly revoked.
    let t2 = issue(&mut orch, "run-2", false).await;
    let r = orch
        .revoke_token(revoke(Target::RunId("run-2".into())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.revoked_jtis, vec![t2.claims.unwrap().jti]);
    let r = orch
        .revoke_token(revoke(Target::RunId("run-2".into())))
        .await
        .unwrap()
        .into_inner();
    assert!(r.revoked_jtis.is_empty());
    // A token issued after its run was revoked is revoked too.
    let late = issue(&mut orch, "run-2", false).await;
    assert_eq!(
        verdict(&mut conn, verify_request(&late.token)).await.0,
        Verdict::Revoked
    );
}

async fn audit_and_events(app: TestApp) {
    let mut orch = app.orchestrator(TENANT_A).await;
    let mut conn = app.connector(TENANT_A).await;
    let issued = issue(&mut orch, "run-1", true).await;
    let jti = issued.claims.clone().unwrap().jti;
    let (v, _) = verdict(
        &mut conn,
        pb::VerifyTokenRequest {
            tool: "payments.charge".into(),
            ..verify_request(&issued.token)
        },
    )
    .await;
    assert_eq!(v, Verdict::CapabilityMismatch);
    orch.revoke_token(revoke_request(Target::Jti(jti.clone()), "operator said so"))
        .await
        .unwrap();

    let mut auditor = app.client(TENANT_A, "aud", &[Role::Auditor]).await;
    let entries = audit_entries(&mut auditor, pb::ListTokenAuditRequest::default()).await;
    let kinds: Vec<i32> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            pb::AuditKind::Revoked as i32,
            pb::AuditKind::VerifyFailed as i32,
            pb::AuditKind::Issued as i32
        ]
    );
    assert!(entries.iter().all(|e| e.jti == jti && e.time.is_some()));
    assert_eq!(entries[0].reason, "operator said so");
    assert_eq!(entries[0].actor, ORCHESTRATOR);
    assert_eq!(entries[1].verdict, Verdict::CapabilityMismatch as i32);
    assert_eq!(entries[1].actor, CONNECTOR);
    assert_eq!(entries[1].tool, "payments.charge");
    assert_eq!(entries[2].tool, TOOL);
    assert_eq!(entries[2].run_id, "run-1");

    // Filters and paging.
    let only = audit_entries(
        &mut auditor,
        pb::ListTokenAuditRequest {
            kind: pb::AuditKind::VerifyFailed as i32,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(only.len(), 1);
    let page = |token: String| pb::ListTokenAuditRequest {
        page_size: 2,
        page_token: token,
        ..Default::default()
    };
    let first = auditor
        .list_token_audit(page(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    let next = first.next_page_token;
    assert!(!next.is_empty());
    let second = auditor
        .list_token_audit(page(next))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.entries.len(), 1);
    assert_eq!(second.entries[0].kind, pb::AuditKind::Issued as i32);
    assert!(second.next_page_token.is_empty());

    // The outbox holds the three events, in order, with their payloads.
    let events = app.event_types(TENANT_A).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        vec![
            "dev.anumate.token.issued.v1",
            "dev.anumate.token.verify_failed.v1",
            "dev.anumate.token.revoked.v1"
        ]
    );
    let issued_ev = ev::TokenIssued::decode(events[0].1.as_slice()).unwrap();
    assert_eq!(
        (issued_ev.jti.as_str(), issued_ev.tenant_id.as_str()),
        (jti.as_str(), TENANT_A)
    );
    let failed = ev::TokenVerifyFailed::decode(events[1].1.as_slice()).unwrap();
    assert_eq!(failed.verdict, Verdict::CapabilityMismatch as i32);
    assert!(!failed.message.is_empty());
    let revoked = ev::TokenRevoked::decode(events[2].1.as_slice()).unwrap();
    assert_eq!(revoked.jtis, vec![jti]);
    assert_eq!(revoked.run_id, "run-1");
    assert_eq!(revoked.reason, "operator said so");
    // Time filters.
    let future = anumate_proto::timestamp_from_secs(anumate_store::now_micros() / 1_000_000 + 3600);
    let none = audit_entries(
        &mut auditor,
        pb::ListTokenAuditRequest {
            start_time: Some(future),
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());
    let all = audit_entries(
        &mut auditor,
        pb::ListTokenAuditRequest {
            end_time: Some(future),
            run_id: "run-1".into(),
            jti: entries[0].jti.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), 3);
}

async fn purge(app: TestApp) {
    let mut orch = app.orchestrator(TENANT_A).await;
    let mut conn = app.connector(TENANT_A).await;
    let issued = issue(&mut orch, "run-1", true).await;
    let consume = consume_request(&issued.token);
    assert_eq!(verdict(&mut conn, consume.clone()).await.0, Verdict::Valid);
    // A record whose token expired long ago.
    let tx = app.store.write(TENANT_A).await.unwrap();
    tx.execute(
        "INSERT INTO captoken_replay (jti, tenant_id, exp) VALUES ('old', $1, 1000)",
        vec![TENANT_A.into()],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(app.count(TENANT_A, "captoken_replay").await, 2);
    assert_eq!(app.tokens.purge_replay().await.unwrap(), 1);
    assert_eq!(app.count(TENANT_A, "captoken_replay").await, 1);
    // The live record still guards its token.
    assert_eq!(verdict(&mut conn, consume).await.0, Verdict::Replayed);
    // The background task runs and can be stopped.
    let task = app.tokens.spawn_background();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!task.is_finished());
    task.abort();
}

/// Key rotation with overlap: after the new key becomes active, tokens signed
/// by the retired key still verify; once it is dropped from the ring they are
/// `UNKNOWN_KEY`. The JWKS lists both while they overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_sqlite() {
    let app = spawn_app(Backend::Sqlite).await;
    let mut orch = app.orchestrator(TENANT_A).await;
    let old = issue(&mut orch, "run-1", false).await;

    let new_key = KeyPair::generate().unwrap();
    let new_kid = new_key.kid().to_owned();
    let rotated = Arc::new(KeyRing::new(new_key).with_retired(app.keys.active()));
    let tokens = CapTokens::new(app.store.clone(), rotated.clone(), &config()).unwrap();
    let server = serve(tokens, app.auth.clone()).await;
    let mut conn = app.client_at(server.addr, TENANT_A, CONNECTOR, &[]).await;
    assert_eq!(
        verdict(&mut conn, verify_request(&old.token)).await.0,
        Verdict::Valid
    );
    let mut orch2 = app
        .client_at(server.addr, TENANT_A, ORCHESTRATOR, &[])
        .await;
    let fresh = issue(&mut orch2, "run-1", false).await;
    assert_eq!(fresh.claims.unwrap().kid, new_kid);
    let jwks = orch2
        .get_jwks(pb::GetJwksRequest {})
        .await
        .unwrap()
        .into_inner();
    let set: anumate_crypto::Jwks = serde_json::from_slice(&jwks.data).unwrap();
    assert_eq!(set.keys.len(), 2);

    // Retired for good: only the new key remains.
    let retired = Arc::new(KeyRing::new(
        KeyPair::from_pkcs8_pem(&rotated.active().to_pkcs8_pem()).unwrap(),
    ));
    let tokens = CapTokens::new(app.store.clone(), retired, &config()).unwrap();
    let server = serve(tokens, app.auth.clone()).await;
    let mut conn = app.client_at(server.addr, TENANT_A, CONNECTOR, &[]).await;
    assert_eq!(
        verdict(&mut conn, verify_request(&old.token)).await.0,
        Verdict::UnknownKey
    );
    assert_eq!(
        verdict(&mut conn, verify_request(&fresh.token)).await.0,
        Verdict::Valid
    );
}

/// When the replay store cannot be read the call fails `UNAVAILABLE`: no
/// verdict, nothing written, never a `VALID`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_unavailable_sqlite() {
    use sea_orm::ConnectionTrait as _;
    let app = spawn_app(Backend::Sqlite).await;
    let mut orch = app.orchestrator(TENANT_A).await;
    let issued = issue(&mut orch, "run-1", true).await;
    let before = app.counts(TENANT_A).await;
    app.store
        .owner_connection()
        .execute_unprepared("ALTER TABLE captoken_replay RENAME TO captoken_replay_gone")
        .await
        .unwrap();
    let mut conn = app.connector(TENANT_A).await;
    expect_error(
        conn.verify_token(consume_request(&issued.token)).await,
        ErrorCode::Unavailable,
    );
    assert_eq!(app.counts(TENANT_A).await, before);
}

/// Two replicas sharing one PostgreSQL database: a token consumed on one is
/// `REPLAYED` on the other, and of concurrent consumes exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_across_two_instances_postgres() {
    let app = spawn_app(Backend::Postgres).await;
    let replica = app.replica().await;
    let mut orch = app.orchestrator(TENANT_A).await;
    let mut one = app.connector(TENANT_A).await;
    let mut two = app.client_at(replica.addr, TENANT_A, CONNECTOR, &[]).await;
    let consume = |token: &str| consume_request(token);

    let issued = issue(&mut orch, "run-1", true).await;
    assert_eq!(
        verdict(&mut one, consume(&issued.token)).await.0,
        Verdict::Valid
    );
    assert_eq!(
        verdict(&mut two, consume(&issued.token)).await.0,
        Verdict::Replayed
    );

    for _ in 0..5 {
        let issued = issue(&mut orch, "run-1", true).await;
        let (mut a, mut b) = (one.clone(), two.clone());
        let (ra, rb) = tokio::join!(
            a.verify_token(consume(&issued.token)),
            b.verify_token(consume(&issued.token))
        );
        let mut verdicts = vec![
            ra.unwrap().into_inner().verdict,
            rb.unwrap().into_inner().verdict,
        ];
        verdicts.sort_unstable();
        assert_eq!(
            verdicts,
            vec![Verdict::Valid as i32, Verdict::Replayed as i32]
        );
    }
}

// ---------------------------------------------------------------------------
// Revocation receipts (in-process and over gRPC)
// ---------------------------------------------------------------------------

/// A receipts service over the app's database.
async fn receipts_over(app: &TestApp) -> anumate_receipts::Receipts {
    app.store
        .migrate(&anumate_receipts::migrations())
        .await
        .expect("receipts migrations");
    let keys = Arc::new(KeyRing::new(KeyPair::generate().expect("key")));
    anumate_receipts::Receipts::new(
        app.store.clone(),
        keys,
        &anumate_receipts::ReceiptsConfig::default(),
    )
    .expect("receipts")
}

/// The receipts service at `url` over gRPC, called as `issuer`'s service.
fn grpc_receipts_at(
    url: &str,
    issuer: anumate_auth::ServiceIssuer,
) -> anumate_service::clients::Grpc {
    let channel = anumate_service::clients::channel("captokens.receipts_url", url).unwrap();
    anumate_service::clients::Grpc::new(channel).with_service_issuer(issuer)
}

/// A captokens server over the app's database that receipts revocations
/// through `receipts`.
async fn serve_receipting(
    app: &TestApp,
    receipts: Arc<dyn anumate_service::clients::ReceiptsClient>,
) -> Server {
    let tokens = CapTokens::new(app.store.clone(), app.keys.clone(), &config())
        .expect("service")
        .with_revocation_receipts(receipts);
    serve(tokens, app.auth.clone()).await
}

async fn revocations_are_receipted(app: TestApp) {
    let receipts = receipts_over(&app).await;
    let server = serve_receipting(&app, Arc::new(receipts.clone())).await;
    let mut op = app
        .client_at(server.addr, TENANT_A, "olga", &[Role::Operator])
        .await;
    let mut orch = app
        .client_at(server.addr, TENANT_A, ORCHESTRATOR, &[])
        .await;
    let a = issue(&mut orch, "run-r", false).await.claims.unwrap().jti;
    let b = issue(&mut orch, "run-r", false).await.claims.unwrap().jti;
    let revoked = op
        .revoke_token(revoke_request(
            Target::RunId("run-r".into()),
            "run cancelled",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_jtis.len(), 2);
    assert!(!revoked.receipt_id.is_empty());
    let actor = anumate_receipts::Actor {
        tenant: TENANT_A.into(),
        subject: "auditor".into(),
        service: None,
    };
    let receipt = receipts.get(&actor, &revoked.receipt_id).await.unwrap();
    assert_eq!(
        receipt.kind,
        anumate_proto::receipts::v1::ReceiptKind::TokenRevocation as i32
    );
    let subject = receipt.subject.unwrap();
    assert_eq!(subject.run_id, "run-r");
    let mut jtis = subject.jtis.clone();
    jtis.sort();
    let mut expected = vec![a.clone(), b];
    expected.sort();
    assert_eq!(jtis, expected);
    let content = serde_json::to_value(receipt.content.unwrap()).unwrap();
    assert_eq!(content["reason"], "run cancelled");
    assert_eq!(content["revoked_by"], "olga");
    // Appended, and signed, as the captokens service.
    assert_eq!(receipt.actor, "svc:captokens");
    // The revocation event names the receipt.
    let events = app.event_types(TENANT_A).await;
    let (_, payload) = events
        .iter()
        .rev()
        .find(|(t, _)| t == "dev.anumate.token.revoked.v1")
        .expect("token revoked event");
    let event = ev::TokenRevoked::decode(payload.as_slice()).unwrap();
    assert_eq!(event.receipt_id, revoked.receipt_id);
    // Nothing left to revoke: no receipt.
    let again = op
        .revoke_token(revoke_request(Target::Jti(a), "again"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.revoked_jtis.is_empty() && again.receipt_id.is_empty());

    // Over gRPC, with the caller's own token forwarded to a receipts server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receipts_addr = listener.local_addr().unwrap();
    let auth = app.auth.clone();
    let grpc_receipts = receipts.clone();
    let receipts_server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(
                tower::ServiceBuilder::new()
                    .map_response(anumate_errors::layer::ensure_error_info::<tonic::body::Body>)
                    .layer(AuthLayer::new(
                        auth,
                        anumate_auth::AuthzTable::platform().unwrap(),
                    )),
            )
            .add_service(anumate_receipts::ReceiptsGrpc::new(grpc_receipts).into_internal_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let captokens = app.services.for_service("captokens").unwrap();
    let client = grpc_receipts_at(&format!("http://{receipts_addr}"), captokens.clone());
    let remote = serve_receipting(&app, Arc::new(client)).await;
    let mut op = app
        .client_at(remote.addr, TENANT_A, "oscar", &[Role::Operator])
        .await;
    let mut orch = app
        .client_at(remote.addr, TENANT_A, ORCHESTRATOR, &[])
        .await;
    let c = issue(&mut orch, "run-s", false).await.claims.unwrap().jti;
    let revoked = op
        .revoke_token(revoke_request(Target::Jti(c.clone()), "leaked"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_jtis, vec![c]);
    let receipt = receipts.get(&actor, &revoked.receipt_id).await.unwrap();
    let content = serde_json::to_value(receipt.content.unwrap()).unwrap();
    assert_eq!(content["revoked_by"], "oscar");
    assert_eq!(content["target"], "jti");
    assert_eq!(receipt.actor, "svc:captokens");
    receipts_server.abort();

    // No receipts service reachable: UNAVAILABLE and nothing revoked.
    let down = grpc_receipts_at("http://127.0.0.1:9", captokens);
    let broken = serve_receipting(&app, Arc::new(down)).await;
    let mut op = app
        .client_at(broken.addr, TENANT_A, "olga", &[Role::Operator])
        .await;
    let mut orch = app
        .client_at(broken.addr, TENANT_A, ORCHESTRATOR, &[])
        .await;
    let issued = issue(&mut orch, "run-t", false).await;
    let before = app.count(TENANT_A, "captoken_revocations").await;
    expect_error(
        op.revoke_token(revoke_request(Target::RunId("run-t".into()), "x"))
            .await,
        ErrorCode::Unavailable,
    );
    assert_eq!(app.count(TENANT_A, "captoken_revocations").await, before);
    let mut conn = app.connector(TENANT_A).await;
    assert_eq!(
        verdict(&mut conn, verify_request(&issued.token)).await.0,
        Verdict::Valid
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_are_receipted_sqlite() {
    revocations_are_receipted(spawn_app(Backend::Sqlite).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_are_receipted_postgres() {
    revocations_are_receipted(spawn_app(Backend::Postgres).await).await;
}

/// Issue #9 (high): only the orchestrator service (and audited admins) mint,
/// a verification must name the action and the arguments, and a `svc:`
/// subject from the user issuer is no service. Each assertion failed on the
/// old code: operators minted, a `svc:` user token passed as a service, and a
/// VerifyToken without arguments was VALID.
async fn tokens_bind_what_the_platform_approved(app: TestApp) {
    let before = app.counts(TENANT_A).await;
    // Operators (and other people) may not mint, nor may other services.
    let mut operator = app.client(TENANT_A, "olga", &[Role::Operator]).await;
    let e = expect_error(
        operator.issue_token(issue_request("run-1", true)).await,
        ErrorCode::PermissionDenied,
    );
    assert!(e.message().contains("admin"), "{e:?}");
    let mut connector = app.connector(TENANT_A).await;
    let e = expect_error(
        connector.issue_token(issue_request("run-1", true)).await,
        ErrorCode::PermissionDenied,
    );
    assert!(e.message().contains("orchestrator"), "{e:?}");
    // A user-issuer token claiming `sub: svc:orchestrator` is refused
    // outright, for issuing and for the rest.
    let forged = app.user_token(TENANT_A, ORCHESTRATOR, &[]);
    let mut forged = client_with(app.server.addr, forged).await;
    let status = forged
        .issue_token(issue_request("run-1", true))
        .await
        .expect_err("svc: subject from the user issuer");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ),
        "{status:?}"
    );
    assert_eq!(app.counts(TENANT_A).await, before, "nothing written");

    // An admin may, and the audit says so.
    let mut admin = app.client(TENANT_A, "ada", &[Role::Admin]).await;
    let by_admin = issue(&mut admin, "run-9", false).await;
    let mut orchestrator = app.orchestrator(TENANT_A).await;
    let issued = issue(&mut orchestrator, "run-1", false).await;
    let mut auditor = app.client(TENANT_A, "aud", &[Role::Auditor]).await;
    let audit = audit_entries(
        &mut auditor,
        pb::ListTokenAuditRequest {
            kind: pb::AuditKind::Issued as i32,
            ..Default::default()
        },
    )
    .await;
    let entry = |jti: &str| audit.iter().find(|e| e.jti == jti).cloned().unwrap();
    let admin_jti = by_admin.claims.unwrap().jti;
    assert_eq!(entry(&admin_jti).actor, "ada");
    assert_eq!(entry(&admin_jti).reason, "admin-issued");
    assert_eq!(entry(&issued.claims.clone().unwrap().jti).reason, "");

    // Verifying names the action and the arguments, or it is a bad request
    // naming the field (and writes nothing).
    let before = app.counts(TENANT_A).await;
    let mut req = verify_request(&issued.token);
    req.args = None;
    req.args_sha256 = String::new();
    let e = expect_error(
        connector.verify_token(req).await,
        ErrorCode::InvalidArgument,
    );
    assert!(e.message().contains("args"), "{e:?}");
    let mut req = verify_request(&issued.token);
    req.action = String::new();
    let e = expect_error(
        connector.verify_token(req).await,
        ErrorCode::InvalidArgument,
    );
    assert!(e.message().contains("action"), "{e:?}");
    assert_eq!(app.counts(TENANT_A).await, before);
    // Other arguments, by value or by hash: a mismatch verdict.
    let mut req = verify_request(&issued.token);
    req.args = Some(to_struct(&args(99)));
    assert_eq!(verdict(&mut connector, req).await.0, Verdict::ArgsMismatch);
    let mut req = verify_request(&issued.token);
    req.args = None;
    req.args_sha256 = hash(&args(99));
    assert_eq!(verdict(&mut connector, req).await.0, Verdict::ArgsMismatch);
    // The right hash alone is enough, in any accepted spelling (`sha256:`,
    // and the colon-free `sha256-` and bare hex), and so is the plan's.
    let right = hash(&args(100));
    assert!(right.starts_with("sha256:"), "{right}");
    let bare = right.trim_start_matches("sha256:");
    for (args_sha256, plan_hash) in [
        (right.clone(), PLAN.to_owned()),
        (format!("sha256-{bare}"), PLAN.replace("sha256:", "sha256-")),
        (
            bare.to_owned(),
            PLAN.trim_start_matches("sha256:").to_owned(),
        ),
    ] {
        let mut req = verify_request(&issued.token);
        req.args = None;
        req.args_sha256 = args_sha256;
        req.plan_hash = plan_hash;
        assert_eq!(verdict(&mut connector, req).await.0, Verdict::Valid);
    }
    // A hash that is no SHA-256 digest is a bad request naming its field.
    for field in ["args_sha256", "plan_hash"] {
        let mut req = verify_request(&issued.token);
        match field {
            "args_sha256" => req.args_sha256 = "xyz".into(),
            _ => req.plan_hash = "sha256:XYZ".into(),
        }
        let status = expect_error(
            connector.verify_token(req).await,
            ErrorCode::InvalidArgument,
        );
        let e = anumate_errors::Error::from_status(&status);
        assert_eq!(e.violations[0].field, field, "{e:?}");
    }
    // Operators may no longer verify; admins may.
    expect_error(
        operator.verify_token(verify_request(&issued.token)).await,
        ErrorCode::PermissionDenied,
    );
    assert_eq!(
        verdict(&mut admin, verify_request(&issued.token)).await.0,
        Verdict::Valid
    );
    // Refresh is the orchestrator's (and admins'); revoke also operators'.
    for caller in [&mut operator, &mut connector] {
        expect_error(
            caller
                .refresh_token(refresh_request(&issued.token, None))
                .await,
            ErrorCode::PermissionDenied,
        );
    }
    expect_error(
        connector
            .revoke_token(revoke_request(Target::RunId("run-1".into()), ""))
            .await,
        ErrorCode::PermissionDenied,
    );
    let revoked = operator
        .revoke_token(revoke_request(Target::RunId("run-1".into()), "stop"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_jtis.len(), 1);
}

/// Issue #9 (low): a single-use token consumed concurrently with its refresh
/// never yields both a consumed call and a live refreshed token, and a chain
/// of refreshes ends at `max_refresh_lifetime_secs` from the first `iat`.
async fn refresh_races_and_chains(app: TestApp) {
    let replica = app.replica().await;
    let mut orchestrator = app.orchestrator(TENANT_A).await;
    let mut connector = app.client_at(replica.addr, TENANT_A, CONNECTOR, &[]).await;
    let mut both = 0;
    for i in 0..24 {
        let issued = issue(&mut orchestrator, &format!("race-{i}"), true).await;
        let consume = consume_request(&issued.token);
        let refresh = refresh_request(&issued.token, None);
        let (mut c, mut o) = (connector.clone(), orchestrator.clone());
        let (consumed, refreshed) = tokio::join!(
            async move { c.verify_token(consume).await.unwrap().into_inner() },
            async move { o.refresh_token(refresh).await },
        );
        let consumed = consumed.verdict == Verdict::Valid as i32 && consumed.consumed;
        if let Ok(fresh) = refreshed {
            // The refreshed token must not be usable when the old one was spent.
            let fresh = fresh.into_inner().token;
            let (v, _) = verdict(&mut connector, consume_request(&fresh)).await;
            if consumed && v == Verdict::Valid {
                both += 1;
            }
        } else if !consumed {
            panic!("neither the consume nor the refresh of race-{i} won");
        }
    }
    assert_eq!(both, 0, "consumed tokens that also yielded a live refresh");
    // A consumed single-use token is not refreshable, sequentially either.
    let issued = issue(&mut orchestrator, "spent", true).await;
    let spent = consume_request(&issued.token);
    assert_eq!(verdict(&mut connector, spent).await.0, Verdict::Valid);
    expect_reason(
        orchestrator
            .refresh_token(refresh_request(&issued.token, None))
            .await,
        Reason::TokenAlreadyUsed,
    );

    // The chain: a service whose chain may live 90 s refreshes a 60 s token
    // once (now + 60 <= iat + 90 only while iat is recent) but not to 120 s.
    let cfg = CapTokensConfig {
        max_refresh_lifetime_secs: 90,
        ..config()
    };
    let tokens = CapTokens::new(app.store.clone(), app.keys.clone(), &cfg).unwrap();
    let short = serve(tokens, app.auth.clone()).await;
    let mut orch = app.client_at(short.addr, TENANT_A, ORCHESTRATOR, &[]).await;
    let first = issue(&mut orch, "chain", false).await;
    let second = orch
        .refresh_token(refresh_request(&first.token, ttl(60)))
        .await
        .unwrap()
        .into_inner();
    let e = expect_error(
        orch.refresh_token(refresh_request(&second.token, ttl(120)))
            .await,
        ErrorCode::FailedPrecondition,
    );
    assert!(e.message().contains("max_refresh_lifetime_secs"), "{e:?}");
    // The refused refresh left the token as it was.
    assert_eq!(
        verdict(&mut connector, verify_request(&second.token))
            .await
            .0,
        Verdict::Valid
    );
}
