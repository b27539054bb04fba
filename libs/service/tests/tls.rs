#![allow(clippy::unwrap_used, clippy::expect_used)]
//! mTLS on the production server (`server::serve` with `[tls]`), over real
//! sockets with certificates made by rcgen: a client without a certificate,
//! or with one another CA signed, is refused during the handshake; a rotated
//! server certificate is used by the next connection without a restart; the
//! peer's service identity (its SAN) is checked against the service a token
//! names (`SERVICE_IDENTITY_MISMATCH`), and a service the RPC does not admit
//! is refused.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anumate_auth::{
    AuthLayer, Authenticator, AuthzRule, AuthzTable, DevIssuer, Role, ServiceIssuer,
};
use anumate_crypto::{KeyPair as SigningKeyPair, KeyRing};
use anumate_service::clients;
use anumate_service::server::{GrpcConfig, Layers};
use anumate_service::tls::{PeerIdentity, Tls, TlsConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::pem::PemObject as _;
use tonic::server::NamedService;

// --- certificates -----------------------------------------------------------

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A leaf certificate (PEM) and its key (PEM) with `sans`: `spiffe://…`
/// as URIs, IPs as IPs, the rest as DNS names.
fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    for san in sans {
        params
            .subject_alt_names
            .push(if san.starts_with("spiffe://") {
                SanType::URI((*san).try_into().unwrap())
            } else if let Ok(ip) = san.parse() {
                SanType::IpAddress(ip)
            } else {
                SanType::DnsName((*san).try_into().unwrap())
            });
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_tls(dir: &Path, name: &str, ca: &Ca, leaf: &(String, String)) -> TlsConfig {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let ca_file = dir.join(format!("{name}-ca.crt"));
    std::fs::write(&cert, &leaf.0).unwrap();
    std::fs::write(&key, &leaf.1).unwrap();
    std::fs::write(&ca_file, &ca.pem).unwrap();
    TlsConfig {
        cert,
        key,
        client_ca: ca_file,
        reload_secs: 1,
        ..TlsConfig::default()
    }
}

// --- a tiny service that says who called ------------------------------------

/// `/test.Echo/Who`: answers "<peer identity>|<subject>".
#[derive(Clone)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Who;

impl tonic::server::UnaryService<()> for Who {
    type Response = String;
    type Future = std::future::Ready<Result<tonic::Response<String>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<()>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .map(|p| p.0.clone().unwrap_or_else(|| "-".into()))
            .unwrap_or_else(|| "none".into());
        let subject = req
            .extensions()
            .get::<anumate_auth::Principal>()
            .map(|p| p.subject.clone())
            .unwrap_or_default();
        std::future::ready(Ok(tonic::Response::new(format!("{peer}|{subject}"))))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<String, ()>::default());
            Ok(grpc.unary(Who, req).await)
        })
    }
}

async fn who(
    channel: tonic::transport::Channel,
    token: Option<&str>,
) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{e:?}")))?;
    let mut req = tonic::Request::new(());
    if let Some(token) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Who");
    grpc.unary(req, path, tonic_prost::ProstCodec::<(), String>::default())
        .await
        .map(tonic::Response::into_inner)
}

struct Server {
    url: String,
    dev: DevIssuer,
    services: ServiceIssuer,
    service_signer: DevIssuer,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(tls: Tls) -> Server {
    start_with(tls, GrpcConfig::default()).await
}

async fn start_with(tls: Tls, grpc: GrpcConfig) -> Server {
    let dev = DevIssuer::from_key_ring(KeyRing::new(SigningKeyPair::generate().unwrap()));
    let service_keys = KeyRing::new(SigningKeyPair::generate().unwrap());
    let services = ServiceIssuer::new("orchestrator", Arc::new(service_keys.clone())).unwrap();
    // Signs any claims with the service issuer's key (an expired token).
    let service_signer = DevIssuer::from_key_ring(service_keys);
    let authenticator = Authenticator::new(anumate_auth::AuthConfig::default())
        .unwrap()
        .with_static_issuer(anumate_auth::DEV_ISSUER, dev.jwks())
        .with_static_service_issuer(services.jwks());
    let table = AuthzTable::from_rules([(
        "/test.Echo/Who".to_owned(),
        AuthzRule {
            roles: vec![Role::Operator],
            services: vec!["orchestrator".into(), "compiler".into()],
            ..AuthzRule::default()
        },
    )])
    .unwrap();
    let layers = Layers::new(grpc, AuthLayer::new(authenticator, table)).with_tls(Some(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(Echo);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(anumate_service::server::serve(
        listener,
        layers,
        routes.routes(),
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        url,
        dev,
        services,
        service_signer,
        _stop: stop,
    }
}

fn client(url: &str, tls: &Tls) -> tonic::transport::Channel {
    clients::channel_with("test", url, Some(tls)).unwrap()
}

struct Fixture {
    _dir: tempfile_dir::Dir,
    dir: PathBuf,
    ca: Ca,
    server_tls: TlsConfig,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    pub fn new(tag: &str) -> (Dir, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "anumate-tls-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&path).unwrap();
        (Dir(path.clone()), path)
    }
}

fn fixture(tag: &str) -> Fixture {
    let (guard, dir) = tempfile_dir::new(tag);
    let ca = ca("anumate test CA");
    let server = leaf(
        &ca,
        "registry",
        &[
            "127.0.0.1",
            "registry.anumate",
            "spiffe://anumate/svc/registry",
        ],
    );
    let server_tls = write_tls(&dir, "server", &ca, &server);
    Fixture {
        _dir: guard,
        dir,
        ca,
        server_tls,
    }
}

fn client_tls(f: &Fixture, name: &str, sans: &[&str]) -> Tls {
    let cert = leaf(&f.ca, name, sans);
    Tls::load(&write_tls(&f.dir, name, &f.ca, &cert)).unwrap()
}

// --- the tests ---------------------------------------------------------------

/// Refused by the TLS handshake: the channel cannot connect (`UNAVAILABLE`)
/// or the connection dies on its first use (`UNKNOWN`, "transport error").
fn assert_refused(err: &tonic::Status) {
    assert!(
        matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
            && !err.metadata().contains_key("grpc-status-details-bin"),
        "not a transport refusal: {err:?}"
    );
}

#[tokio::test]
async fn clients_without_a_certificate_of_the_ca_are_refused() {
    let f = fixture("refuse");
    let server = start(Tls::load(&f.server_tls).unwrap()).await;
    let user = server
        .dev
        .mint(
            "t1",
            "user:alice",
            &[Role::Operator],
            Duration::from_secs(60),
        )
        .unwrap();

    // A service certificate of the CA: served.
    let good = client_tls(&f, "orchestrator", &["spiffe://anumate/svc/orchestrator"]);
    let answer = who(client(&server.url, &good), Some(&user)).await.unwrap();
    assert_eq!(answer, "orchestrator|user:alice");

    // Plain HTTP/2 to the TLS port: refused.
    let plain = clients::channel_with("test", &server.url.replace("https", "http"), None).unwrap();
    let err = who(plain, Some(&user)).await.unwrap_err();
    // The server hangs up on the first bytes: a transport error.
    assert!(
        matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Unknown),
        "{err:?}"
    );

    // TLS without a client certificate: the handshake is refused.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(f.ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut anon = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    anon.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.url.trim_start_matches("https://"))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(anon))
        .connect(name, tcp)
        .await;
    // TLS 1.3: the client learns of the refusal on its first read.
    let refused = match handshake {
        Err(_) => true,
        Ok(mut stream) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 16];
            !matches!(stream.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "a client without a certificate got through");

    // A certificate another CA signed (same name): refused.
    let rogue_ca = ca("rogue CA");
    let rogue = leaf(
        &rogue_ca,
        "orchestrator",
        &["spiffe://anumate/svc/orchestrator"],
    );
    let mut rogue_cfg = write_tls(&f.dir, "rogue", &rogue_ca, &rogue);
    // It trusts the real CA for the server, so only its own certificate is wrong.
    std::fs::write(f.dir.join("rogue-trust.crt"), &f.ca.pem).unwrap();
    rogue_cfg.ca = f.dir.join("rogue-trust.crt");
    let rogue = Tls::load(&rogue_cfg).unwrap();
    let err = who(client(&server.url, &rogue), Some(&user))
        .await
        .unwrap_err();
    assert_refused(&err);

    // A client that does not trust the server's CA refuses the server.
    let mut distrust = rogue_cfg.clone();
    distrust.ca = rogue_cfg.client_ca.clone();
    let distrust = Tls::load(&distrust).unwrap();
    let err = who(client(&server.url, &distrust), Some(&user))
        .await
        .unwrap_err();
    assert_refused(&err);
}

#[tokio::test]
async fn the_certificate_must_be_the_service_the_token_names() {
    let f = fixture("identity");
    let server = start(Tls::load(&f.server_tls).unwrap()).await;
    let orchestrator_token = server.services.mint("t1", Duration::from_secs(60)).unwrap();

    // The orchestrator's token over the orchestrator's certificate (URI SAN).
    let orch = client_tls(&f, "orchestrator", &["spiffe://anumate/svc/orchestrator"]);
    let answer = who(client(&server.url, &orch), Some(&orchestrator_token))
        .await
        .unwrap();
    assert_eq!(answer, "orchestrator|svc:orchestrator");

    // The orchestrator's token over the compiler's certificate (DNS SAN): refused.
    let compiler = client_tls(&f, "compiler", &["compiler.anumate"]);
    let err = who(client(&server.url, &compiler), Some(&orchestrator_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let e = anumate_errors::Error::from_status(&err);
    assert_eq!(
        e.reason,
        anumate_errors::Reason::ServiceIdentityMismatch,
        "{e:?}"
    );
    assert!(
        e.metadata
            .contains(&("peer_service".into(), "compiler".into())),
        "{e:?}"
    );
    assert!(err.message().contains("\"compiler\""), "{}", err.message());

    // A certificate naming no service cannot carry a service token.
    let anon = client_tls(&f, "laptop", &["laptop.example"]);
    let err = who(client(&server.url, &anon), Some(&orchestrator_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("names no service"),
        "{}",
        err.message()
    );

    // A service the RPC does not admit, with its own certificate: refused by the rule.
    let ghost_token = server
        .services
        .for_service("ghostrun")
        .unwrap()
        .mint("t1", Duration::from_secs(60))
        .unwrap();
    let ghost = client_tls(&f, "ghostrun", &["spiffe://anumate/svc/ghostrun"]);
    let err = who(client(&server.url, &ghost), Some(&ghost_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("orchestrator, compiler"),
        "{}",
        err.message()
    );

    // The orchestrator's own certificate with an expired token of the
    // service issuer: TOKEN_EXPIRED.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = server
        .service_signer
        .sign_claims(&serde_json::json!({
            "iss": anumate_auth::SERVICE_ISSUER,
            "aud": anumate_auth::SERVICE_AUDIENCE,
            "sub": "svc:orchestrator",
            "tenant": "t1",
            "roles": [],
            "iat": now - 7200,
            "nbf": now - 7200,
            "exp": now - 3600,
        }))
        .unwrap();
    let err = who(client(&server.url, &orch), Some(&expired))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert_eq!(
        anumate_errors::Error::from_status(&err).code,
        anumate_errors::ErrorCode::TokenExpired,
        "{err:?}"
    );

    // No token at all: UNAUTHENTICATED, certificate or not.
    let err = who(client(&server.url, &orch), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
}

#[tokio::test]
async fn a_rotated_certificate_is_used_without_a_restart() {
    let f = fixture("rotate");
    let tls = Tls::load(&f.server_tls).unwrap();
    let server = start(tls.clone()).await;
    let user = server
        .dev
        .mint(
            "t1",
            "user:alice",
            &[Role::Operator],
            Duration::from_secs(60),
        )
        .unwrap();
    let orch = client_tls(&f, "orchestrator", &["spiffe://anumate/svc/orchestrator"]);
    let before = tls.server_config();
    who(client(&server.url, &orch), Some(&user)).await.unwrap();

    // Rotate to a certificate of a new CA; clients trusting only the new CA
    // connect once the server has picked it up (polled every second).
    let new_ca = ca("anumate test CA 2");
    let new_leaf = leaf(&new_ca, "registry", &["127.0.0.1"]);
    std::fs::write(&f.server_tls.cert, &new_leaf.0).unwrap();
    std::fs::write(&f.server_tls.key, &new_leaf.1).unwrap();
    // Clients of both CAs are accepted during the rotation.
    std::fs::write(
        &f.server_tls.client_ca,
        format!("{}{}", f.ca.pem, new_ca.pem),
    )
    .unwrap();

    let new_client_leaf = leaf(
        &new_ca,
        "orchestrator",
        &["spiffe://anumate/svc/orchestrator"],
    );
    let new_client = Tls::load(&write_tls(&f.dir, "new-orch", &new_ca, &new_client_leaf)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match who(client(&server.url, &new_client), Some(&user)).await {
            Ok(answer) => {
                assert_eq!(answer, "orchestrator|user:alice");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                assert_refused(&e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("the rotated certificate was not picked up: {e:?}"),
        }
    }
    assert!(!Arc::ptr_eq(&before, &tls.server_config()));
    // The old client trusts only the old CA: it now refuses the server.
    let err = who(client(&server.url, &orch), Some(&user))
        .await
        .unwrap_err();
    assert_refused(&err);

    // A broken file is not loaded: the server keeps the last good certificate.
    std::fs::write(&f.server_tls.key, "not a key").unwrap();
    assert!(tls.reload().is_err());
    who(client(&server.url, &new_client), Some(&user))
        .await
        .unwrap();
}

/// `[grpc.rate_limits]`: a tenant over its rate gets `RESOURCE_EXHAUSTED`
/// with `RetryInfo`; another tenant, and calls made by services, do not.
#[tokio::test]
async fn a_tenant_over_its_rate_is_told_when_to_retry() {
    use tonic_types::StatusExt as _;
    let f = fixture("rate");
    let mut grpc = GrpcConfig::default();
    grpc.rate_limits.rps = 1.0;
    grpc.rate_limits.burst = 2.0;
    grpc.rate_limits.tenants.insert(
        "big".into(),
        anumate_service::ratelimit::Rate {
            rps: 100.0,
            burst: 10.0,
        },
    );
    let server = start_with(Tls::load(&f.server_tls).unwrap(), grpc).await;
    let orch = client_tls(&f, "orchestrator", &["spiffe://anumate/svc/orchestrator"]);
    let ch = client(&server.url, &orch);
    let user = |tenant: &str| {
        server
            .dev
            .mint(
                tenant,
                "user:alice",
                &[Role::Operator],
                Duration::from_secs(60),
            )
            .unwrap()
    };
    let t1 = user("t1");
    who(ch.clone(), Some(&t1)).await.unwrap();
    who(ch.clone(), Some(&t1)).await.unwrap();
    let err = who(ch.clone(), Some(&t1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let details = err.get_error_details();
    let delay = details.retry_info().unwrap().retry_delay.unwrap();
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(1),
        "{delay:?}"
    );
    assert_eq!(details.error_info().unwrap().reason, "RATE_LIMITED");
    // Other tenants have their own buckets (and their own rates).
    who(ch.clone(), Some(&user("t2"))).await.unwrap();
    let big = user("big");
    for _ in 0..5 {
        who(ch.clone(), Some(&big)).await.unwrap();
    }
    // Services serving t1 are not limited.
    let svc = server.services.mint("t1", Duration::from_secs(60)).unwrap();
    for _ in 0..5 {
        who(ch.clone(), Some(&svc)).await.unwrap();
    }
    // After the delay it said, t1 is served again.
    tokio::time::sleep(delay).await;
    who(ch, Some(&t1)).await.unwrap();
}

#[test]
fn bad_files_name_the_setting() {
    let f = fixture("bad");
    let mut cfg = f.server_tls.clone();
    cfg.key = f.dir.join("missing.key");
    let err = Tls::load(&cfg).unwrap_err();
    assert_eq!(err.code, anumate_errors::ErrorCode::InvalidArgument);
    assert!(
        err.message.contains("tls.key") || format!("{err:?}").contains("tls.key"),
        "{err:?}"
    );
    let mut cfg = f.server_tls.clone();
    cfg.cert = cfg.client_ca.clone();
    std::fs::write(&cfg.client_ca, "garbage").unwrap();
    let err = Tls::load(&cfg).unwrap_err();
    assert_eq!(
        err.code,
        anumate_errors::ErrorCode::InvalidArgument,
        "{err:?}"
    );
}
