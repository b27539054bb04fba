#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `http` connector through the hub's gRPC on both backends, against a
//! real HTTP server on loopback: allow-list, redirects off the list, the SSRF
//! guard (literal and resolved private addresses), timeouts, the response
//! cap, 5xx/429 retryable and 4xx not, and secrets that never leave the hub.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anumate_auth::BearerToken;
use anumate_captokens::{ArgsBinding, Capability, IssueRequest, Issuer};
use anumate_connectors::{ConnectorsConfig, Http, Hub, HubGrpc, StaticTools};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_errors::Reason;
use anumate_proto::connectors::v1 as pb;
use anumate_testing::{Backend, DevAuth, TestDb, migrated_store};
use pb::connector_hub_internal_client::ConnectorHubInternalClient;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt as _;

const SECRET: &str = "s3cr3t-pay-token-value";

/// Every log line of this test binary (all levels, every crate: the hub,
/// reqwest, hyper), to show the secret never reaches one.
fn logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(|| LogWriter)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
    LOGS.get_or_init(Default::default)
}

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs().lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A tiny HTTP/1.1 server: the path picks the answer; `/echo` returns the
/// request's head and body as JSON.
async fn upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (status, extra, payload) = match path.as_str() {
                    "/echo" => (
                        "200 OK",
                        String::new(),
                        json!({"head": head, "body": body}).to_string(),
                    ),
                    "/unavailable" => ("503 Service Unavailable", String::new(), "{}".into()),
                    "/busy" => ("429 Too Many Requests", String::new(), "{}".into()),
                    "/denied" => (
                        "401 Unauthorized",
                        String::new(),
                        format!("bad credentials: {head}"),
                    ),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        ("200 OK", String::new(), "{}".into())
                    }
                    "/big" => ("200 OK", String::new(), "x".repeat(64 * 1024)),
                    "/hop" => (
                        "302 Found",
                        format!("Location: http://127.0.0.1:{port}/echo\r\n"),
                        String::new(),
                    ),
                    "/away" => (
                        "302 Found",
                        "Location: http://evil.example/steal\r\n".into(),
                        String::new(),
                    ),
                    _ => ("404 Not Found", String::new(), "{}".into()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\n{extra}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{payload}",
                    payload.len()
                );
                let _ = sock.write_all(response.as_bytes()).await;
            });
        }
    });
    port
}

fn tool(name: &str, http: Value) -> anumate_tools::Tool {
    serde_json::from_value(json!({
        "apiVersion": "anumate.dev/v1", "kind": "Tool",
        "metadata": {"name": name},
        "spec": {"connector": "http", "side_effect": "write", "http": http}
    }))
    .unwrap()
}

fn tools(port: u16) -> StaticTools {
    let local = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let open = |name: &str, path: &str| {
        tool(
            name,
            json!({"method": "POST", "url": local(path), "allow_private": true,
                          "headers": {"Authorization": "Bearer ${{ secrets.PAY_TOKEN }}"},
                          "body": {"amount": "${{ args.amount }}"}, "timeout": "1s",
                          "max_response_bytes": 16384}),
        )
    };
    StaticTools::new([
        open("pay.echo", "/echo"),
        open("pay.unavailable", "/unavailable"),
        open("pay.busy", "/busy"),
        open("pay.denied", "/denied"),
        open("pay.slow", "/slow"),
        open("pay.big", "/big"),
        open("pay.hop", "/hop"),
        open("pay.away", "/away"),
        // Not on its own allow-list.
        tool(
            "pay.unlisted",
            json!({"method": "GET", "url": local("/echo"), "allowed_hosts": ["pay.example"], "allow_private": true}),
        ),
        // Loopback without allow_private: literally, and through a name.
        tool("pay.ssrf", json!({"method": "GET", "url": local("/echo")})),
        tool(
            "pay.ssrfname",
            json!({"method": "GET", "url": format!("http://localhost:{port}/echo")}),
        ),
        // A port nobody listens on.
        tool(
            "pay.down",
            json!({"method": "GET", "url": "http://127.0.0.1:9/x", "allow_private": true}),
        ),
    ])
}

struct App {
    hub: ConnectorHubInternalClient<InterceptedService<Channel, BearerToken>>,
    keys: Arc<KeyRing>,
    _db: TestDb,
    _auth: DevAuth,
}

async fn spawn_app(backend: Backend) -> App {
    logs();
    let port = upstream().await;
    let mut migrations = anumate_connectors::migrations();
    migrations.extend(anumate_captokens_service::migrations());
    let (db, store) = migrated_store(backend, &migrations).await;
    let keys = Arc::new(KeyRing::new(KeyPair::generate().unwrap()));
    // The captokens service in this process, over the same database.
    let captokens = anumate_captokens_service::CapTokens::new(
        store.clone(),
        keys.clone(),
        &anumate_captokens_service::CapTokensConfig::default(),
    )
    .unwrap();
    let secrets = HashMap::from([("PAY_TOKEN".to_owned(), SECRET.to_owned())]);
    let hub = Hub::new(
        store,
        Arc::new(captokens),
        Arc::new(tools(port)),
        &ConnectorsConfig::default(),
    )
    .with_connector("http", Arc::new(Http::new(secrets)));
    let auth = DevAuth::with_service_issuer("orchestrator");
    let layer = anumate_auth::AuthLayer::new(
        auth.authenticator.clone(),
        anumate_auth::AuthzTable::platform().unwrap(),
    );
    let (addr, _) = anumate_testing::serve_with_layer(
        anumate_testing::bind().await,
        layer,
        Routes::new(HubGrpc::new(hub).into_internal_server()),
    );
    let token = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint("t1", Duration::from_secs(300))
        .unwrap();
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    App {
        hub: ConnectorHubInternalClient::with_interceptor(channel, BearerToken(token)),
        keys,
        _db: db,
        _auth: auth,
    }
}

impl App {
    async fn call(&mut self, tool: &str, key: &str) -> Result<Value, tonic::Status> {
        let args = json!({"amount": 12});
        let token = Issuer::new("t")
            .issue(
                self.keys.as_ref(),
                IssueRequest {
                    subject: "user:a",
                    audience: "anumate-connectors",
                    tenant: "t1",
                    run: "r",
                    step: "s",
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
        let out = self
            .hub
            .invoke(pb::InvokeRequest {
                tool: tool.into(),
                args: Some(serde_json::from_value(args).unwrap()),
                idempotency_key: key.into(),
                capability_token: token,
            })
            .await?
            .into_inner();
        Ok(anumate_engine::json::struct_json(out.output.as_ref().unwrap()).unwrap())
    }
}

/// The failure's reason, `retryable` metadata and message.
fn failure(result: Result<Value, tonic::Status>) -> (Reason, String, String) {
    let status = result.unwrap_err();
    let err = anumate_errors::Error::from_status(&status);
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert!(
        !format!("{status:?}").contains(SECRET),
        "secret in {status:?}"
    );
    (
        err.reason,
        info.metadata.get("retryable").cloned().unwrap_or_default(),
        err.message,
    )
}

async fn http_calls_are_guarded_and_classified(mut app: App) {
    // A call goes out with the rendered body, the idempotency key and the
    // secret; the upstream's echo of the secret is scrubbed from the output.
    let out = app.call("pay.echo", "k-echo").await.unwrap();
    let head = out["head"].as_str().unwrap();
    assert!(head.starts_with("POST /echo"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("idempotency-key: k-echo"),
        "{head}"
    );
    assert!(head.contains("Bearer [secret]"), "{head}");
    assert!(!out.to_string().contains(SECRET));
    assert_eq!(
        serde_json::from_str::<Value>(out["body"].as_str().unwrap()).unwrap(),
        json!({"amount": 12})
    );
    // A redirect within the allow-list is followed (a 302 turns POST into GET).
    let hopped = app.call("pay.hop", "k-hop").await.unwrap();
    assert!(
        hopped["head"].as_str().unwrap().starts_with("GET /echo"),
        "{hopped}"
    );

    let cases = [
        (
            "pay.unavailable",
            Reason::ConnectorRetryable,
            "true",
            "answered 503",
        ),
        (
            "pay.busy",
            Reason::ConnectorRetryable,
            "true",
            "answered 429",
        ),
        (
            "pay.denied",
            Reason::ConnectorFailed,
            "false",
            "answered 401",
        ),
        ("pay.slow", Reason::ConnectorRetryable, "true", "timed out"),
        (
            "pay.big",
            Reason::ConnectorFailed,
            "false",
            "more than 16384 bytes",
        ),
        ("pay.away", Reason::ConnectorFailed, "false", "evil.example"),
        (
            "pay.unlisted",
            Reason::ConnectorFailed,
            "false",
            "not in allowed_hosts",
        ),
        (
            "pay.ssrf",
            Reason::ConnectorFailed,
            "false",
            "not a public address",
        ),
        (
            "pay.ssrfname",
            Reason::ConnectorFailed,
            "false",
            "non-public address",
        ),
        (
            "pay.down",
            Reason::ConnectorRetryable,
            "true",
            "could not reach",
        ),
    ];
    for (tool, reason, retryable, says) in cases {
        let (got, retry, message) = failure(app.call(tool, &format!("k-{tool}")).await);
        assert_eq!(
            (got, retry.as_str()),
            (reason, retryable),
            "{tool}: {message}"
        );
        assert!(message.contains(says), "{tool}: {message}");
    }
    // A permanent failure is recorded: the same key answers it again.
    let (again, _, _) = failure(app.call("pay.denied", "k-pay.denied").await);
    assert_eq!(again, Reason::ConnectorFailed);
    // And the hub still serves.
    app.call("pay.echo", "k-after").await.unwrap();

    let logged = String::from_utf8_lossy(&logs().lock().unwrap()).to_string();
    assert!(
        logged.contains("connector.invoked"),
        "the hub logs its calls"
    );
    assert!(!logged.contains(SECRET), "a log line holds the secret");
}

anumate_testing::on_both_backends! {
    http_calls_are_guarded_and_classified => http_sqlite, http_postgres;
}
