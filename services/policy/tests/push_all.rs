#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `PushPolicies`: a file of several `policy` blocks stored all or none, over
//! real gRPC behind the real authentication layer, on SQLite and PostgreSQL.

use std::net::SocketAddr;
use std::time::Duration;

use anumate_auth::{BearerToken, DevIssuer, Role};
use anumate_errors::{ErrorCode, Reason};
use anumate_policy_service::{Policies, PolicyConfig, PolicyGrpc};
use anumate_proto::policy::v1 as pb;
use anumate_testing::{
    self as testing, Backend, DevAuth, TestDb, expect_error, expect_reason, on_both_backends,
};
use pb::policy_service_client::PolicyServiceClient;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Client = PolicyServiceClient<InterceptedService<Channel, BearerToken>>;

const EXAMPLE: &str = include_str!("../../../examples/refund.policy");
const TENANT: &str = "tenant-a";

struct TestApp {
    addr: SocketAddr,
    issuer: DevIssuer,
    server: tokio::task::JoinHandle<()>,
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

async fn spawn_app(backend: Backend) -> TestApp {
    let (db, store) = testing::migrated_store(backend, &anumate_policy_service::migrations()).await;
    let policies = Policies::new(store, &PolicyConfig::default());
    let auth = DevAuth::new();
    let (addr, server) = testing::serve(
        auth.authenticator,
        Routes::new(PolicyGrpc::new(policies).into_server()),
    )
    .await;
    TestApp {
        addr,
        issuer: auth.issuer,
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
    async fn client(&self, roles: &[Role]) -> Client {
        let token = self
            .issuer
            .mint(TENANT, "alice", roles, Duration::from_secs(300))
            .unwrap();
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        PolicyServiceClient::with_interceptor(channel, BearerToken(token))
    }
}

fn push_req(source: &str, publish: bool) -> pb::PushPoliciesRequest {
    pb::PushPoliciesRequest {
        source: source.into(),
        source_name: "refund.policy".into(),
        publish,
    }
}

async fn names(c: &mut Client) -> Vec<String> {
    c.list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .policies
        .into_iter()
        .map(|p| p.name)
        .collect()
}

on_both_backends! {
    example_file => example_file_sqlite, example_file_postgres;
    all_or_none => all_or_none_sqlite, all_or_none_postgres;
}

/// The example file holds two policies: both stored, published, each with
/// its own block as source (compiling alone, rules at its own lines); the
/// same file again creates nothing.
async fn example_file(app: TestApp) {
    let mut c = app.client(&[Role::Author]).await;
    let pushed = c
        .push_policies(push_req(EXAMPLE, true))
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert_eq!(pushed.len(), 2);
    let v: Vec<_> = pushed.iter().map(|p| p.version.clone().unwrap()).collect();
    assert_eq!(v[0].name, "refund-limits");
    assert_eq!(v[1].name, "pii-masking");
    assert!(pushed.iter().all(|p| p.created));
    assert!(v.iter().all(|v| v.version == 1));
    assert!(v[0].source.starts_with("policy \"refund-limits\" {"));
    assert!(v[0].source.ends_with("}\n") && !v[0].source.contains("pii-masking"));
    assert!(v[1].source.starts_with("policy \"pii-masking\" {"));
    assert_eq!(v[0].rules.len(), 2);
    assert_eq!(v[0].test_count, 1);
    assert_eq!(
        pushed[0].policy.as_ref().unwrap().published_version,
        1,
        "published in the same push"
    );

    // Read back (compiled from the stored block alone).
    let got = c
        .get_policy(pb::GetPolicyRequest {
            name: "pii-masking".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let got = got.version.unwrap();
    assert_eq!(got.source, v[1].source);
    assert_eq!(got.rules.len(), 1);
    assert_eq!(
        got.rules[0].span.as_ref().unwrap().start_line,
        2,
        "lines of the stored block"
    );

    // Evaluating both stored policies works as the file did.
    let refs = ["refund-limits", "pii-masking"]
        .iter()
        .map(|n| pb::PolicyRef {
            name: n.to_string(),
            version: 1,
            content_hash: String::new(),
        })
        .collect();
    let eval = c
        .evaluate_policy(pb::EvaluatePolicyRequest {
            policies: Some(pb::evaluate_policy_request::Policies::PolicySet(
                pb::PolicySet { policies: refs },
            )),
            source_name: String::new(),
            input: Some(pb::evaluate_policy_request::Input::InputJson(
                r#"{"tool": "payments.refund", "args": {"amount": 900000, "currency": "INR"},
                    "principal": {"roles": ["operator"]}}"#
                    .into(),
            )),
            allowed_tools: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let decision = eval.decision.unwrap();
    assert_eq!(decision.effect, pb::Effect::RequireApproval as i32);
    assert_eq!(decision.obligations.unwrap().redactions.len(), 2);

    // The same file again: nothing new.
    let again = c
        .push_policies(push_req(EXAMPLE, true))
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert!(again.iter().all(|p| !p.created));
    assert_eq!(again[0].version.as_ref().unwrap().version, 1);

    // A file of one block stores the whole file, as PushPolicy does.
    let one = format!(
        "# only pii\n{}",
        &EXAMPLE[EXAMPLE.find("policy \"pii").unwrap()..]
    )
    .replace("[REDACTED]", "[HIDDEN]");
    let pushed = c
        .push_policies(push_req(&one, false))
        .await
        .unwrap()
        .into_inner()
        .policies;
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].version.as_ref().unwrap().source, one);
    assert_eq!(pushed[0].version.as_ref().unwrap().version, 2);
}

/// Bad files and a refused block store nothing, with errors positioned in
/// the file; only authors and admins push.
async fn all_or_none(app: TestApp) {
    let mut c = app.client(&[Role::Author]).await;

    // A broken second block: positioned in the file, the first not stored.
    let broken = EXAMPLE.replace("when true", "when tru(");
    let err = expect_reason(
        c.push_policies(push_req(&broken, false)).await,
        Reason::InvalidDocument,
    );
    let line = broken
        .lines()
        .position(|l| l.contains("when tru("))
        .unwrap()
        + 1;
    // At the broken `when` or where the parser noticed (the next line), in
    // the file's numbering.
    assert!(
        err.violations.iter().any(|v| v
            .position
            .is_some_and(|(l, _)| l as usize == line || l as usize == line + 1)),
        "{err:?}"
    );
    assert!(names(&mut c).await.is_empty());

    // Two blocks naming one policy.
    let twice = format!(
        "{EXAMPLE}\n{}",
        &EXAMPLE[..EXAMPLE.find("policy \"pii").unwrap()]
    );
    let err = expect_reason(
        c.push_policies(push_req(&twice, false)).await,
        Reason::InvalidDocument,
    );
    assert_eq!(err.violations.len(), 1);
    let second = EXAMPLE.lines().count() + 2;
    assert_eq!(
        err.violations[0].position,
        Some((second as u32, 1)),
        "{err:?}"
    );
    assert!(
        err.violations[0]
            .description
            .contains("duplicate policy `refund-limits`"),
        "{err:?}"
    );

    // No block at all.
    let err = expect_reason(
        c.push_policies(push_req("# nothing here\n", false)).await,
        Reason::InvalidDocument,
    );
    assert!(!err.violations.is_empty(), "{err:?}");
    assert!(names(&mut c).await.is_empty());

    // One block refused by the store (its policy was deleted): neither stored.
    let pii = &EXAMPLE[EXAMPLE.find("policy \"pii").unwrap()..];
    c.push_policy(pb::PushPolicyRequest {
        source: pii.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.delete_policy(pb::DeletePolicyRequest {
        name: "pii-masking".into(),
        etag: String::new(),
    })
    .await
    .unwrap();
    expect_reason(
        c.push_policies(push_req(EXAMPLE, false)).await,
        Reason::DocumentDeleted,
    );
    let err = expect_reason(
        c.get_policy(pb::GetPolicyRequest {
            name: "refund-limits".into(),
            version: String::new(),
        })
        .await,
        Reason::PolicyNotFound,
    );
    assert!(err.message.contains("refund-limits"), "{err:?}");

    // Operators and auditors may not push; the service keeps serving.
    for role in [Role::Operator, Role::Auditor] {
        let mut other = app.client(&[role]).await;
        expect_error(
            other.push_policies(push_req(EXAMPLE, false)).await,
            ErrorCode::PermissionDenied,
        );
    }
    assert!(names(&mut c).await.is_empty());
}
