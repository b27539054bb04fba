#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The Policy service driven like a client drives it: real gRPC over TCP,
//! behind the real authentication layer, against SQLite and PostgreSQL.
//!
//! Each scenario is one `async fn(TestApp)`; `on_both_backends!` runs it once
//! per database.

use std::net::SocketAddr;
use std::time::Duration;

use anumate_auth::{BearerToken, DevIssuer, Role};
use anumate_errors::{Error, ErrorCode, Reason};
use anumate_policy_service::{Policies, PolicyConfig, PolicyGrpc};
use anumate_proto::policy::v1 as pb;
use anumate_testing::{
    self as testing, Backend, DevAuth, Store, TestDb, expect_error, expect_reason, on_both_backends,
};
use pb::evaluate_policy_request::{Input, Policies as Target};
use pb::policy_service_client::PolicyServiceClient;
use tonic::Status;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt as _;

type Client = PolicyServiceClient<InterceptedService<Channel, BearerToken>>;

const EXAMPLE: &str = include_str!("../../../examples/refund.policy");
const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";
const AUTHOR: &[Role] = &[Role::Author];
const OPERATOR: &[Role] = &[Role::Operator];
const AUDITOR: &[Role] = &[Role::Auditor];
const MAX_SOURCE: usize = 64 * 1024;

const LIMITS: &str = r#"policy "refund-limits" {
  description: "Limits on automated refunds"
  rule "only-inr" priority 100 {
    when tool == "payments.refund" and args.currency != "INR"
    then deny(reason: "only INR refunds are automated")
  }
  rule "large-refund" {
    when tool == "payments.refund"
     and args.amount > 500000
     and not (principal.roles contains "finance-lead")
    then require_approval(approvers: ["group:finance-leads"], quorum: 1,
                          reason: "refund above 5,000 INR")
  }
  test "big refund waits for a lead" {
    given { tool: "payments.refund", args: {amount: 900000, currency: "INR"},
            principal: {roles: ["operator"]} }
    expect require_approval
  }
}
"#;

/// `LIMITS` reformatted, with comments: the same canonical form.
const LIMITS_REFORMATTED: &str = r#"# refund limits, reformatted
policy "refund-limits" { description: "Limits on automated refunds"
  rule "only-inr" priority 100 { when tool == "payments.refund" and args.currency != "INR" then deny(reason: "only INR refunds are automated") }
  # the big one
  rule "large-refund" { when tool == "payments.refund" and args.amount > 500000 and not (principal.roles contains "finance-lead")
    then require_approval(approvers: ["group:finance-leads"], quorum: 1, reason: "refund above 5,000 INR") }
  test "big refund waits for a lead" { given { tool: "payments.refund", args: {amount: 900000, currency: "INR"}, principal: {roles: ["operator"]} } expect require_approval }
}
"#;

const PII: &str = r#"policy "pii-masking" {
  rule "mask-contacts" {
    when true
    then redact(fields: ["customer.phone"], with: "[REDACTED]"),
         redact(detectors: ["email", "phone", "card", "iban", "api_key"])
  }
}
"#;

const BIG_REFUND: &str = r#"{"tool": "payments.refund", "args": {"amount": 900000, "currency": "INR",
  "customer": {"email": "jane.doe@example.com", "phone": "+44 20 7946 0958"}},
  "principal": {"id": "user:bob", "roles": ["operator"]}, "now": "2026-01-01T00:00:00Z"}"#;

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

struct TestApp {
    addr: SocketAddr,
    issuer: DevIssuer,
    store: Store,
    server: tokio::task::JoinHandle<()>,
    _db: TestDb,
    _issuer_dir: tempfile::TempDir,
}

async fn spawn_app(backend: Backend) -> TestApp {
    spawn_with(
        backend,
        PolicyConfig {
            max_source_bytes: MAX_SOURCE,
            ..PolicyConfig::default()
        },
    )
    .await
}

async fn spawn_with(backend: Backend, cfg: PolicyConfig) -> TestApp {
    let (db, store) = testing::migrated_store(backend, &anumate_policy_service::migrations()).await;
    let policies = Policies::new(store.clone(), &cfg);

    let DevAuth {
        issuer,
        authenticator: auth,
        dir: issuer_dir,
        ..
    } = DevAuth::new();
    let (addr, server) =
        testing::serve(auth, Routes::new(PolicyGrpc::new(policies).into_server())).await;
    TestApp {
        addr,
        issuer,
        store,
        server,
        _db: db,
        _issuer_dir: issuer_dir,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TestApp {
    async fn client_with_token(&self, token: &str) -> Client {
        let channel = Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        PolicyServiceClient::with_interceptor(channel, BearerToken(token.into()))
    }

    async fn client(&self, tenant: &str, roles: &[Role]) -> Client {
        let token = self
            .issuer
            .mint(tenant, "alice", roles, Duration::from_secs(300))
            .expect("mint");
        self.client_with_token(&token).await
    }

    /// `(input_json)` of every decision log row of `tenant`.
    async fn decision_inputs(&self, tenant: &str) -> Vec<String> {
        let tx = self.store.read(tenant).await.expect("read tx");
        let rows = tx
            .query_all(
                "SELECT input_json FROM policy_decisions WHERE tenant_id = $1 ORDER BY created_at",
                vec![tenant.into()],
            )
            .await
            .expect("query");
        rows.iter()
            .map(|r| r.try_get::<String>("", "input_json").expect("input_json"))
            .collect()
    }

    async fn event_types(&self, tenant: &str) -> Vec<(String, String, String)> {
        let tx = self.store.read(tenant).await.expect("read tx");
        anumate_events::read_after(&tx, 0, 1000)
            .await
            .expect("outbox")
            .into_iter()
            .map(|r| (r.event_type, r.topic, r.subject))
            .collect()
    }
}

on_both_backends! {
    lifecycle => lifecycle_sqlite, lifecycle_postgres;
    evaluation => evaluation_sqlite, evaluation_postgres;
    tests_and_redact => tests_and_redact_sqlite, tests_and_redact_postgres;
    bad_input => bad_input_sqlite, bad_input_postgres;
    roles => roles_sqlite, roles_postgres;
    tenancy => tenancy_sqlite, tenancy_postgres;
    decision_log_redaction => decision_log_redaction_sqlite, decision_log_redaction_postgres;
    events => events_sqlite, events_postgres;
    concurrent_pushes => concurrent_pushes_sqlite, concurrent_pushes_postgres;
}

fn push_req(source: &str, publish: bool) -> pb::PushPolicyRequest {
    pb::PushPolicyRequest {
        source: source.into(),
        source_name: "test.policy".into(),
        etag: String::new(),
        publish,
    }
}

async fn push(c: &mut Client, source: &str, publish: bool) -> pb::PushPolicyResponse {
    c.push_policy(push_req(source, publish))
        .await
        .expect("push")
        .into_inner()
}

fn eval_set(refs: &[(&str, i32, &str)], input: &str) -> pb::EvaluatePolicyRequest {
    pb::EvaluatePolicyRequest {
        policies: Some(Target::PolicySet(pb::PolicySet {
            policies: refs
                .iter()
                .map(|(n, v, h)| pb::PolicyRef {
                    name: n.to_string(),
                    version: *v,
                    content_hash: h.to_string(),
                })
                .collect(),
        })),
        source_name: String::new(),
        input: Some(Input::InputJson(input.into())),
        allowed_tools: Vec::new(),
    }
}

fn eval_source(source: &str, input: &str) -> pb::EvaluatePolicyRequest {
    pb::EvaluatePolicyRequest {
        policies: Some(Target::Source(source.into())),
        source_name: "adhoc.policy".into(),
        input: Some(Input::InputJson(input.into())),
        allowed_tools: Vec::new(),
    }
}

async fn get(c: &mut Client, name: &str, version: &str) -> Result<pb::GetPolicyResponse, Status> {
    c.get_policy(pb::GetPolicyRequest {
        name: name.into(),
        version: version.into(),
    })
    .await
    .map(|r| r.into_inner())
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

async fn lifecycle(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let v1 = push(&mut c, LIMITS, false).await;
    assert!(v1.created);
    let ver = v1.version.clone().unwrap();
    assert_eq!((ver.name.as_str(), ver.version), ("refund-limits", 1));
    assert_eq!(ver.status, pb::PolicyVersionStatus::Draft as i32);
    assert_eq!(ver.source, LIMITS);
    assert!(ver.content_hash.starts_with("sha256:"));
    assert_eq!(
        ver.content_hash,
        format!(
            "sha256:{}",
            anumate_crypto::sha256_hex(ver.canonical_json.as_bytes())
        )
    );
    assert_eq!(ver.test_count, 1);
    let rules: Vec<_> = ver
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.priority, r.effect))
        .collect();
    assert_eq!(
        rules,
        [
            ("only-inr", 100, pb::Effect::Deny as i32),
            ("large-refund", 0, pb::Effect::RequireApproval as i32)
        ]
    );
    assert_eq!(ver.rules[1].span.as_ref().unwrap().start_line, 7);
    assert_eq!(v1.policy.as_ref().unwrap().latest_version, 1);

    // Identical and merely reformatted content: no new version.
    let again = push(&mut c, LIMITS, false).await;
    assert!(!again.created);
    assert_eq!(again.version.unwrap().version, 1);
    let reformatted = push(&mut c, LIMITS_REFORMATTED, false).await;
    assert!(!reformatted.created, "comments and layout are not content");

    // New content: version 2.
    let changed = LIMITS.replace("500000", "400000");
    let v2 = push(&mut c, &changed, false).await;
    assert!(v2.created);
    assert_eq!(v2.version.as_ref().unwrap().version, 2);
    assert_ne!(v2.version.as_ref().unwrap().content_hash, ver.content_hash);

    // Nothing published yet.
    expect_reason(
        get(&mut c, "refund-limits", "").await,
        Reason::PolicyVersionNotFound,
    );
    let latest = get(&mut c, "refund-limits", "latest").await.unwrap();
    assert_eq!(latest.version.unwrap().version, 2);

    // Publish v1, then read it as "published".
    let p = c
        .publish_policy_version(pb::PublishPolicyVersionRequest {
            name: "refund-limits".into(),
            version: 1,
            etag: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.policy.as_ref().unwrap().published_version, 1);
    let published = get(&mut c, "refund-limits", "published").await.unwrap();
    let pv = published.version.unwrap();
    assert_eq!(pv.version, 1);
    assert_eq!(pv.status, pb::PolicyVersionStatus::Published as i32);
    assert_eq!(pv.rules.len(), 2);

    // Versions newest first, metadata only.
    let versions = c
        .list_policy_versions(pb::ListPolicyVersionsRequest {
            name: "refund-limits".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [2, 1]
    );
    assert!(
        versions
            .iter()
            .all(|v| v.source.is_empty() && v.canonical_json.is_empty())
    );

    push(&mut c, PII, false).await;
    let list = c
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["pii-masking", "refund-limits"]);
    // One per page (AIP-158); a token the server did not issue names `page_token`.
    let page = |page_token: String| pb::ListPoliciesRequest {
        page_size: 1,
        page_token,
        ..Default::default()
    };
    let first = c
        .list_policies(page(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.policies[0].name, "pii-masking");
    let second = c
        .list_policies(page(first.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.policies[0].name, "refund-limits");
    assert!(second.next_page_token.is_empty());
    let err = expect_error(
        c.list_policies(page("%%".into())).await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(err.violations[0].field, "page_token");
    let only_published = c
        .list_policies(pb::ListPoliciesRequest {
            status: pb::PolicyVersionStatus::Published as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(only_published.policies.len(), 1);

    // Stale etag.
    let err = expect_error(
        c.publish_policy_version(pb::PublishPolicyVersionRequest {
            name: "refund-limits".into(),
            version: 2,
            etag: "r1".into(),
        })
        .await,
        ErrorCode::EtagMismatch,
    );
    assert!(err.message.contains("changed"));

    // Deprecate v1: nothing published; it cannot be published again.
    let d = c
        .deprecate_policy_version(pb::DeprecatePolicyVersionRequest {
            name: "refund-limits".into(),
            version: 1,
            etag: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.policy.unwrap().published_version, 0);
    expect_reason(
        c.publish_policy_version(pb::PublishPolicyVersionRequest {
            name: "refund-limits".into(),
            version: 1,
            etag: String::new(),
        })
        .await,
        Reason::VersionDeprecated,
    );

    // Delete: gone from reads; its name cannot be reused; exact hash still evaluates.
    c.delete_policy(pb::DeletePolicyRequest {
        name: "refund-limits".into(),
        etag: String::new(),
    })
    .await
    .unwrap();
    expect_reason(
        get(&mut c, "refund-limits", "latest").await,
        Reason::PolicyNotFound,
    );
    expect_reason(
        c.push_policy(push_req(LIMITS, false)).await,
        Reason::DocumentDeleted,
    );
    let by_hash = c
        .evaluate_policy(eval_set(
            &[("refund-limits", 0, &ver.content_hash)],
            BIG_REFUND,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        by_hash.decision.unwrap().effect,
        pb::Effect::RequireApproval as i32
    );
    // The pin may also be written `sha256-<hex>` or as bare hex; the
    // response names it in the one wire form.
    let hex = ver.content_hash.trim_start_matches("sha256:");
    for pin in [format!("sha256-{hex}"), hex.to_string()] {
        let resp = c
            .evaluate_policy(eval_set(&[("refund-limits", 0, &pin)], BIG_REFUND))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.policies[0].content_hash, ver.content_hash, "{pin}");
    }
    let err = expect_error(
        c.evaluate_policy(eval_set(&[("refund-limits", 0, "sha256:beef")], BIG_REFUND))
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(err.violations[0].field, "policies.content_hash");
}

async fn evaluation(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let limits = push(&mut c, LIMITS, true).await.version.unwrap();
    let pii = push(&mut c, PII, true).await.version.unwrap();

    let resp = c
        .evaluate_policy(eval_set(
            &[("refund-limits", 0, ""), ("pii-masking", 0, "")],
            BIG_REFUND,
        ))
        .await
        .unwrap()
        .into_inner();
    let d = resp.decision.clone().unwrap();
    assert_eq!(d.effect, pb::Effect::RequireApproval as i32);
    let matched: Vec<_> = d
        .matched_rules
        .iter()
        .map(|m| {
            let r = m.rule.as_ref().unwrap();
            (
                r.policy.as_str(),
                r.rule.as_str(),
                r.span.as_ref().unwrap().start_line,
            )
        })
        .collect();
    assert_eq!(
        matched,
        [
            ("pii-masking", "mask-contacts", 2),
            ("refund-limits", "large-refund", 7)
        ]
    );
    let large = &d.matched_rules[1];
    assert_eq!(large.reason, "refund above 5,000 INR");
    let r = large.rule.as_ref().unwrap();
    assert_eq!(
        (r.policy_version, r.content_hash.as_str()),
        (1, limits.content_hash.as_str())
    );
    assert_eq!(r.span.as_ref().unwrap().source_name, "refund-limits@1");
    assert_eq!(d.reasons, ["refund above 5,000 INR"]);
    let obl = d.obligations.unwrap();
    assert_eq!(obl.approvals.len(), 1);
    let stage = &obl.approvals[0].stages[0];
    assert_eq!(
        (stage.approvers.as_slice(), stage.quorum),
        (&["group:finance-leads".to_string()][..], 1)
    );
    assert_eq!(obl.redactions.len(), 2);
    assert_eq!(obl.redactions[0].fields, ["customer.phone"]);
    assert!(
        obl.redactions[1]
            .detectors
            .contains(&(pb::Detector::Email as i32))
    );
    let names: Vec<_> = resp
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p.version))
        .collect();
    assert_eq!(names, [("pii-masking", 1), ("refund-limits", 1)]);
    assert!(resp.policy_set_hash.starts_with("sha256:"));
    assert!(resp.fuel_used > 0);

    // Pure: the same request gives the same decision.
    let again = c
        .evaluate_policy(eval_set(
            &[("pii-masking", 0, ""), ("refund-limits", 0, "")],
            BIG_REFUND,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, resp);

    // A content-hash pin that contradicts the version number.
    expect_reason(
        c.evaluate_policy(eval_set(
            &[("refund-limits", 1, &pii.content_hash)],
            BIG_REFUND,
        ))
        .await,
        Reason::PolicyVersionNotFound,
    );
    let changed = push(&mut c, &LIMITS.replace("500000", "400000"), false).await;
    expect_error(
        c.evaluate_policy(eval_set(
            &[("refund-limits", 1, &changed.version.unwrap().content_hash)],
            BIG_REFUND,
        ))
        .await,
        ErrorCode::FailedPrecondition,
    );

    // Ad-hoc source: deny beats everything, priority first.
    let usd = r#"{"tool": "payments.refund", "args": {"amount": 900000, "currency": "USD"}}"#;
    let adhoc = c
        .evaluate_policy(eval_source(EXAMPLE, usd))
        .await
        .unwrap()
        .into_inner();
    let d = adhoc.decision.unwrap();
    assert_eq!(d.effect, pb::Effect::Deny as i32);
    assert_eq!(d.matched_rules[0].rule.as_ref().unwrap().rule, "only-inr");
    assert_eq!(d.matched_rules[0].priority, 100);
    assert_eq!(
        d.matched_rules[0]
            .rule
            .as_ref()
            .unwrap()
            .span
            .as_ref()
            .unwrap()
            .source_name,
        "adhoc.policy"
    );
    assert!(adhoc.policies.iter().all(|p| p.version == 0));

    // Structured input.
    let mut req = eval_source(EXAMPLE, "");
    let v: serde_json::Value = serde_json::from_str(usd).unwrap();
    req.input = Some(Input::InputStruct(serde_json::from_value(v).unwrap()));
    let d = c
        .evaluate_policy(req)
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.effect, pb::Effect::Deny as i32);

    // The allow-list denies before any policy runs.
    let mut req = eval_source(EXAMPLE, r#"{"tool": "payments.charge"}"#);
    req.allowed_tools = vec!["payments.refund".into()];
    let d = c
        .evaluate_policy(req)
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.effect, pb::Effect::Deny as i32);
    assert!(d.denied_by_allow_list);
    assert!(d.matched_rules.is_empty());
    assert_eq!(
        d.reasons,
        ["tool \"payments.charge\" is not in the capsule's allow-list"]
    );

    // Nothing matches: allow.
    let d = c
        .evaluate_policy(eval_set(
            &[("refund-limits", 0, "")],
            r#"{"tool": "crm.lookup"}"#,
        ))
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.effect, pb::Effect::Allow as i32);
}

async fn tests_and_redact(app: TestApp) {
    let mut c = app.client(TENANT_A, AUDITOR).await;
    let resp = c
        .test_policy(pb::TestPolicyRequest {
            target: Some(pb::test_policy_request::Target::Source(EXAMPLE.into())),
            source_name: "refund.policy".into(),
            name_filter: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.passed_count, resp.failed_count), (1, 0));
    assert!(resp.results[0].passed);
    let span = resp.results[0].span.as_ref().unwrap();
    assert_eq!(
        (span.source_name.as_str(), span.start_line),
        ("refund.policy", 14)
    );

    let failing = EXAMPLE.replace("expect require_approval", "expect allow");
    let resp = c
        .test_policy(pb::TestPolicyRequest {
            target: Some(pb::test_policy_request::Target::Source(failing)),
            source_name: "refund.policy".into(),
            name_filter: "big".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.passed_count, resp.failed_count), (0, 1));
    let r = &resp.results[0];
    assert!(!r.passed);
    assert_eq!(r.expected_effect, pb::Effect::Allow as i32);
    assert_eq!(
        r.decision.as_ref().unwrap().effect,
        pb::Effect::RequireApproval as i32
    );
    assert!(
        r.failure_message.contains("expected: allow"),
        "{}",
        r.failure_message
    );

    // A stored version's tests.
    let mut author = app.client(TENANT_A, AUTHOR).await;
    push(&mut author, LIMITS, true).await;
    let resp = c
        .test_policy(pb::TestPolicyRequest {
            target: Some(pb::test_policy_request::Target::Policy(pb::PolicyRef {
                name: "refund-limits".into(),
                version: 0,
                content_hash: String::new(),
            })),
            source_name: String::new(),
            name_filter: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.passed_count, 1);

    // Redact: text, JSON with field paths.
    let text = c
        .redact(pb::RedactRequest {
            value: Some(pb::redact_request::Value::Text(
                "mail jane.doe@example.com now".into(),
            )),
            redactions: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        text.value,
        Some(pb::redact_response::Value::Text(
            "mail [REDACTED:email] now".into()
        ))
    );
    assert_eq!(text.findings[0].detector, pb::Detector::Email as i32);
    let json = c
        .redact(pb::RedactRequest {
            value: Some(pb::redact_request::Value::ValueJson(
                r#"{"customer": {"name": "Jane", "email": "jane@example.com"}, "note": "call +44 20 7946 0958"}"#.into(),
            )),
            redactions: vec![pb::Redaction {
                fields: vec!["customer.name".into()],
                detectors: vec![pb::Detector::Email as i32, pb::Detector::Phone as i32],
                replacement: "***".into(),
                rule: None,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        json.value,
        Some(pb::redact_response::Value::ValueJson(
            r#"{"customer":{"email":"***","name":"***"},"note":"call ***"}"#.into()
        ))
    );
    let findings: Vec<_> = json
        .findings
        .iter()
        .map(|f| (f.path.as_str(), f.detector, f.field.as_str(), f.count))
        .collect();
    assert_eq!(
        findings,
        [
            ("$.customer.name", 0, "customer.name", 1),
            ("$.customer.email", pb::Detector::Email as i32, "", 1),
            ("$.note", pb::Detector::Phone as i32, "", 1),
        ]
    );
}

async fn bad_input(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;

    // Oversized policy source.
    let big = format!("{LIMITS}\n# {}\n", "x".repeat(MAX_SOURCE));
    expect_error(
        c.push_policy(push_req(&big, false)).await,
        ErrorCode::PayloadTooLarge,
    );
    expect_error(
        c.evaluate_policy(eval_source(&big, "{}")).await,
        ErrorCode::PayloadTooLarge,
    );
    // Beyond the transport limit: refused from the length prefix, same code.
    let huge = format!("{LIMITS}\n# {}\n", "x".repeat(4 * 1024 * 1024));
    let err = expect_error(
        c.push_policy(push_req(&huge, false)).await,
        ErrorCode::PayloadTooLarge,
    );
    assert!(err.message.contains("too large"), "{}", err.message);
    // An oversized input.
    let input = format!(r#"{{"args": {{"pad": "{}"}}}}"#, "x".repeat(1024 * 1024));
    expect_error(
        c.evaluate_policy(eval_source(LIMITS, &input)).await,
        ErrorCode::PayloadTooLarge,
    );

    // Syntax error: INVALID_DOCUMENT with line:col.
    let broken = LIMITS.replace("then deny(", "then deny((");
    let err = expect_error(
        c.push_policy(push_req(&broken, false)).await,
        ErrorCode::InvalidDocument,
    );
    assert_eq!(err.violations.len(), 1, "{err:?}");
    assert_eq!(err.violations[0].position.map(|p| p.0), Some(5), "{err:?}");
    // Unknown field: a checker error, also positioned.
    let unknown = LIMITS.replace("args.currency", "argz.currency");
    let err = expect_error(
        c.push_policy(push_req(&unknown, false)).await,
        ErrorCode::InvalidDocument,
    );
    assert_eq!(err.violations[0].position, Some((4, 40)), "{err:?}");
    // Two policy blocks in a stored document.
    let err = expect_error(
        c.push_policy(push_req(EXAMPLE, false)).await,
        ErrorCode::InvalidDocument,
    );
    assert_eq!(err.violations[0].position, Some((20, 1)), "{err:?}");
    expect_error(
        c.validate_policy(pb::ValidatePolicyRequest {
            source: broken.clone(),
            source_name: "x.policy".into(),
        })
        .await,
        ErrorCode::InvalidDocument,
    );
    expect_error(
        c.evaluate_policy(eval_source(&broken, "{}")).await,
        ErrorCode::InvalidDocument,
    );

    // Unknown policy reference.
    expect_reason(
        c.evaluate_policy(eval_set(&[("no-such-policy", 0, "")], "{}"))
            .await,
        Reason::PolicyNotFound,
    );
    push(&mut c, LIMITS, false).await;
    expect_reason(
        c.evaluate_policy(eval_set(&[("refund-limits", 0, "")], "{}"))
            .await,
        Reason::PolicyVersionNotFound, // nothing published
    );
    expect_reason(
        c.evaluate_policy(eval_set(&[("refund-limits", 9, "")], "{}"))
            .await,
        Reason::PolicyVersionNotFound,
    );
    expect_error(
        c.evaluate_policy(eval_set(
            &[("refund-limits", 1, ""), ("refund-limits", 1, "")],
            "{}",
        ))
        .await,
        ErrorCode::InvalidArgument,
    );
    expect_error(
        c.evaluate_policy(eval_set(&[], "{}")).await,
        ErrorCode::InvalidArgument,
    );

    // Malformed input JSON: INVALID_ARGUMENT with its position.
    let err = expect_error(
        c.evaluate_policy(eval_set(&[("refund-limits", 1, "")], "{\n  \"tool\": }"))
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(err.violations[0].field, "input_json");
    assert_eq!(err.violations[0].position, Some((2, 11)), "{err:?}");
    expect_error(
        c.evaluate_policy(eval_set(&[("refund-limits", 1, "")], "[1, 2]"))
            .await,
        ErrorCode::InvalidArgument,
    );
    let err = expect_error(
        c.evaluate_policy(eval_set(&[("refund-limits", 1, "")], r#"{"toll": "x"}"#))
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(err.violations[0].field, "input_json.toll");
    let mut missing = eval_source(LIMITS, "{}");
    missing.input = None;
    expect_error(c.evaluate_policy(missing).await, ErrorCode::InvalidArgument);

    // Bad names and versions.
    expect_error(
        get(&mut c, "Not A Name", "").await,
        ErrorCode::InvalidArgument,
    );
    expect_error(
        get(&mut c, "refund-limits", "first").await,
        ErrorCode::InvalidArgument,
    );

    // The service keeps serving.
    get(&mut c, "refund-limits", "latest").await.unwrap();
}

async fn roles(app: TestApp) {
    let mut author = app.client(TENANT_A, AUTHOR).await;
    push(&mut author, LIMITS, true).await;

    let mut op = app.client(TENANT_A, OPERATOR).await;
    expect_error(
        op.push_policy(push_req(PII, false)).await,
        ErrorCode::PermissionDenied,
    );
    expect_error(
        op.delete_policy(pb::DeletePolicyRequest {
            name: "refund-limits".into(),
            etag: String::new(),
        })
        .await,
        ErrorCode::PermissionDenied,
    );
    op.evaluate_policy(eval_set(&[("refund-limits", 0, "")], BIG_REFUND))
        .await
        .unwrap();

    let mut auditor = app.client(TENANT_A, AUDITOR).await;
    get(&mut auditor, "refund-limits", "").await.unwrap();
    expect_error(
        auditor
            .evaluate_policy(eval_set(&[("refund-limits", 0, "")], BIG_REFUND))
            .await,
        ErrorCode::PermissionDenied,
    );
    expect_error(
        auditor
            .publish_policy_version(pb::PublishPolicyVersionRequest {
                name: "refund-limits".into(),
                version: 1,
                etag: String::new(),
            })
            .await,
        ErrorCode::PermissionDenied,
    );

    let mut anon = app.client_with_token("not-a-token").await;
    expect_error(
        get(&mut anon, "refund-limits", "").await,
        ErrorCode::Unauthenticated,
    );
}

async fn tenancy(app: TestApp) {
    let mut a = app.client(TENANT_A, AUTHOR).await;
    let pushed = push(&mut a, LIMITS, true).await.version.unwrap();
    let mut b = app.client(TENANT_B, AUTHOR).await;
    expect_reason(
        get(&mut b, "refund-limits", "").await,
        Reason::PolicyNotFound,
    );
    let list = b
        .list_policies(pb::ListPoliciesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.policies.is_empty());
    expect_reason(
        b.evaluate_policy(eval_set(&[("refund-limits", 0, "")], BIG_REFUND))
            .await,
        Reason::PolicyNotFound,
    );
    expect_reason(
        b.evaluate_policy(eval_set(
            &[("refund-limits", 0, &pushed.content_hash)],
            BIG_REFUND,
        ))
        .await,
        Reason::PolicyNotFound,
    );
    // The same content in B is B's own version 1, and A is untouched.
    let own = push(&mut b, LIMITS, false).await;
    assert!(own.created);
    assert_eq!(own.version.unwrap().version, 1);
    assert_eq!(
        get(&mut a, "refund-limits", "")
            .await
            .unwrap()
            .version
            .unwrap()
            .status,
        pb::PolicyVersionStatus::Published as i32
    );
    // The caller's tenant replaces one given in the input.
    let d = a
        .evaluate_policy(eval_source(
            r#"policy "t" { rule "other-tenant" { when tenant == "tenant-b" then deny() } }"#,
            r#"{"tenant": "tenant-b"}"#,
        ))
        .await
        .unwrap()
        .into_inner()
        .decision
        .unwrap();
    assert_eq!(d.effect, pb::Effect::Allow as i32);
    assert!(app.decision_inputs(TENANT_B).await.is_empty());
}

async fn decision_log_redaction(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    push(&mut c, LIMITS, true).await;
    push(&mut c, PII, true).await;
    c.evaluate_policy(eval_set(
        &[("refund-limits", 0, ""), ("pii-masking", 0, "")],
        BIG_REFUND,
    ))
    .await
    .unwrap();
    let rows = app.decision_inputs(TENANT_A).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert!(!row.contains("jane.doe@example.com"), "{row}");
    assert!(!row.contains("7946"), "{row}");
    let logged: serde_json::Value = serde_json::from_str(row).unwrap();
    assert_eq!(logged["args"]["customer"]["phone"], "[REDACTED]");
    assert_eq!(logged["args"]["customer"]["email"], "[REDACTED:email]");
    assert_eq!(logged["args"]["amount"], 900000);
    assert_eq!(logged["tenant"], TENANT_A);

    // `ip` is IPv4 and IPv6; every DSL detector has a proto name.
    let resp = c
        .evaluate_policy(eval_source(
            r#"policy "ips" { rule "r" { when true then redact(detectors: ["ip", "jwt"]) } }"#,
            r#"{"args": {"addr": "2001:db8::1", "peer": "10.1.2.3"}}"#,
        ))
        .await
        .unwrap()
        .into_inner();
    let redaction = &resp.decision.unwrap().obligations.unwrap().redactions[0];
    assert_eq!(
        redaction.detectors,
        [
            pb::Detector::Ipv4 as i32,
            pb::Detector::Ipv6 as i32,
            pb::Detector::Jwt as i32
        ]
    );
    let rows = app.decision_inputs(TENANT_A).await;
    let row = rows.last().unwrap();
    assert!(
        !row.contains("2001:db8::1") && !row.contains("10.1.2.3"),
        "{row}"
    );
    assert!(row.contains("[REDACTED:ipv6]"), "{row}");

    // Without a redact obligation the input is logged as given.
    c.evaluate_policy(eval_set(
        &[("refund-limits", 0, "")],
        r#"{"tool": "crm.lookup", "args": {"q": "x"}}"#,
    ))
    .await
    .unwrap();
    let rows = app.decision_inputs(TENANT_A).await;
    assert_eq!(rows.len(), 3);
    assert!(rows[2].contains("crm.lookup"));
}

async fn events(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    push(&mut c, LIMITS, true).await;
    push(&mut c, LIMITS, true).await; // no-op: no event
    c.deprecate_policy_version(pb::DeprecatePolicyVersionRequest {
        name: "refund-limits".into(),
        version: 1,
        etag: String::new(),
    })
    .await
    .unwrap();
    c.delete_policy(pb::DeletePolicyRequest {
        name: "refund-limits".into(),
        etag: String::new(),
    })
    .await
    .unwrap();
    let events = app.event_types(TENANT_A).await;
    let want = [
        (
            "dev.anumate.policy.pushed.v1",
            "policies/refund-limits/versions/1",
        ),
        (
            "dev.anumate.policy.published.v1",
            "policies/refund-limits/versions/1",
        ),
        (
            "dev.anumate.policy.deprecated.v1",
            "policies/refund-limits/versions/1",
        ),
        ("dev.anumate.policy.deleted.v1", "policies/refund-limits"),
    ];
    assert_eq!(events.len(), want.len(), "{events:?}");
    for ((ty, topic, subject), (want_ty, want_subject)) in events.iter().zip(want) {
        assert_eq!(
            (ty.as_str(), topic.as_str(), subject.as_str()),
            (want_ty, "anumate.policies", want_subject)
        );
    }
    assert!(app.event_types(TENANT_B).await.is_empty());
}

/// Running out of fuel is its own error, never a deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_exhaustion_sqlite() {
    let app = spawn_with(
        Backend::Sqlite,
        PolicyConfig {
            fuel: 3,
            ..PolicyConfig::default()
        },
    )
    .await;
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let status = c
        .evaluate_policy(eval_source(LIMITS, BIG_REFUND))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.reason, "FUEL_EXHAUSTED");
    assert_eq!(info.metadata.get("limit").map(String::as_str), Some("fuel"));
    assert!(app.decision_inputs(TENANT_A).await.is_empty());
}

/// Concurrent pushes of distinct content each get their own version; pushes
/// of identical content store it once.
async fn concurrent_pushes(app: TestApp) {
    const N: i32 = 8;
    let client = app.client(TENANT_A, AUTHOR).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let mut c = client.clone();
        tasks.spawn(async move {
            let source = LIMITS.replace("500000", &format!("{}", 500000 + i));
            (i, c.push_policy(push_req(&source, false)).await)
        });
    }
    let mut versions = std::collections::BTreeSet::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.unwrap();
        let pushed = result
            .unwrap_or_else(|s| panic!("push {i} failed: {:?}", Error::from_status(&s)))
            .into_inner();
        assert!(pushed.created);
        assert!(versions.insert(pushed.version.unwrap().version));
    }
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>()
    );

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..N {
        let mut c = client.clone();
        tasks.spawn(async move { c.push_policy(push_req(PII, false)).await });
    }
    let mut created = 0;
    while let Some(joined) = tasks.join_next().await {
        let pushed = joined.unwrap().expect("push").into_inner();
        assert_eq!(pushed.version.unwrap().version, 1);
        created += usize::from(pushed.created);
    }
    assert_eq!(created, 1);
}

// ---------------------------------------------------------------------------
// Issue 9: one deeply nested expression aborted the whole server.
// ---------------------------------------------------------------------------

/// `LIMITS` with its first condition wrapped in 3,000 parentheses (6 KB).
fn deeply_nested_limits() -> String {
    let cond = r#"tool == "payments.refund" and args.currency != "INR""#;
    let deep = format!("{}{cond}{}", "(".repeat(3000), ")".repeat(3000));
    let src = LIMITS.replacen(cond, &deep, 1);
    assert_ne!(src, LIMITS);
    src
}

async fn deep_nesting(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    let deep = deeply_nested_limits();
    let check = |err: Error| {
        assert_eq!(err.violations.len(), 1, "{err:?}");
        let v = &err.violations[0];
        assert!(v.description.contains("nesting deeper than 64"), "{err:?}");
        // Line 4, `when` at column 10: the first `(` past the limit.
        assert_eq!(v.position, Some((4, 10 + 63)), "{err:?}");
    };
    check(expect_error(
        c.evaluate_policy(eval_source(&deep, BIG_REFUND)).await,
        ErrorCode::InvalidDocument,
    ));
    check(expect_error(
        c.validate_policy(pb::ValidatePolicyRequest {
            source: deep.clone(),
            source_name: "deep.policy".into(),
        })
        .await,
        ErrorCode::InvalidDocument,
    ));
    check(expect_error(
        c.push_policy(push_req(&deep, false)).await,
        ErrorCode::InvalidDocument,
    ));
    // The same server still answers, on the same connection.
    let d = c
        .evaluate_policy(eval_source(LIMITS, BIG_REFUND))
        .await
        .expect("a normal evaluation after the deep one")
        .into_inner();
    assert!(d.decision.is_some(), "{d:?}");
}

on_both_backends! {
    deep_nesting => deep_nesting_sqlite, deep_nesting_postgres;
}

// ---------------------------------------------------------------------------
// Decision log retention and size
// ---------------------------------------------------------------------------

const HOUR_MICROS: i64 = 3_600_000_000;

/// Writes a decision log row `age_hours` old for `tenant`, as an evaluation
/// that long ago would have.
async fn old_decision(app: &TestApp, tenant: &str, id: &str, age_hours: i64) {
    let created = anumate_store::now_micros() - age_hours * HOUR_MICROS;
    let tx = app.store.write(tenant).await.expect("write tx");
    tx.execute(
        "INSERT INTO policy_decisions (tenant_id, id, created_at, principal, effect, \
           policy_set_hash, policies, input_json, decision_json, fuel_used) \
         VALUES ($1, $2, $3, 'alice', 'EFFECT_ALLOW', '', '[]', '{}', '{}', 0)",
        vec![tenant.into(), id.into(), created.into()],
    )
    .await
    .expect("insert old decision");
    tx.commit().await.expect("commit");
}

async fn decision_ids(app: &TestApp, tenant: &str) -> Vec<String> {
    let tx = app.store.read(tenant).await.expect("read tx");
    let rows = tx
        .query_all(
            "SELECT id FROM policy_decisions WHERE tenant_id = $1 ORDER BY created_at",
            vec![tenant.into()],
        )
        .await
        .expect("query");
    rows.iter()
        .map(|r| r.try_get::<String>("", "id").expect("id"))
        .collect()
}

/// Decision rows past `decision_retention_hours` (default 720) go when the
/// tenant next records a decision, at most once a minute per tenant; other
/// tenants' rows stay. An input over `max_logged_input_bytes` (default 64 KiB)
/// is stored as its size and hash, not in full.
async fn decision_retention(app: TestApp) {
    let mut c = app.client(TENANT_A, AUTHOR).await;
    old_decision(&app, TENANT_A, "a-old", 721).await;
    old_decision(&app, TENANT_A, "a-recent", 719).await;
    old_decision(&app, TENANT_B, "b-old", 721).await;

    c.evaluate_policy(eval_source(LIMITS, BIG_REFUND))
        .await
        .unwrap();
    let ids = decision_ids(&app, TENANT_A).await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], "a-recent");
    assert_eq!(decision_ids(&app, TENANT_B).await, ["b-old"]);

    // Within the minute, the next evaluation does not purge again.
    old_decision(&app, TENANT_A, "a-old-2", 800).await;
    let big_note = "x".repeat(100 * 1024);
    let big_input =
        serde_json::json!({"tool": "crm.lookup", "args": {"note": big_note}}).to_string();
    c.evaluate_policy(eval_source(LIMITS, &big_input))
        .await
        .unwrap();
    let ids = decision_ids(&app, TENANT_A).await;
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[0], "a-old-2");

    // The large input is logged as its size and hash.
    let inputs = app.decision_inputs(TENANT_A).await;
    let logged: serde_json::Value = serde_json::from_str(inputs.last().unwrap()).unwrap();
    assert_eq!(logged["omitted"], true, "{logged}");
    let bytes = logged["bytes"].as_u64().unwrap();
    assert!(bytes > 100 * 1024, "{logged}");
    assert_eq!(logged["sha256"].as_str().unwrap().len(), 64, "{logged}");
    assert!(inputs.iter().all(|i| i.len() < 64 * 1024));
}

/// `decision_retention_hours = 0` keeps every row.
async fn decision_retention_off(backend: Backend) {
    let app = spawn_with(
        backend,
        PolicyConfig {
            decision_retention_hours: 0,
            ..PolicyConfig::default()
        },
    )
    .await;
    let mut c = app.client(TENANT_A, AUTHOR).await;
    old_decision(&app, TENANT_A, "ancient", 24 * 365 * 5).await;
    c.evaluate_policy(eval_source(LIMITS, BIG_REFUND))
        .await
        .unwrap();
    let ids = decision_ids(&app, TENANT_A).await;
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_eq!(ids[0], "ancient");
}

on_both_backends! {
    decision_retention => decision_retention_sqlite, decision_retention_postgres;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_retention_off_sqlite() {
    decision_retention_off(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_retention_off_postgres() {
    decision_retention_off(Backend::Postgres).await;
}
