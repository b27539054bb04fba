//! Decisions, checking errors, fuel, tests blocks, templates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anumate_policy::{
    CompiledSet, Effect, EvalError, Obligation, TemplateScope, check_template_expr, compile,
    run_tests,
};
use serde_json::json;

fn set(src: &str) -> CompiledSet {
    compile("t.policy", src).unwrap_or_else(|e| panic!("{e}"))
}

fn compile_err(src: &str) -> String {
    match compile("t.policy", src) {
        Ok(_) => panic!("expected a compile error"),
        Err(e) => e.to_string(),
    }
}

const REFUND: &str = include_str!("../testdata/refund.policy");

#[test]
fn spec_example_parses_checks_and_its_test_passes() {
    let s = set(REFUND);
    assert_eq!(s.policy_names(), ["refund-limits", "pii-masking"]);
    let outcomes = run_tests(&s);
    assert_eq!(outcomes.len(), 1);
    assert!(outcomes[0].passed(), "{}", outcomes[0].diff());
    // The committed example is the same file.
    assert_eq!(REFUND, include_str!("../../../examples/refund.policy"));
}

#[test]
fn spec_example_decisions() {
    let s = set(REFUND);
    let d = s
        .evaluate(
            &json!({"tool": "payments.refund", "args": {"amount": 900000, "currency": "USD"},
                          "principal": {"id": "u1", "roles": ["operator"]}}),
        )
        .unwrap();
    assert_eq!(d.effect, Effect::Deny);
    let names: Vec<_> = d.matched.iter().map(|m| m.rule.as_str()).collect();
    // priority 100 first, then source order.
    assert_eq!(names, ["only-inr", "large-refund", "mask-contacts"]);
    assert_eq!(d.matched[0].span.start.line, 3);
    assert_eq!(d.matched[0].span.start.col, 3);
    assert_eq!(d.matched[0].span.end.line, 6);
    assert_eq!(
        d.reasons,
        ["only INR refunds are automated", "refund above 5,000 INR"]
    );
    assert!(d.obligations.iter().any(|o| matches!(o,
        Obligation::RequireApproval { approvers, quorum: 1, .. } if approvers == &["group:finance-leads"])));
    assert!(d.obligations.iter().any(|o| matches!(o,
        Obligation::Redact { with: Some(w), .. } if w == "[REDACTED]")));

    let lead = s
        .evaluate(
            &json!({"tool": "payments.refund", "args": {"amount": 900000, "currency": "INR"},
                          "principal": {"roles": ["finance-lead"]}}),
        )
        .unwrap();
    assert_eq!(lead.effect, Effect::Allow);
    assert_eq!(lead.matched.len(), 1);
}

const LADDER: &str = r#"
policy "ladder" {
  rule "a" priority 1 { when args.x >= 1 then allow(reason: "a") }
  rule "b" priority 5 { when args.x >= 2 then require_approval(approvers: ["u"], reason: "b") }
  rule "c" { when args.x >= 3 then deny(reason: "c") }
  rule "d" priority 5 { when args.x >= 3 then log(message: "big") }
  rule "off" priority 99 {
    enabled: false
    when true then deny(reason: "disabled")
  }
}
"#;

#[test]
fn deny_beats_approval_beats_allow() {
    let s = set(LADDER);
    let eff = |x: i64| s.evaluate(&json!({"args": {"x": x}})).unwrap().effect;
    assert_eq!(eff(0), Effect::Allow);
    assert_eq!(eff(1), Effect::Allow);
    assert_eq!(eff(2), Effect::RequireApproval);
    assert_eq!(eff(3), Effect::Deny);
}

#[test]
fn priority_orders_the_report_and_disabled_rules_never_fire() {
    let s = set(LADDER);
    let d = s.evaluate(&json!({"args": {"x": 3}})).unwrap();
    let names: Vec<_> = d.matched.iter().map(|m| m.rule.as_str()).collect();
    assert_eq!(names, ["b", "d", "a", "c"]);
    assert_eq!(d.reasons, ["b", "a", "c"]);
    assert!(!d.reasons.contains(&"disabled"));
}

#[test]
fn nothing_matching_is_allow() {
    let s = set(LADDER);
    let d = s.evaluate(&json!({})).unwrap();
    assert_eq!(d.effect, Effect::Allow);
    assert!(d.matched.is_empty());
}

#[test]
fn fuel_exhaustion_is_its_own_error() {
    let s = set(LADDER).with_fuel(5);
    let err = s.evaluate(&json!({"args": {"x": 3}})).unwrap_err();
    assert!(
        matches!(err, EvalError::FuelExhausted { limit: 5, .. }),
        "{err}"
    );
    // A long list scan costs fuel too.
    let s = set(r#"policy "p" { rule "r" { when args.list contains "zz" then deny() } }"#)
        .with_fuel(1000);
    let list: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    let err = s.evaluate(&json!({"args": {"list": list}})).unwrap_err();
    assert!(matches!(err, EvalError::FuelExhausted { .. }));
}

#[test]
fn regex_is_checked_at_compile_time_with_position() {
    let msg = compile_err(
        "policy \"p\" {\n  rule \"r\" { when args.s matches \"(unclosed\" then deny() }\n}",
    );
    assert!(
        msg.starts_with("t.policy:2:34: bad regex: unclosed group"),
        "{msg}"
    );
    assert!(msg.contains('^'));
    let s = set(r#"policy "p" { rule "r" { when args.s matches '^ord_[a-z0-9]+$' then deny() } }"#);
    assert_eq!(
        s.evaluate(&json!({"args": {"s": "ord_abc1"}}))
            .unwrap()
            .effect,
        Effect::Deny
    );
    assert_eq!(
        s.evaluate(&json!({"args": {"s": "x"}})).unwrap().effect,
        Effect::Allow
    );
}

#[test]
fn unknown_fields_and_functions_are_compile_errors_with_carets() {
    let msg = compile_err(
        "policy \"p\" {\n  rule \"r\" { when user.id == \"x\" or shout(tool) then deny() }\n}",
    );
    let expected = "t.policy:2:19: unknown field `user` (the input has tenant, principal, capsule, plan_hash, step, tool, args, output, env, now)\n    rule \"r\" { when user.id == \"x\" or shout(tool) then deny() }\n                    ^";
    assert!(msg.starts_with(expected), "{msg}");
    assert!(
        msg.contains("t.policy:2:37: unknown function `shout`"),
        "{msg}"
    );
    let msg = compile_err(r#"policy "p" { rule "r" { when principal.email == "x" then deny() } }"#);
    assert!(msg.contains("unknown field `principal.email`"), "{msg}");
    // args/output/env are open.
    set(
        r#"policy "p" { rule "r" { when args.any.thing == output['x-y'] and env.region == "in" then deny() } }"#,
    );
}

#[test]
fn type_errors_that_can_be_seen_are_reported() {
    let msg = compile_err(r#"policy "p" { rule "r" { when tool > 5 then deny() } }"#);
    assert!(
        msg.contains("cannot order a string against a number"),
        "{msg}"
    );
    let msg = compile_err(r#"policy "p" { rule "r" { when lower(5) == "x" then deny() } }"#);
    assert!(
        msg.contains("`lower` needs a string, found a number"),
        "{msg}"
    );
    let msg = compile_err(r#"policy "p" { rule "r" { when tool then deny() } }"#);
    assert!(msg.contains("`when` needs a boolean"), "{msg}");
    let msg =
        compile_err(r#"policy "p" { rule "r" { when true then redact(detectors: ["dna"]) } }"#);
    assert!(msg.contains("unknown detector `dna`"), "{msg}");
    let msg =
        compile_err(r#"policy "p" { rule "r" { when true then require_approval(quorum: 0) } }"#);
    assert!(msg.contains("`quorum` must be a positive integer"), "{msg}");
    let msg = compile_err(r#"policy "p" { rule "r" { when true then deny(because: "x") } }"#);
    assert!(msg.contains("`deny` has no argument `because`"), "{msg}");
}

#[test]
fn builtins_and_operators_evaluate() {
    let s = set(r#"
policy "p" {
  rule "email" { when is_email(args.to) then log(message: "email") }
  rule "card" { when is_card(args.card) then deny(reason: "card") }
  rule "str" { when starts_with(lower(args.name), "ab") and len(args.name) == 4 and trim(" x ") == "x" then allow(reason: "str") }
  rule "in" { when tenant in ["t1", "t2"] and "ops" in principal.groups then allow(reason: "in") }
  rule "arith" { when args.a * 2 - 1 > 10 and -args.a < 0 then allow(reason: "arith") }
  rule "hyphen" { when args['fetch-order'].status == 'paid' then allow(reason: "hyphen") }
}"#);
    let d = s
        .evaluate(&json!({
            "tenant": "t2", "principal": {"groups": ["ops"]},
            "args": {"to": "a@b.co", "card": "4111111111111111", "name": "ABcd", "a": 6,
                     "fetch-order": {"status": "paid"}}
        }))
        .unwrap();
    assert_eq!(d.effect, Effect::Deny);
    assert_eq!(d.reasons, ["card", "str", "in", "arith", "hyphen"]);
}

#[test]
fn failing_test_block_has_a_readable_diff() {
    let s = set(r#"
policy "p" {
  rule "r" { when args.x > 1 then deny(reason: "too big") }
  test "small is fine" { given { args: {x: 5} } expect allow }
}"#);
    let out = run_tests(&s);
    assert!(!out[0].passed());
    let diff = out[0].diff();
    assert!(diff.contains("- expected: allow"), "{diff}");
    assert!(diff.contains("+ actual:   deny"), "{diff}");
    assert!(diff.contains("matched:  p/r (deny) at 3:3–3:60"), "{diff}");
    assert!(diff.contains("reason:   too big"), "{diff}");
}

#[test]
fn template_expressions_are_checked_against_their_scope() {
    let scope = TemplateScope {
        inputs: &["order_id", "amount_paise"],
        steps_upstream: &["fetch-order"],
        steps_known: &["fetch-order", "refund", "notify"],
    };
    assert!(check_template_expr("steps.fetch-order.output.status == 'paid'", &scope).is_empty());
    assert!(check_template_expr("inputs.order_id", &scope).is_empty());
    let v = check_template_expr("inputs.nope", &scope);
    assert_eq!(v[0].description, "unknown input `nope`");
    assert_eq!(v[0].position, Some((1, 1)));
    let v = check_template_expr("x == 1 and steps.missing.output", &scope);
    assert_eq!(v.len(), 2);
    assert!(v[0].description.starts_with("unknown field `x`"));
    assert_eq!(v[1].description, "unknown step `missing`");
    assert_eq!(v[1].position, Some((1, 12)));
    let v = check_template_expr("steps.notify.output.x", &scope);
    assert!(v[0].description.contains("not upstream"));
    let v = check_template_expr("inputs.order_id ==", &scope);
    assert!(v[0].description.contains("expected an expression"));

    let e =
        anumate_policy::compile_template_expr("steps.fetch-order.output.status == 'paid'", &scope)
            .unwrap();
    let out = e
        .eval(
            &json!({}),
            &json!({"fetch-order": {"output": {"status": "paid"}}}),
        )
        .unwrap();
    assert_eq!(out, json!(true));
}

/// Found by the fuzzer: a `given` block with a repeated key is a compile
/// error naming the key (it used to trip an assertion in debug builds).
#[test]
fn a_repeated_key_in_given_is_an_error_not_a_panic() {
    let msg = compile_err(
        "policy \"p\" {\n  rule \"r\" { when true then allow() }\n  test \"t\" {\n    given { tool: \"a\", args: {}, args: {} }\n    expect allow\n  }\n}\n",
    );
    assert!(msg.contains("duplicate key `args`"), "{msg}");
}
