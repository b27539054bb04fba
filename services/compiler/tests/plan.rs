#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The compile function without I/O: golden plan hashes, hash stability and
//! sensitivity, and the problems it rejects with their stable reasons.
//!
//! Golden vectors live in `testdata/plans/*.json`: the inputs (capsule YAML and
//! version, resolved policy versions) and the expected `plan_hash` plus the
//! executable content it is computed over. Regenerate after an intended change
//! with `ANUMATE_UPDATE_GOLDEN=1 cargo test -p anumate-compiler --test plan`
//! and review the diff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anumate_compiler::plan::{executable_content, plan_hash};
use anumate_compiler::{Catalogue, CompileInput, ResolvedPolicy, compile};
use anumate_errors::{Error, ErrorCode, Reason};
use anumate_proto::compiler::v1 as pb;
use serde_json::{Value, json};

const CAPSULE: &str = include_str!("../../../examples/refund.capsule.yaml");
const POLICIES: &str = include_str!("../../../examples/refund.policy");

fn parse(yaml: &str) -> anumate_capsule::Capsule {
    anumate_capsule::parse(yaml, &anumate_capsule::Limits::default())
        .unwrap_or_else(|e| panic!("{e}: {e:?}"))
}

/// The two policies of `examples/refund.policy` as separately stored versions.
fn example_policies() -> Vec<ResolvedPolicy> {
    let (limits, pii) = POLICIES.split_at(POLICIES.find("policy \"pii-masking\"").unwrap());
    vec![
        ResolvedPolicy::new("refund-limits", 3, &fake_hash("refund-limits@3"), limits).unwrap(),
        ResolvedPolicy::new("pii-masking", 1, &fake_hash("pii-masking@1"), pii).unwrap(),
    ]
}

fn fake_hash(s: &str) -> String {
    format!("sha256:{}", anumate_crypto::sha256_hex(s.as_bytes()))
}

fn compile_with(
    capsule: &anumate_capsule::Capsule,
    policies: &[ResolvedPolicy],
) -> Result<pb::ExecutablePlan, Error> {
    let catalogue = Catalogue::new(&[]).unwrap();
    let (_, hash) = anumate_crypto::content_hash(&capsule.document);
    compile(&CompileInput {
        capsule,
        capsule_version: 1,
        capsule_content_hash: &hash,
        policies,
        catalogue: &catalogue,
        default_timeout: Duration::from_secs(30),
    })
}

fn compile_yaml(yaml: &str) -> Result<pb::ExecutablePlan, Error> {
    compile_with(&parse(yaml), &example_policies())
}

fn reason(e: &Error) -> &str {
    e.metadata
        .iter()
        .find(|(k, _)| k == "reason")
        .map_or("", |(_, v)| v.as_str())
}

#[test]
fn example_capsule_compiles_to_the_documented_plan() {
    let plan = compile_yaml(CAPSULE).unwrap();
    assert!(plan.plan_hash.starts_with("sha256:") && plan.plan_hash.len() == 71);
    let ids: Vec<_> = plan.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["fetch-order", "refund", "notify"]);
    let levels: Vec<_> = plan.levels.iter().map(|l| l.step_ids.clone()).collect();
    assert_eq!(levels, [["fetch-order"], ["refund"], ["notify"]]);
    assert_eq!(
        plan.steps[1].condition,
        "steps.fetch-order.output.status == 'paid'"
    );
    assert_eq!(
        plan.allowed_tools,
        ["email.send", "http.get", "payments.refund"]
    );
    let names: Vec<_> = plan
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p.version))
        .collect();
    assert_eq!(names, [("pii-masking", 1), ("refund-limits", 3)]);
    // The large-refund rule depends on the amount and the principal: conditional.
    assert_eq!(plan.approval_needs.len(), 1);
    let need = &plan.approval_needs[0];
    assert_eq!(need.step_id, "refund");
    assert_eq!(need.certainty, pb::ApprovalCertainty::Conditional as i32);
    let obligation = need.obligation.as_ref().unwrap();
    assert_eq!(obligation.stages[0].approvers, ["group:finance-leads"]);
    assert_eq!(obligation.reason, "refund above 5,000 INR");
    let rule = obligation.rule.as_ref().unwrap();
    assert_eq!(
        (rule.policy.as_str(), rule.rule.as_str()),
        ("refund-limits", "large-refund")
    );
    assert_eq!(rule.span.as_ref().unwrap().start_line, 7);
    // Retry and timeout are explicit in the plan.
    let retry = plan.steps[0].retry.as_ref().unwrap();
    assert_eq!(retry.max_attempts, 3);
    assert_eq!(retry.backoff, pb::Backoff::Exponential as i32);
    assert_eq!(plan.steps[0].timeout.unwrap().seconds, 10);
    assert_eq!(plan.steps[1].timeout.unwrap().seconds, 30);
    // Estimate: 0.3 s + 1.5 s + 0.8 s along the only path; cost 2000 + 1000 micro-USD.
    let est = plan.estimate.as_ref().unwrap();
    assert_eq!(est.expected_duration.unwrap().seconds, 2);
    assert_eq!(est.expected_duration.unwrap().nanos, 600_000_000);
    assert_eq!((est.cost_micros, est.currency.as_str()), (3_000, "USD"));
    // 3 × 10 s + (1 s + 2 s) of backoff, then two 30 s steps.
    assert_eq!(est.max_duration.unwrap().seconds, 33 + 30 + 30);
    // Recomputing the hash from the plan gives the same value.
    assert_eq!(plan_hash(&plan).unwrap(), plan.plan_hash);
}

#[test]
fn reordering_yaml_keys_keeps_the_hash_and_one_argument_changes_it() {
    let base = compile_yaml(CAPSULE).unwrap().plan_hash;
    let reordered = r#"kind: Capsule
spec:
  steps:
    - tool: http.get
      retry: {initial: 1s, backoff: exponential, max_attempts: 3}
      timeout: 10s
      with: {url: "https://orders.example/v1/orders/${{ inputs.order_id }}"}
      id: fetch-order
    - with: {amount: "${{ inputs.amount_paise }}", order_id: "${{ inputs.order_id }}"}
      if: "${{ steps.fetch-order.output.status == 'paid' }}"
      needs: [fetch-order]
      id: refund
      tool: payments.refund
    - {with: {template: refund-done, to: "${{ steps.fetch-order.output.email }}"}, needs: [refund], tool: email.send, id: notify}
  policies: [refund-limits, pii-masking]
  tools: [http.get, payments.refund, email.send]
  inputs:
    amount_paise: {minimum: 1, required: true, type: integer}
    order_id:     {pattern: "^ord_[a-z0-9]+$", type: string, required: true}
metadata:
  labels: {team: payments}
  description: Refund an order below a threshold and tell the customer
  name: refund-small-orders
apiVersion: anumate.dev/v1
"#;
    assert_eq!(compile_yaml(reordered).unwrap().plan_hash, base);

    let changed = CAPSULE.replace("template: refund-done", "template: refund-sent");
    let other = compile_yaml(&changed).unwrap().plan_hash;
    assert_ne!(other, base);
    // So does a policy version, but not the estimate-only inputs.
    let mut policies = example_policies();
    policies[0].version = 4;
    policies[0].content_hash = fake_hash("refund-limits@4");
    assert_ne!(
        compile_with(&parse(CAPSULE), &policies).unwrap().plan_hash,
        base
    );
}

#[test]
fn cycles_are_rejected_with_their_reason() {
    let mut capsule = parse(CAPSULE);
    // The registry's validator refuses cycles; the compiler checks again.
    capsule.spec.steps[0].needs = vec!["notify".into()];
    let e = compile_with(&capsule, &example_policies()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidDocument);
    assert_eq!(reason(&e), "cycle");
    assert_eq!(e.violations.len(), 1);
    assert_eq!(e.violations[0].field, "spec.steps[0].needs");
    assert!(
        e.violations[0]
            .description
            .contains("fetch-order -> notify -> refund -> fetch-order"),
        "{:?}",
        e.violations
    );
}

#[test]
fn tools_outside_the_allow_list_or_the_catalogue_are_rejected() {
    let mut capsule = parse(CAPSULE);
    capsule.spec.steps[2].tool = "sms.send".into();
    let e = compile_with(&capsule, &example_policies()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidDocument);
    assert_eq!(reason(&e), "tool_not_allowed");
    assert_eq!(e.violations[0].field, "spec.steps[2].tool");

    let unknown = CAPSULE.replace(
        "[http.get, payments.refund, email.send]",
        "[http.get, payments.refund, email.send, crm.update]",
    );
    let e = compile_yaml(&unknown).unwrap_err();
    assert_eq!(e.reason, Reason::ToolNotDeclared);
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(e.message.contains("crm.update"), "{}", e.message);
    assert!(e.metadata.contains(&("tools".into(), "crm.update".into())));
}

#[test]
fn expressions_and_arguments_are_checked() {
    let mut capsule = parse(CAPSULE);
    capsule.spec.steps[2].with =
        json!({"to": "${{ steps.fetch-order.output.email + }}", "template": 5});
    capsule.spec.steps[1].condition = Some("${{ steps.notify.output.ok }}".into());
    let e = compile_with(&capsule, &example_policies()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidDocument);
    let fields: Vec<_> = e.violations.iter().map(|v| v.field.as_str()).collect();
    assert!(fields.contains(&"spec.steps[1].if"), "{fields:?}");
    assert!(fields.contains(&"spec.steps[2].with.to"), "{fields:?}");
    assert!(
        fields.contains(&"spec.steps[2].with.template"),
        "{fields:?}"
    );
    let meta: Vec<_> = e.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert!(
        meta.contains(&"reasons=bad_expression,bad_arguments".to_string()),
        "{meta:?}"
    );

    // A templated amount of the wrong input type is visible statically.
    let wrong = CAPSULE.replace(
        "amount: \"${{ inputs.amount_paise }}\"",
        "amount: \"${{ inputs.order_id }}\"",
    );
    let e = compile_yaml(&wrong).unwrap_err();
    assert_eq!(e.violations[0].field, "spec.steps[1].with.amount");
    assert!(
        e.violations[0]
            .description
            .contains("must be integer, this is string")
    );
}

#[test]
fn literal_arguments_make_approvals_certain() {
    let always = r#"policy "always" {
  rule "refunds" { when tool == "payments.refund" and args.amount >= 100 then require_approval(stages: [{name: "ops", approvers: ["group:ops"], quorum: 2}, {approvers: ["user:cfo"]}]) }
  rule "never" { when tool == "email.send" and args.template == "x" then require_approval(approvers: ["group:x"]) }
}
"#;
    let policies = vec![ResolvedPolicy::new("always", 1, &fake_hash("always"), always).unwrap()];
    let yaml = CAPSULE.replace("amount: \"${{ inputs.amount_paise }}\"", "amount: 250");
    let plan = compile_with(&parse(&yaml), &policies).unwrap();
    assert_eq!(plan.approval_needs.len(), 1);
    let need = &plan.approval_needs[0];
    assert_eq!(need.certainty, pb::ApprovalCertainty::Always as i32);
    let stages = &need.obligation.as_ref().unwrap().stages;
    assert_eq!((stages[0].name.as_str(), stages[0].quorum), ("ops", 2));
    assert_eq!((stages[1].name.as_str(), stages[1].quorum), ("stage-2", 1));
}

// ---------------------------------------------------------------------------
// Golden vectors
// ---------------------------------------------------------------------------

fn golden_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/plans");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn golden_plan(v: &Value) -> pb::ExecutablePlan {
    let capsule = parse(v["capsule_yaml"].as_str().unwrap());
    let policies: Vec<ResolvedPolicy> = v["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            ResolvedPolicy::new(
                p["name"].as_str().unwrap(),
                i32::try_from(p["version"].as_i64().unwrap()).unwrap(),
                p["content_hash"].as_str().unwrap(),
                p["source"].as_str().unwrap(),
            )
            .unwrap()
        })
        .collect();
    let catalogue = Catalogue::new(&[]).unwrap();
    compile(&CompileInput {
        capsule: &capsule,
        capsule_version: i32::try_from(v["capsule_version"].as_i64().unwrap()).unwrap(),
        capsule_content_hash: v["capsule_content_hash"].as_str().unwrap(),
        policies: &policies,
        catalogue: &catalogue,
        default_timeout: Duration::from_secs(30),
    })
    .unwrap()
}

#[test]
fn golden_plan_hashes() {
    let update = std::env::var_os("ANUMATE_UPDATE_GOLDEN").is_some();
    let files = golden_files();
    assert!(files.len() >= 3, "golden vectors missing");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut v: Value = serde_json::from_str(&text).unwrap();
        let plan = golden_plan(&v);
        let content = executable_content(&plan).unwrap();
        // The hash is SHA-256 over the JCS text of the content, nothing else.
        let jcs = anumate_crypto::canonical_json(&content).unwrap();
        assert_eq!(
            plan.plan_hash,
            format!("sha256:{}", anumate_crypto::sha256_hex(jcs.as_bytes()))
        );
        if update {
            v["plan_hash"] = json!(plan.plan_hash);
            v["executable_content"] = content;
            std::fs::write(&file, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
            continue;
        }
        assert_eq!(
            v["executable_content"],
            content,
            "{}: executable content changed",
            file.display()
        );
        assert_eq!(
            v["plan_hash"].as_str().unwrap(),
            plan.plan_hash,
            "{}: plan hash changed",
            file.display()
        );
    }
}

#[test]
fn configured_tools_extend_the_catalogue() {
    use anumate_compiler::ToolSpec;
    let crm = ToolSpec {
        tool: "crm.update".into(),
        connector: "mcp:crm".into(),
        version: "3".into(),
        side_effect: "write".into(),
        idempotent: false,
        input_schema: json!({"type": "object"}),
        output_schema: json!({"type": "object"}),
        cost_micros: 0,
        currency: String::new(),
        typical_duration_ms: 0,
    };
    let catalogue = Catalogue::new(std::slice::from_ref(&crm)).unwrap();
    let yaml = CAPSULE.replace(
        "[http.get, payments.refund, email.send]",
        "[http.get, payments.refund, email.send, crm.update]",
    );
    let capsule = parse(&yaml);
    let plan = compile(&CompileInput {
        capsule: &capsule,
        capsule_version: 1,
        capsule_content_hash: "sha256:00",
        policies: &example_policies(),
        catalogue: &catalogue,
        default_timeout: Duration::from_secs(30),
    })
    .unwrap();
    let b = plan
        .tool_bindings
        .iter()
        .find(|b| b.tool == "crm.update")
        .unwrap();
    assert_eq!(
        (b.connector.as_str(), b.tool_version.as_str()),
        ("mcp:crm", "3")
    );
    assert_eq!(b.side_effect, pb::SideEffect::Write as i32);

    let bad = ToolSpec {
        side_effect: "sometimes".into(),
        ..crm
    };
    let e = Catalogue::new(&[bad]).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.violations[0].field.contains("side_effect"), "{e:?}");
}
