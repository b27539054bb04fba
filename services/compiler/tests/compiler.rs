#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Compiler driven like a client drives it: real gRPC over TCP behind the
//! real authentication layer, with the real registry and policy service in the
//! same server (as in `anumate dev`), the compiler reaching them through their
//! generated clients, on SQLite and PostgreSQL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anumate_auth::{BearerToken, DevIssuer, Role};
use anumate_compiler::{Compiler, CompilerConfig, CompilerGrpc, Upstreams};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_errors::{Error, ErrorCode, Reason};
use anumate_policy_service::{Policies, PolicyConfig, PolicyGrpc};
use anumate_proto::compiler::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_registry::{Registry, RegistryConfig, RegistryGrpc, ToolsGrpc};
use anumate_testing::{
    self as testing, Backend, DevAuth, Store, TestDb, expect_error, expect_reason, on_both_backends,
};
use pb::compiler_service_client::CompilerServiceClient;
use ppb::policy_service_client::PolicyServiceClient;
use rpb::registry_service_client::RegistryServiceClient;
use rpb::tools_service_client::ToolsServiceClient;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Intercepted = InterceptedService<Channel, BearerToken>;

const CAPSULE: &str = include_str!("../../../examples/refund.capsule.yaml");
const POLICIES: &str = include_str!("../../../examples/refund.policy");
const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";

struct TestApp {
    addr: SocketAddr,
    issuer: DevIssuer,
    store: Store,
    server: tokio::task::JoinHandle<()>,
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn spawn_app(backend: Backend) -> TestApp {
    let mut migrations = anumate_registry::migrations();
    migrations.extend(anumate_policy_service::REPO_MIGRATIONS.iter().copied());
    migrations.extend(anumate_compiler::REPO_MIGRATIONS.iter().copied());
    let (db, store) = testing::migrated_store(backend, &migrations).await;

    let DevAuth {
        issuer,
        authenticator: auth,
        dir: issuer_dir,
        ..
    } = DevAuth::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let own = format!("http://{addr}");
    let registry = Registry::new(
        store.clone(),
        Arc::new(KeyRing::new(KeyPair::generate().expect("key"))),
        &RegistryConfig::default(),
    );
    let policies = Policies::new(store.clone(), &PolicyConfig::default());
    let compiler = Compiler::new(
        store.clone(),
        Upstreams::lazy(&own, &own).expect("upstreams"),
        &CompilerConfig::default(),
    )
    .expect("compiler");
    let (_, server) = testing::serve_on(
        listener,
        auth,
        Routes::new(ToolsGrpc::new(registry.tools().clone()).into_server())
            .add_service(RegistryGrpc::new(registry).into_server())
            .add_service(PolicyGrpc::new(policies).into_server())
            .add_service(CompilerGrpc::new(compiler).into_server()),
    );
    TestApp {
        addr,
        issuer,
        store,
        server,
        _db: db,
        _issuer_dir: issuer_dir,
    }
}

/// Accepted sockets with TCP_NODELAY, as `anumate` serves them (the compiler's
/// upstream calls would otherwise wait ~40 ms each for a delayed ACK).
struct Clients {
    compiler: CompilerServiceClient<Intercepted>,
    registry: RegistryServiceClient<Intercepted>,
    policy: PolicyServiceClient<Intercepted>,
    tools: ToolsServiceClient<Intercepted>,
}

impl TestApp {
    async fn clients(&self, tenant: &str, roles: &[Role]) -> Clients {
        let token = self
            .issuer
            .mint(tenant, "alice", roles, Duration::from_secs(300))
            .expect("mint");
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let t = || BearerToken(token.clone());
        Clients {
            compiler: CompilerServiceClient::with_interceptor(channel.clone(), t()),
            registry: RegistryServiceClient::with_interceptor(channel.clone(), t()),
            tools: ToolsServiceClient::with_interceptor(channel.clone(), t()),
            policy: PolicyServiceClient::with_interceptor(channel, t()),
        }
    }

    async fn event_types(&self, tenant: &str) -> Vec<(String, String)> {
        let tx = self.store.read(tenant).await.expect("read tx");
        anumate_events::read_after(&tx, 0, 1000)
            .await
            .expect("outbox")
            .into_iter()
            .map(|r| (r.event_type, r.subject))
            .collect()
    }
}

fn meta<'a>(e: &'a Error, key: &str) -> &'a str {
    e.metadata
        .iter()
        .find(|(k, _)| k == key)
        .map_or("", |(_, v)| v.as_str())
}

/// Publishes the two example policies and the example capsule as `tenant`.
async fn seed(app: &TestApp, tenant: &str) {
    let mut c = app.clients(tenant, &[Role::Admin]).await;
    push_refund(&mut c).await;
}

/// The refund example's two policies and its capsule, published.
async fn push_refund(c: &mut Clients) {
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
            .expect("push policy");
    }
    push_capsule(c, CAPSULE).await;
}

async fn push_capsule(c: &mut Clients, yaml: &str) -> rpb::CapsuleVersion {
    c.registry
        .push_capsule(rpb::PushCapsuleRequest {
            source_yaml: yaml.into(),
            source_name: "capsule.yaml".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .expect("push capsule")
        .into_inner()
        .version
        .unwrap()
}

fn compile_req(name: &str, version: &str) -> pb::CompileRequest {
    pb::CompileRequest {
        capsule_name: name.into(),
        version: version.into(),
    }
}

on_both_backends! {
    compile_cache_get_list => compile_cache_get_list_sqlite, compile_cache_get_list_postgres;
    bad_input => bad_input_sqlite, bad_input_postgres;
    tenancy_and_roles => tenancy_and_roles_sqlite, tenancy_and_roles_postgres;
    concurrent_compiles => concurrent_compiles_sqlite, concurrent_compiles_postgres;
    tenant_tools => tenant_tools_sqlite, tenant_tools_postgres;
}

/// The example capsule calling the tenant's `orders.lookup` in its first step.
fn capsule_with_own_tool() -> String {
    CAPSULE
        .replace("tools: [http.get,", "tools: [orders.lookup,")
        .replace("tool: http.get", "tool: orders.lookup")
        .replace(
            "with: {url: \"https://orders.example/v1/orders/${{ inputs.order_id }}\"}",
            "with: {order_id: \"${{ inputs.order_id }}\"}",
        )
}

async fn push_tools(c: &mut Clients, yaml: &str) -> Vec<rpb::PushedTool> {
    c.tools
        .push_tools(rpb::PushToolsRequest {
            source_yaml: yaml.into(),
            source_name: "tools.yaml".into(),
        })
        .await
        .expect("push tools")
        .into_inner()
        .tools
}

/// A capsule using a tenant's tool compiles against its current version:
/// the plan names the version and hash, and changing the tool changes the
/// plan. A tenant's tool replaces a built-in of its name for that tenant only.
async fn tenant_tools(app: TestApp) {
    const TOOLS: &str = include_str!("../../../examples/tools.yaml");
    let mut admin = app.clients(TENANT_A, &[Role::Admin]).await;
    push_refund(&mut admin).await;
    let own = capsule_with_own_tool();
    push_capsule(&mut admin, &own).await;

    // Not declared yet: compiling says which tool is missing.
    let e = expect_reason(
        admin
            .compiler
            .compile(compile_req("refund-small-orders", ""))
            .await,
        Reason::ToolNotDeclared,
    );
    assert_eq!(meta(&e, "tools"), "orders.lookup");

    let pushed = push_tools(&mut admin, TOOLS).await;
    let lookup = pushed[1].version.clone().unwrap();
    let compile = |c: &mut Clients| {
        let mut compiler = c.compiler.clone();
        async move {
            compiler
                .compile(compile_req("refund-small-orders", ""))
                .await
                .expect("compile")
                .into_inner()
        }
    };
    let first = compile(&mut admin).await;
    assert!(!first.cache_hit);
    let plan = first.plan.unwrap();
    let binding = plan
        .tool_bindings
        .iter()
        .find(|b| b.tool == "orders.lookup")
        .unwrap();
    assert_eq!(binding.tool_version, "1");
    assert_eq!(binding.tool_hash, lookup.content_hash);
    assert_eq!(binding.connector, "mock");
    assert_eq!(binding.side_effect, pb::SideEffect::Read as i32);
    // Built-ins keep their declaration and carry no hash.
    let refund = plan
        .tool_bindings
        .iter()
        .find(|b| b.tool == "payments.refund")
        .unwrap();
    assert!(refund.tool_hash.is_empty());
    assert!(compile(&mut admin).await.cache_hit);

    // A new version of the tool is a new plan naming it.
    let changed = TOOLS.replace("latency: 20ms", "latency: 25ms");
    let v2 = push_tools(&mut admin, &changed).await[1]
        .version
        .clone()
        .unwrap();
    assert_eq!(v2.version, 2);
    let second = compile(&mut admin).await;
    assert!(!second.cache_hit);
    let second = second.plan.unwrap();
    assert_ne!(second.plan_hash, plan.plan_hash);
    let binding = second
        .tool_bindings
        .iter()
        .find(|b| b.tool == "orders.lookup")
        .unwrap();
    assert_eq!(
        (binding.tool_version.as_str(), binding.tool_hash.as_str()),
        ("2", v2.content_hash.as_str())
    );

    // Deprecating it brings the first version's plan back.
    admin
        .tools
        .deprecate_tool_version(rpb::DeprecateToolVersionRequest {
            name: "orders.lookup".into(),
            version: 2,
            etag: String::new(),
        })
        .await
        .unwrap();
    let again = compile(&mut admin).await;
    assert_eq!(again.plan.unwrap().plan_hash, plan.plan_hash);

    // A tenant's tool replaces the built-in of its name, for that tenant only.
    let email = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: email.send}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, properties: {to: {type: string}, template: {type: string}}}
  mock: {output: {message_id: m_1}}
";
    push_tools(&mut admin, email).await;
    let plan = compile(&mut admin).await.plan.unwrap();
    let email_binding = plan
        .tool_bindings
        .iter()
        .find(|b| b.tool == "email.send")
        .unwrap();
    assert_eq!(email_binding.connector, "mock");
    assert_eq!(email_binding.tool_version, "1");

    let mut b = app.clients(TENANT_B, &[Role::Admin]).await;
    push_refund(&mut b).await;
    let plan_b = compile(&mut b).await.plan.unwrap();
    let email_b = plan_b
        .tool_bindings
        .iter()
        .find(|b| b.tool == "email.send")
        .unwrap();
    assert_eq!(email_b.connector, "http");
    assert!(email_b.tool_hash.is_empty());
}

/// Compiles the example as `tenant-a` and returns the plan hash.
async fn compile_example(app: &TestApp) -> pb::ExecutablePlan {
    seed(app, TENANT_A).await;
    let mut c = app.clients(TENANT_A, &[Role::Operator]).await;
    let first = c
        .compiler
        .compile(compile_req("refund-small-orders", ""))
        .await
        .expect("compile")
        .into_inner();
    assert!(!first.cache_hit);
    first.plan.unwrap()
}

async fn compile_cache_get_list(app: TestApp) {
    let plan = compile_example(&app).await;
    assert_eq!(plan.capsule_name, "refund-small-orders");
    assert_eq!(plan.capsule_version, 1);
    assert_eq!(plan.steps.len(), 3);
    assert_eq!(plan.created_by, "alice");
    assert!(plan.create_time.is_some());
    // Policies pinned to the versions the policy service resolves, with its set hash.
    let names: Vec<_> = plan
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p.version))
        .collect();
    assert_eq!(names, [("pii-masking", 1), ("refund-limits", 1)]);
    let mut c = app.clients(TENANT_A, &[Role::Operator]).await;
    let eval = c
        .policy
        .evaluate_policy(ppb::EvaluatePolicyRequest {
            policies: Some(ppb::evaluate_policy_request::Policies::PolicySet(
                ppb::PolicySet {
                    policies: plan.policies.clone(),
                },
            )),
            input: Some(ppb::evaluate_policy_request::Input::InputJson("{}".into())),
            ..Default::default()
        })
        .await
        .expect("evaluate")
        .into_inner();
    assert_eq!(eval.policy_set_hash, plan.policy_set_hash);
    assert_eq!(plan.approval_needs.len(), 1);
    assert_eq!(plan.approval_needs[0].step_id, "refund");

    // Compiling again is a cache hit with the same plan, by "published" and by number.
    for version in ["", "published", "1", "latest"] {
        let again = c
            .compiler
            .compile(compile_req("refund-small-orders", version))
            .await
            .expect("compile again")
            .into_inner();
        assert!(again.cache_hit, "version {version:?}");
        assert_eq!(again.plan.as_ref().unwrap(), &plan);
    }
    // By hash as sent, and in the colon-free forms a path segment carries.
    let hex = plan.plan_hash.trim_start_matches("sha256:");
    for hash in [plan.plan_hash.clone(), format!("sha256-{hex}"), hex.into()] {
        let got = c
            .compiler
            .get_plan(pb::GetPlanRequest { plan_hash: hash })
            .await
            .expect("get")
            .into_inner()
            .plan
            .unwrap();
        assert_eq!(got, plan);
    }

    // A new capsule version is a new plan; the list shows both, newest first, in summary form.
    let v2 = CAPSULE.replace("template: refund-done", "template: refund-sent");
    let mut admin = app.clients(TENANT_A, &[Role::Admin]).await;
    assert_eq!(push_capsule(&mut admin, &v2).await.version, 2);
    let second = c
        .compiler
        .compile(compile_req("refund-small-orders", ""))
        .await
        .expect("compile v2")
        .into_inner();
    assert!(!second.cache_hit);
    let second = second.plan.unwrap();
    assert_ne!(second.plan_hash, plan.plan_hash);
    let list = c
        .compiler
        .list_plans(pb::ListPlansRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.plans.len(), 1);
    assert_eq!(list.plans[0].plan_hash, second.plan_hash);
    assert!(list.plans[0].steps.is_empty() && !list.plans[0].policies.is_empty());
    let token = list.next_page_token;
    assert!(!token.is_empty());
    let rest = c
        .compiler
        .list_plans(pb::ListPlansRequest {
            page_size: 10,
            page_token: token,
            capsule_name: "refund-small-orders".into(),
            capsule_version: 1,
        })
        .await
        .expect("list page 2")
        .into_inner();
    let hashes: Vec<_> = rest.plans.iter().map(|p| p.plan_hash.as_str()).collect();
    assert_eq!(hashes, [plan.plan_hash.as_str()]);

    // One plan.compiled per stored plan, none for cache hits.
    let compiled: Vec<_> = app
        .event_types(TENANT_A)
        .await
        .into_iter()
        .filter(|(t, _)| t == "dev.anumate.plan.compiled.v1")
        .collect();
    assert_eq!(compiled.len(), 2, "{compiled:?}");
    assert_eq!(compiled[0].1, format!("plans/{}", plan.plan_hash));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_capsule_gives_the_same_hash_on_sqlite_and_postgres() {
    let sqlite = compile_example(&spawn_app(Backend::Sqlite).await).await;
    let postgres = compile_example(&spawn_app(Backend::Postgres).await).await;
    assert_eq!(sqlite.plan_hash, postgres.plan_hash);
    assert_eq!(
        anumate_compiler::plan_hash(&sqlite).unwrap(),
        anumate_compiler::plan_hash(&postgres).unwrap()
    );
}

async fn bad_input(app: TestApp) {
    seed(&app, TENANT_A).await;
    let mut c = app.clients(TENANT_A, &[Role::Admin]).await;

    expect_reason(
        c.compiler.compile(compile_req("no-such-capsule", "")).await,
        Reason::CapsuleNotFound,
    );
    expect_reason(
        c.compiler
            .compile(compile_req("refund-small-orders", "9"))
            .await,
        Reason::CapsuleVersionNotFound,
    );
    let e = expect_error(
        c.compiler.compile(compile_req("Bad Name!", "")).await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "capsule_name");
    let e = expect_error(
        c.compiler
            .compile(compile_req("refund-small-orders", "newest"))
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "version");
    // Oversized: refused from the length prefix.
    expect_error(
        c.compiler
            .compile(compile_req(&"a".repeat(200 * 1024), ""))
            .await,
        ErrorCode::PayloadTooLarge,
    );
    for hash in ["sha256:nothex", "", &"A".repeat(64)] {
        let e = expect_error(
            c.compiler
                .get_plan(pb::GetPlanRequest {
                    plan_hash: hash.into(),
                })
                .await,
            ErrorCode::InvalidArgument,
        );
        assert_eq!(e.violations[0].field, "plan_hash");
    }
    expect_reason(
        c.compiler
            .get_plan(pb::GetPlanRequest {
                plan_hash: format!("sha256-{}", "0".repeat(64)),
            })
            .await,
        Reason::PlanNotFound,
    );
    let e = expect_error(
        c.compiler
            .list_plans(pb::ListPlansRequest {
                page_size: 5,
                page_token: "!!!".into(),
                ..Default::default()
            })
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "page_token");
    let e = expect_error(
        c.compiler
            .list_plans(pb::ListPlansRequest {
                page_size: -1,
                ..Default::default()
            })
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "page_size");

    // Unknown policy reference, unpublished policy, tool without a binding.
    let unknown_policy = CAPSULE
        .replace("name: refund-small-orders", "name: needs-missing-policy")
        .replace(
            "[refund-limits, pii-masking]",
            "[refund-limits, no-such-policy]",
        );
    push_capsule(&mut c, &unknown_policy).await;
    let e = expect_reason(
        c.compiler
            .compile(compile_req("needs-missing-policy", ""))
            .await,
        Reason::PolicyNotFound,
    );
    assert_eq!(meta(&e, "policy"), "no-such-policy");

    c.policy
        .push_policy(ppb::PushPolicyRequest {
            source: "policy \"draft-only\" { rule \"r\" { when true then allow } }".into(),
            source_name: "d.policy".into(),
            etag: String::new(),
            publish: false,
        })
        .await
        .expect("push draft policy");
    let draft = CAPSULE
        .replace("name: refund-small-orders", "name: needs-draft-policy")
        .replace("[refund-limits, pii-masking]", "[draft-only]");
    push_capsule(&mut c, &draft).await;
    let e = expect_reason(
        c.compiler
            .compile(compile_req("needs-draft-policy", ""))
            .await,
        Reason::PolicyVersionNotFound,
    );
    assert_eq!(meta(&e, "policy"), "draft-only");

    let unknown_tool = CAPSULE
        .replace("name: refund-small-orders", "name: uses-unknown-tool")
        .replace(
            "[http.get, payments.refund, email.send]",
            "[http.get, payments.refund, email.send, crm.update]",
        );
    push_capsule(&mut c, &unknown_tool).await;
    let e = expect_reason(
        c.compiler
            .compile(compile_req("uses-unknown-tool", ""))
            .await,
        Reason::ToolNotDeclared,
    );
    assert_eq!(meta(&e, "tools"), "crm.update");

    // Arguments the tool's schema rejects: every problem, with its place.
    let bad_args = CAPSULE
        .replace("name: refund-small-orders", "name: bad-arguments")
        .replace("template: refund-done", "template: refund-done, cc: boss");
    push_capsule(&mut c, &bad_args).await;
    let e = expect_error(
        c.compiler.compile(compile_req("bad-arguments", "")).await,
        ErrorCode::InvalidDocument,
    );
    assert_eq!(meta(&e, "reason"), "bad_arguments");
    assert_eq!(e.violations[0].field, "spec.steps[2].with.cc");
    assert!(e.violations[0].position.is_some());

    // No plan was stored by any of that, and the service keeps serving.
    let ok = c
        .compiler
        .compile(compile_req("refund-small-orders", ""))
        .await
        .expect("still serving")
        .into_inner();
    assert!(!ok.cache_hit);
    let list = c
        .compiler
        .list_plans(pb::ListPlansRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.plans.len(), 1);

    // A deprecated version compiles only when named by number.
    let retired = CAPSULE.replace("name: refund-small-orders", "name: retired");
    push_capsule(&mut c, &retired).await;
    c.registry
        .deprecate_capsule_version(rpb::DeprecateCapsuleVersionRequest {
            name: "retired".into(),
            version: 1,
            etag: String::new(),
        })
        .await
        .expect("deprecate");
    expect_reason(
        c.compiler.compile(compile_req("retired", "latest")).await,
        Reason::VersionDeprecated,
    );
}

async fn tenancy_and_roles(app: TestApp) {
    let plan = compile_example(&app).await;
    // Tenant A reads it (from then on from memory)...
    let mut a = app.clients(TENANT_A, &[Role::Admin]).await;
    let read = |plan_hash: &str| pb::GetPlanRequest {
        plan_hash: plan_hash.into(),
    };
    for _ in 0..2 {
        let got = a.compiler.get_plan(read(&plan.plan_hash)).await.unwrap();
        assert_eq!(got.into_inner().plan.unwrap(), plan);
    }
    let mut b = app.clients(TENANT_B, &[Role::Admin]).await;
    // ...and another tenant sees neither the plan nor the capsule.
    let e = expect_reason(
        b.compiler
            .get_plan(pb::GetPlanRequest {
                plan_hash: plan.plan_hash.clone(),
            })
            .await,
        Reason::PlanNotFound,
    );
    assert!(e.message.contains(&plan.plan_hash));
    let list = b
        .compiler
        .list_plans(pb::ListPlansRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.plans.is_empty());
    expect_reason(
        b.compiler
            .compile(compile_req("refund-small-orders", ""))
            .await,
        Reason::CapsuleNotFound,
    );
    // Tenant B compiling the same content stores its own copy under the same hash.
    seed(&app, TENANT_B).await;
    let own = b
        .compiler
        .compile(compile_req("refund-small-orders", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!own.cache_hit);
    let own = own.plan.unwrap();
    assert_eq!(own.plan_hash, plan.plan_hash);
    // Each tenant reads its own copy of the same hash.
    let b_read = b.compiler.get_plan(read(&plan.plan_hash)).await.unwrap();
    assert_eq!(b_read.into_inner().plan.unwrap(), own);
    let a_read = a.compiler.get_plan(read(&plan.plan_hash)).await.unwrap();
    assert_eq!(a_read.into_inner().plan.unwrap(), plan);

    // Stored plans are write-once: the database refuses to alter or remove one.
    for sql in [
        "UPDATE plans SET plan_json = '{}' WHERE tenant_id = $1",
        "DELETE FROM plans WHERE tenant_id = $1",
    ] {
        let tx = app.store.write(TENANT_A).await.unwrap();
        let refused = tx.execute(sql, vec![TENANT_A.into()]).await;
        assert!(refused.is_err(), "{sql} was allowed");
    }

    // Auditors read but do not compile.
    let mut auditor = app.clients(TENANT_A, &[Role::Auditor]).await;
    expect_error(
        auditor
            .compiler
            .compile(compile_req("refund-small-orders", ""))
            .await,
        ErrorCode::PermissionDenied,
    );
    auditor
        .compiler
        .get_plan(pb::GetPlanRequest {
            plan_hash: plan.plan_hash.clone(),
        })
        .await
        .expect("auditor reads");
}

/// Compiles racing on the same content store one plan and one event; every
/// other caller gets that plan as a cache hit.
async fn concurrent_compiles(app: TestApp) {
    seed(&app, TENANT_A).await;
    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut c = app.clients(TENANT_A, &[Role::Operator]).await;
        calls.push(tokio::spawn(async move {
            c.compiler
                .compile(compile_req("refund-small-orders", ""))
                .await
                .map(tonic::Response::into_inner)
        }));
    }
    let mut fresh = 0;
    let mut hashes = std::collections::BTreeSet::new();
    for call in calls {
        let r = call.await.unwrap().expect("compile");
        fresh += usize::from(!r.cache_hit);
        hashes.insert(r.plan.unwrap().plan_hash);
    }
    assert_eq!(fresh, 1);
    assert_eq!(hashes.len(), 1);
    let compiled = app
        .event_types(TENANT_A)
        .await
        .into_iter()
        .filter(|(t, _)| t == "dev.anumate.plan.compiled.v1")
        .count();
    assert_eq!(compiled, 1);
}

/// Issue 10, delegated service identity: in a mesh the compiler reads the
/// registry and the policy service as `svc:compiler` acting for its caller,
/// with the caller's roles, not with the caller's own token. Here the
/// upstream server trusts only the platform's service issuer, so a compile
/// succeeds only through delegation; a compiler without service keys (which
/// forwards the caller's token) fails against it.
#[tokio::test]
async fn upstreams_are_read_as_the_compiler_acting_for_its_caller() {
    use anumate_auth::{AuthConfig, Authenticator, ServiceIssuer};
    use anumate_service::clients::Grpc;

    let mut migrations = anumate_registry::migrations();
    migrations.extend(anumate_policy_service::REPO_MIGRATIONS.iter().copied());
    migrations.extend(anumate_compiler::REPO_MIGRATIONS.iter().copied());
    let (_db, store) = testing::migrated_store(Backend::Sqlite, &migrations).await;
    let keys_dir = tempfile::tempdir().unwrap();
    let services = ServiceIssuer::load_or_create(keys_dir.path(), "compiler").unwrap();

    // The upstream pod: registry and policy, trusting only service tokens.
    let upstream_auth = Authenticator::new(AuthConfig::default())
        .unwrap()
        .with_static_service_issuer(services.jwks());
    let registry = Registry::new(
        store.clone(),
        Arc::new(KeyRing::new(KeyPair::generate().unwrap())),
        &RegistryConfig::default(),
    );
    let policies = Policies::new(store.clone(), &PolicyConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (upstream_addr, upstream) = testing::serve_on(
        listener,
        upstream_auth,
        Routes::new(ToolsGrpc::new(registry.tools().clone()).into_server())
            .add_service(RegistryGrpc::new(registry).into_server())
            .add_service(PolicyGrpc::new(policies).into_server()),
    );
    let upstream_url = format!("http://{upstream_addr}");

    // An author pushes through the upstream (as a service acting for them).
    let author = services
        .mint_on_behalf_of(
            TENANT_A,
            "user:bob",
            &[Role::Author],
            Duration::from_secs(60),
        )
        .unwrap();
    let channel = Endpoint::from_shared(upstream_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = Clients {
        compiler: CompilerServiceClient::with_interceptor(
            channel.clone(),
            BearerToken(author.clone()),
        ),
        registry: RegistryServiceClient::with_interceptor(
            channel.clone(),
            BearerToken(author.clone()),
        ),
        tools: ToolsServiceClient::with_interceptor(channel.clone(), BearerToken(author.clone())),
        policy: PolicyServiceClient::with_interceptor(channel, BearerToken(author)),
    };
    push_refund(&mut c).await;

    // The compiler pod: users' tokens from the dev issuer; upstreams over gRPC.
    let compiler_pod = |with_keys: bool| {
        let registry_channel = anumate_service::clients::channel("r", &upstream_url).unwrap();
        let policy_channel = anumate_service::clients::channel("p", &upstream_url).unwrap();
        let client = |channel| {
            let grpc = Grpc::new(channel);
            Arc::new(if with_keys {
                grpc.with_service_issuer(services.clone())
            } else {
                grpc
            })
        };
        Compiler::new(
            store.clone(),
            Upstreams::new(client(registry_channel), client(policy_channel)),
            &CompilerConfig::default(),
        )
        .unwrap()
    };
    let DevAuth {
        issuer,
        authenticator,
        dir: _dir,
        ..
    } = DevAuth::new();
    let compile_as = |with_keys: bool, roles: &'static [Role]| {
        let compiler = compiler_pod(with_keys);
        let authenticator = authenticator.clone();
        let issuer = issuer.clone();
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (addr, server) = testing::serve_on(
                listener,
                authenticator,
                Routes::new(CompilerGrpc::new(compiler).into_server()),
            );
            let token = issuer
                .mint(TENANT_A, "user:alice", roles, Duration::from_secs(60))
                .unwrap();
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let result = CompilerServiceClient::with_interceptor(channel, BearerToken(token))
                .compile(compile_req("refund-small-orders", ""))
                .await;
            server.abort();
            result
        }
    };

    // With service keys: the compiler acts for alice (an operator) and compiles.
    let plan = compile_as(true, &[Role::Operator])
        .await
        .expect("compile through delegation")
        .into_inner()
        .plan
        .unwrap();
    assert!(plan.plan_hash.starts_with("sha256:"));

    // Without them it forwards alice's token, which the upstream does not trust.
    let status = compile_as(false, &[Role::Operator]).await.unwrap_err();
    assert!(
        status.message().contains("registry") || status.message().contains("issuer"),
        "{status:?}"
    );
    assert_ne!(status.code(), tonic::Code::Ok);
    upstream.abort();
}
