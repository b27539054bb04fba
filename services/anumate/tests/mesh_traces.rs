#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Traces across the mesh (issue 18): the gateway, the compiler, the
//! registry, the policy service and the events service each run as their own
//! `anumate serve <service>` process on one PostgreSQL database, every one
//! exporting spans over OTLP to a collector in this test (the
//! `opentelemetry-proto` trace service). One REST call to compile, sent with
//! the client's `traceparent`, makes one trace: gateway → compiler →
//! registry (and policy), each server span the child of its caller's client
//! call; and, with a Kafka broker (`ANUMATE_TEST_KAFKA`), the `plan.compiled`
//! event the compiler wrote carries the trace through the outbox and Kafka
//! into the events service's consumer.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Mesh, Pod, anumate, free_port, http_request, start_pod};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;

const POLICY: &str = "policy \"open\" {\n  rule \"cap\" {\n    when args.to == \"nobody\"\n    then deny(reason: \"no one\")\n  }\n}\n";

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: traced
spec:
  inputs:
    to: {type: string, required: true}
  tools: [mock.echo]
  policies: [open]
  steps:
    - id: call
      tool: mock.echo
      with: {to: "${{ inputs.to }}"}
"#;

/// One exported span: the process's `service.name`, its trace, its id and
/// its parent's (hex; empty for a root), its name.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
}

/// An OTLP trace collector keeping every span it is sent.
#[derive(Debug, Clone, Default)]
struct Collector(Arc<Mutex<Vec<Exported>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut kept = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                kept.push(Exported {
                    service: service.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts `anumate serve <role>` with `config`, and waits until it serves.
fn start(d: &Path, role: &str, config: &str, store_url: &str) -> Pod {
    let config_path = d.join(format!("{role}.toml"));
    std::fs::write(&config_path, config).unwrap();
    let mut cmd = anumate(d);
    cmd.args(["serve", role, "--listen"])
        .arg(if role == "gateway" {
            "127.0.0.1:0".to_owned()
        } else {
            config
                .lines()
                .find_map(|l| l.strip_prefix("# listen "))
                .unwrap()
                .to_owned()
        })
        .arg("--config")
        .arg(&config_path)
        .env("ANUMATE_STORE__URL", store_url)
        .env("ANUMATE_ADMIN__LISTEN", "127.0.0.1:0")
        // Export each batch of spans within 100 ms (the SDK's default is 5 s).
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info");
    start_pod(cmd, role, d.join(format!("{role}.log")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_the_gateway_the_services_and_kafka() {
    let collector = Collector::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_addr = otlp.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(otlp)),
    );

    let db = anumate_store::testing::TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mesh = Mesh::prepare(d, &db);
    let token = mesh.token.clone();

    let kafka = std::env::var("ANUMATE_TEST_KAFKA").ok();
    let roles: &[&str] = if kafka.is_some() {
        &["registry", "policy", "compiler", "events", "gateway"]
    } else {
        eprintln!("ANUMATE_TEST_KAFKA unset: the trace through Kafka is not checked");
        &["registry", "policy", "compiler", "gateway"]
    };
    let ports: BTreeMap<&str, u16> = roles.iter().map(|r| (*r, free_port())).collect();
    let url = |role: &str| format!("http://127.0.0.1:{}", ports[role]);
    let group = format!("trace-test-{}", std::process::id());
    let mut pods = Vec::new();
    for role in roles {
        let config = format!(
            "# listen 127.0.0.1:{port}\n{shared}\
             [compiler]\npolicy_url = {policy:?}\nregistry_url = {registry:?}\n\n\
             [telemetry]\notlp_endpoint = \"http://{otlp_addr}\"\n\n\
             [events]\nhistory_group = {group:?}\n\n\
             {kafka}{gateway}",
            port = ports[role],
            shared = mesh.config,
            policy = url("policy"),
            registry = url("registry"),
            kafka = match &kafka {
                Some(brokers) => format!("[kafka]\nbrokers = {brokers:?}\n\n"),
                None => String::new(),
            },
            // The gateway in front of the compiler.
            gateway = if *role == "gateway" {
                format!(
                    "[gateway]\nlisten = \"127.0.0.1:{}\"\nupstream = {:?}\n",
                    ports["gateway"],
                    url("compiler")
                )
            } else {
                String::new()
            },
        );
        pods.push(start(d, role, &config, &db.config.url));
    }
    let logs = || pods.iter().map(Pod::tail).collect::<Vec<_>>().join("\n");

    // The policy and capsule, straight to their services (not traced by us).
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    let gw = format!("127.0.0.1:{}", ports["gateway"]);
    push(&url("policy"), &url("registry"), &bearer).await;

    // The REST call, in the client's trace.
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let client_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let (status, body) = http_request(
        &gw,
        "POST",
        "/v1/plans:compile",
        &[auth[0], ("traceparent", &traceparent)],
        r#"{"capsuleName": "traced"}"#,
    );
    assert_eq!(status, 200, "{body}\n{}", logs());

    // Every process's spans of that trace reach the collector.
    let mut wanted = vec![
        "anumate-gateway",
        "anumate-compiler",
        "anumate-registry",
        "anumate-policy",
    ];
    if kafka.is_some() {
        wanted.push("anumate-events");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let spans = loop {
        let spans: Vec<Exported> = collector
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        if wanted.iter().all(|w| spans.iter().any(|s| s.service == *w)) {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of trace {trace_id} from {wanted:?}; got {spans:#?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let of = |service: &str| -> Vec<&Exported> {
        spans.iter().filter(|s| s.service == service).collect()
    };
    let ids =
        |service: &str| -> Vec<String> { of(service).iter().map(|s| s.span_id.clone()).collect() };
    let server_span = |service: &str, name: &str| -> Exported {
        of(service)
            .into_iter()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("no span {name:?} from {service}: {spans:#?}"))
    };

    // gateway (child of the client) → compiler → registry and policy: each
    // server span's parent is a span of its caller's process.
    let gateway = server_span("anumate-gateway", "POST /v1/plans:compile");
    assert_eq!(gateway.parent, client_span, "{spans:#?}");
    let compile = server_span(
        "anumate-compiler",
        "/anumate.compiler.v1.CompilerService/Compile",
    );
    assert!(
        ids("anumate-gateway").contains(&compile.parent),
        "{spans:#?}"
    );
    let get_capsule = server_span(
        "anumate-registry",
        "/anumate.registry.v1.RegistryService/GetCapsule",
    );
    assert!(
        ids("anumate-compiler").contains(&get_capsule.parent),
        "{spans:#?}"
    );
    let get_policy = server_span(
        "anumate-policy",
        "/anumate.policy.v1.PolicyService/GetPolicy",
    );
    assert!(
        ids("anumate-compiler").contains(&get_policy.parent),
        "{spans:#?}"
    );
    // producer → Kafka → consumer: the events service consumed
    // `plan.compiled` in a span whose parent is the compiler's.
    if kafka.is_some() {
        let consume = server_span("anumate-events", "consume");
        assert!(
            ids("anumate-compiler").contains(&consume.parent),
            "{spans:#?}"
        );
    }

    // A malformed traceparent starts a trace of its own, and the call works.
    let (status, body) = http_request(
        &gw,
        "POST",
        "/v1/plans:compile",
        &[auth[0], ("traceparent", "00-not-a-trace-01")],
        r#"{"capsuleName": "traced"}"#,
    );
    assert_eq!(status, 200, "{body}");
    server.abort();
}

/// Pushes the policy and the capsule over gRPC.
async fn push(policy_url: &str, registry_url: &str, bearer: &str) {
    use anumate_proto::policy::v1 as ppb;
    use anumate_proto::registry::v1 as rpb;
    let with_token = |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", bearer.parse().unwrap());
        Ok(req)
    };
    let channel = |u: &str| {
        tonic::transport::Endpoint::from_shared(u.to_owned())
            .unwrap()
            .connect_lazy()
    };
    ppb::policy_service_client::PolicyServiceClient::with_interceptor(
        channel(policy_url),
        with_token,
    )
    .push_policy(ppb::PushPolicyRequest {
        source: POLICY.into(),
        source_name: "open.policy".into(),
        etag: String::new(),
        publish: true,
    })
    .await
    .unwrap();
    rpb::registry_service_client::RegistryServiceClient::with_interceptor(
        channel(registry_url),
        with_token,
    )
    .push_capsule(rpb::PushCapsuleRequest {
        source_yaml: CAPSULE.into(),
        source_name: "traced.yaml".into(),
        etag: String::new(),
        publish: true,
    })
    .await
    .unwrap();
}
