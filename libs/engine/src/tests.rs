use super::*;
use serde_json::json;

/// A plan built from JSON the way the compiler emits it.
pub(crate) fn plan(steps: Value, allowed: &[&str]) -> cpb::ExecutablePlan {
    let mut out = cpb::ExecutablePlan {
        plan_hash: "sha256:00".into(),
        capsule_name: "refund".into(),
        capsule_version: 1,
        inputs_schema: Some(json::to_struct(&json!({
            "type": "object",
            "required": ["amount_cents"],
            "properties": {
                "amount_cents": {"type": "integer", "minimum": 1},
                "order_id": {"type": "string", "default": "ord_1"}
            }
        }))),
        allowed_tools: allowed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for s in steps.as_array().into_iter().flatten() {
        out.steps.push(cpb::PlanStep {
            id: s["id"].as_str().unwrap_or_default().into(),
            tool: s["tool"].as_str().unwrap_or("t").into(),
            needs: s["needs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect(),
            condition: s["if"].as_str().unwrap_or_default().into(),
            args: Some(json::to_struct(&s["args"])),
            ..Default::default()
        });
    }
    out
}

pub(crate) const POLICIES: &str = r#"
policy "refunds" {
  rule "big-refunds" priority 10 {
    when tool == "stripe.refund" and args.amount > 5000
    then require_approval(approvers: ["group:finance"], quorum: 2, reason: "big refund")
  }
  rule "no-deletes" {
    when tool == "db.delete"
    then deny(reason: "never")
  }
  rule "mask" {
    when tool == "stripe.refund"
    then redact(fields: ["email"])
  }
}
"#;

fn engine(steps: Value, allowed: &[&str]) -> Engine {
    let set = anumate_policy::compile("p.policy", POLICIES).unwrap_or_else(|e| panic!("{e}"));
    Engine::new(
        &plan(steps, allowed),
        vec![Arc::new(set)],
        Context::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn call(step: Step) -> (Value, StepDecision) {
    match step {
        Step::Call { args, decision, .. } => (args, decision),
        other => panic!("expected a call, got {other:?}"),
    }
}

#[test]
fn readiness_follows_needs_and_arguments_see_upstream_outputs() {
    let e = engine(
        json!([
            {"id": "fetch", "tool": "orders.get", "args": {"id": "${{ inputs.order_id }}"}},
            {"id": "refund", "tool": "stripe.refund", "needs": ["fetch"],
             "args": {"amount": "${{ steps.fetch.output.total }}", "email": "${{ steps.fetch.output.email }}"}}
        ]),
        &["orders.get", "stripe.refund"],
    );
    let mut run = e
        .start(&json!({"amount_cents": 1}))
        .unwrap_or_else(|v| panic!("{v:?}"));
    assert_eq!(run.ready(), [0]);
    let (args, d) = call(run.decide(0).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!((args, d.effect), (json!({"id": "ord_1"}), Effect::Allow));
    assert_eq!(run.ready(), Vec::<usize>::new());
    assert_eq!(run.decide(1), Err(DriveError::NotReady("refund".into())));
    run.finish(
        0,
        Finished::Succeeded(json!({"total": 9000, "email": "a@b.c"})),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (args, d) = call(run.decide(1).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(args, json!({"amount": 9000, "email": "a@b.c"}));
    assert_eq!(d.effect, Effect::RequireApproval);
    assert_eq!(d.approvals.len(), 1);
    assert_eq!(d.approvals[0].stages[0].approvers, ["group:finance"]);
    assert_eq!(d.approvals[0].stages[0].quorum, 2);
    assert_eq!(d.redactions.len(), 1);
    assert_eq!(
        d.rules.iter().map(|r| r.rule.as_str()).collect::<Vec<_>>(),
        ["big-refunds", "mask"]
    );
}

#[test]
fn a_false_condition_skips_the_step_and_everything_downstream() {
    let e = engine(
        json!([
            {"id": "a", "tool": "t", "args": {}},
            {"id": "b", "tool": "t", "needs": ["a"], "if": "steps.a.output.ok == true", "args": {}},
            {"id": "c", "tool": "t", "needs": ["b"], "args": {}}
        ]),
        &["t"],
    );
    let mut run = e
        .start(&json!({"amount_cents": 3}))
        .unwrap_or_else(|v| panic!("{v:?}"));
    call(run.decide(0).unwrap_or_else(|e| panic!("{e}")));
    run.finish(0, Finished::Succeeded(json!({"ok": false})))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(run.decide(1), Ok(Step::SkippedByCondition));
    assert_eq!(
        run.decide(2),
        Ok(Step::SkippedUpstream {
            upstream: "b".into()
        })
    );
    assert!(run.is_done());
}

#[test]
fn tools_outside_the_allow_list_are_denied_before_policies_and_denials_skip_downstream() {
    let e = engine(
        json!([
            {"id": "a", "tool": "shell.exec", "args": {}},
            {"id": "b", "tool": "db.delete", "args": {}},
            {"id": "c", "tool": "t", "needs": ["b"], "args": {}}
        ]),
        &["t", "db.delete"],
    );
    let mut run = e
        .start(&json!({"amount_cents": 3}))
        .unwrap_or_else(|v| panic!("{v:?}"));
    let (_, a) = call(run.decide(0).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        (a.effect, a.rules[0].rule.as_str()),
        (Effect::Deny, ALLOW_LIST_RULE)
    );
    let (_, b) = call(run.decide(1).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        (b.effect, b.rules[0].reasons[0].as_str()),
        (Effect::Deny, "never")
    );
    run.finish(1, Finished::Denied)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        run.decide(2),
        Ok(Step::SkippedUpstream {
            upstream: "b".into()
        })
    );
}

#[test]
fn bad_inputs_are_refused_field_by_field_before_anything_runs() {
    let e = engine(json!([]), &[]);
    let err = e
        .start(&json!({"amount_cents": 0}))
        .err()
        .unwrap_or_default();
    assert_eq!(err.len(), 1);
    assert_eq!(
        (err[0].field.as_str(), err[0].description.as_str()),
        ("inputs.amount_cents", "must be ≥ 1")
    );
}

#[test]
fn an_argument_that_cannot_be_evaluated_fails_the_step_naming_its_path() {
    let e = engine(
        json!([{"id": "a", "tool": "t", "args": {"x": {"y": "${{ inputs.amount_cents / 0 }}"}}}]),
        &["t"],
    );
    let mut run = e
        .start(&json!({"amount_cents": 3}))
        .unwrap_or_else(|v| panic!("{v:?}"));
    match run.decide(0) {
        Ok(Step::ExpressionError { path, .. }) => assert_eq!(path, "args.x.y"),
        // Division by zero may evaluate to null rather than fail: then it is a call.
        Ok(Step::Call { args, .. }) => assert_eq!(args["x"]["y"], Value::Null),
        other => panic!("{other:?}"),
    }
}

#[test]
fn plans_with_unknown_needs_are_refused() {
    let set = anumate_policy::compile("p.policy", POLICIES).unwrap_or_else(|e| panic!("{e}"));
    let err = Engine::new(
        &plan(json!([{"id": "a", "needs": ["zz"], "args": {}}]), &[]),
        vec![Arc::new(set)],
        Context::default(),
    )
    .err()
    .map(|e| e.step);
    assert_eq!(err.as_deref(), Some("a"));
}

#[test]
fn policies_see_the_capsule_labels_and_env_and_approvals_carry_their_rule_span() {
    let src = r#"
policy "where" {
  rule "payments-team" {
    when capsule.labels.team == "payments" and env.stage == "prod"
    then require_approval(approvers: ["group:leads"], quorum: 1)
  }
  rule "no-staging-writes" {
    when env.stage == "staging"
    then deny(reason: "staging is read-only")
  }
}
"#;
    let set =
        Arc::new(anumate_policy::compile("where.policy", src).unwrap_or_else(|e| panic!("{e}")));
    let p = plan(json!([{"id": "a", "tool": "t", "args": {}}]), &["t"]);
    let labels: BTreeMap<String, String> = [("team".to_string(), "payments".to_string())].into();
    let decide = |env: Value, labels: &BTreeMap<String, String>| {
        let e = Engine::new(
            &p,
            vec![set.clone()],
            Context {
                env,
                ..Context::default()
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .with_capsule_labels(labels);
        let mut run = e
            .start(&json!({"amount_cents": 3}))
            .unwrap_or_else(|v| panic!("{v:?}"));
        call(run.decide(0).unwrap_or_else(|e| panic!("{e}"))).1
    };
    let d = decide(json!({"stage": "prod"}), &labels);
    assert_eq!(d.effect, Effect::RequireApproval);
    let span = d.approvals[0].span.unwrap_or_else(|| panic!("no span"));
    assert_eq!((span.start.line, span.start.col), (3, 3));
    assert_eq!(d.approvals[0].span, d.rules[0].span);
    // Without the label, or in another stage, the rule does not match.
    assert_eq!(
        decide(json!({"stage": "prod"}), &BTreeMap::new()).effect,
        Effect::Allow
    );
    assert_eq!(
        decide(json!({"stage": "dev"}), &labels).effect,
        Effect::Allow
    );
    assert_eq!(
        decide(json!({"stage": "staging"}), &labels).effect,
        Effect::Deny
    );
}
