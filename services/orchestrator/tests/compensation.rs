#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Compensations over gRPC on the composition `anumate dev` runs, on SQLite
//! and PostgreSQL: a run whose first step (a transfer declaring a
//! compensation) succeeded waits for an approval of its second step; the
//! starter cancels it. The compensation runs once as a governed call of its
//! own (policy decision, token, the hub with its own idempotency key, a
//! receipt that verifies offline), the waiting step is cancelled, the run
//! ends `CANCELLED` naming the compensated step, and a compensation the
//! policy denies leaves the step `COMPENSATION_FAILED` without calling.

use std::time::{Duration, Instant};

use anumate_auth::{BearerToken, Role};
use anumate_crypto::KeyRing;
use anumate_engine::json as ej;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::ghostrun::v1 as gpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::receipts::v1 as rcpb;
use anumate_proto::registry::v1 as rpb;
use anumate_receipt::{InclusionProof, verify_receipt_offline};
use anumate_service::{Context, KeysConfig, ServiceModule};
use anumate_testing::{Backend, DevAuth, Layers, ModuleServer, TestDb, on_both_backends};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Authed = InterceptedService<Channel, BearerToken>;

const TENANT: &str = "acme";

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: payments.transfer}
spec:
  connector: mock
  side_effect: write
  idempotent: false
  input: {type: object, required: [to, amount], properties: {to: {type: string}, amount: {type: integer, minimum: 1}}}
  mock: {output: {transfer_id: \"tr_${{ args.to }}\", amount: \"${{ args.amount }}\"}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: payments.reverse}
spec:
  connector: mock
  side_effect: write
  idempotent: false
  input: {type: object, required: [transfer_id], properties: {transfer_id: {type: string}, amount: {type: integer}}}
  mock: {output: {reversed: \"${{ args.transfer_id }}\"}, latency: 300ms, fail: {times: 1, code: UNAVAILABLE}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: notify.send}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, required: [to], properties: {to: {type: string}}}
  mock: {output: {sent: true}}
";

const POLICY: &str = r#"policy "transfer-guard" {
  rule "notify-needs-approval" {
    when tool == "notify.send"
    then require_approval(approvers: ["user:bob"], quorum: 1, reason: "a human reads it first")
  }
  rule "no-big-reversal" {
    when tool == "payments.reverse" and args.amount > 5000
    then deny(reason: "reversals above 5,000 are done by hand")
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
  tools: [payments.transfer, payments.reverse, notify.send]
  policies: [transfer-guard]
  steps:
    - id: transfer
      tool: payments.transfer
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
      compensate:
        tool: payments.reverse
        with: {transfer_id: "${{ steps.transfer.output.transfer_id }}", amount: "${{ inputs.amount }}"}
        timeout: 5s
    - id: notify
      tool: notify.send
      needs: [transfer]
      with: {to: "${{ inputs.to }}"}
"#;

struct TestApp {
    server: Option<ModuleServer>,
    auth: DevAuth,
    keys_dir: std::path::PathBuf,
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
        json!({"orchestrator": {"poll_ms": 50, "approval_poll_ms": 100}}),
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
        keys_dir,
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
    receipts: rcpb::receipts_service_client::ReceiptsServiceClient<Authed>,
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
                channel.clone(),
                t(),
            ),
            receipts: rcpb::receipts_service_client::ReceiptsServiceClient::with_interceptor(
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

/// Verifies receipt `id` offline: signature, inclusion proof, checkpoint.
async fn verify_offline(app: &TestApp, run_id: &str, id: &str) {
    let jwks = KeyRing::load_or_create(&app.keys_dir, "receipts")
        .unwrap()
        .jwks();
    let mut auditor = app.as_user("user:audrey", &[Role::Auditor]).await;
    let receipt = auditor
        .receipts
        .get_receipt(rcpb::GetReceiptRequest {
            receipt_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();
    assert_eq!(receipt.subject.as_ref().unwrap().run_id, run_id);
    // The checkpointer signs a new tree head every few seconds.
    let start = Instant::now();
    let proof = loop {
        match auditor
            .receipts
            .get_inclusion_proof(rcpb::GetInclusionProofRequest {
                receipt_id: id.to_string(),
                tree_size: 0,
            })
            .await
        {
            Ok(p) => break p.into_inner(),
            Err(s)
                if s.code() == tonic::Code::FailedPrecondition
                    && start.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    let checkpoint = proof.checkpoint.unwrap();
    let inclusion = InclusionProof {
        leaf_index: proof.leaf_index as u64,
        tree_size: checkpoint.tree_size as u64,
        audit_path: proof
            .audit_path
            .iter()
            .map(|h| h.as_slice().try_into().unwrap())
            .collect(),
    };
    let json = anumate_receipts::export::receipt_json(&receipt)
        .unwrap()
        .to_string();
    verify_receipt_offline(&json, &inclusion, &checkpoint.note, &jwks)
        .unwrap_or_else(|e| panic!("{e}: {json}"));
}

async fn mock_calls(c: &mut Clients, run_id: &str, tool: &str) -> Vec<conpb::MockCall> {
    c.hub
        .list_mock_calls(conpb::ListMockCallsRequest {
            run_id: run_id.into(),
            tool: tool.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .calls
}

/// Starts a run for `amount`, waits until the transfer succeeded and the
/// notification waits for its approval, then cancels it.
async fn start_and_cancel(c: &mut Clients, plan_hash: &str, amount: i64, key: &str) -> String {
    let args = json!({"to": "acct_bob", "amount": amount});
    let report = preflight(c, plan_hash, args.clone()).await;
    assert_eq!(report.verdict(), gpb::PreflightVerdict::Warn, "{report:#?}");
    let run = c
        .orch
        .execute(execute(plan_hash, args, &report.preflight_id, key))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let run_id = run.run_id.clone();
    let run = wait_for(c, &run_id, |r| {
        r.state == pb::RunState::WaitingApproval as i32
    })
    .await;
    assert_eq!(step(&run, "transfer").state(), pb::StepState::Succeeded);
    assert_eq!(step(&run, "notify").state(), pb::StepState::WaitingApproval);
    assert!(mock_calls(c, &run_id, "payments.reverse").await.is_empty());
    c.orch
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
            reason: "the customer withdrew".into(),
            etag: run.etag.clone(),
        })
        .await
        .unwrap();
    run_id
}

/// The approval once it is no longer pending (at most 10 s).
async fn wait_approval_ended(c: &mut Clients, id: &str) -> apb::Approval {
    let start = Instant::now();
    loop {
        let a = c
            .approvals
            .get_approval(apb::GetApprovalRequest {
                approval_id: id.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .approval
            .unwrap();
        if a.state() != apb::ApprovalState::Pending || start.elapsed() > Duration::from_secs(10) {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

on_both_backends! {
    cancel_compensates => cancel_compensates_sqlite, cancel_compensates_postgres;
}

async fn cancel_compensates(app: TestApp) {
    let plan_hash = seed(&app).await;
    let mut alice = app.alice().await;

    // The plan carries the declared compensation.
    let plan = alice
        .compiler
        .get_plan(cpb::GetPlanRequest {
            plan_hash: plan_hash.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .plan
        .unwrap();
    let comp = plan.steps[0].compensation.as_ref().unwrap();
    assert_eq!(comp.tool, "payments.reverse");

    // Cancelled while the notification waits: the transfer is reversed once.
    let run_id = start_and_cancel(&mut alice, &plan_hash, 100, "pay-1").await;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Cancelled as i32
    })
    .await;
    assert!(!run.killed);
    let transfer = step(&run, "transfer");
    assert_eq!(transfer.state(), pb::StepState::Compensated, "{run:#?}");
    let notify = step(&run, "notify");
    assert_eq!(notify.state(), pb::StepState::Cancelled);
    // Its open approval is cancelled with the run.
    let approval = wait_approval_ended(&mut alice, &notify.approval_ids[0]).await;
    assert_eq!(approval.state(), apb::ApprovalState::Cancelled);
    // The call's attempt carries its policy decision.
    let call = &transfer.attempts[0];
    assert_eq!(
        call.decision.as_ref().unwrap().effect(),
        ppb::Effect::Allow,
        "{call:#?}"
    );
    // The reversal's first delivery fails (retryable): tried again with the
    // same key.
    assert_eq!(transfer.compensation_attempts.len(), 2, "{transfer:#?}");
    let failed = &transfer.compensation_attempts[0];
    assert_eq!(failed.state(), pb::AttemptState::Failed);
    assert!(failed.failure.as_ref().unwrap().retryable, "{failed:#?}");
    let comp = &transfer.compensation_attempts[1];
    assert_eq!(comp.idempotency_key, failed.idempotency_key);
    assert_eq!(comp.kind(), pb::AttemptKind::Compensation);
    assert_eq!(comp.state(), pb::AttemptState::Succeeded);
    assert_eq!(
        comp.idempotency_key,
        format!("{run_id}/transfer/compensate")
    );
    assert_ne!(comp.idempotency_key, call.idempotency_key);
    assert!(!comp.token_jti.is_empty());
    assert_ne!(comp.token_jti, call.token_jti);
    assert_eq!(comp.decision.as_ref().unwrap().effect(), ppb::Effect::Allow);
    assert!(!comp.receipt_id.is_empty());

    let reversals = mock_calls(&mut alice, &run_id, "payments.reverse").await;
    assert_eq!(reversals.len(), 1, "{reversals:#?}");
    assert!(reversals[0].acted);
    assert_eq!(reversals[0].deliveries, 2);
    assert_eq!(reversals[0].idempotency_key, comp.idempotency_key);
    assert_eq!(reversals[0].step_id, "transfer");
    assert_eq!(
        ej::struct_json(reversals[0].args.as_ref().unwrap()).unwrap(),
        json!({"transfer_id": "tr_acct_bob", "amount": 100})
    );
    assert_eq!(
        mock_calls(&mut alice, &run_id, "payments.transfer")
            .await
            .len(),
        1
    );
    assert!(
        mock_calls(&mut alice, &run_id, "notify.send")
            .await
            .is_empty()
    );

    // The journal names the compensation; its receipt and the run's verify.
    let history = alice
        .orch
        .list_run_history(pb::ListRunHistoryRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let types: Vec<&str> = history.iter().map(|e| e.r#type.as_str()).collect();
    assert!(types.contains(&"step.compensated"), "{types:?}");
    assert_eq!(types.last(), Some(&"run.cancelled"), "{types:?}");
    verify_offline(&app, &run_id, &comp.receipt_id).await;
    verify_offline(&app, &run_id, &run.receipt_id).await;

    // Cancelling again changes nothing: the reversal acted once.
    let _ = alice
        .orch
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
            reason: "again".into(),
            etag: String::new(),
        })
        .await;
    let reversals = mock_calls(&mut alice, &run_id, "payments.reverse").await;
    assert_eq!(reversals.len(), 1);
    assert_eq!(reversals[0].deliveries, 2);

    // A compensation the policy denies is not called; the step says so.
    let run_id = start_and_cancel(&mut alice, &plan_hash, 9000, "pay-2").await;
    let run = wait_for(&mut alice, &run_id, |r| {
        r.state == pb::RunState::Cancelled as i32
    })
    .await;
    let transfer = step(&run, "transfer");
    assert_eq!(
        transfer.state(),
        pb::StepState::CompensationFailed,
        "{run:#?}"
    );
    assert!(
        transfer.state_reason.contains("reversals above 5,000"),
        "{}",
        transfer.state_reason
    );
    let comp = &transfer.compensation_attempts[0];
    assert_eq!(comp.state(), pb::AttemptState::Failed);
    let decision = comp.decision.as_ref().unwrap();
    assert_eq!(decision.effect(), ppb::Effect::Deny);
    assert_eq!(
        decision.matched_rules[0].rule.as_ref().unwrap().rule,
        "no-big-reversal"
    );
    assert!(
        mock_calls(&mut alice, &run_id, "payments.reverse")
            .await
            .is_empty()
    );
    verify_offline(&app, &run_id, &comp.receipt_id).await;

    // Killed while compensating: the step stays on record as a
    // compensation that did not finish, its attempt abandoned.
    let run_id = start_and_cancel(&mut alice, &plan_hash, 200, "pay-3").await;
    wait_for(&mut alice, &run_id, |r| {
        r.steps[0].state == pb::StepState::Compensating as i32
    })
    .await;
    alice
        .orch
        .kill_run(pb::KillRunRequest {
            run_id: run_id.clone(),
            reason: "stop everything".into(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let run = get(&mut alice, &run_id).await;
    assert_eq!(run.state(), pb::RunState::Cancelled);
    assert!(run.killed);
    let transfer = step(&run, "transfer");
    assert_eq!(
        transfer.state(),
        pb::StepState::CompensationFailed,
        "{run:#?}"
    );
    assert!(transfer.state_reason.contains("killed"), "{transfer:#?}");
    assert!(
        transfer
            .compensation_attempts
            .iter()
            .all(|a| a.state() != pb::AttemptState::Running),
        "{transfer:#?}"
    );
}
