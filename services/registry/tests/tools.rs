#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The tool catalogue driven like a client drives it: real gRPC over TCP,
//! behind the real authentication layer, on SQLite and PostgreSQL.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anumate_auth::{BearerToken, DevIssuer, Role};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_errors::{ErrorCode, Reason};
use anumate_events::OutboxRow;
use anumate_proto::events::v1 as ev;
use anumate_proto::registry::v1 as pb;
use anumate_registry::{Registry, RegistryConfig, RegistryGrpc, ToolsGrpc};
use anumate_testing::{
    self as testing, Backend, DevAuth, Store, TestDb, expect_error, expect_reason, on_both_backends,
};
use pb::registry_service_client::RegistryServiceClient;
use pb::tools_service_client::ToolsServiceClient;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Tools = ToolsServiceClient<InterceptedService<Channel, BearerToken>>;
type Capsules = RegistryServiceClient<InterceptedService<Channel, BearerToken>>;

const EXAMPLE: &str = include_str!("../../../examples/tools.yaml");
const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";
const AUTHOR: &[Role] = &[Role::Author];
const AUDITOR: &[Role] = &[Role::Auditor];

const MOCK: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: crm.note, labels: {team: sales}}
spec:
  connector: mock
  side_effect: write
  mock: {output: {id: n_1}}
";

struct TestApp {
    addr: SocketAddr,
    issuer: DevIssuer,
    services: anumate_auth::ServiceIssuer,
    store: Store,
    server: tokio::task::JoinHandle<()>,
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

async fn spawn_app(backend: Backend) -> TestApp {
    let (db, store) = testing::migrated_store(backend, &anumate_registry::migrations()).await;
    let keys = Arc::new(KeyRing::new(KeyPair::generate().expect("registry key")));
    let registry = Registry::new(store.clone(), keys, &RegistryConfig::default());
    let auth = DevAuth::with_service_issuer("connectors");
    let routes = Routes::new(ToolsGrpc::new(registry.tools().clone()).into_server())
        .add_service(RegistryGrpc::new(registry).into_server());
    let (addr, server) = testing::serve(auth.authenticator, routes).await;
    TestApp {
        addr,
        issuer: auth.issuer,
        services: auth.services.unwrap(),
        store,
        server,
        _db: db,
        _issuer_dir: auth.dir,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestApp {
    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn token(&self, tenant: &str, roles: &[Role]) -> BearerToken {
        BearerToken(
            self.issuer
                .mint(tenant, "alice", roles, Duration::from_secs(300))
                .unwrap(),
        )
    }

    async fn tools(&self, tenant: &str, roles: &[Role]) -> Tools {
        ToolsServiceClient::with_interceptor(self.channel().await, self.token(tenant, roles))
    }

    async fn capsules(&self, tenant: &str, roles: &[Role]) -> Capsules {
        RegistryServiceClient::with_interceptor(self.channel().await, self.token(tenant, roles))
    }

    /// Tools and tool versions of `tenant`, and its outbox rows.
    async fn counts(&self, tenant: &str) -> (i64, i64, i64) {
        let tx = self.store.read(tenant).await.unwrap();
        let mut n = [0i64; 3];
        for (i, table) in ["tools", "tool_versions", "outbox"].iter().enumerate() {
            let row = tx
                .query_one(
                    &format!("SELECT COUNT(*) AS n FROM {table} WHERE tenant_id = $1"),
                    vec![tenant.into()],
                )
                .await
                .unwrap()
                .unwrap();
            n[i] = row.try_get("", "n").unwrap();
        }
        (n[0], n[1], n[2])
    }

    async fn events(&self, tenant: &str) -> Vec<OutboxRow> {
        let tx = self.store.read(tenant).await.unwrap();
        anumate_events::read_after(&tx, 0, 1000).await.unwrap()
    }
}

fn push_req(source: &str) -> pb::PushToolsRequest {
    pb::PushToolsRequest {
        source_yaml: source.into(),
        source_name: "tools.yaml".into(),
    }
}

async fn push(c: &mut Tools, source: &str) -> Vec<pb::PushedTool> {
    c.push_tools(push_req(source))
        .await
        .unwrap()
        .into_inner()
        .tools
}

async fn get(
    c: &mut Tools,
    name: &str,
    version: &str,
) -> Result<pb::GetToolResponse, tonic::Status> {
    c.get_tool(pb::GetToolRequest {
        name: name.into(),
        version: version.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn list(c: &mut Tools, labels: &str, size: i32, token: &str) -> pb::ListToolsResponse {
    c.list_tools(pb::ListToolsRequest {
        page_size: size,
        page_token: token.into(),
        label_selector: labels.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn deprecate(
    c: &mut Tools,
    name: &str,
    version: i32,
) -> Result<pb::DeprecateToolVersionResponse, tonic::Status> {
    c.deprecate_tool_version(pb::DeprecateToolVersionRequest {
        name: name.into(),
        version,
        etag: String::new(),
    })
    .await
    .map(tonic::Response::into_inner)
}

on_both_backends! {
    lifecycle => lifecycle_sqlite, lifecycle_postgres;
    push_errors => push_errors_sqlite, push_errors_postgres;
    all_or_nothing => all_or_nothing_sqlite, all_or_nothing_postgres;
    tenants => tenants_sqlite, tenants_postgres;
    capsule_warnings => capsule_warnings_sqlite, capsule_warnings_postgres;
    hub_reads_tools_as_a_service => hub_service_sqlite, hub_service_postgres;
}

/// Push a file of two, read, list, change one, deprecate: versions and
/// events as an author expects them.
async fn lifecycle(app: TestApp) {
    let mut c = app.tools(TENANT_A, AUTHOR).await;
    let pushed = push(&mut c, EXAMPLE).await;
    let names: Vec<&str> = pushed
        .iter()
        .map(|p| p.tool.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(names, ["payments.transfer", "orders.lookup"]);
    assert!(pushed.iter().all(|p| p.created));
    let v1 = pushed[0].version.clone().unwrap();
    assert_eq!(
        (v1.version, v1.connector.as_str(), v1.side_effect.as_str()),
        (1, "http", "write")
    );
    assert_eq!(v1.status, pb::VersionStatus::Published as i32);
    assert!(v1.content_hash.starts_with("sha256:"));
    assert!(v1.source_yaml.contains("payments.transfer"));
    assert!(!v1.source_yaml.contains("orders.lookup"));
    // The canonical form is the typed tool's.
    let tool = anumate_tools::Tool::from_canonical_json(&v1.canonical_json).unwrap();
    assert_eq!(tool.name(), "payments.transfer");

    // The same file again stores nothing.
    let again = push(&mut c, EXAMPLE).await;
    assert!(again.iter().all(|p| !p.created));
    assert_eq!(app.counts(TENANT_A).await.0, 2);

    // Changing one tool makes a version of that one only.
    let changed = EXAMPLE.replace("latency: 20ms", "latency: 30ms");
    let pushed = push(&mut c, &changed).await;
    assert_eq!(
        pushed.iter().map(|p| p.created).collect::<Vec<_>>(),
        [false, true]
    );
    let current = get(&mut c, "orders.lookup", "").await.unwrap();
    assert_eq!(current.version.as_ref().unwrap().version, 2);
    assert_eq!(current.tool.as_ref().unwrap().current_version, 2);
    let first = get(&mut c, "orders.lookup", "1").await.unwrap();
    assert!(first.version.unwrap().source_yaml.contains("20ms"));

    // List, paged by name.
    let page = list(&mut c, "", 1, "").await;
    assert_eq!(page.tools.len(), 1);
    assert_eq!(page.tools[0].name, "orders.lookup");
    let page = list(&mut c, "", 1, &page.next_page_token).await;
    assert_eq!(page.tools[0].name, "payments.transfer");
    assert!(page.next_page_token.is_empty());

    let versions = c
        .list_tool_versions(pb::ListToolVersionsRequest {
            name: "orders.lookup".into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [2, 1]
    );
    assert!(versions.iter().all(|v| v.source_yaml.is_empty()));

    // Deprecating the current version makes the previous one current …
    let d = deprecate(&mut c, "orders.lookup", 2).await.unwrap();
    assert_eq!(
        d.version.unwrap().status,
        pb::VersionStatus::Deprecated as i32
    );
    assert_eq!(d.tool.unwrap().current_version, 1);
    let current = get(&mut c, "orders.lookup", "current").await.unwrap();
    assert_eq!(current.version.unwrap().version, 1);
    // … and with none left, there is no current version.
    deprecate(&mut c, "orders.lookup", 1).await.unwrap();
    let e = expect_reason(
        get(&mut c, "orders.lookup", "").await,
        Reason::ToolVersionNotFound,
    );
    assert!(e.message.contains("every version"), "{e}");
    assert_eq!(
        get(&mut c, "orders.lookup", "latest")
            .await
            .unwrap()
            .version
            .unwrap()
            .version,
        2
    );

    // Unknown tools and versions, and malformed requests.
    expect_reason(get(&mut c, "no.such", "").await, Reason::ToolNotFound);
    expect_reason(
        get(&mut c, "payments.transfer", "9").await,
        Reason::ToolVersionNotFound,
    );
    expect_reason(deprecate(&mut c, "no.such", 1).await, Reason::ToolNotFound);
    let e = expect_error(
        get(&mut c, "Bad Name", "").await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(e.violations[0].field, "name");
    expect_error(
        get(&mut c, "payments.transfer", "published").await,
        ErrorCode::InvalidArgument,
    );

    // Events: pushed + published per new version, deprecated per deprecation,
    // on anumate.tools keyed by tenant and tool.
    let rows = app.events(TENANT_A).await;
    let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    assert_eq!(
        types,
        [
            "dev.anumate.tool.pushed.v1",
            "dev.anumate.tool.published.v1",
            "dev.anumate.tool.pushed.v1",
            "dev.anumate.tool.published.v1",
            "dev.anumate.tool.pushed.v1",
            "dev.anumate.tool.published.v1",
            "dev.anumate.tool.deprecated.v1",
            "dev.anumate.tool.deprecated.v1",
        ]
    );
    assert!(rows.iter().all(|r| r.topic == "anumate.tools"));
    let orders: Vec<&OutboxRow> = rows
        .iter()
        .filter(|r| r.aggregate_key == format!("{TENANT_A}/orders.lookup"))
        .collect();
    assert_eq!(orders.len(), 6);
    let last: ev::ToolDeprecated = prost::Message::decode(rows[7].payload.as_slice()).unwrap();
    assert_eq!(
        last,
        ev::ToolDeprecated {
            tenant_id: TENANT_A.into(),
            name: "orders.lookup".into(),
            version: 1,
            actor: "alice".into(),
        }
    );
    assert_eq!(rows[7].subject, "tools/orders.lookup/versions/1");
}

/// Bad files are refused whole with every problem at its line and column in
/// the file; nothing is written and the service keeps serving.
async fn push_errors(app: TestApp) {
    let mut c = app.tools(TENANT_A, AUTHOR).await;
    let bad = format!(
        "{MOCK}---\napiVersion: anumate.dev/v1\nkind: Tool\nmetadata: {{name: pay.out}}\nspec:\n  connector: http\n  side_effect: write\n  input: {{type: object, properties: {{a: {{type: strin}}}}}}\n  http: {{method: GET, url: \"https://a.example\", headers: {{X: \"${{{{ secrets.A }}}}\"}}}}\n  mock: {{output: \"${{{{ secrets.B }}}}\"}}\n"
    );
    let e = expect_reason(c.push_tools(push_req(&bad)).await, Reason::InvalidDocument);
    assert!(e.message.starts_with("tools.yaml:"), "{e}");
    let at: Vec<(String, Option<(u32, u32)>)> = e
        .violations
        .iter()
        .map(|v| (v.field.clone(), v.position))
        .collect();
    assert_eq!(
        at,
        [
            ("spec.input.properties.a.type".to_string(), Some((15, 48))),
            ("spec.mock.output".to_string(), Some((17, 18))),
        ],
        "{e:?}"
    );
    assert!(e.violations[0].description.contains("JSON Schema"));
    assert!(e.violations[1].description.contains("secrets may only"));
    // The valid first document was not stored either.
    assert_eq!(app.counts(TENANT_A).await, (0, 0, 0));

    let e = expect_reason(
        c.push_tools(push_req("kind: [")).await,
        Reason::InvalidDocument,
    );
    assert!(e.violations[0].position.is_some(), "{e:?}");
    assert!(
        e.violations[0].description.starts_with("invalid YAML"),
        "{e:?}"
    );

    // Authors only, and the service still serves.
    let mut auditor = app.tools(TENANT_A, AUDITOR).await;
    expect_error(
        auditor.push_tools(push_req(MOCK)).await,
        ErrorCode::PermissionDenied,
    );
    assert_eq!(push(&mut c, MOCK).await.len(), 1);
    assert_eq!(
        get(&mut auditor, "crm.note", "")
            .await
            .unwrap()
            .tool
            .unwrap()
            .name,
        "crm.note"
    );
}

/// A file's tools are stored together or not at all, also when the refusal
/// comes from the store (a document identical to a deprecated version).
async fn all_or_nothing(app: TestApp) {
    let mut c = app.tools(TENANT_A, AUTHOR).await;
    push(&mut c, MOCK).await;
    deprecate(&mut c, "crm.note", 1).await.unwrap();
    let before = app.counts(TENANT_A).await;
    let file = EXAMPLE.replace("---\n", &format!("---\n{MOCK}---\n"));
    let e = expect_reason(
        c.push_tools(push_req(&file)).await,
        Reason::VersionDeprecated,
    );
    assert!(e.message.contains("deprecated"), "{e}");
    assert_eq!(app.counts(TENANT_A).await, before);
    expect_reason(
        get(&mut c, "payments.transfer", "").await,
        Reason::ToolNotFound,
    );
}

/// Another tenant sees none of A's tools and keeps its own of the same name;
/// on PostgreSQL the database itself hides A's rows.
async fn tenants(app: TestApp) {
    let mut a = app.tools(TENANT_A, AUTHOR).await;
    let mut b = app.tools(TENANT_B, AUTHOR).await;
    push(&mut a, EXAMPLE).await;
    expect_reason(
        get(&mut b, "payments.transfer", "").await,
        Reason::ToolNotFound,
    );
    assert!(list(&mut b, "", 0, "").await.tools.is_empty());
    let mine = push(&mut b, MOCK).await;
    assert_eq!(mine[0].version.as_ref().unwrap().version, 1);
    assert_eq!(
        list(&mut a, "team=sales", 0, "").await.tools.len(),
        0,
        "B's labels are not A's"
    );
    assert_eq!(list(&mut b, "team=sales", 0, "").await.tools.len(), 1);

    if app.store.backend() == anumate_store::Backend::Postgres {
        // A query without a tenant filter still sees only B's rows.
        let tx = app.store.read(TENANT_B).await.unwrap();
        for table in ["tools", "tool_versions", "tool_labels"] {
            let rows = tx
                .query_all(&format!("SELECT tenant_id FROM {table}"), vec![])
                .await
                .unwrap();
            let tenants: BTreeSet<String> = rows
                .iter()
                .map(|r| r.try_get("", "tenant_id").unwrap())
                .collect();
            assert_eq!(tenants, BTreeSet::from([TENANT_B.to_string()]), "{table}");
        }
    }
}

/// `PushCapsule` warns about tools neither the tenant nor the built-ins
/// declare, and stops once the tool is pushed.
async fn capsule_warnings(app: TestApp) {
    let capsule = include_str!("../../../examples/refund.capsule.yaml");
    let mut caps = app.capsules(TENANT_A, AUTHOR).await;
    let push_capsule = |source: String| pb::PushCapsuleRequest {
        source_yaml: source,
        source_name: String::new(),
        etag: String::new(),
        publish: false,
    };
    // Built-in tools only: no warning.
    let r = caps
        .push_capsule(push_capsule(capsule.into()))
        .await
        .unwrap()
        .into_inner();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    let own = capsule
        .replace("tools: [http.get,", "tools: [orders.lookup, http.get,")
        .replace("tool: http.get", "tool: orders.lookup")
        .replace(
            "with: {url: \"https://orders.example/v1/orders/${{ inputs.order_id }}\"}",
            "with: {order_id: \"${{ inputs.order_id }}\"}",
        )
        .replace("tools: [orders.lookup, http.get,", "tools: [orders.lookup,");
    let r = caps
        .push_capsule(push_capsule(own.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    assert!(r.warnings[0].contains("orders.lookup"), "{:?}", r.warnings);
    assert!(r.version.is_some(), "a warning does not stop the push");

    let mut tools = app.tools(TENANT_A, AUTHOR).await;
    push(&mut tools, EXAMPLE).await;
    let r = caps
        .push_capsule(push_capsule(own))
        .await
        .unwrap()
        .into_inner();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

/// The connector hub in its own process reads a tool in its own name
/// (`svc:connectors`, the `RegistryClient` it uses); other services, and the
/// hub for anything but reading a tool, are refused.
async fn hub_reads_tools_as_a_service(app: TestApp) {
    use anumate_service::clients::{Caller, Grpc, RegistryClient};
    let mut author = app.tools("t1", AUTHOR).await;
    push(&mut author, EXAMPLE).await;
    let url = format!("http://{}", app.addr);
    let hub = Grpc::new(anumate_service::clients::channel("registry", &url).unwrap())
        .with_service_issuer(app.services.for_service("connectors").unwrap());
    let caller = Caller::Service {
        tenant: "t1".into(),
        service: "connectors",
    };
    let got = hub
        .get_tool(
            &caller,
            pb::GetToolRequest {
                name: "payments.transfer".into(),
                version: String::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(got.tool.unwrap().name, "payments.transfer");
    // Another tenant's catalogue is the hub's caller's tenant only.
    let other = Caller::Service {
        tenant: "t2".into(),
        service: "connectors",
    };
    let missing = hub
        .get_tool(
            &other,
            pb::GetToolRequest {
                name: "payments.transfer".into(),
                version: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // Another service identity is refused.
    let approvals = Grpc::new(anumate_service::clients::channel("registry", &url).unwrap())
        .with_service_issuer(app.services.for_service("approvals").unwrap());
    let denied = approvals
        .get_tool(
            &Caller::Service {
                tenant: "t1".into(),
                service: "approvals",
            },
            pb::GetToolRequest {
                name: "payments.transfer".into(),
                version: String::new(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    // The hub may read, not push.
    let token = app
        .services
        .for_service("connectors")
        .unwrap()
        .mint("t1", Duration::from_secs(60))
        .unwrap();
    let mut as_hub = ToolsServiceClient::with_interceptor(app.channel().await, BearerToken(token));
    let push = as_hub.push_tools(push_req(EXAMPLE)).await.unwrap_err();
    assert_eq!(push.code(), tonic::Code::PermissionDenied);
}
