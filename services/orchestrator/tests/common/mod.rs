//! The platform `anumate dev` composes, served over gRPC for the
//! orchestrator's integration tests, and the calls they share.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

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
use anumate_service::ServiceModule;
use anumate_testing::{Backend, DevAuth, ModuleServer, TestDb};
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub type Authed = InterceptedService<Channel, BearerToken>;

pub const TENANT: &str = "acme";

pub struct TestApp {
    pub server: Option<ModuleServer>,
    pub auth: DevAuth,
    pub keys_dir: std::path::PathBuf,
    pub _db: TestDb,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.handle.abort();
        }
    }
}

pub fn modules() -> Vec<Box<dyn ServiceModule>> {
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

/// The composition `anumate dev` runs, on `backend`, with the orchestrator
/// polling fast (approvals every 100 ms).
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(
        backend,
        json!({"orchestrator": {"poll_ms": 50, "approval_poll_ms": 100}}),
    )
    .await
}

/// The composition with `config` as the server's configuration.
pub async fn spawn_app_with(backend: Backend, config: Value) -> TestApp {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
    let anumate_testing::Composed { server, auth, db } = anumate_testing::compose(
        backend,
        anumate_events::MIGRATIONS,
        &modules(),
        config,
        "orchestrator",
    )
    .await;
    let keys_dir = auth.dir.path().join("keys");
    TestApp {
        server: Some(server),
        auth,
        keys_dir,
        _db: db,
    }
}

pub struct Clients {
    pub orch: pb::orchestrator_service_client::OrchestratorServiceClient<Authed>,
    pub registry: rpb::registry_service_client::RegistryServiceClient<Authed>,
    pub tools: rpb::tools_service_client::ToolsServiceClient<Authed>,
    pub policy: ppb::policy_service_client::PolicyServiceClient<Authed>,
    pub compiler: cpb::compiler_service_client::CompilerServiceClient<Authed>,
    pub ghostrun: gpb::ghost_run_service_client::GhostRunServiceClient<Authed>,
    pub approvals: apb::approvals_service_client::ApprovalsServiceClient<Authed>,
    pub hub: conpb::connector_hub_service_client::ConnectorHubServiceClient<Authed>,
    pub receipts: rcpb::receipts_service_client::ReceiptsServiceClient<Authed>,
}

impl TestApp {
    pub async fn as_user(&self, subject: &str, roles: &[Role]) -> Clients {
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
    pub async fn alice(&self) -> Clients {
        self.as_user(
            "user:alice",
            &[Role::Operator, Role::Approver, Role::Auditor],
        )
        .await
    }
}

/// Pushes the tools, the policy and the capsule; compiles; returns the plan hash.
pub async fn seed(app: &TestApp, tools: &str, policy: &str, capsule: &str) -> String {
    let mut admin = app.as_user("user:root", &[Role::Admin]).await;
    admin
        .tools
        .push_tools(rpb::PushToolsRequest {
            source_yaml: tools.into(),
            source_name: "tools.yaml".into(),
        })
        .await
        .unwrap();
    admin
        .policy
        .push_policy(ppb::PushPolicyRequest {
            source: policy.into(),
            source_name: "transfer.policy".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    admin
        .registry
        .push_capsule(rpb::PushCapsuleRequest {
            source_yaml: capsule.into(),
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

pub fn inputs(v: Value) -> Option<pbjson_types::Struct> {
    Some(ej::to_struct(&v))
}

pub async fn preflight(c: &mut Clients, plan_hash: &str, v: Value) -> gpb::PreflightReport {
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

pub fn execute(plan_hash: &str, v: Value, preflight: &str, key: &str) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        plan_hash: plan_hash.into(),
        inputs: inputs(v),
        preflight_id: preflight.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// The mock tool `tool`'s effects for `run_id`, one per idempotency key.
pub async fn mock_calls(c: &mut Clients, run_id: &str, tool: &str) -> Vec<conpb::MockCall> {
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

pub async fn get(c: &mut Clients, run_id: &str) -> pb::Run {
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
pub async fn wait_for(c: &mut Clients, run_id: &str, done: impl Fn(&pb::Run) -> bool) -> pb::Run {
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

pub fn step<'a>(run: &'a pb::Run, id: &str) -> &'a pb::StepRun {
    run.steps.iter().find(|s| s.step_id == id).unwrap()
}

/// Verifies receipt `id` of `run_id` offline: signature, inclusion proof
/// (waiting for the checkpoint that covers it) and checkpoint.
pub async fn verify_offline(app: &TestApp, run_id: &str, id: &str) {
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
