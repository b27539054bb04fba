#![allow(clippy::unwrap_used, clippy::expect_used)]
//! In one process an approval's decision wakes the waiting step at once
//! (the approvals service's in-process broadcast), not at the step's next
//! poll: with `approval_poll_ms` at ten minutes the transfer still runs
//! right after the quorum is reached, on SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use anumate_auth::{BearerToken, Role};
use anumate_engine::json as ej;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::ghostrun::v1 as gpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_service::{Context, KeysConfig, ServiceModule};
use anumate_testing::{Backend, DevAuth, Layers, ModuleServer, TestDb, on_both_backends};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Authed = InterceptedService<Channel, BearerToken>;

const TENANT: &str = "acme";

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: accounts.lookup}
spec:
  connector: mock
  side_effect: read
  idempotent: true
  input: {type: object, required: [account], properties: {account: {type: string}}}
  mock: {output: {account: \"${{ args.account }}\", status: open}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: payments.transfer}
spec:
  connector: mock
  side_effect: write
  idempotent: false
  input: {type: object, required: [to, amount], properties: {to: {type: string}, amount: {type: integer, minimum: 1}}}
  mock: {output: {transfer_id: \"tr_${{ args.to }}\", amount: \"${{ args.amount }}\"}}
";

const POLICY: &str = r#"policy "transfer-guard" {
  rule "huge-transfer" priority 100 {
    when tool == "payments.transfer" and args.amount > 1000000
    then deny(reason: "transfers above 1,000,000 are not automated")
  }
  rule "large-transfer" {
    when tool == "payments.transfer" and args.amount > 1000
    then require_approval(approvers: ["user:bob", "user:carol", "user:dave"], quorum: 2,
                          reason: "transfer above 1,000")
  }
}
"#;

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: transfer
spec:
  inputs:
    to:     {type: string, required: true, pattern: "^acct_[a-z0-9]+$"}
    amount: {type: integer, required: true, minimum: 1}
  tools: [accounts.lookup, payments.transfer]
  policies: [transfer-guard]
  steps:
    - id: lookup
      tool: accounts.lookup
      with: {account: "${{ inputs.to }}"}
    - id: transfer
      tool: payments.transfer
      needs: [lookup]
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
"#;

struct TestApp {
    server: Option<ModuleServer>,
    auth: DevAuth,
    _db: TestDb,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.handle.abort();
        }
    }
}

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

async fn spawn_app(backend: Backend) -> TestApp {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let modules = modules();
    let mut migrations = anumate_events::MIGRATIONS.to_vec();
    for m in &modules {
        migrations.extend(m.migrations());
    }
    let (db, store) = anumate_testing::migrated_store(backend, &migrations).await;
    let auth = DevAuth::with_service_issuer("orchestrator");
    let keys_dir = auth.dir.path().join("keys");
    let listener = anumate_testing::bind().await;
    let own_url = format!("http://{}", listener.local_addr().unwrap());
    let ctx = Context::new(
        json!({"orchestrator": {"poll_ms": 50, "approval_poll_ms": 600_000}}),
        Some(store),
        KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        },
        keys_dir.clone(),
        auth.services.clone(),
        own_url,
    );
    let layers = Layers::platform(
        anumate_testing::GrpcConfig::default(),
        auth.authenticator.clone(),
    )
    .unwrap();
    let server = anumate_testing::serve_modules(listener, &modules, ctx, layers).await;
    TestApp {
        server: Some(server),
        auth,
        _db: db,
    }
}

struct Clients {
    orch: pb::orchestrator_service_client::OrchestratorServiceClient<Authed>,
    registry: rpb::registry_service_client::RegistryServiceClient<Authed>,
    tools: rpb::tools_service_client::ToolsServiceClient<Authed>,
    policy: ppb::policy_service_client::PolicyServiceClient<Authed>,
    compiler: cpb::compiler_service_client::CompilerServiceClient<Authed>,
    ghostrun: gpb::ghost_run_service_client::GhostRunServiceClient<Authed>,
    approvals: apb::approvals_service_client::ApprovalsServiceClient<Authed>,
    hub: conpb::connector_hub_service_client::ConnectorHubServiceClient<Authed>,
}

impl TestApp {
    async fn as_user(&self, subject: &str, roles: &[Role]) -> Clients {
        let token = self
            .auth
            .issuer
            .mint(TENANT, subject, roles, Duration::from_secs(600))
            .unwrap();
        let url = self.server.as_ref().unwrap().url();
        let channel = Endpoint::from_shared(url).unwrap().connect().await.unwrap();
        let t = || BearerToken(token.clone());
        Clients {
            orch: pb::orchestrator_service_client::OrchestratorServiceClient::with_interceptor(
                channel.clone(),
                t(),
            ),
            registry: rpb::registry_service_client::RegistryServiceClient::with_interceptor(
                channel.clone(),
                t(),
            ),
            tools: rpb::tools_service_client::ToolsServiceClient::with_interceptor(
                channel.clone(),
                t(),
            ),
            policy: ppb::policy_service_client::PolicyServiceClient::with_interceptor(
                channel.clone(),
                t(),
            ),
            compiler: cpb::compiler_service_client::CompilerServiceClient::with_interceptor(
                channel.clone(),
                t(),
            ),
            ghostrun: gpb::ghost_run_service_client::GhostRunServiceClient::with_interceptor(
                channel.clone(),
                t(),
            ),
            approvals: apb::approvals_service_client::ApprovalsServiceClient::with_interceptor(
                channel.clone(),
                t(),
            ),
            hub: conpb::connector_hub_service_client::ConnectorHubServiceClient::with_interceptor(
                channel,
                t(),
            ),
        }
    }

    /// The starter: an operator (also an approver, so self-approval is tested).
    async fn alice(&self) -> Clients {
        self.as_user(
            "user:alice",
            &[Role::Operator, Role::Approver, Role::Auditor],
        )
        .await
    }
}

/// Pushes the tools, the policy and the capsule; compiles; returns the plan hash.
async fn seed(app: &TestApp) -> String {
    let mut admin = app.as_user("user:root", &[Role::Admin]).await;
    admin
        .tools
        .push_tools(rpb::PushToolsRequest {
            source_yaml: TOOLS.into(),
            source_name: "tools.yaml".into(),
        })
        .await
        .unwrap();
    admin
        .policy
        .push_policy(ppb::PushPolicyRequest {
            source: POLICY.into(),
            source_name: "transfer.policy".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    admin
        .registry
        .push_capsule(rpb::PushCapsuleRequest {
            source_yaml: CAPSULE.into(),
            source_name: "transfer.yaml".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    let plan = admin
        .compiler
        .compile(cpb::CompileRequest {
            capsule_name: "transfer".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    plan.plan_hash
}

fn inputs(v: Value) -> Option<pbjson_types::Struct> {
    Some(ej::to_struct(&v))
}

async fn preflight(c: &mut Clients, plan_hash: &str, v: Value) -> gpb::PreflightReport {
    c.ghostrun
        .preflight(gpb::PreflightRequest {
            plan_hash: plan_hash.into(),
            inputs: inputs(v),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap()
}

fn execute(plan_hash: &str, v: Value, preflight: &str, key: &str) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        plan_hash: plan_hash.into(),
        inputs: inputs(v),
        preflight_id: preflight.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

async fn get(c: &mut Clients, run_id: &str) -> pb::Run {
    c.orch
        .get_run(pb::GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
}

/// Polls the run until `done` holds (at most 20 s).
async fn wait_for(c: &mut Clients, run_id: &str, done: impl Fn(&pb::Run) -> bool) -> pb::Run {
    let start = Instant::now();
    loop {
        let run = get(c, run_id).await;
        if done(&run) {
            return run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "run never reached the expected state: {run:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step<'a>(run: &'a pb::Run, id: &str) -> &'a pb::StepRun {
    run.steps.iter().find(|s| s.step_id == id).unwrap()
}

on_both_backends! {
    a_decision_wakes_the_step => a_decision_wakes_the_step_sqlite, a_decision_wakes_the_step_postgres;
}

async fn a_decision_wakes_the_step(app: TestApp) {
    let plan_hash = seed(&app).await;
    let mut alice = app.alice().await;
    let args = json!({"to": "acct_bob", "amount": 250000});
    let report = preflight(&mut alice, &plan_hash, args.clone()).await;
    let run_id = alice
        .orch
        .execute(execute(&plan_hash, args, &report.preflight_id, "pay-1"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::WaitingApproval as i32
    })
    .await;
    let approval_id = step(&run, "transfer").approval_ids[0].clone();
    let approval = alice
        .approvals
        .get_approval(apb::GetApprovalRequest {
            approval_id: approval_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    for who in ["user:bob", "user:carol"] {
        let mut c = app.as_user(who, &[Role::Approver]).await;
        c.approvals
            .approve(apb::ApproveRequest {
                approval_id: approval_id.clone(),
                comment: "ok".into(),
                etag: String::new(),
                args_sha256: approval.args_sha256.clone(),
            })
            .await
            .unwrap();
    }
    // The next poll is ten minutes away: only the nudge can run it now.
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    let transfer = step(&run, "transfer");
    assert_eq!(transfer.attempts.len(), 1);
    let calls = alice
        .hub
        .list_mock_calls(conpb::ListMockCallsRequest {
            run_id: run_id.clone(),
            tool: "payments.transfer".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .calls;
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].deliveries, 1);
}
