use serde_json::json;

use super::*;
use crate::compile;

fn set(src: &str) -> CompiledSet {
    compile("t", src).unwrap_or_else(|e| panic!("{e}"))
}

const A: &str = r#"
policy "a" {
  rule "low" { when true then require_approval(approvers: ["group:ops"], reason: "ops look"), redact(fields: ["x"]) }
  rule "high" priority 10 { when tool == "t" then allow(reason: "fine") }
}"#;
const B: &str = r#"
policy "b" {
  rule "mid" priority 5 { when true then require_approval(stages: [{approvers: ["user:a"], quorum: 2}, {name: "cfo", approvers: ["user:c"]}]) }
  rule "never" { when false then deny }
}"#;

#[test]
fn rules_from_every_set_by_priority_then_set_then_position() {
    let (a, b) = (set(A), set(B));
    let d = decide(&[&a, &b], &json!({"tool": "t"})).unwrap();
    assert_eq!(d.effect, Effect::RequireApproval);
    let order: Vec<_> = d
        .rules
        .iter()
        .map(|r| (r.set, r.rule.rule.as_str()))
        .collect();
    assert_eq!(order, [(0, "high"), (1, "mid"), (0, "low")]);
    assert_eq!(d.rules[0].reasons, ["fine".to_string()]);
    // Each rule keeps its own obligations, approvals included.
    assert_eq!(d.rules[2].obligations.len(), 2);
    assert_eq!(d.rules[1].obligations.len(), 1);
    assert!(d.fuel_used > 0);
    let alone = decide(&[&a], &json!({"tool": "t"})).unwrap();
    assert!(d.fuel_used > alone.fuel_used);
}

#[test]
fn a_deny_drops_approval_obligations_but_keeps_redactions() {
    let deny = set(r#"policy "d" { rule "no" { when true then deny(reason: "no") } }"#);
    let a = set(A);
    let d = decide(&[&a, &deny], &json!({"tool": "x"})).unwrap();
    assert_eq!(d.effect, Effect::Deny);
    let low = d.rules.iter().find(|r| r.rule.rule == "low").unwrap();
    assert_eq!(low.obligations.len(), 1);
    assert!(matches!(low.obligations[0], Obligation::Redact { .. }));
}

#[test]
fn a_bad_input_or_no_fuel_is_an_error_not_a_decision() {
    let a = set(A);
    assert_eq!(
        decide(&[&a], &json!([1])).unwrap_err(),
        EvalError::InputNotObject
    );
    let starved = set(A).with_fuel(0);
    assert!(matches!(
        decide(&[&a, &starved], &json!({})),
        Err(EvalError::FuelExhausted { .. })
    ));
}

#[test]
fn approval_stages_from_approvers_or_written_stages() {
    let a = set(A);
    let b = set(B);
    let d = decide(&[&a, &b], &json!({"tool": "t"})).unwrap();
    let stages = |rule: &str| {
        let r = d.rules.iter().find(|r| r.rule.rule == rule).unwrap();
        r.obligations
            .iter()
            .flat_map(|o| o.approval_stages())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        stages("low"),
        [ApprovalStage {
            name: "stage-1".into(),
            approvers: vec!["group:ops".into()],
            quorum: 1
        }]
    );
    assert_eq!(
        stages("mid"),
        [
            ApprovalStage {
                name: "stage-1".into(),
                approvers: vec!["user:a".into()],
                quorum: 2
            },
            ApprovalStage {
                name: "cfo".into(),
                approvers: vec!["user:c".into()],
                quorum: 1
            },
        ]
    );
    // Redactions have no stages.
    assert!(
        Obligation::Redact {
            fields: vec![],
            detectors: vec![],
            with: None
        }
        .approval_stages()
        .is_empty()
    );
}

#[test]
fn the_obligation_of_an_action_is_the_one_a_decision_carries() {
    let src = r#"policy "p" { rule "r" { when true then require_approval(approvers: ["u:a"], quorum: 2, reason: "why") } }"#;
    let ast = crate::parse("t", src).unwrap();
    let action = &ast.policies[0].rules[0].actions[0];
    let s = set(src);
    let d = decide(&[&s], &json!({})).unwrap();
    assert_eq!(
        approval_obligation(action).as_ref(),
        Some(d.rules[0].obligations[0])
    );
    let deny = crate::parse("t", r#"policy "p" { rule "r" { when true then deny } }"#).unwrap();
    assert_eq!(
        approval_obligation(&deny.policies[0].rules[0].actions[0]),
        None
    );
}
