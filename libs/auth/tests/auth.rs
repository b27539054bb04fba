//! Authentication end to end with real keys, a real JWKS server and a real gRPC server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anumate_auth::{
    AuthConfig, AuthLayer, Authenticator, BearerToken, DEV_ISSUER, DevIssuer, IssuerConfig, Role,
    principal,
};
use anumate_crypto::{Jwks, KeyRing, b64url};
use anumate_errors::{Error, ErrorCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const RSA_PEM: &str = include_str!("fixtures/rsa_test_key.pem");
const RSA_JWK: &str = include_str!("fixtures/rsa_test_jwk.json");

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(iss: &str, tenant: Option<&str>, exp_in: i64) -> Value {
    let mut c = json!({
        "iss": iss,
        "sub": "user:alice",
        "iat": now(),
        "nbf": now(),
        "exp": now() + exp_in,
        "jti": "t-1",
        "aud": "anumate",
        "roles": ["operator", "superhero", "auditor"],
    });
    if let Some(t) = tenant {
        c["tenant"] = json!(t);
    }
    c
}

struct Dev {
    _dir: tempfile::TempDir,
    issuer: DevIssuer,
    auth: Authenticator,
}

fn dev() -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::load_or_create(dir.path()).unwrap();
    let auth = Authenticator::new(AuthConfig::default())
        .unwrap()
        .with_static_issuer(issuer.issuer(), issuer.jwks());
    Dev {
        _dir: dir,
        issuer,
        auth,
    }
}

async fn rejected(auth: &Authenticator, token: &str) -> Error {
    auth.authenticate(token).await.unwrap_err()
}

#[tokio::test]
async fn dev_token_yields_principal() {
    let d = dev();
    let token = d
        .issuer
        .mint(
            "acme",
            "user:bob",
            &[Role::Author, Role::Approver],
            Duration::from_secs(600),
        )
        .unwrap();
    let p = d.auth.authenticate(&token).await.unwrap();
    assert_eq!(p.tenant_id, "acme");
    assert_eq!(p.subject, "user:bob");
    assert_eq!(p.issuer, DEV_ISSUER);
    assert_eq!(p.roles, vec![Role::Author, Role::Approver]);
    assert!(p.token_id.is_some());
    assert!(p.require_any(&[Role::Approver]).is_ok());
    let denied = p.require_any(&[Role::Operator]).unwrap_err();
    assert_eq!(denied.code, ErrorCode::PermissionDenied);
    assert!(denied.message.contains("operator"), "{}", denied.message);

    // Unknown role names are ignored; the key persists across reloads.
    let token = d
        .issuer
        .sign_claims(&claims(DEV_ISSUER, Some("acme"), 60))
        .unwrap();
    let p = d.auth.authenticate(&token).await.unwrap();
    assert_eq!(p.roles, vec![Role::Operator, Role::Auditor]);
    assert_eq!(p.token_id.as_deref(), Some("t-1"));
    let reloaded = DevIssuer::load_or_create(d._dir.path()).unwrap();
    assert_eq!(reloaded.jwks(), d.issuer.jwks());

    let admin = anumate_auth::Principal {
        roles: vec![Role::Admin],
        ..p
    };
    assert!(admin.require_any(&[Role::Auditor]).is_ok());
}

#[tokio::test]
async fn expired_token_is_token_expired_and_leeway_applies() {
    let d = dev();
    let expired = d
        .issuer
        .sign_claims(&claims(DEV_ISSUER, Some("acme"), -3600))
        .unwrap();
    let e = rejected(&d.auth, &expired).await;
    assert_eq!(e.code, ErrorCode::TokenExpired);
    let status = e.to_status();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(Error::from_status(&status).code, ErrorCode::TokenExpired);

    let within_leeway = d
        .issuer
        .sign_claims(&claims(DEV_ISSUER, Some("acme"), -10))
        .unwrap();
    assert!(d.auth.authenticate(&within_leeway).await.is_ok());

    let mut future = claims(DEV_ISSUER, Some("acme"), 3600);
    future["nbf"] = json!(now() + 600);
    let e = rejected(&d.auth, &d.issuer.sign_claims(&future).unwrap()).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
}

#[tokio::test]
async fn other_key_other_issuer_and_missing_claims_are_unauthenticated() {
    let d = dev();
    let other = dev();

    // Another key: unknown kid.
    let token = other
        .issuer
        .mint("acme", "user:eve", &[Role::Admin], Duration::from_secs(60))
        .unwrap();
    let e = rejected(&d.auth, &token).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("no key with kid"), "{}", e.message);

    // Another key claiming the trusted kid: forged signature.
    let good = d
        .issuer
        .mint("acme", "user:eve", &[Role::Admin], Duration::from_secs(60))
        .unwrap();
    let forged_sig = other
        .issuer
        .mint("acme", "user:eve", &[], Duration::from_secs(60))
        .unwrap();
    let (signing_input, _) = good.rsplit_once('.').unwrap();
    let (_, other_sig) = forged_sig.rsplit_once('.').unwrap();
    let e = rejected(&d.auth, &format!("{signing_input}.{other_sig}")).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("signature"), "{}", e.message);

    // Tampered payload under a valid signature.
    let (header, rest) = good.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let mut tampered = claims(DEV_ISSUER, Some("other-tenant"), 60);
    tampered["roles"] = json!(["admin"]);
    let forged = format!("{header}.{}.{sig}", b64url(tampered.to_string().as_bytes()));
    assert_eq!(
        rejected(&d.auth, &forged).await.code,
        ErrorCode::Unauthenticated
    );

    // Another issuer.
    let token = d
        .issuer
        .sign_claims(&claims("https://evil.example", Some("acme"), 60))
        .unwrap();
    let e = rejected(&d.auth, &token).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("unknown token issuer"), "{}", e.message);

    // No tenant.
    let token = d.issuer.sign_claims(&claims(DEV_ISSUER, None, 60)).unwrap();
    let e = rejected(&d.auth, &token).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("tenant"), "{}", e.message);

    // No exp.
    let mut no_exp = claims(DEV_ISSUER, Some("acme"), 60);
    no_exp.as_object_mut().unwrap().remove("exp");
    let e = rejected(&d.auth, &d.issuer.sign_claims(&no_exp).unwrap()).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("exp"), "{}", e.message);

    // Garbage.
    for junk in ["", "abc", "a.b.c", "a.b.c.d"] {
        assert_eq!(
            rejected(&d.auth, junk).await.code,
            ErrorCode::Unauthenticated
        );
    }
}

#[tokio::test]
async fn alg_none_and_hs256_with_public_key_are_rejected() {
    let d = dev();
    let kid = d.issuer.jwks().keys[0].kid.clone().unwrap();
    let payload = b64url(claims(DEV_ISSUER, Some("acme"), 60).to_string().as_bytes());

    for alg in ["none", "None", "NONE"] {
        let header = b64url(json!({"alg": alg, "kid": kid}).to_string().as_bytes());
        let e = rejected(&d.auth, &format!("{header}.{payload}.")).await;
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        assert!(e.message.contains("not accepted"), "{}", e.message);
    }

    // HS256 keyed with the public key (the classic confusion attack).
    let public_jwk = serde_json::to_string(&d.issuer.jwks().keys[0]).unwrap();
    let x = d.issuer.jwks().keys[0].x.clone().unwrap();
    for secret in [public_jwk.as_bytes(), x.as_bytes()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.clone());
        let token = jsonwebtoken::encode(
            &header,
            &claims(DEV_ISSUER, Some("acme"), 60),
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
        let e = rejected(&d.auth, &token).await;
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        assert!(e.message.contains("HS256"), "{}", e.message);
    }
}

fn rsa_jwks() -> Jwks {
    Jwks {
        keys: vec![serde_json::from_str(RSA_JWK).unwrap()],
    }
}

fn rs256_token(iss: &str, kid: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(
        &header,
        &claims(iss, Some("globex"), 60),
        &EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn rs256_verifies_against_rsa_jwk_and_alg_must_match_key() {
    let d = dev();
    let idp = "https://idp.example";
    let auth = d.auth.clone().with_static_issuer(idp, rsa_jwks());

    let p = auth
        .authenticate(&rs256_token(idp, "rsa-test-1"))
        .await
        .unwrap();
    assert_eq!(p.tenant_id, "globex");
    assert_eq!(p.issuer, idp);

    // The dev issuer still works on the same authenticator.
    let dev_token = d
        .issuer
        .mint("acme", "u", &[], Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        auth.authenticate(&dev_token).await.unwrap().tenant_id,
        "acme"
    );

    // RS256 header naming an EC key, and ES256 header naming the RSA key.
    let ec_kid = d.issuer.jwks().keys[0].kid.clone().unwrap();
    let e = rejected(&auth, &rs256_token(DEV_ISSUER, &ec_kid)).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("does not match"), "{}", e.message);

    let header = b64url(
        json!({"alg": "ES256", "kid": "rsa-test-1"})
            .to_string()
            .as_bytes(),
    );
    let payload = b64url(claims(idp, Some("globex"), 60).to_string().as_bytes());
    let sig = b64url(&[0u8; 64]);
    let e = rejected(&auth, &format!("{header}.{payload}.{sig}")).await;
    assert!(e.message.contains("does not match"), "{}", e.message);
}

/// A JWKS endpoint on 127.0.0.1 that counts its fetches.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(jwks: &Jwks) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(serde_json::to_string(jwks).unwrap()));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut read = 0;
                    while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = sock.read(&mut buf[read..]).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        read += n;
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let body = b.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    sock.write_all(resp.as_bytes()).await.unwrap();
                    let _ = sock.shutdown().await;
                });
            }
        });
        JwksServer { addr, body, hits }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn authenticator_for(server: &JwksServer, issuer: &str, min_refetch: u64) -> Authenticator {
    Authenticator::new(AuthConfig {
        issuers: vec![IssuerConfig {
            issuer: issuer.into(),
            audience: Some("anumate".into()),
            tenants: vec!["*".into()],
            jwks_url: Some(server.url()),
            jwks_file: None,
        }],
        jwks_min_refetch_secs: min_refetch,
        ..AuthConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn jwks_is_fetched_over_http_cached_and_refetched_on_new_kid() {
    let dir = tempfile::tempdir().unwrap();
    let old = KeyRing::load_or_create(dir.path(), "old").unwrap();
    let new = KeyRing::load_or_create(dir.path(), "new").unwrap();
    let old_issuer = DevIssuer::from_key_ring(old.clone());
    let new_issuer = DevIssuer::from_key_ring(new.clone());
    let server = JwksServer::start(&old.jwks()).await;
    let iss = format!("http://{}", server.addr);
    let mut c = claims(&iss, Some("initech"), 60);
    c["aud"] = json!("anumate");

    let auth = authenticator_for(&server, &iss, 3600);
    let old_token = old_issuer.sign_claims(&c).unwrap();
    assert_eq!(server.hits(), 0, "JWKS URLs are fetched lazily");
    for _ in 0..3 {
        let p = auth.clone().authenticate(&old_token).await.unwrap();
        assert_eq!(p.tenant_id, "initech");
    }
    assert_eq!(server.hits(), 1, "JWKS is cached");

    // Wrong audience.
    let mut wrong_aud = c.clone();
    wrong_aud["aud"] = json!("someone-else");
    let e = rejected(&auth, &old_issuer.sign_claims(&wrong_aud).unwrap()).await;
    assert!(e.message.contains("audience"), "{}", e.message);

    // The issuer rotates: a new kid appears in its JWKS.
    let rotated = Jwks {
        keys: new.jwks().keys.into_iter().chain(old.jwks().keys).collect(),
    };
    *server.body.lock().unwrap() = serde_json::to_string(&rotated).unwrap();
    let new_token = new_issuer.sign_claims(&c).unwrap();

    // Rate-limited: within the minimum interval an unknown kid does not refetch.
    let e = rejected(&auth, &new_token).await;
    assert!(e.message.contains("no key with kid"), "{}", e.message);
    assert_eq!(server.hits(), 1);

    // Without the limit the unknown kid triggers one refetch, then is cached.
    let eager = authenticator_for(&server, &iss, 0);
    assert!(eager.authenticate(&old_token).await.is_ok());
    assert_eq!(server.hits(), 2);
    assert!(eager.authenticate(&new_token).await.is_ok());
    assert!(eager.authenticate(&new_token).await.is_ok());
    assert_eq!(
        server.hits(),
        2,
        "rotated JWKS already fetched by first call"
    );

    *server.body.lock().unwrap() = serde_json::to_string(&old.jwks()).unwrap();
    let eager = authenticator_for(&server, &iss, 0);
    assert!(eager.authenticate(&old_token).await.is_ok());
    assert_eq!(server.hits(), 3);
    assert!(
        rejected(&eager, &new_token)
            .await
            .message
            .contains("no key with kid")
    );
    assert_eq!(server.hits(), 4, "unknown kid refetched");
}

#[tokio::test]
async fn jwks_file_issuer_and_unreachable_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_string(&rsa_jwks()).unwrap()).unwrap();
    let idp = "https://file-idp.example";
    let auth = Authenticator::new(AuthConfig {
        issuers: vec![IssuerConfig {
            issuer: idp.into(),
            audience: Some("anumate".into()),
            tenants: vec!["*".into()],
            jwks_url: None,
            jwks_file: Some(path),
        }],
        ..AuthConfig::default()
    })
    .unwrap();
    assert!(
        auth.authenticate(&rs256_token(idp, "rsa-test-1"))
            .await
            .is_ok()
    );

    // Nothing listens on port 9 of localhost: the error says the keys are unavailable.
    let down = "http://127.0.0.1:9";
    let auth = Authenticator::new(AuthConfig {
        issuers: vec![IssuerConfig {
            issuer: down.into(),
            audience: Some("anumate".into()),
            tenants: vec!["*".into()],
            jwks_url: Some(format!("{down}/jwks")),
            jwks_file: None,
        }],
        ..AuthConfig::default()
    })
    .unwrap();
    let e = rejected(&auth, &rs256_token(down, "rsa-test-1")).await;
    assert_eq!(e.code, ErrorCode::Unavailable);

    assert!(
        Authenticator::new(AuthConfig {
            issuers: vec![IssuerConfig {
                issuer: "x".into(),
                audience: Some("anumate".into()),
                tenants: vec!["*".into()],
                jwks_url: None,
                jwks_file: None,
            }],
            ..AuthConfig::default()
        })
        .is_err()
    );
}

#[derive(Clone)]
struct WhoAmI;

impl tonic::server::UnaryService<HealthCheckRequest> for WhoAmI {
    type Response = HealthCheckResponse;
    type Future = Pin<
        Box<
            dyn Future<Output = Result<tonic::Response<HealthCheckResponse>, tonic::Status>> + Send,
        >,
    >;

    fn call(&mut self, req: tonic::Request<HealthCheckRequest>) -> Self::Future {
        let who = principal(&req);
        Box::pin(async move {
            let p = who?;
            p.require_any(&[Role::Operator])?;
            let mut resp = tonic::Response::new(HealthCheckResponse { status: 1 });
            resp.metadata_mut()
                .insert("x-tenant", p.tenant_id.parse().unwrap());
            resp.metadata_mut()
                .insert("x-subject", p.subject.parse().unwrap());
            Ok(resp)
        })
    }
}

const WHOAMI: &str = "/anumate.test.v1.WhoAmI/Get";

async fn call_whoami<T>(svc: T) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(svc);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.into().to_string()))?;
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    grpc.unary(
        tonic::Request::new(HealthCheckRequest::default()),
        http::uri::PathAndQuery::from_static(WHOAMI),
        codec,
    )
    .await
}

#[tokio::test]
async fn layer_over_real_grpc_server() {
    let d = dev();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let inner = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
        let mut health = health.clone();
        async move {
            if req.uri().path().starts_with("/grpc.health.v1.") {
                return tower::Service::call(&mut health, req).await;
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<
                HealthCheckResponse,
                HealthCheckRequest,
            >::default());
            Ok::<_, Infallible>(grpc.unary(WhoAmI, req).await)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rules = anumate_auth::AuthzTable::from_rules([(
        WHOAMI.to_string(),
        anumate_auth::AuthzRule::roles(&[Role::Operator, Role::Admin]),
    )])
    .unwrap();
    let layer = AuthLayer::new(d.auth.clone(), rules);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .serve_with_incoming(inner, tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // Health passes without a token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1);

    // No token: UNAUTHENTICATED with ErrorInfo details.
    let status = call_whoami(channel.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let err = Error::from_status(&status);
    assert_eq!(err.code, ErrorCode::Unauthenticated);
    assert_eq!(err.message, "missing authorization metadata");

    // Expired token: TOKEN_EXPIRED reason.
    let expired = d
        .issuer
        .sign_claims(&claims(DEV_ISSUER, Some("acme"), -3600))
        .unwrap();
    let svc =
        tonic::service::interceptor::InterceptedService::new(channel.clone(), BearerToken(expired));
    let status = call_whoami(svc).await.unwrap_err();
    assert_eq!(Error::from_status(&status).code, ErrorCode::TokenExpired);

    // Valid token: the handler sees the principal.
    let token = d
        .issuer
        .mint(
            "acme",
            "user:compiler",
            &[Role::Operator],
            Duration::from_secs(60),
        )
        .unwrap();
    let svc =
        tonic::service::interceptor::InterceptedService::new(channel.clone(), BearerToken(token));
    let resp = call_whoami(svc).await.unwrap();
    assert_eq!(resp.metadata().get("x-tenant").unwrap(), "acme");
    assert_eq!(resp.metadata().get("x-subject").unwrap(), "user:compiler");

    // Authenticated but without the role: PERMISSION_DENIED from the layer.
    let token = d
        .issuer
        .mint(
            "acme",
            "user:carol",
            &[Role::Auditor],
            Duration::from_secs(60),
        )
        .unwrap();
    let svc = tonic::service::interceptor::InterceptedService::new(channel, BearerToken(token));
    let status = call_whoami(svc).await.unwrap_err();
    assert_eq!(
        Error::from_status(&status).code,
        ErrorCode::PermissionDenied
    );
}

#[tokio::test]
async fn layer_call_directly_and_principal_helper() {
    use tower::{Layer, Service, ServiceExt};
    let d = dev();
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    let inner = tower::service_fn(move |req: http::Request<()>| {
        let seen = seen2.clone();
        async move {
            *seen.lock().unwrap() = req.extensions().get::<anumate_auth::Principal>().cloned();
            Ok::<_, Infallible>(http::Response::new(String::from("ok")))
        }
    });
    let rules = anumate_auth::AuthzTable::from_rules([
        (
            "/anumate.registry.v1.Registry/Get".to_string(),
            anumate_auth::AuthzRule::roles(&[Role::Auditor]),
        ),
        (
            "/anumate.registry.v1.Registry/Keys".to_string(),
            anumate_auth::AuthzRule::public(),
        ),
    ])
    .unwrap();
    let mut svc = AuthLayer::new(d.auth.clone(), rules).layer(inner);

    let token = d
        .issuer
        .mint("acme", "u", &[Role::Auditor], Duration::from_secs(60))
        .unwrap();
    let req = http::Request::builder()
        .uri("/anumate.registry.v1.Registry/Get")
        .header("authorization", format!("bearer {token}"))
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.body(), "ok");
    assert_eq!(seen.lock().unwrap().take().unwrap().tenant_id, "acme");

    let req = http::Request::builder()
        .uri("/anumate.registry.v1.Registry/Get")
        .header("authorization", "Basic Zm9vOmJhcg==")
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(resp.headers()["grpc-status"], "16");
    assert!(resp.headers().contains_key("grpc-status-details-bin"));
    assert!(resp.body().is_empty());
    assert!(seen.lock().unwrap().is_none());

    // A method without a rule is refused after authentication, before the handler.
    let req = http::Request::builder()
        .uri("/anumate.registry.v1.Registry/Unlisted")
        .header("authorization", format!("bearer {token}"))
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "7");
    assert!(seen.lock().unwrap().is_none());

    // A caller outside the rule: PERMISSION_DENIED, the handler never runs.
    let operator = d
        .issuer
        .mint("acme", "o", &[Role::Operator], Duration::from_secs(60))
        .unwrap();
    let req = http::Request::builder()
        .uri("/anumate.registry.v1.Registry/Get")
        .header("authorization", format!("bearer {operator}"))
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "7");
    assert!(seen.lock().unwrap().is_none());

    // A public method passes without a token (and without a principal).
    let req = http::Request::builder()
        .uri("/anumate.registry.v1.Registry/Keys")
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.body(), "ok");
    assert!(seen.lock().unwrap().take().is_none());

    // Reflection passes through without a token.
    let req = http::Request::builder()
        .uri("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        .body(())
        .unwrap();
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.body(), "ok");

    let bare = tonic::Request::new(());
    assert_eq!(
        principal(&bare).unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
}

/// A verified token is remembered, but never past its expiry and never once
/// the issuer's key set it was verified with is refreshed without its key.
#[tokio::test]
async fn remembered_tokens_expire_and_follow_key_removal() {
    // Expiry: a cached token is rejected as expired once `exp` (+ leeway) passes.
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::load_or_create(dir.path()).unwrap();
    let trusting_dev = |cfg: AuthConfig| {
        Authenticator::new(cfg)
            .unwrap()
            .with_static_issuer(issuer.issuer(), issuer.jwks())
    };
    let auth = trusting_dev(AuthConfig {
        leeway_secs: 0,
        ..AuthConfig::default()
    });
    let short = issuer
        .sign_claims(&claims(DEV_ISSUER, Some("acme"), 1))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(auth.authenticate(&short).await.unwrap().tenant_id, "acme");
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(rejected(&auth, &short).await.code, ErrorCode::TokenExpired);

    // Key removal: once the cached JWKS goes stale and is refetched without
    // the key, the remembered token is rejected.
    let keys = KeyRing::load_or_create(dir.path(), "idp").unwrap();
    let idp = DevIssuer::from_key_ring(keys.clone());
    let server = JwksServer::start(&keys.jwks()).await;
    let iss = format!("http://{}", server.addr);
    let mut c = claims(&iss, Some("initech"), 600);
    c["aud"] = json!("anumate");
    let token = idp.sign_claims(&c).unwrap();
    let auth = Authenticator::new(AuthConfig {
        issuers: vec![IssuerConfig {
            issuer: iss.clone(),
            audience: Some("anumate".into()),
            tenants: vec!["*".into()],
            jwks_url: Some(server.url()),
            jwks_file: None,
        }],
        jwks_cache_secs: 1,
        jwks_min_refetch_secs: 0,
        ..AuthConfig::default()
    })
    .unwrap();
    for _ in 0..3 {
        assert!(auth.authenticate(&token).await.is_ok());
    }
    assert_eq!(server.hits(), 1);
    *server.body.lock().unwrap() = serde_json::to_string(&Jwks { keys: vec![] }).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = rejected(&auth, &token).await;
    assert!(e.message.contains("no key with kid"), "{}", e.message);
    assert_eq!(server.hits(), 2);

    // Turned off, every call verifies (and still succeeds).
    let off = trusting_dev(AuthConfig {
        verified_token_cache: 0,
        ..AuthConfig::default()
    });
    let token = issuer
        .sign_claims(&claims(DEV_ISSUER, Some("acme"), 60))
        .unwrap();
    assert!(off.authenticate(&token).await.is_ok());
    assert!(off.authenticate(&token).await.is_ok());
}

// ---------------------------------------------------------------------------
// Service identity and issuer trust (issue 9)
// ---------------------------------------------------------------------------

/// A `svc:` subject from a user issuer is refused; only the platform's
/// service issuer makes a service principal.
#[tokio::test]
async fn service_identity_comes_only_from_the_service_issuer() {
    let d = dev();
    let keys_dir = tempfile::tempdir().unwrap();
    let services =
        anumate_auth::ServiceIssuer::load_or_create(keys_dir.path(), "orchestrator").unwrap();
    let auth = d.auth.clone().with_static_service_issuer(services.jwks());

    // A dev (user) token claiming to be the orchestrator.
    let forged = d
        .issuer
        .mint(
            "acme",
            "svc:orchestrator",
            &[Role::Operator],
            Duration::from_secs(60),
        )
        .unwrap();
    let e = rejected(&auth, &forged).await;
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("reserved"), "{}", e.message);

    // A real service token.
    let token = services.mint("acme", Duration::from_secs(60)).unwrap();
    let p = auth.authenticate(&token).await.unwrap();
    assert_eq!(p.service_name(), Some("orchestrator"));
    assert!(p.is_service());
    assert_eq!(p.subject, "svc:orchestrator");
    assert!(p.require_service(&["orchestrator"]).is_ok());
    assert_eq!(
        p.require_service(&["approvals"]).unwrap_err().code,
        ErrorCode::PermissionDenied
    );
    // Services hold no tenant roles.
    assert!(p.require_any(&[Role::Operator]).is_err());

    // A user token is never a service, whatever its roles.
    let user = d
        .issuer
        .mint("acme", "user:bob", &[Role::Admin], Duration::from_secs(60))
        .unwrap();
    let p = auth.authenticate(&user).await.unwrap();
    assert!(!p.is_service());
    assert!(p.require_service(&["orchestrator"]).is_err());

    // The service issuer's key signing a non-service subject is refused too.
    let raw =
        DevIssuer::from_key_ring(KeyRing::load_or_create(keys_dir.path(), "services").unwrap());
    let mut c = claims(anumate_auth::SERVICE_ISSUER, Some("acme"), 60);
    c["aud"] = json!(anumate_auth::SERVICE_AUDIENCE);
    let e = rejected(&auth, &raw.sign_claims(&c).unwrap()).await;
    assert!(e.message.contains("must name a service"), "{}", e.message);

    // Without trusting the service issuer, its tokens are unknown.
    let e = rejected(&d.auth, &token).await;
    assert!(e.message.contains("unknown token issuer"), "{}", e.message);
    // Service tokens live at most five minutes.
    let long = services.mint("acme", Duration::from_secs(86_400)).unwrap();
    let payload = long.split('.').nth(1).unwrap();
    let body: Value =
        serde_json::from_slice(&anumate_crypto::b64url_decode(payload).unwrap()).unwrap();
    assert!(body["exp"].as_i64().unwrap() - body["iat"].as_i64().unwrap() <= 300);
}

fn issuer_config(iss: &str, url: Option<String>, tenants: &[&str]) -> IssuerConfig {
    IssuerConfig {
        issuer: iss.into(),
        audience: Some("anumate".into()),
        tenants: tenants.iter().map(|t| t.to_string()).collect(),
        jwks_url: url,
        jwks_file: None,
    }
}

/// Audience and tenants are required per issuer, JWKS only over https (or
/// loopback http), and an issuer speaks only for its tenants.
#[tokio::test]
async fn issuers_need_audience_tenants_and_https_and_are_bound_to_tenants() {
    let new = |ic: IssuerConfig| {
        Authenticator::new(AuthConfig {
            issuers: vec![ic],
            ..AuthConfig::default()
        })
    };
    let mut no_aud = issuer_config("https://idp", Some("https://idp/jwks".into()), &["acme"]);
    no_aud.audience = None;
    let e = new(no_aud).unwrap_err();
    assert!(e.message.contains("no audience"), "{}", e.message);

    let e = new(issuer_config(
        "https://idp",
        Some("https://idp/jwks".into()),
        &[],
    ))
    .unwrap_err();
    assert!(e.message.contains("no tenants"), "{}", e.message);

    let e = new(issuer_config(
        "https://idp",
        Some("http://idp.example/jwks".into()),
        &["acme"],
    ))
    .unwrap_err();
    assert!(e.message.contains("https"), "{}", e.message);
    for ok in [
        "https://idp.example/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]:9/jwks",
    ] {
        assert!(
            new(issuer_config("https://idp", Some(ok.into()), &["acme"])).is_ok(),
            "{ok}"
        );
    }
    let e = new(issuer_config(
        "https://idp",
        Some("https://idp/jwks".into()),
        &["Bad Tenant"],
    ))
    .unwrap_err();
    assert!(e.message.contains("tenant id"), "{}", e.message);

    // Bound to tenants: initech's issuer cannot speak for acme.
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyRing::load_or_create(dir.path(), "idp").unwrap();
    let idp = DevIssuer::from_key_ring(keys.clone());
    let server = JwksServer::start(&keys.jwks()).await;
    let iss = format!("http://{}", server.addr);
    let auth = new(issuer_config(&iss, Some(server.url()), &["initech"])).unwrap();
    let ok = idp.sign_claims(&claims(&iss, Some("initech"), 60)).unwrap();
    assert_eq!(auth.authenticate(&ok).await.unwrap().tenant_id, "initech");
    let other = idp.sign_claims(&claims(&iss, Some("acme"), 60)).unwrap();
    let e = rejected(&auth, &other).await;
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    assert!(
        e.message.contains("not trusted for tenant"),
        "{}",
        e.message
    );

    // A token without `aud` is refused even by the dev issuer.
    let d = dev();
    let mut c = claims(DEV_ISSUER, Some("acme"), 60);
    c.as_object_mut().unwrap().remove("aud");
    let e = rejected(&d.auth, &d.issuer.sign_claims(&c).unwrap()).await;
    assert!(e.message.contains("aud"), "{}", e.message);
}

/// When the JWKS cannot be fetched, cached keys serve for a bounded time, then
/// the issuer's tokens are refused until a fetch succeeds.
#[tokio::test]
async fn stale_keys_stop_working_after_max_staleness() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyRing::load_or_create(dir.path(), "idp").unwrap();
    let idp = DevIssuer::from_key_ring(keys.clone());
    let server = JwksServer::start(&keys.jwks()).await;
    let iss = format!("http://{}", server.addr);
    let auth = Authenticator::new(AuthConfig {
        issuers: vec![issuer_config(&iss, Some(server.url()), &["*"])],
        jwks_cache_secs: 1,
        jwks_min_refetch_secs: 0,
        max_key_staleness_secs: 1,
        verified_token_cache: 0,
        ..AuthConfig::default()
    })
    .unwrap();
    let token = idp.sign_claims(&claims(&iss, Some("acme"), 600)).unwrap();
    assert!(auth.authenticate(&token).await.is_ok());
    // The issuer's JWKS endpoint now fails (not JSON).
    *server.body.lock().unwrap() = "not json".into();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Stale (past the cache TTL) but within the staleness allowance: still served.
    assert!(auth.authenticate(&token).await.is_ok());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let e = rejected(&auth, &token).await;
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("cannot be refreshed"), "{}", e.message);
    // Recovery: the JWKS answers again.
    *server.body.lock().unwrap() = serde_json::to_string(&keys.jwks()).unwrap();
    assert!(auth.authenticate(&token).await.is_ok());
}

/// Tenant ids are checked: a charset, a length, and not the `-` pseudo-tenant.
#[tokio::test]
async fn tenant_ids_are_validated() {
    let d = dev();
    for bad in [
        "has space",
        "-",
        "UPPER",
        "a/b",
        "x".repeat(64).as_str(),
        "é",
    ] {
        let token = d
            .issuer
            .sign_claims(&claims(DEV_ISSUER, Some(bad), 60))
            .unwrap();
        let e = rejected(&d.auth, &token).await;
        assert_eq!(e.code, ErrorCode::Unauthenticated, "{bad:?}");
        assert!(e.message.contains("tenant id"), "{bad:?}: {}", e.message);
    }
    for good in ["acme", "tenant-a", "t_1.eu", "0abc"] {
        let token = d
            .issuer
            .sign_claims(&claims(DEV_ISSUER, Some(good), 60))
            .unwrap();
        assert_eq!(d.auth.authenticate(&token).await.unwrap().tenant_id, good);
    }
}

/// A service acting for someone: the token names the service and the
/// principal it acts for; the callee sees both, with that principal's roles
/// (never more). Hours later (a resumed run) the service mints the same
/// identity from what it recorded, without the caller's token.
#[tokio::test]
async fn delegated_service_tokens_carry_whom_the_service_acts_for() {
    let d = dev();
    let keys_dir = tempfile::tempdir().unwrap();
    let orchestrator =
        anumate_auth::ServiceIssuer::load_or_create(keys_dir.path(), "orchestrator").unwrap();
    let auth = d
        .auth
        .clone()
        .with_static_service_issuer(orchestrator.jwks());

    let alice = auth
        .authenticate(
            &d.issuer
                .mint(
                    "acme",
                    "user:alice",
                    &[Role::Operator],
                    Duration::from_secs(60),
                )
                .unwrap(),
        )
        .await
        .unwrap();
    let token = orchestrator.token_for(&alice).unwrap();
    let p = auth.authenticate(&token).await.unwrap();
    assert_eq!(p.service_name(), Some("orchestrator"));
    assert_eq!(p.subject, "svc:orchestrator");
    assert_eq!(p.on_behalf_of(), Some("user:alice"));
    assert_eq!(p.originator(), "user:alice");
    assert_eq!(p.tenant_id, "acme");
    assert_eq!(p.roles, vec![Role::Operator]);
    assert!(p.require_any(&[Role::Operator]).is_ok());
    assert!(
        p.require_any(&[Role::Author]).is_err(),
        "never more than alice"
    );
    // Cached: the same caller gets the same token.
    assert_eq!(orchestrator.token_for(&alice).unwrap(), token);

    // Through a second service, the chain still acts for alice.
    let compiler = orchestrator.for_service("compiler").unwrap();
    let hop = auth
        .authenticate(&compiler.token_for(&p).unwrap())
        .await
        .unwrap();
    assert_eq!(hop.service_name(), Some("compiler"));
    assert_eq!(hop.on_behalf_of(), Some("user:alice"));
    assert_eq!(hop.roles, vec![Role::Operator]);

    // A service on its own behalf stays itself, with no roles.
    let own = orchestrator.token("acme").unwrap();
    let me = auth.authenticate(&own).await.unwrap();
    let hop = auth
        .authenticate(&compiler.token_for(&me).unwrap())
        .await
        .unwrap();
    assert_eq!(hop.on_behalf_of(), None);
    assert!(hop.roles.is_empty());

    // Resumed later: minted from the recorded starter, no token needed.
    let resumed = orchestrator
        .mint_on_behalf_of(
            "acme",
            "user:alice",
            &[Role::Operator],
            Duration::from_secs(60),
        )
        .unwrap();
    let p = auth.authenticate(&resumed).await.unwrap();
    assert_eq!(p.on_behalf_of(), Some("user:alice"));
    assert!(
        orchestrator
            .mint_on_behalf_of("acme", "svc:approvals", &[], Duration::from_secs(60))
            .is_err(),
        "a service acts for people, not for other services"
    );

    // Only the service issuer may delegate: a user issuer's obo claim is refused.
    let mut c = claims(DEV_ISSUER, Some("acme"), 60);
    c["obo"] = json!({"sub": "user:root", "roles": ["admin"]});
    let e = rejected(&auth, &d.issuer.sign_claims(&c).unwrap()).await;
    assert!(e.message.contains("obo"), "{}", e.message);

    // The outgoing request carries the token.
    let mut req = tonic::Request::new(());
    orchestrator.authorize(&mut req, &alice).unwrap();
    let header = req
        .metadata()
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(header, format!("Bearer {token}"));
}

#[tokio::test]
async fn groups_claim_becomes_the_principals_groups() {
    let d = dev();
    let token = d
        .issuer
        .mint_with_groups(
            "acme",
            "user:carol",
            &[Role::Approver],
            &[
                "controllers".into(),
                "group:finance".into(),
                "controllers".into(),
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    let carol = d.auth.authenticate(&token).await.unwrap();
    assert_eq!(
        carol.groups,
        vec!["controllers", "finance"],
        "sorted, once each"
    );
    assert!(carol.in_group("controllers") && !carol.in_group("auditors"));
    assert!(carol.matches("group:finance"));
    assert!(carol.matches("user:carol"));
    assert!(!carol.matches("group:auditors") && !carol.matches("user:dave"));
    assert!(
        !carol.matches("controllers"),
        "a bare name is not a group entry"
    );

    // Absent or null: no groups, still authenticated.
    let plain = d
        .auth
        .authenticate(
            &d.issuer
                .sign_claims(&claims(DEV_ISSUER, Some("acme"), 60))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(plain.groups.is_empty());
    let mut c = claims(DEV_ISSUER, Some("acme"), 60);
    c["groups"] = Value::Null;
    let p = d
        .auth
        .authenticate(&d.issuer.sign_claims(&c).unwrap())
        .await
        .unwrap();
    assert!(p.groups.is_empty());

    // A service acting for carol carries her groups (and only hers).
    let keys_dir = tempfile::tempdir().unwrap();
    let orchestrator =
        anumate_auth::ServiceIssuer::load_or_create(keys_dir.path(), "orchestrator").unwrap();
    let auth = d
        .auth
        .clone()
        .with_static_service_issuer(orchestrator.jwks());
    let delegated = auth
        .authenticate(&orchestrator.token_for(&carol).unwrap())
        .await
        .unwrap();
    assert_eq!(delegated.on_behalf_of(), Some("user:carol"));
    assert_eq!(delegated.groups, carol.groups);
    assert!(delegated.matches("user:carol") && delegated.matches("group:controllers"));
    let own = auth
        .authenticate(&orchestrator.token("acme").unwrap())
        .await
        .unwrap();
    assert!(own.groups.is_empty());
}

#[tokio::test]
async fn malformed_groups_claims_are_unauthenticated_by_name() {
    let d = dev();
    let too_many: Vec<String> = (0..=anumate_auth::MAX_GROUPS)
        .map(|i| format!("g{i}"))
        .collect();
    let cases = [
        (
            json!("controllers"),
            "must be an array of group names, not a string",
        ),
        (json!({"name": "controllers"}), "not an object"),
        (
            json!(["controllers", 7]),
            "groups[1] must be a string, not a number",
        ),
        (
            json!(["Controllers"]),
            "groups[0]: group \"Controllers\" must be",
        ),
        (json!(["ops team"]), "contains ' '"),
        (json!([""]), "must be 1-63 characters"),
        (json!(["x".repeat(64)]), "must be 1-63 characters"),
        (json!(too_many), "names 65 groups; at most 64"),
    ];
    for (claim, expected) in cases {
        let mut c = claims(DEV_ISSUER, Some("acme"), 60);
        c["groups"] = claim.clone();
        let e = rejected(&d.auth, &d.issuer.sign_claims(&c).unwrap()).await;
        assert_eq!(e.code, ErrorCode::Unauthenticated, "{claim}");
        assert_eq!(e.reason, anumate_errors::Reason::Unauthenticated, "{claim}");
        assert!(e.message.contains(expected), "{claim}: {}", e.message);
        assert!(
            e.metadata
                .iter()
                .any(|(k, v)| k == "claim" && v == "groups"),
            "{claim}"
        );
    }

    // Minting refuses what a verifier would refuse.
    let e = d
        .issuer
        .mint_with_groups(
            "acme",
            "user:x",
            &[],
            &["Bad Name".into()],
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("Bad Name"), "{}", e.message);
}
