#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A run acts in the trace of the call that started it (issue 18): the
//! `Execute` arrives with the client's `traceparent`; every pass a worker
//! makes over the run later (policy, token, hub call, receipt, events) is a
//! span of that same trace, so the run's work shows under the request that
//! caused it, however much later a worker picks it up.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anumate_proto::orchestrator::v1 as pb;
use anumate_testing::Backend;
use common::*;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde_json::json;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: ledger.debit}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [to], properties: {to: {type: string}}}
  mock: {output: {ok: true}}
";

const POLICY: &str = r#"policy "transfer-guard" {
  rule "nobody" {
    when args.to == "acct_nobody"
    then deny(reason: "no one")
  }
}
"#;

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: transfer
spec:
  inputs:
    to: {type: string, required: true}
  tools: [ledger.debit]
  policies: [transfer-guard]
  steps:
    - id: debit
      tool: ledger.debit
      with: {to: "${{ inputs.to }}"}
    - id: again
      tool: ledger.debit
      needs: [debit]
      with: {to: "${{ inputs.to }}"}
"#;

/// Keeps every ended span.
#[derive(Debug, Clone, Default)]
struct Capture(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Capture {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_acts_in_the_trace_of_the_execute_that_started_it() {
    let capture = Capture::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(capture.clone())
        .build();
    // What `[telemetry] otlp_endpoint` installs: info spans, and the
    // per-call server spans.
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_filter(tracing_subscriber::EnvFilter::new(
                "info,tower_http::trace::make_span=debug",
            )),
    );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let app = spawn_app(Backend::Sqlite).await;
    let plan = seed(&app, TOOLS, POLICY, CAPSULE).await;
    let mut alice = app.alice().await;
    let report = preflight(&mut alice, &plan, json!({"to": "acct_1"})).await;
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let mut req = tonic::Request::new(execute(
        &plan,
        json!({"to": "acct_1"}),
        &report.preflight_id,
        "traced-1",
    ));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let run = alice
        .orch
        .execute(req)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let run = wait_for(&mut alice, &run.run_id, |r| {
        r.state() == pb::RunState::Succeeded || r.state() == pb::RunState::Failed
    })
    .await;
    assert_eq!(run.state(), pb::RunState::Succeeded, "{run:#?}");
    // The last pass's span ends just after the run's last save.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let spans = capture.0.lock().unwrap().clone();
    let trace_of = |s: &SpanData| format!("{:032x}", s.span_context.trace_id());
    let execute = spans
        .iter()
        .find(|s| s.name == "/anumate.orchestrator.v1.OrchestratorService/Execute")
        .unwrap_or_else(|| panic!("no Execute span: {spans:#?}"));
    assert_eq!(trace_of(execute), trace_id, "{execute:#?}");
    let passes: Vec<&SpanData> = spans.iter().filter(|s| s.name == "run_pass").collect();
    // At least one pass per step (started, completed) and the run's end.
    assert!(passes.len() >= 2, "{spans:#?}");
    for pass in &passes {
        assert_eq!(
            trace_of(pass),
            trace_id,
            "a pass outside the run's trace: {pass:#?}"
        );
    }
}
