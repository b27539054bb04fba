#![allow(clippy::unwrap_used, clippy::expect_used)]
//! GhostRun driven like a client drives it: real gRPC over TCP behind the real
//! authentication layer, with the real registry, policy service and compiler
//! in the same server, on SQLite and PostgreSQL. Reports are compared with the
//! golden reports under `tests/golden/preflight/` (the same file for both
//! backends: determinism across them); `UPDATE_GOLDEN=1` rewrites them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anumate_auth::{BearerToken, DevIssuer, Role};
use anumate_compiler::{Compiler, CompilerConfig, CompilerGrpc, Upstreams};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_engine::json as ej;
use anumate_errors::{ErrorCode, Reason};
use anumate_ghostrun::{GhostRun, GhostRunConfig, GhostRunGrpc};
use anumate_policy_service::{Policies, PolicyConfig, PolicyGrpc};
use anumate_proto::ghostrun::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_registry::{
    Registry, RegistryConfig, RegistryGrpc, TenantSettingsGrpc, TenantSettingsStore, ToolsGrpc,
};
use anumate_service::clients::Grpc;
use anumate_testing::{
    self as testing, Backend, DevAuth, Store, TestDb, expect_error, expect_reason, on_both_backends,
};
use pb::ghost_run_service_client::GhostRunServiceClient;
use ppb::policy_service_client::PolicyServiceClient;
use rpb::registry_service_client::RegistryServiceClient;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Intercepted = InterceptedService<Channel, BearerToken>;

const POLICIES: &str = include_str!("../../../examples/refund.policy");
const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";

/// The refund example, reading the order from the HTTP body, in `currency`.
fn capsule(name: &str, currency: &str) -> String {
    format!(
        r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: {name}
spec:
  inputs:
    order_id:     {{type: string, required: true, pattern: "^ord_[a-z0-9]+$"}}
    amount_paise: {{type: integer, required: true, minimum: 1}}
  tools: [http.get, payments.refund, email.send]
  policies: [refund-limits, pii-masking]
  steps:
    - id: fetch-order
      tool: http.get
      with: {{url: "https://orders.example/v1/orders/${{{{ inputs.order_id }}}}"}}
      retry: {{max_attempts: 3, backoff: exponential, initial: 1s}}
    - id: refund
      tool: payments.refund
      needs: [fetch-order]
      if: "${{{{ steps.fetch-order.output.body.status == 'paid' }}}}"
      with: {{order_id: "${{{{ inputs.order_id }}}}", amount: "${{{{ inputs.amount_paise }}}}", currency: {currency}}}
    - id: notify
      tool: email.send
      needs: [refund]
      with: {{to: "${{{{ steps.fetch-order.output.body.email }}}}", template: refund-done}}
"#
    )
}

struct TestApp {
    addr: SocketAddr,
    /// The loader the orchestrator would build its engines with, over the
    /// same upstreams as this GhostRun (in process only).
    loader: Option<anumate_ghostrun::Loader>,
    issuer: DevIssuer,
    store: Store,
    server: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.server.abort();
    }
}

/// How GhostRun reaches the compiler, the policy service and the tenant
/// settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wiring {
    /// In this process, as `anumate dev` and `serve all` compose them.
    InProcess,
    /// Over gRPC on the server's own listener (the mesh, one service per process).
    Mesh,
    /// Compiler and policy in this process, the tenant settings over gRPC at
    /// an address nothing listens on.
    SettingsDown,
}

async fn spawn_mesh(backend: Backend) -> TestApp {
    spawn_wired(backend, Wiring::Mesh).await
}

async fn spawn_settings_down(backend: Backend) -> TestApp {
    spawn_wired(backend, Wiring::SettingsDown).await
}

async fn spawn_app(backend: Backend) -> TestApp {
    spawn_wired(backend, Wiring::InProcess).await
}

async fn spawn_wired(backend: Backend, wiring: Wiring) -> TestApp {
    let mut migrations = anumate_registry::migrations();
    migrations.extend(anumate_policy_service::REPO_MIGRATIONS.iter().copied());
    migrations.extend(anumate_compiler::REPO_MIGRATIONS.iter().copied());
    migrations.extend(anumate_ghostrun::REPO_MIGRATIONS.iter().copied());
    let (db, store) = testing::migrated_store(backend, &migrations).await;
    let DevAuth {
        issuer,
        authenticator: auth,
        dir: issuer_dir,
        ..
    } = DevAuth::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let own = format!("http://{addr}");
    let registry = Registry::new(
        store.clone(),
        Arc::new(KeyRing::new(KeyPair::generate().unwrap())),
        &RegistryConfig::default(),
    );
    let policies = Policies::new(store.clone(), &PolicyConfig::default());
    let settings = TenantSettingsStore::new(store.clone());
    let cancel = CancellationToken::new();
    let (followed, token) = (settings.clone(), cancel.clone());
    tokio::spawn(async move { followed.follow_changes(token).await });
    let channel = anumate_service::clients::channel("own", &own).unwrap();
    let grpc = Arc::new(Grpc::new(channel));
    let cfg = GhostRunConfig {
        policy_env: [("stage".to_string(), json!("prod"))].into(),
        ..GhostRunConfig::default()
    };
    let mut loader = None;
    let (compiler, ghostrun) = match wiring {
        Wiring::InProcess | Wiring::SettingsDown => {
            let compiler = Compiler::new(
                store.clone(),
                Upstreams::new(Arc::new(registry.clone()), Arc::new(policies.clone())),
                &CompilerConfig::default(),
            )
            .unwrap();
            loader = Some(anumate_ghostrun::Loader::new(
                Arc::new(compiler.clone()),
                Arc::new(policies.clone()),
                Some(Arc::new(registry.clone())),
                &cfg.policy_env,
            ));
            let ghostrun = GhostRun::new(
                store.clone(),
                Arc::new(compiler.clone()),
                Arc::new(policies.clone()),
                cfg,
            )
            .with_registry(Arc::new(registry.clone()))
            .with_settings(if wiring == Wiring::InProcess {
                Arc::new(settings.clone())
            } else {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                let down = format!("http://127.0.0.1:{port}");
                Arc::new(Grpc::new(
                    anumate_service::clients::channel("down", &down).unwrap(),
                ))
            });
            (compiler, ghostrun)
        }
        Wiring::Mesh => {
            let compiler = Compiler::new(
                store.clone(),
                Upstreams::lazy(&own, &own).unwrap(),
                &CompilerConfig::default(),
            )
            .unwrap();
            let ghostrun = GhostRun::new(store.clone(), grpc.clone(), grpc.clone(), cfg)
                .with_registry(grpc.clone())
                .with_settings(grpc);
            (compiler, ghostrun)
        }
    };
    let (_, server) = testing::serve_on(
        listener,
        auth,
        Routes::new(ToolsGrpc::new(registry.tools().clone()).into_server())
            .add_service(RegistryGrpc::new(registry).into_server())
            .add_service(TenantSettingsGrpc::new(settings).into_server())
            .add_service(PolicyGrpc::new(policies).into_server())
            .add_service(CompilerGrpc::new(compiler).into_server())
            .add_service(GhostRunGrpc::new(ghostrun).into_server()),
    );
    TestApp {
        addr,
        loader,
        issuer,
        store,
        server,
        cancel,
        _db: db,
        _issuer_dir: issuer_dir,
    }
}

struct Clients {
    ghostrun: GhostRunServiceClient<Intercepted>,
    registry: RegistryServiceClient<Intercepted>,
    policy: PolicyServiceClient<Intercepted>,
}

impl TestApp {
    async fn clients(&self, tenant: &str, roles: &[Role]) -> Clients {
        let token = self
            .issuer
            .mint(tenant, "alice", roles, Duration::from_secs(300))
            .unwrap();
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let t = || BearerToken(token.clone());
        Clients {
            ghostrun: GhostRunServiceClient::with_interceptor(channel.clone(), t()),
            registry: RegistryServiceClient::with_interceptor(channel.clone(), t()),
            policy: PolicyServiceClient::with_interceptor(channel, t()),
        }
    }

    async fn events(&self, tenant: &str) -> Vec<(String, String)> {
        let tx = self.store.read(tenant).await.unwrap();
        anumate_events::read_after(&tx, 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.event_type.contains("preflight"))
            .map(|r| (r.event_type, r.subject))
            .collect()
    }
}

async fn seed(app: &TestApp, tenant: &str) {
    let mut c = app.clients(tenant, &[Role::Admin]).await;
    let split = POLICIES.find("policy \"pii-masking\"").unwrap();
    for source in [&POLICIES[..split], &POLICIES[split..]] {
        c.policy
            .push_policy(ppb::PushPolicyRequest {
                source: source.into(),
                source_name: "refund.policy".into(),
                etag: String::new(),
                publish: true,
            })
            .await
            .unwrap();
    }
    for (name, currency) in [("refund-inr", "INR"), ("refund-usd", "USD")] {
        c.registry
            .push_capsule(rpb::PushCapsuleRequest {
                source_yaml: capsule(name, currency),
                source_name: "capsule.yaml".into(),
                etag: String::new(),
                publish: true,
            })
            .await
            .unwrap();
    }
}

fn inputs(v: Value) -> Option<pbjson_types::Struct> {
    Some(ej::to_struct(&v))
}

fn by_capsule(name: &str, v: Value) -> pb::PreflightRequest {
    pb::PreflightRequest {
        capsule_name: name.into(),
        inputs: inputs(v),
        ..Default::default()
    }
}

fn paid_order() -> pb::Fixture {
    pb::Fixture {
        step_id: "fetch-order".into(),
        result: Some(pb::fixture::Result::Output(ej::to_value(&json!({
            "status": 200,
            "body": {"status": "paid", "email": "asha@example.com"}
        })))),
        ..Default::default()
    }
}

fn outcomes(r: &pb::PreflightReport) -> Vec<(String, pb::StepOutcome)> {
    r.steps
        .iter()
        .map(|s| (s.step_id.clone(), s.outcome()))
        .collect()
}

/// The report without what depends on when and where it was stored.
fn normalized(r: &pb::PreflightReport) -> Value {
    let bare = pb::PreflightReport {
        preflight_id: String::new(),
        report_hash: String::new(),
        create_time: None,
        citation_expire_time: None,
        evaluation_time: None,
        ..r.clone()
    };
    anumate_ghostrun::report::canonical(&bare).unwrap()
}

/// Compares with (or, with `UPDATE_GOLDEN=1`, writes) a golden report.
fn golden(name: &str, r: &pb::PreflightReport) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/preflight")
        .join(format!("{name}.json"));
    let got = serde_json::to_string_pretty(&normalized(r)).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    assert_eq!(got, want, "golden report {name} changed");
}

on_both_backends! {
    reports => reports_sqlite, reports_postgres;
    labels_and_env => labels_and_env_sqlite, labels_and_env_postgres;
    bad_input => bad_input_sqlite, bad_input_postgres;
    tenancy => tenancy_sqlite, tenancy_postgres;
    citation_ttl => citation_ttl_sqlite, citation_ttl_postgres;
}

on_both_backends! {
    spawn = spawn_mesh;
    reports => mesh_reports_sqlite, mesh_reports_postgres;
    labels_and_env => mesh_labels_and_env_sqlite, mesh_labels_and_env_postgres;
    citation_ttl => mesh_citation_ttl_sqlite, mesh_citation_ttl_postgres;
}

on_both_backends! {
    spawn = spawn_settings_down;
    settings_unreachable => settings_unreachable_sqlite, settings_unreachable_postgres;
}

/// Seconds between a report's creation and the end of its citation.
fn citable_for(r: &pb::PreflightReport) -> i64 {
    r.citation_expire_time.unwrap().seconds - r.create_time.unwrap().seconds
}

/// A report is citable for its tenant's `preflight_citation_ttl` as set when
/// it was made: 1 h by default, what an admin set afterwards, while another
/// tenant keeps the default and older reports keep theirs.
async fn citation_ttl(app: TestApp) {
    use rpb::tenant_settings_service_client::TenantSettingsServiceClient;
    seed(&app, TENANT_A).await;
    seed(&app, TENANT_B).await;
    let small = || {
        by_capsule(
            "refund-inr",
            json!({"order_id": "ord_1", "amount_paise": 5}),
        )
    };
    let mut a = app.clients(TENANT_A, &[Role::Operator]).await;
    let before = a
        .ghostrun
        .preflight(small())
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert!(before.citable);
    assert_eq!(citable_for(&before), 3600);

    let token = app
        .issuer
        .mint(TENANT_A, "root", &[Role::Admin], Duration::from_secs(300))
        .unwrap();
    let channel = Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut settings = TenantSettingsServiceClient::with_interceptor(channel, BearerToken(token));
    settings
        .update_tenant_settings(rpb::UpdateTenantSettingsRequest {
            settings: Some(rpb::TenantSettings {
                preflight_citation_ttl: Some(pbjson_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: Some(pbjson_types::FieldMask {
                paths: vec!["preflight_citation_ttl".into()],
            }),
            etag: String::new(),
        })
        .await
        .unwrap();

    let after = a
        .ghostrun
        .preflight(small())
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(citable_for(&after), 600, "the tenant's new setting");
    let stored = a
        .ghostrun
        .get_preflight(pb::GetPreflightRequest {
            preflight_id: before.preflight_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(
        citable_for(&stored),
        3600,
        "a stored report keeps its expiry"
    );

    let mut b = app.clients(TENANT_B, &[Role::Operator]).await;
    let other = b
        .ghostrun
        .preflight(small())
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(
        citable_for(&other),
        3600,
        "another tenant keeps the default"
    );
}

/// When the tenant's settings cannot be read, no report is made (rather than
/// one citable for longer than the tenant allows): `UNAVAILABLE` naming
/// them, nothing stored, and the service keeps serving reads.
async fn settings_unreachable(app: TestApp) {
    seed(&app, TENANT_A).await;
    let mut c = app.clients(TENANT_A, &[Role::Operator]).await;
    let status = c
        .ghostrun
        .preflight(by_capsule(
            "refund-inr",
            json!({"order_id": "ord_1", "amount_paise": 5}),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("tenant settings"), "{status:?}");
    assert_eq!(count(&mut c).await, 0);
    assert!(app.events(TENANT_A).await.is_empty());
}

async fn reports(app: TestApp) {
    seed(&app, TENANT_A).await;
    let mut c = app.clients(TENANT_A, &[Role::Operator]).await;
    let small = json!({"order_id": "ord_1", "amount_paise": 1000});

    // Generated output: the HTTP body has no status, so the `if` is false and
    // everything downstream is skipped. A clean PASS, citable for an hour.
    let pass = c
        .ghostrun
        .preflight(by_capsule("refund-inr", small.clone()))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(pass.verdict(), pb::PreflightVerdict::Pass);
    assert_eq!(
        outcomes(&pass),
        [
            ("fetch-order".to_string(), pb::StepOutcome::Runs),
            ("refund".to_string(), pb::StepOutcome::SkippedByCondition),
            ("notify".to_string(), pb::StepOutcome::SkippedUpstream),
        ]
    );
    assert_eq!(pass.steps[0].output_source(), pb::OutputSource::Schema);
    assert!(pass.citable && pass.fixtures_hash.is_empty());
    let expires = pass.citation_expire_time.unwrap().seconds - pass.create_time.unwrap().seconds;
    assert_eq!(expires, 3600);
    assert_eq!(pass.inputs_hash, anumate_crypto::content_hash(&small).1);
    assert_eq!(pass.principal.as_ref().unwrap().id, "alice");
    assert_eq!(
        pass.simulator_version,
        anumate_engine::sim::SIMULATOR_VERSION
    );
    assert_eq!(
        pass.report_hash,
        anumate_ghostrun::report::report_hash(&pass).unwrap()
    );
    golden("refund-skipped", &pass);

    // A fixture makes the order paid: the big refund waits for a finance
    // lead (WARN), the customer e-mail is redacted, fixtures make it uncitable.
    let big = json!({"order_id": "ord_1", "amount_paise": 900000});
    let warn = c
        .ghostrun
        .preflight(pb::PreflightRequest {
            plan_hash: pass.plan_hash.replace("sha256:", "sha256-"),
            inputs: inputs(big),
            fixtures: vec![paid_order()],
            seed: 7,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(warn.verdict(), pb::PreflightVerdict::Warn);
    assert_eq!(
        outcomes(&warn),
        [
            ("fetch-order".to_string(), pb::StepOutcome::Runs),
            ("refund".to_string(), pb::StepOutcome::WaitsForApproval),
            ("notify".to_string(), pb::StepOutcome::Runs),
        ]
    );
    assert_eq!(warn.approvals_needed.len(), 1);
    let need = &warn.approvals_needed[0];
    let stage = &need.obligation.as_ref().unwrap().stages[0];
    assert_eq!(need.step_id, "refund");
    assert_eq!(
        (stage.approvers.clone(), stage.quorum),
        (vec!["group:finance-leads".to_string()], 1)
    );
    let to = &warn.steps[2].args.as_ref().unwrap().fields["to"];
    assert_eq!(ej::value_json(to, 1).unwrap(), json!("[REDACTED]"));
    assert!(!warn.citable && warn.citation_expire_time.is_none());
    assert!(warn.fixtures_hash.starts_with("sha256:"));
    let risk = warn.risk.as_ref().unwrap();
    let codes: Vec<&str> = risk.factors.iter().map(|f| f.code.as_str()).collect();
    assert!(
        codes.contains(&"APPROVAL_REQUIRED") && codes.contains(&"DESTRUCTIVE_TOOL"),
        "{codes:?}"
    );
    golden("refund-approval", &warn);

    // Only INR refunds are automated: a USD refund is denied, FAIL.
    let fail = c
        .ghostrun
        .preflight(pb::PreflightRequest {
            capsule_name: "refund-usd".into(),
            capsule_version: "1".into(),
            inputs_json: r#"{"order_id": "ord_9", "amount_paise": 9007199254740993}"#.into(),
            fixtures: vec![paid_order()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(fail.verdict(), pb::PreflightVerdict::Fail);
    assert_eq!(fail.steps[1].outcome(), pb::StepOutcome::Denied);
    assert_eq!(fail.steps[2].outcome(), pb::StepOutcome::SkippedUpstream);
    assert!(
        fail.issues
            .iter()
            .any(|i| i.code == "POLICY_DENIED" && i.step_id == "refund")
    );
    // Integers beyond 2^53 survive as JSON text.
    let exact: Value =
        serde_json::from_str(r#"{"order_id": "ord_9", "amount_paise": 9007199254740993}"#).unwrap();
    assert_eq!(fail.inputs_hash, anumate_crypto::content_hash(&exact).1);
    golden("refund-denied", &fail);

    // Same request, same report (but for the time it ran).
    let again = c
        .ghostrun
        .preflight(by_capsule("refund-inr", small))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(normalized(&again), normalized(&pass));
    assert_ne!(again.preflight_id, pass.preflight_id);

    // Stored, listed newest first without steps, filtered, paged.
    let got = c
        .ghostrun
        .get_preflight(pb::GetPreflightRequest {
            preflight_id: warn.preflight_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(normalized(&got), normalized(&warn));
    assert_eq!(got.report_hash, warn.report_hash);
    let list = c
        .ghostrun
        .list_preflights(pb::ListPreflightsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.reports.len(), 2);
    assert!(list.reports.iter().all(|r| r.steps.is_empty()));
    assert_eq!(list.reports[0].preflight_id, again.preflight_id);
    let rest = c
        .ghostrun
        .list_preflights(pb::ListPreflightsRequest {
            page_size: 2,
            page_token: list.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.reports.len(), 2);
    assert!(rest.next_page_token.is_empty());
    let fails = c
        .ghostrun
        .list_preflights(pb::ListPreflightsRequest {
            verdict: pb::PreflightVerdict::Fail as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fails.reports.len(), 1);
    assert_eq!(fails.reports[0].preflight_id, fail.preflight_id);
    let risky = c
        .ghostrun
        .list_preflights(pb::ListPreflightsRequest {
            min_risk_level: pb::RiskLevel::High as i32,
            plan_hash: pass.plan_hash.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = risky
        .reports
        .iter()
        .map(|r| r.preflight_id.as_str())
        .collect();
    assert_eq!(ids, [warn.preflight_id.as_str()]);

    // One preflight.completed event per report, in the same transaction.
    let events = app.events(TENANT_A).await;
    assert_eq!(events.len(), 4);
    assert!(
        events
            .iter()
            .all(|(t, _)| t == "dev.anumate.preflight.completed.v1")
    );
    assert_eq!(events[0].1, format!("preflights/{}", pass.preflight_id));

    // Fixtures script "fail N times, then succeed" within the step's retries
    // (fetch-order may make 3 attempts); one failure more and the step fails.
    let flaky = |n: i32| pb::Fixture {
        fail_times: n,
        ..paid_order()
    };
    let retried = c
        .ghostrun
        .preflight(pb::PreflightRequest {
            fixtures: vec![flaky(2)],
            ..by_capsule(
                "refund-inr",
                json!({"order_id": "ord_1", "amount_paise": 5}),
            )
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    // A small refund runs without approval: destructive, so a WARN.
    assert_eq!(retried.verdict(), pb::PreflightVerdict::Warn);
    assert!(
        retried
            .issues
            .iter()
            .any(|i| i.code == "DESTRUCTIVE_WITHOUT_APPROVAL" && i.step_id == "refund")
    );
    assert_eq!(
        (retried.steps[0].outcome(), retried.steps[0].attempts),
        (pb::StepOutcome::Runs, 3)
    );
    assert_eq!(retried.steps[1].outcome(), pb::StepOutcome::Runs);
    let failed = c
        .ghostrun
        .preflight(pb::PreflightRequest {
            fixtures: vec![flaky(3)],
            ..by_capsule(
                "refund-inr",
                json!({"order_id": "ord_1", "amount_paise": 5}),
            )
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(failed.verdict(), pb::PreflightVerdict::Fail);
    assert_eq!(
        outcomes(&failed),
        [
            ("fetch-order".to_string(), pb::StepOutcome::Fails),
            ("refund".to_string(), pb::StepOutcome::SkippedUpstream),
            ("notify".to_string(), pb::StepOutcome::SkippedUpstream),
        ]
    );
    assert_eq!(failed.steps[0].error.as_ref().unwrap().code, "TIMEOUT");
    assert!(failed.issues.iter().any(|i| i.code == "TOOL_FAILED"));
}

async fn count(c: &mut Clients) -> usize {
    c.ghostrun
        .list_preflights(pb::ListPreflightsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .reports
        .len()
}

async fn bad_input(app: TestApp) {
    seed(&app, TENANT_A).await;
    let mut c = app.clients(TENANT_A, &[Role::Operator]).await;

    // Inputs not matching the schema: one violation per field.
    let e = expect_reason(
        c.ghostrun
            .preflight(by_capsule(
                "refund-inr",
                json!({"order_id": "ORD-1", "amount_paise": 0}),
            ))
            .await,
        Reason::PreflightInputsInvalid,
    );
    let got: Vec<(String, String)> = e
        .violations
        .iter()
        .map(|v| (v.field.clone(), v.description.clone()))
        .collect();
    assert_eq!(
        got,
        [
            ("inputs.amount_paise".to_string(), "must be ≥ 1".to_string()),
            (
                "inputs.order_id".to_string(),
                "must match /^ord_[a-z0-9]+$/".to_string()
            ),
        ]
    );
    let e = expect_reason(
        c.ghostrun
            .preflight(by_capsule("refund-inr", json!({})))
            .await,
        Reason::PreflightInputsInvalid,
    );
    assert_eq!(e.violations.len(), 2);

    // Fixtures for an unknown step, an unused tool, or of the wrong shape.
    let ok = json!({"order_id": "ord_1", "amount_paise": 5});
    let with = |f: pb::Fixture| pb::PreflightRequest {
        fixtures: vec![f],
        ..by_capsule("refund-inr", ok.clone())
    };
    let e = expect_reason(
        c.ghostrun
            .preflight(with(pb::Fixture {
                step_id: "fetch".into(),
                ..paid_order()
            }))
            .await,
        Reason::PreflightFixtureInvalid,
    );
    assert_eq!(e.violations[0].field, "fixtures[0].step_id");
    assert!(e.violations[0].description.contains("fetch-order"), "{e:?}");
    let e = expect_reason(
        c.ghostrun
            .preflight(with(pb::Fixture {
                step_id: String::new(),
                tool: "http.post".into(),
                ..paid_order()
            }))
            .await,
        Reason::PreflightFixtureInvalid,
    );
    assert_eq!(e.violations[0].field, "fixtures[0].tool");
    let e = expect_reason(
        c.ghostrun
            .preflight(with(pb::Fixture {
                result: Some(pb::fixture::Result::Output(ej::to_value(
                    &json!({"status": "paid"}),
                ))),
                ..paid_order()
            }))
            .await,
        Reason::PreflightFixtureInvalid,
    );
    assert_eq!(e.violations[0].field, "fixtures[0].output.status");

    // Which plan: exactly one of hash and capsule; hashes well formed.
    let e = expect_error(
        c.ghostrun.preflight(pb::PreflightRequest::default()).await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "plan_hash");
    let e = expect_error(
        c.ghostrun
            .preflight(pb::PreflightRequest {
                plan_hash: "sha256:nothex".into(),
                ..Default::default()
            })
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "plan_hash");
    expect_reason(
        c.ghostrun
            .preflight(pb::PreflightRequest {
                plan_hash: format!("sha256:{}", "0".repeat(64)),
                ..Default::default()
            })
            .await,
        Reason::PlanNotFound,
    );
    expect_reason(
        c.ghostrun
            .preflight(by_capsule("no-such-capsule", ok.clone()))
            .await,
        Reason::CapsuleNotFound,
    );
    let e = expect_error(
        c.ghostrun
            .preflight(pb::PreflightRequest {
                inputs_json: "[1]".into(),
                ..by_capsule("refund-inr", ok.clone())
            })
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "inputs_json");

    // Listing: malformed token or hash named.
    for (req, field) in [
        (
            pb::ListPreflightsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListPreflightsRequest {
                plan_hash: "nothex".into(),
                ..Default::default()
            },
            "plan_hash",
        ),
    ] {
        let e = expect_error(
            c.ghostrun.list_preflights(req).await,
            ErrorCode::InvalidArgument,
        );
        assert_eq!(e.violations[0].field, field);
    }

    // Nothing stored, no event; the service keeps serving.
    assert_eq!(count(&mut c).await, 0);
    assert!(app.events(TENANT_A).await.is_empty());
    let r = c
        .ghostrun
        .preflight(by_capsule("refund-inr", ok))
        .await
        .unwrap();
    assert!(r.into_inner().report.is_some());
    expect_reason(
        c.ghostrun
            .get_preflight(pb::GetPreflightRequest {
                preflight_id: "0196f0f0-0000-7000-8000-000000000000".into(),
            })
            .await,
        Reason::PreflightNotFound,
    );
}

async fn tenancy(app: TestApp) {
    seed(&app, TENANT_A).await;
    let mut a = app.clients(TENANT_A, &[Role::Operator]).await;
    let report = a
        .ghostrun
        .preflight(by_capsule(
            "refund-inr",
            json!({"order_id": "ord_1", "amount_paise": 5}),
        ))
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();

    // Another tenant sees nothing of it, and cannot preflight its plan.
    let mut b = app.clients(TENANT_B, &[Role::Admin]).await;
    expect_reason(
        b.ghostrun
            .get_preflight(pb::GetPreflightRequest {
                preflight_id: report.preflight_id.clone(),
            })
            .await,
        Reason::PreflightNotFound,
    );
    assert_eq!(count(&mut b).await, 0);
    expect_reason(
        b.ghostrun
            .preflight(pb::PreflightRequest {
                plan_hash: report.plan_hash.clone(),
                ..Default::default()
            })
            .await,
        Reason::PlanNotFound,
    );

    // Auditors read but do not run.
    let mut auditor = app.clients(TENANT_A, &[Role::Auditor]).await;
    assert_eq!(count(&mut auditor).await, 1);
    expect_error(
        auditor
            .ghostrun
            .preflight(by_capsule(
                "refund-inr",
                json!({"order_id": "ord_1", "amount_paise": 5}),
            ))
            .await,
        ErrorCode::PermissionDenied,
    );
}

/// Policies see the capsule version's `metadata.labels` as `capsule.labels`
/// and `[ghostrun] policy_env` as `env`, and the engine the orchestrator
/// builds through the same loader decides the same on the same call.
async fn labels_and_env(app: TestApp) {
    let mut admin = app.clients(TENANT_A, &[Role::Admin]).await;
    admin
        .policy
        .push_policy(ppb::PushPolicyRequest {
            source: r#"policy "where" {
  rule "payments-in-prod" {
    when capsule.labels.team == "payments" and env.stage == "prod"
    then require_approval(approvers: ["group:leads"], quorum: 1, reason: "payments in prod")
  }
  rule "not-in-staging" {
    when env.stage == "staging"
    then deny(reason: "staging")
  }
}
"#
            .into(),
            source_name: "where.policy".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    let yaml = |name: &str, labels: &str| {
        format!(
            "apiVersion: anumate.dev/v1\nkind: Capsule\nmetadata:\n  name: {name}\n  labels: {labels}\nspec:\n  tools: [http.get]\n  policies: [where]\n  steps:\n    - id: get\n      tool: http.get\n      with: {{url: \"https://example.com\"}}\n"
        )
    };
    for (name, labels) in [("pay", "{team: payments}"), ("ops", "{team: ops}")] {
        admin
            .registry
            .push_capsule(rpb::PushCapsuleRequest {
                source_yaml: yaml(name, labels),
                source_name: "capsule.yaml".into(),
                etag: String::new(),
                publish: true,
            })
            .await
            .unwrap();
    }
    let mut c = app.clients(TENANT_A, &[Role::Operator]).await;
    let mut effects = Vec::new();
    for name in ["pay", "ops"] {
        let r = c
            .ghostrun
            .preflight(by_capsule(name, json!({})))
            .await
            .unwrap()
            .into_inner()
            .report
            .unwrap();
        let d = r.steps[0].decision.clone().unwrap();
        effects.push((name, d.effect(), r.verdict()));
        // The report echoes (and hashes) the env and labels it decided on.
        let env = r.policy_env.clone().expect("the report's policy_env");
        assert_eq!(
            anumate_engine::json::struct_json(&env).unwrap()["stage"],
            json!("prod")
        );
        let team = if name == "pay" { "payments" } else { "ops" };
        assert_eq!(
            r.capsule_labels.get("team").map(String::as_str),
            Some(team),
            "{:?}",
            r.capsule_labels
        );
        if name == "pay" {
            let rule = r.approvals_needed[0]
                .obligation
                .as_ref()
                .unwrap()
                .rule
                .as_ref()
                .unwrap();
            assert_eq!(rule.rule, "payments-in-prod");
            let span = rule.span.as_ref().expect("the approval's rule has a span");
            assert_eq!(
                (
                    span.source_name.as_str(),
                    span.start_line,
                    span.start_column
                ),
                ("where@1", 2, 3)
            );
        }
        // The orchestrator's path: the same loader type, the same context.
        if let Some(loader) = &app.loader {
            let caller = anumate_service::clients::Caller::User {
                tenant: TENANT_A.into(),
                subject: "alice".into(),
                authorization: None,
            };
            let plan = loader.plan(&caller, TENANT_A, &r.plan_hash).await.unwrap();
            let p = r.principal.clone().unwrap();
            let context = loader.context(
                TENANT_A,
                &p.id,
                &p.roles,
                &p.groups,
                r.evaluation_time.unwrap().seconds,
            );
            let engine = loader.engine(&caller, &plan, context).await.unwrap();
            let mut run = engine.start(&json!({})).unwrap();
            let step = run.decide(0).unwrap();
            let anumate_engine::Step::Call { decision, .. } = step else {
                panic!("expected a call, got {step:?}");
            };
            assert_eq!(
                decision.effect == anumate_policy::Effect::RequireApproval,
                d.effect() == ppb::Effect::RequireApproval,
                "{name}: the run decides as the preflight did"
            );
        }
    }
    assert_eq!(
        effects,
        [
            (
                "pay",
                ppb::Effect::RequireApproval,
                pb::PreflightVerdict::Warn
            ),
            ("ops", ppb::Effect::Allow, pb::PreflightVerdict::Pass),
        ]
    );
}
