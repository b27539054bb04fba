//! The gateway in front of the whole platform, on real sockets: every
//! service built as `anumate dev` builds it (SQLite store, every production
//! gRPC layer), the gateway on its own port calling the services in process
//! through those layers, as `anumate dev` runs it, or (a mesh's `serve
//! gateway`) over gRPC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anumate_auth::Role;
use anumate_gateway::{Gateway, GatewayConfig, routes::BodyBinding};
use anumate_service::{GrpcConfig, ServiceModule};
use anumate_testing::{Backend, DevAuth, ModuleServer, TestDb};
use prost_reflect::Kind;
use serde_json::{Value, json};

const TENANT: &str = "acme";

struct Platform {
    server: ModuleServer,
    gateway: Gateway,
    url: String,
    auth: DevAuth,
    _db: TestDb,
    _gw: tokio::task::JoinHandle<()>,
}

fn modules() -> Vec<Box<dyn ServiceModule>> {
    vec![
        anumate_registry::module(),
        anumate_receipts::module(),
        anumate_policy_service::module(),
        anumate_captokens_service::module(),
        anumate_compiler::module(),
        anumate_events_service::module(),
        anumate_approvals::module(),
        anumate_ghostrun::module(),
        anumate_connectors::module(),
        anumate_orchestrator::module(),
    ]
}

/// How the gateway reaches the services.
#[derive(Clone, Copy, PartialEq)]
enum Upstream {
    /// Their layered routes in this process (`anumate dev`, `serve all`).
    InProcess,
    /// Their gRPC listener (a mesh's `serve gateway`).
    Network,
}

async fn platform(config: GatewayConfig) -> Platform {
    platform_with(config, Upstream::InProcess, GrpcConfig::default()).await
}

async fn platform_with(config: GatewayConfig, upstream: Upstream, grpc: GrpcConfig) -> Platform {
    let anumate_testing::Composed { server, auth, db } = anumate_testing::compose_with_grpc(
        Backend::Sqlite,
        anumate_events::MIGRATIONS,
        &modules(),
        json!({}),
        "gateway-test",
        grpc,
    )
    .await;
    let gateway = match upstream {
        Upstream::InProcess => Gateway::in_process(config, server.in_process.clone()).unwrap(),
        Upstream::Network => Gateway::connect_lazy(config, &server.url()).unwrap(),
    };
    let gw_listener = anumate_testing::bind().await;
    let url = format!("http://{}", gw_listener.local_addr().unwrap());
    let served = gateway.clone();
    let gw = tokio::spawn(async move {
        anumate_gateway::serve(gw_listener, served, std::future::pending())
            .await
            .unwrap();
    });
    Platform {
        server,
        gateway,
        url,
        auth,
        _db: db,
        _gw: gw,
    }
}

impl Platform {
    fn token(&self) -> String {
        self.token_as(&[Role::Admin])
    }

    fn token_as(&self, roles: &[Role]) -> String {
        self.auth
            .issuer
            .mint(TENANT, "user:alice", roles, Duration::from_secs(600))
            .unwrap()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The reason in a `google.rpc.Status` body.
fn reason(body: &Value) -> String {
    body["details"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find(|x| x["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
        })
        .map(|x| x["reason"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

fn violation_fields(body: &Value) -> Vec<String> {
    body["details"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .flat_map(|x| x["fieldViolations"].as_array().cloned().unwrap_or_default())
        .map(|v| v["field"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_annotated_rpc_is_routed_and_answers_sensibly() {
    let p = platform(GatewayConfig::default()).await;
    let token = p.token();
    let http = client();
    let mut seen = std::collections::BTreeSet::new();
    let mut report = Vec::new();
    for route in p.gateway.routes().routes() {
        // Fill each path variable with a value of its field's type.
        let mut path = route.template.openapi_path();
        for v in &route.template.variables {
            let field = route.rpc.input().get_field_by_name(&v.field_path);
            let value = match field.map(|f| f.kind()) {
                Some(Kind::Int32 | Kind::Int64 | Kind::Uint32 | Kind::Uint64) => "1",
                _ => "missing",
            };
            path = path.replace(&format!("{{{}}}", v.field_path), value);
        }
        let mut req = http
            .request(route.method.clone(), format!("{}{path}", p.url))
            .bearer_auth(&token);
        if !matches!(route.body, BodyBinding::None) {
            req = req.header("content-type", "application/json").body("{}");
        }
        // A watch with nothing to say yet sends its headers after a short wait.
        let resp = tokio::time::timeout(Duration::from_secs(10), req.send()).await;
        let status = match resp {
            Err(_) => panic!("{} {path}: no answer", route.method),
            Ok(resp) => {
                let resp = resp.unwrap();
                let status = resp.status().as_u16();
                if status >= 400 {
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    assert_ne!(reason(&body), "ROUTE_NOT_FOUND", "{} {path}", route.method);
                    assert!(body["code"].is_number(), "{} {path}: {body}", route.method);
                    report.push(format!(
                        "{} {path} -> {status} {}",
                        route.method,
                        reason(&body)
                    ));
                }
                status
            }
        };
        assert!(
            status < 500 || status == 501 || status == 503,
            "{} {path} answered {status}",
            route.method
        );
        seen.insert(route.grpc_path.clone());
    }
    // Every annotated RPC was called at least once.
    let pool = prost_reflect::DescriptorPool::decode(anumate_proto::FILE_DESCRIPTOR_SET).unwrap();
    let ext = pool.get_extension_by_name("google.api.http").unwrap();
    let annotated: std::collections::BTreeSet<String> = pool
        .services()
        .flat_map(|s| {
            let ext = ext.clone();
            s.methods()
                .filter(move |m| m.options().has_extension(&ext))
                .map(|m| format!("/{}/{}", m.parent_service().full_name(), m.name()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(seen, annotated);
    println!("{} RPCs called; errors:\n{}", seen.len(), report.join("\n"));
    p.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_get_a_capsule_over_rest() {
    let p = platform(GatewayConfig::default()).await;
    let token = p.token();
    let http = client();
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/refund.capsule.yaml"
    ))
    .unwrap();
    let resp = http
        .post(format!("{}/v1/capsules:push", p.url))
        .bearer_auth(&token)
        .header("idempotency-key", "push-1")
        .json(&json!({"sourceYaml": yaml, "publish": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    let pushed: Value = resp.json().await.unwrap();
    assert_eq!(pushed["created"], true, "{pushed}");
    let name = pushed["capsule"]["name"].as_str().unwrap().to_owned();
    assert_eq!(name, "refund-small-orders");

    // The additional binding and the versioned path, query parameters too.
    let got: Value = http
        .get(format!("{}/v1/capsules/{name}", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["capsule"]["name"], name, "{got}");
    let resp = http
        .get(format!("{}/v1/capsules/{name}/versions/1", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let list: Value = http
        .get(format!("{}/v1/capsules?page_size=10", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["capsules"].as_array().map(Vec::len), Some(1), "{list}");

    // An unknown capsule: the service's NOT_FOUND, as HTTP 404 with its reason.
    let resp = http
        .get(format!("{}/v1/capsules/nope", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(reason(&body), "CAPSULE_NOT_FOUND", "{body}");
    p.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_precise_4xx_with_a_status_body() {
    let p = platform(GatewayConfig {
        max_body_bytes: 64 * 1024,
        ..GatewayConfig::default()
    })
    .await;
    let token = p.token();
    let http = client();
    let post = |path: &str, body: String| {
        http.post(format!("{}{path}", p.url))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Malformed JSON: the position.
    let resp = post("/v1/capsules:push", "{\"sourceYaml\": ".into())
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(reason(&body), "INVALID_DOCUMENT", "{body}");
    assert_eq!(body["code"], 3);

    // A wrong type: the field named.
    let resp = post("/v1/capsules:push", "{\"publish\": \"yes\"}".into())
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(reason(&body), "INVALID_ARGUMENT", "{body}");
    assert_eq!(violation_fields(&body), vec!["publish"], "{body}");

    // An unknown field: named.
    let resp = post("/v1/capsules:push", "{\"sourceYml\": \"x\"}".into())
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(violation_fields(&body), vec!["sourceYml"], "{body}");

    // An unknown enum name in a query parameter.
    let resp = http
        .get(format!("{}/v1/capsules?status=VERSION_STATUS_BOGUS", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(violation_fields(&body), vec!["status"], "{body}");

    // An unknown query parameter.
    let resp = http
        .get(format!("{}/v1/capsules?colour=red", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(violation_fields(&body), vec!["colour"], "{body}");

    // Oversize body: 413 with PAYLOAD_TOO_LARGE.
    let big = format!("{{\"sourceYaml\": \"{}\"}}", "a".repeat(100 * 1024));
    let resp = post("/v1/capsules:push", big).await.unwrap();
    assert_eq!(resp.status(), 413);
    // The unread rest of the body spoils the connection: it is closed, so
    // the client's next request (below) goes on a fresh one.
    assert_eq!(resp.headers()["connection"], "close");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(reason(&body), "PAYLOAD_TOO_LARGE", "{body}");

    // Missing token: 401 from the services' own authentication.
    let resp = http
        .get(format!("{}/v1/capsules", p.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(reason(&body), "UNAUTHENTICATED", "{body}");

    // No route, and a route of another method.
    let resp = http
        .get(format!("{}/v1/nothing-here", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(reason(&body), "ROUTE_NOT_FOUND", "{body}");
    let resp = http
        .delete(format!("{}/v1/capsules:push", p.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    p.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_hold_headers_for_early_errors_and_openapi_is_served() {
    let p = platform(GatewayConfig::default()).await;
    let token = p.token();
    let http = client();
    // WatchRun on an unknown run: a real 404 before any stream starts.
    for accept in ["application/x-ndjson", "text/event-stream"] {
        let resp = http
            .get(format!("{}/v1/runs/run_missing:watch", p.url))
            .bearer_auth(&token)
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{accept}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(reason(&body), "RUN_NOT_FOUND", "{body}");
    }

    let doc: Value = http
        .get(format!("{}/openapi.json", p.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let ops: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_object().unwrap().len())
        .sum();
    assert!(ops >= 60, "{ops} operations");
    let push = &doc["paths"]["/v1/capsules:push"]["post"];
    assert!(
        push["description"].as_str().is_some_and(|d| !d.is_empty()),
        "{push}"
    );
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    assert!(
        doc["paths"]["/v1/runs/{run_id}:watch"]["get"]["responses"]["200"]["content"]
            ["text/event-stream"]
            .is_object()
    );
    // REQUIRED fields are required: a query parameter, a body property (not
    // the path's), but not where another binding's path may carry them.
    let export = &doc["paths"]["/v1/receipts:export"]["get"]["parameters"];
    let format = export
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "format")
        .unwrap_or_else(|| panic!("{export}"));
    assert_eq!(format["required"], true, "{format}");
    let approve = &doc["paths"]["/v1/approvals/{approval_id}:approve"]["post"]["requestBody"]["content"]
        ["application/json"]["schema"];
    assert_eq!(approve["required"], json!(["argsSha256"]), "{approve}");
    let get_policy = &doc["paths"]["/v1/policies/{name}"]["get"]["parameters"];
    assert!(
        get_policy
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["required"] == true || p["in"] == "query" && p["required"] == false),
        "{get_policy}"
    );
    assert!(
        get_policy
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "version" && p["required"] == false),
        "{get_policy}"
    );
    // A google.api.HttpBody answer is any bytes under its own content type.
    assert_eq!(
        doc["paths"]["/v1/captokens/jwks"]["get"]["responses"]["200"]["content"]["*/*"]["schema"],
        json!({})
    );
    p.server.stop().await;
}

/// Reads `body` until `want` complete frames (split on `sep`) arrived.
async fn frames(resp: reqwest::Response, sep: &str, want: usize) -> Vec<String> {
    use futures::StreamExt as _;
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let done: Vec<String> = text
            .split(sep)
            .filter(|f| !f.trim().is_empty() && !f.starts_with(':'))
            .map(str::to_owned)
            .collect();
        if done.len() > want || (text.ends_with(sep) && done.len() >= want) {
            return done;
        }
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk.unwrap())),
            _ => return done,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_tail_streams_as_ndjson_and_sse_and_resumes() {
    let p = platform(GatewayConfig::default()).await;
    let token = p.token();
    let http = client();
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/refund.capsule.yaml"
    ))
    .unwrap();
    for publish in [false, true] {
        let resp = http
            .post(format!("{}/v1/capsules:push", p.url))
            .bearer_auth(&token)
            .json(&json!({"sourceYaml": yaml.replace("refund-small-orders", &format!("refund-{publish}")), "publish": publish}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // NDJSON: one `{"result": …}` per line (from the start: a oneof field as a query parameter).
    // The relay moves the pushes' events into the log a moment after their
    // commit: until then the tail only says it caught up, so ask again.
    let mut tries = 0;
    let first: Value = loop {
        let resp = http
            .get(format!("{}/v1/events:tail?after_sequence=0", p.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        let lines = frames(resp, "\n", 2).await;
        assert!(!lines.is_empty(), "{lines:?}");
        let first: Value = serde_json::from_str(&lines[0]).unwrap();
        tries += 1;
        if first["result"]["event"].is_object() || tries == 50 {
            break first;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seq = first["result"]["event"]["sequence"]
        .as_str()
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();

    // SSE: `id:` is the sequence; Last-Event-ID resumes after it.
    let resp = http
        .get(format!("{}/v1/events:tail", p.url))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .header("last-event-id", &seq)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = frames(resp, "\n\n", 1).await;
    let first = events
        .iter()
        .find(|e| e.contains("\"event\""))
        .unwrap_or_else(|| panic!("{events:?}"));
    let id: i64 = first
        .lines()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap_or_else(|| panic!("{first}"))
        .parse()
        .unwrap();
    assert!(id > seq.parse::<i64>().unwrap(), "{id} after {seq}");
    assert!(first.contains("event: result\ndata: {"), "{first}");
    p.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_heartbeats_keep_a_quiet_stream_alive_until_an_event_comes() {
    use futures::StreamExt as _;
    let p = platform(GatewayConfig {
        sse_heartbeat_secs: 1,
        ..GatewayConfig::default()
    })
    .await;
    let token = p.token();
    let http = client();
    // Live events only: `caught_up`, then nothing until something happens.
    let resp = http
        .get(format!("{}/v1/events:tail", p.url))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(3500);
    while let Ok(Some(chunk)) = tokio::time::timeout_at(quiet_until, body.next()).await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains("\"caughtUp\":true"), "{text}");
    let beats = text.matches(": heartbeat\n\n").count();
    assert!(
        (2..=4).contains(&beats),
        "{beats} heartbeats in 3.5 s:\n{text}"
    );

    // The wait ends: a push's event comes on the same stream.
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/refund.capsule.yaml"
    ))
    .unwrap();
    let pushed = http
        .post(format!("{}/v1/capsules:push", p.url))
        .bearer_auth(&token)
        .json(&json!({"sourceYaml": yaml}))
        .send()
        .await
        .unwrap();
    assert_eq!(pushed.status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let before = text.len();
    while !text[before..].contains("\"event\":{") {
        match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk.unwrap())),
            _ => panic!("no event after the push:\n{text}"),
        }
    }
    let event = text[before..]
        .split("\n\n")
        .find(|f| f.contains("\"event\":{"))
        .unwrap();
    assert!(event.starts_with("id: "), "{event}");
    p.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_page_renders_openapi_with_the_vendored_redoc() {
    // No services needed: the page and its script are the gateway's own.
    let gateway = Gateway::connect_lazy(GatewayConfig::default(), "http://127.0.0.1:9").unwrap();
    let listener = anumate_testing::bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = tokio::spawn(anumate_gateway::serve(
        listener,
        gateway,
        std::future::pending(),
    ));
    let http = client();
    let page = http.get(format!("{url}/docs")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(
        html.contains("<redoc spec-url=\"/openapi.json\">"),
        "{html}"
    );
    assert!(
        html.contains(&format!(
            "<script src=\"{}\">",
            anumate_gateway::docs::SCRIPT_PATH
        )),
        "{html}"
    );
    // Nothing from elsewhere.
    assert!(
        !html.contains("https://") && !html.contains("http://"),
        "{html}"
    );

    let script = http
        .get(format!("{url}{}", anumate_gateway::docs::SCRIPT_PATH))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), 200);
    assert_eq!(
        script.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert!(
        script.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let js = script.bytes().await.unwrap();
    assert!(js.len() > 500_000, "{} bytes", js.len());
    let head = String::from_utf8_lossy(&js[..js.len().min(4096)]).into_owned();
    assert!(
        head.contains("redoc.standalone.js.LICENSE.txt"),
        "not the Redoc bundle: {head}"
    );
    // The version in the path is the vendored bundle's own (its notices name it).
    let version = anumate_gateway::docs::REDOC_VERSION;
    let notices = std::fs::read_to_string(format!(
        "{}/assets/redoc-{version}.standalone.js.LICENSE.txt",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    assert!(
        notices.contains(&format!("Version: \"{version}\"")),
        "{notices}"
    );
    // Compressed for a client that accepts it.
    let gz = http
        .get(format!("{url}{}", anumate_gateway::docs::SCRIPT_PATH))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(gz.headers()["content-encoding"], "gzip");
    served.abort();
}

/// In process the gateway hands calls to the services' layered routes: the
/// same authentication, per-RPC authorization and rate limits refuse them as
/// over gRPC, and the limits' state (a tenant's bucket) is the one gRPC
/// callers draw on. Each refusal is checked on both upstreams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_calls_are_refused_by_the_same_layers_as_grpc_ones() {
    use anumate_proto::anumate::registry::v1 as rpb;
    let mut grpc = GrpcConfig::default();
    // A burst of 3 GetCapsule-family calls, refilled at one every 100 s.
    grpc.rate_limits.rps = 0.01;
    grpc.rate_limits.burst = 3.0;
    for upstream in [Upstream::InProcess, Upstream::Network] {
        let p = platform_with(GatewayConfig::default(), upstream, grpc.clone()).await;
        let http = client();
        let url = format!("{}/v1/capsules/refund-small-orders", p.url);

        // No token, a forged one: 401 UNAUTHENTICATED, nothing reaches the registry.
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(reason(&body), "UNAUTHENTICATED", "{body}");
        let resp = http
            .get(&url)
            .bearer_auth("eyJhbGciOiJFZERTQSJ9.e30.AAAA")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);

        // A valid token whose roles the RPC's rule does not allow: 403.
        let auditor = p.token_as(&[Role::Auditor]);
        let resp = http
            .post(format!("{}/v1/capsules:push", p.url))
            .bearer_auth(&auditor)
            .json(&json!({"sourceYaml": "name: x", "publish": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], 7, "{body}");

        // The tenant's registry bucket (3 calls) is shared with gRPC callers:
        // one gRPC call and two REST ones spend it, the next REST call is 429
        // with Retry-After, and so is the next gRPC one.
        let token = p.token();
        let channel = tonic::transport::Endpoint::from_shared(p.server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut direct = rpb::registry_service_client::RegistryServiceClient::with_interceptor(
            channel,
            anumate_auth::BearerToken(token.clone()),
        );
        let get = || rpb::GetCapsuleRequest {
            name: "refund-small-orders".into(),
            ..Default::default()
        };
        let first = direct.get_capsule(get()).await.unwrap_err();
        assert_eq!(first.code(), tonic::Code::NotFound, "{first:?}");
        for _ in 0..2 {
            let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
            assert_eq!(resp.status(), 404);
        }
        let resp = http.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert!(resp.headers().contains_key("retry-after"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(reason(&body), "RATE_LIMITED", "{body}");
        let limited = direct.get_capsule(get()).await.unwrap_err();
        assert_eq!(
            limited.code(),
            tonic::Code::ResourceExhausted,
            "{limited:?}"
        );
        p.server.stop().await;
    }
}

/// The receipts export over REST: the lines themselves under the format's
/// content type (no `{"result": …}` wrapping), resumable from a leaf index;
/// a negative index is a real 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_export_streams_raw_lines_and_resumes_from_a_leaf_index() {
    use anumate_proto::receipts::v1 as rpb;
    let p = platform(GatewayConfig::default()).await;
    let service = p
        .auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint(TENANT, Duration::from_secs(300))
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(p.server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut internal = rpb::receipts_internal_client::ReceiptsInternalClient::new(channel);
    for i in 0..4 {
        let mut req = tonic::Request::new(rpb::AppendReceiptRequest {
            kind: rpb::ReceiptKind::StepExecution as i32,
            subject: Some(rpb::ReceiptSubject {
                run_id: "run_export".into(),
                step_id: format!("s{i}"),
                attempt: 1,
                plan_hash: format!("sha256:{}", "ab".repeat(32)),
                ..Default::default()
            }),
            content: None,
            dedupe_key: format!("export:{i}"),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {service}").parse().unwrap(),
        );
        internal.append_receipt(req).await.unwrap();
    }
    let token = p.token_as(&[Role::Auditor]);
    let http = client();
    let get = |query: &str| {
        http.get(format!("{}/v1/receipts:export?{query}", p.url))
            .bearer_auth(&token)
            .send()
    };
    let resp = get("format=EXPORT_FORMAT_NDJSON").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let body = resp.text().await.unwrap();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.len(), 4, "{body}");
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v.get("result").is_none(), "a receipt, not wrapped: {line}");
        // proto3 JSON: leaf 0 is the default, left out.
        let leaf = v["leafIndex"].as_str().unwrap_or("0");
        assert_eq!(leaf, i.to_string(), "{line}");
    }
    // Resuming from leaf 2 gives the last two lines, nothing else.
    for query in ["fromLeafIndex=2", "from_leaf_index=2"] {
        let rest = get(&format!("format=EXPORT_FORMAT_NDJSON&{query}"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(rest.lines().collect::<Vec<_>>(), lines[2..], "{query}");
    }
    // CEF: text lines; an SSE request gets the lines all the same.
    let resp = get("format=EXPORT_FORMAT_CEF").await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    let cef = resp.text().await.unwrap();
    assert_eq!(cef.lines().count(), 4, "{cef}");
    assert!(cef.lines().all(|l| l.starts_with("CEF:0|")), "{cef}");
    // Gzipped when asked (the compression layer polls the body past its
    // end: that once panicked and cut the connection before any response).
    let resp = http
        .get(format!(
            "{}/v1/receipts:export?format=EXPORT_FORMAT_CEF",
            p.url
        ))
        .bearer_auth(&token)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let gz = resp.bytes().await.expect("the whole gzipped body");
    assert!(gz.starts_with(&[0x1f, 0x8b]), "{gz:?}");
    let sse = http
        .get(format!(
            "{}/v1/receipts:export?format=EXPORT_FORMAT_SYSLOG",
            p.url
        ))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(sse.text().await.unwrap().lines().count(), 4);
    // A negative index: a 400 before any line, naming the field.
    let resp = get("format=EXPORT_FORMAT_NDJSON&fromLeafIndex=-1")
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        violation_fields(&body).contains(&"from_leaf_index".to_owned()),
        "{body}"
    );
}
