#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A replica dies with a call in flight: two orchestrator servers on one
//! database (SQLite and PostgreSQL). Replica A's connector hub never answers
//! (a TCP black hole), so its transfer attempt is journaled `RUNNING`; then
//! A's whole runtime is dropped (its tasks vanish mid-call, as on
//! `kill -9`). Replica B takes the run over once A's lease expires: the
//! tool is not idempotent, so the attempt is `OUTCOME_UNKNOWN` and the step
//! `NEEDS_ATTENTION`; an operator's `ResolveStep` RETRY re-sends it with the
//! same idempotency key, and the mock's ledger shows the key acted on once.
//! The tenant turned `require_preflight` off, so no preflight is cited.

use std::time::{Duration, Instant};

use anumate_auth::{BearerToken, Role};
use anumate_engine::json as ej;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_service::{Context, KeysConfig, ServiceModule};
use anumate_testing::{Backend, DevAuth, Layers, ModuleServer, Store};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

const TENANT: &str = "acme";

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: payments.transfer}
spec:
  connector: mock
  side_effect: write
  idempotent: false
  input: {type: object, required: [to, amount], properties: {to: {type: string}, amount: {type: integer, minimum: 1}}}
  mock: {output: {transfer_id: \"tr_${{ args.to }}\"}}
";

const POLICY: &str = r#"policy "open" {
  rule "small" {
    when tool == "payments.transfer" and args.amount > 1000000
    then deny(reason: "too large")
  }
}
"#;

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: pay
spec:
  inputs:
    to:     {type: string, required: true}
    amount: {type: integer, required: true, minimum: 1}
  tools: [payments.transfer]
  policies: [open]
  steps:
    - id: transfer
      tool: payments.transfer
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
"#;

fn modules() -> Vec<Box<dyn ServiceModule>> {
    vec![
        anumate_registry::module(),
        anumate_receipts::module(),
        anumate_policy_service::module(),
        anumate_captokens_service::module(),
        anumate_compiler::module(),
        anumate_approvals::module(),
        anumate_ghostrun::module(),
        anumate_connectors::module(),
        anumate_orchestrator::module(),
    ]
}

/// A server of every module on `store`, with `orchestrator` settings.
async fn serve(store: Store, auth: &DevAuth, orchestrator: Value) -> ModuleServer {
    let listener = anumate_testing::bind().await;
    let own_url = format!("http://{}", listener.local_addr().unwrap());
    let ctx = Context::new(
        json!({"orchestrator": orchestrator}),
        Some(store),
        KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        },
        auth.dir.path().join("keys"),
        auth.services.clone(),
        own_url,
    );
    let layers = Layers::platform(
        anumate_testing::GrpcConfig::default(),
        auth.authenticator.clone(),
    )
    .unwrap();
    anumate_testing::serve_modules(listener, &modules(), ctx, layers).await
}

async fn channel(url: String) -> Channel {
    Endpoint::from_shared(url).unwrap().connect().await.unwrap()
}

fn token(auth: &DevAuth, subject: &str, roles: &[Role]) -> BearerToken {
    BearerToken(
        auth.issuer
            .mint(TENANT, subject, roles, Duration::from_secs(600))
            .unwrap(),
    )
}

async fn get(c: &mut Orch, run_id: &str) -> pb::Run {
    c.get_run(pb::GetRunRequest {
        run_id: run_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .run
    .unwrap()
}

type Orch = pb::orchestrator_service_client::OrchestratorServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, BearerToken>,
>;

async fn wait_for(c: &mut Orch, run_id: &str, done: impl Fn(&pb::Run) -> bool) -> pb::Run {
    let start = Instant::now();
    loop {
        let run = get(c, run_id).await;
        if done(&run) {
            return run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "run never reached the expected state: {run:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_dead_replica_leaves_an_unknown_outcome_to_a_human(backend: Backend) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let mut migrations = anumate_events::MIGRATIONS.to_vec();
    for m in &modules() {
        migrations.extend(m.migrations());
    }
    let (db, store) = anumate_testing::migrated_store(backend, &migrations).await;
    let auth = DevAuth::with_service_issuer("orchestrator");

    // A TCP black hole: accepts connections and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            conns.push(s);
        }
    });

    // Replica A, in its own runtime (on its own thread), calling the black hole.
    let config = db.config.clone();
    let a_token = token(&auth, "user:alice", &[Role::Operator]);
    let admin = token(&auth, "user:root", &[Role::Admin]);
    let keys = auth.dir.path().join("keys");
    let services = auth.services.clone();
    let authenticator = auth.authenticator.clone();
    let (rt_a, server_a) = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(async move {
            let store = Store::connect(&config).await.unwrap();
            let listener = anumate_testing::bind().await;
            let own_url = format!("http://{}", listener.local_addr().unwrap());
            let ctx = Context::new(
                json!({"orchestrator": {"poll_ms": 50, "lease_secs": 1, "connectors_url": hole_url}}),
                Some(store),
                KeysConfig {
                    generate_missing: true,
                    ..KeysConfig::default()
                },
                keys,
                services,
                own_url,
            );
            let layers =
                Layers::platform(anumate_testing::GrpcConfig::default(), authenticator).unwrap();
            anumate_testing::serve_modules(listener, &modules(), ctx, layers).await
        });
        (rt, server)
    })
    .join()
    .unwrap();
    let a_url = server_a.url();

    // Seed through A: tools, policy, capsule, compile; preflight not required.
    let ch = channel(a_url.clone()).await;
    rpb::tools_service_client::ToolsServiceClient::with_interceptor(ch.clone(), admin.clone())
        .push_tools(rpb::PushToolsRequest {
            source_yaml: TOOLS.into(),
            source_name: "tools.yaml".into(),
        })
        .await
        .unwrap();
    ppb::policy_service_client::PolicyServiceClient::with_interceptor(ch.clone(), admin.clone())
        .push_policy(ppb::PushPolicyRequest {
            source: POLICY.into(),
            source_name: "open.policy".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    rpb::registry_service_client::RegistryServiceClient::with_interceptor(
        ch.clone(),
        admin.clone(),
    )
    .push_capsule(rpb::PushCapsuleRequest {
        source_yaml: CAPSULE.into(),
        source_name: "pay.yaml".into(),
        etag: String::new(),
        publish: true,
    })
    .await
    .unwrap();
    let plan = cpb::compiler_service_client::CompilerServiceClient::with_interceptor(
        ch.clone(),
        admin.clone(),
    )
    .compile(cpb::CompileRequest {
        capsule_name: "pay".into(),
        version: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .plan
    .unwrap();
    rpb::tenant_settings_service_client::TenantSettingsServiceClient::with_interceptor(
        ch.clone(),
        admin.clone(),
    )
    .update_tenant_settings(rpb::UpdateTenantSettingsRequest {
        settings: Some(rpb::TenantSettings {
            require_preflight: Some(false),
            ..Default::default()
        }),
        update_mask: Some(pbjson_types::FieldMask {
            paths: vec!["require_preflight".into()],
        }),
        etag: String::new(),
    })
    .await
    .unwrap();

    let mut orch_a = pb::orchestrator_service_client::OrchestratorServiceClient::with_interceptor(
        ch.clone(),
        a_token.clone(),
    );
    let run = orch_a
        .execute(pb::ExecuteRequest {
            plan_hash: plan.plan_hash.clone(),
            inputs: Some(ej::to_struct(&json!({"to": "acct_x", "amount": 10}))),
            idempotency_key: "crash-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let run_id = run.run_id.clone();
    let in_flight = wait_for(&mut orch_a, &run_id, |r| {
        r.steps[0]
            .attempts
            .first()
            .is_some_and(|a| a.state() == pb::AttemptState::Running)
    })
    .await;
    let holder = in_flight.steps[0].attempts[0].lease_holder.clone();
    assert!(!holder.is_empty());

    // A dies: every task of its runtime is dropped mid-call.
    drop(orch_a);
    drop(ch);
    std::mem::forget(server_a);
    rt_a.shutdown_background();

    // B takes the run over after the lease expires.
    let server_b = serve(store, &auth, json!({"poll_ms": 50, "lease_secs": 1})).await;
    let ch = channel(server_b.url()).await;
    let mut orch = pb::orchestrator_service_client::OrchestratorServiceClient::with_interceptor(
        ch.clone(),
        a_token.clone(),
    );
    let run = wait_for(&mut orch, &run_id, |r| {
        r.steps[0].state() == pb::StepState::NeedsAttention
    })
    .await;
    let step = &run.steps[0];
    assert_eq!(step.attempts[0].state(), pb::AttemptState::OutcomeUnknown);
    assert!(step.state_reason.contains("not idempotent"), "{step:#?}");
    assert_eq!(run.state(), pb::RunState::Running);
    let ledger = || {
        let mut hub =
            conpb::connector_hub_service_client::ConnectorHubServiceClient::with_interceptor(
                ch.clone(),
                a_token.clone(),
            );
        let run_id = run_id.clone();
        async move {
            hub.list_mock_calls(conpb::ListMockCallsRequest {
                run_id,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .calls
        }
    };
    assert!(ledger().await.is_empty(), "A never reached the hub");

    // MARK_SUCCEEDED needs the step in NEEDS_ATTENTION; RETRY with a stale etag fails.
    anumate_testing::expect_reason(
        orch.resolve_step(pb::ResolveStepRequest {
            run_id: run_id.clone(),
            step_id: "transfer".into(),
            action: pb::ResolveAction::Retry as i32,
            reason: "checked the bank: nothing arrived".into(),
            etag: "\"1\"".into(),
            ..Default::default()
        })
        .await,
        anumate_errors::Reason::EtagMismatch,
    );
    if let Err(e) = orch
        .resolve_step(pb::ResolveStepRequest {
            run_id: run_id.clone(),
            step_id: "transfer".into(),
            action: pb::ResolveAction::Retry as i32,
            reason: "checked the bank: nothing arrived".into(),
            etag: run.etag.clone(),
            ..Default::default()
        })
        .await
    {
        let history = orch
            .list_run_history(pb::ListRunHistoryRequest {
                run_id: run_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries
            .iter()
            .map(|h| format!("{} {} {} {}", h.sequence, h.r#type, h.step_id, h.actor))
            .collect::<Vec<_>>();
        panic!("{e:?}\nread etag {}; history: {history:#?}", run.etag);
    }
    let done = wait_for(&mut orch, &run_id, |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    let step = &done.steps[0];
    assert_eq!(step.attempts.len(), 2);
    assert_eq!(step.attempts[1].state(), pb::AttemptState::Succeeded);
    assert_eq!(
        step.attempts[0].idempotency_key,
        step.attempts[1].idempotency_key
    );
    assert_ne!(step.attempts[1].lease_holder, holder);
    let calls = ledger().await;
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].deliveries, 1);
    let history = orch
        .list_run_history(pb::ListRunHistoryRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let resolved = history
        .iter()
        .find(|e| e.r#type == "step.resolved")
        .unwrap();
    assert_eq!(resolved.actor, "user:alice");
    // The resolution left a receipt naming who resolved the step, how and why.
    assert!(!step.resolution_receipt_id.is_empty(), "{step:#?}");
    let mut receipts =
        anumate_proto::receipts::v1::receipts_service_client::ReceiptsServiceClient::with_interceptor(
            ch.clone(),
            admin.clone(),
        );
    let receipt = receipts
        .get_receipt(anumate_proto::receipts::v1::GetReceiptRequest {
            receipt_id: step.resolution_receipt_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    let subject = receipt.subject.clone().unwrap();
    assert_eq!(
        (subject.run_id.as_str(), subject.step_id.as_str()),
        (run_id.as_str(), "transfer")
    );
    let content = ej::struct_json(receipt.content.as_ref().unwrap()).unwrap();
    assert_eq!(content["resolved_by"], "user:alice", "{content}");
    assert_eq!(content["resolution"], "RESOLVE_ACTION_RETRY", "{content}");
    assert_eq!(
        content["reason"], "checked the bank: nothing arrived",
        "{content}"
    );
    assert_eq!(
        content["step_state_before"], "STEP_STATE_NEEDS_ATTENTION",
        "{content}"
    );
    assert!(history.iter().any(|e| e.r#type == "step.needs_attention"));
    held.abort();
    server_b.stop().await;
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_sqlite() {
    a_dead_replica_leaves_an_unknown_outcome_to_a_human(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_postgres() {
    a_dead_replica_leaves_an_unknown_outcome_to_a_human(Backend::Postgres).await;
}
