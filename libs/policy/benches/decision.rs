//! Decision latency on a realistic compiled set: 10 policies, 50 rules, mixed
//! string/number/list conditions, 2 regexes — and the same decisions made by
//! `cedar-policy` on an equivalent Cedar policy set and entity data, in the
//! same run. Prints criterion's estimates, then p50/p99 from individually
//! timed decisions of both engines and their ratio.
//!
//! The two engines are checked to agree before anything is timed: on several
//! inputs, Cedar's decision (forbid ⇔ our `deny`) and the set of policies it
//! reports as determining the decision are compared with our matched rules.
//!
//! Translation notes. Our `deny` rules become Cedar `forbid` policies, every
//! other rule a `permit`; our "allow when nothing matched" is a catch-all
//! `permit` (Cedar denies by default). `principal.roles`/`groups` live on a
//! `User` entity, everything else in the request context. Cedar has no
//! regular expressions: the two `matches` conditions become `like` patterns
//! that decide the same on these inputs. Cedar's decision carries no
//! obligations, approvals or spans; ours does. Cedar is timed on a prebuilt
//! request (its JSON → `Context` conversion is not counted), ours on the
//! JSON input as the service receives it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::hint::black_box;
use std::str::FromStr;
use std::time::Instant;

use anumate_policy::{CompiledSet, Effect, compile};
use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, EntityUid, Policy, PolicyId,
    PolicySet, Request,
};
use criterion::Criterion;
use serde_json::{Value, json};

const TOOLS: [&str; 5] = [
    "payments.refund",
    "http.get",
    "email.send",
    "crm.update",
    "db.query",
];

/// One generated rule in both languages.
struct RuleSpec {
    policy: String,
    id: String,
    deny: bool,
    dsl: String,
    cedar: String,
}

/// 10 policies × 5 rules; rules 0 and 1 of policy 0 use regexes.
fn rules() -> Vec<Vec<RuleSpec>> {
    let mut out = Vec::new();
    for p in 0..10 {
        let mut policy = Vec::new();
        for r in 0..5 {
            let tool = TOOLS[(p + r) % TOOLS.len()];
            let n = p * 5 + r;
            let (cond, cedar) = match (p, r) {
                (0, 0) => (
                    format!("tool == \"{tool}\" and args.order_id matches '^ord_[a-z0-9]+$'"),
                    format!("context.tool == \"{tool}\" && context.args.order_id like \"ord_*\""),
                ),
                (0, 1) => (
                    "args.to matches '@(example|test)\\\\.com$'".to_string(),
                    "context.args.to like \"*@example.com\" || context.args.to like \"*@test.com\""
                        .to_string(),
                ),
                (_, 0) => (
                    format!(
                        "tool == \"{tool}\" and args.amount > {} and args.currency != \"INR\"",
                        1000 * n
                    ),
                    format!(
                        "context.tool == \"{tool}\" && context.args.amount > {} && context.args.currency != \"INR\"",
                        1000 * n
                    ),
                ),
                (_, 1) => (
                    format!(
                        "tool == \"{tool}\" and not (principal.roles contains \"finance-lead\") and args.amount >= {}",
                        500 * n
                    ),
                    format!(
                        "context.tool == \"{tool}\" && !(principal.roles.contains(\"finance-lead\")) && context.args.amount >= {}",
                        500 * n
                    ),
                ),
                (_, 2) => (
                    format!(
                        "tenant in [\"t-{n}\", \"t-{}\", \"acme\"] and env.region == \"in-south\"",
                        n + 1
                    ),
                    format!(
                        "[\"t-{n}\", \"t-{}\", \"acme\"].contains(context.tenant) && context.env.region == \"in-south\"",
                        n + 1
                    ),
                ),
                (_, 3) => (
                    format!(
                        "starts_with(tool, \"{}\") and \"ops\" in principal.groups",
                        &tool[..3]
                    ),
                    format!(
                        "context.tool like \"{}*\" && principal.groups.contains(\"ops\")",
                        &tool[..3]
                    ),
                ),
                _ => (
                    format!(
                        "step.id == \"step-{n}\" or (args.items > {n} and capsule.name == \"refund-small-orders\")"
                    ),
                    format!(
                        "context.step.id == \"step-{n}\" || (context.args.items > {n} && context.capsule.name == \"refund-small-orders\")"
                    ),
                ),
            };
            let action = match r {
                0 => format!("deny(reason: \"rule {n}\")"),
                1 => format!(
                    "require_approval(approvers: [\"group:leads-{p}\"], quorum: 1, reason: \"rule {n}\")"
                ),
                2 => "redact(fields: [\"customer.email\"], with: \"[REDACTED]\")".to_string(),
                3 => "log(message: \"seen\", level: \"info\")".to_string(),
                _ => format!("allow(reason: \"rule {n}\")"),
            };
            let dsl = format!(
                "  rule \"r{r}\" priority {} {{\n    when {cond}\n    then {action}\n  }}\n",
                (n * 7) % 13
            );
            let deny = r == 0;
            let cedar = format!(
                "{}(principal, action, resource) when {{ {cedar} }};",
                if deny { "forbid" } else { "permit" }
            );
            policy.push(RuleSpec {
                policy: format!("policy-{p}"),
                id: format!("r{r}"),
                deny,
                dsl,
                cedar,
            });
        }
        out.push(policy);
    }
    out
}

fn source(rules: &[Vec<RuleSpec>]) -> String {
    let mut s = String::new();
    for (p, policy) in rules.iter().enumerate() {
        s.push_str(&format!(
            "policy \"policy-{p}\" {{\n  description: \"generated\"\n"
        ));
        for r in policy {
            s.push_str(&r.dsl);
        }
        s.push_str("}\n");
    }
    s
}

const CATCH_ALL: &str = "default-allow";

fn cedar_policies(rules: &[Vec<RuleSpec>]) -> PolicySet {
    let mut set = PolicySet::new();
    for r in rules.iter().flatten() {
        let id = PolicyId::new(format!("{}/{}", r.policy, r.id));
        let p = Policy::parse(Some(id), &r.cedar).unwrap_or_else(|e| panic!("{}: {e}", r.cedar));
        set.add(p).unwrap();
    }
    let all = Policy::parse(
        Some(PolicyId::new(CATCH_ALL)),
        "permit(principal, action, resource);",
    )
    .unwrap();
    set.add(all).unwrap();
    set
}

fn input() -> Value {
    json!({
        "tenant": "acme",
        "principal": {"id": "u-17", "roles": ["operator", "support"], "groups": ["ops", "emea"]},
        "capsule": {"name": "refund-small-orders", "version": 3},
        "plan_hash": "9f2c1e",
        "step": {"id": "refund", "tool": "payments.refund"},
        "tool": "payments.refund",
        "args": {"order_id": "ord_a1b2c3", "amount": 25000, "currency": "INR",
                 "to": "someone@example.com", "items": 3},
        "env": {"region": "in-south"},
        "now": "2025-01-01T00:00:00Z"
    })
}

/// Variations of [`input`] that exercise other rules and both outcomes.
fn inputs() -> Vec<Value> {
    let mut out = vec![input()];
    let mut v = input();
    v["args"]["order_id"] = json!("x-99");
    v["args"]["to"] = json!("ops@corp.example");
    out.push(v.clone());
    v["args"]["currency"] = json!("EUR");
    v["args"]["amount"] = json!(3_000_000);
    v["principal"]["roles"] = json!(["finance-lead"]);
    out.push(v.clone());
    v["tool"] = json!("http.get");
    v["tenant"] = json!("t-7");
    v["env"]["region"] = json!("eu-west");
    v["principal"]["groups"] = json!(["emea"]);
    v["step"]["id"] = json!("step-9");
    out.push(v.clone());
    v["tool"] = json!("db.query");
    v["args"]["items"] = json!(100);
    out.push(v);
    out
}

/// The Cedar request and entities for one input.
fn cedar_request(input: &Value) -> (Request, Entities) {
    let uid = EntityUid::from_str(&format!(
        "User::\"{}\"",
        input["principal"]["id"].as_str().unwrap()
    ))
    .unwrap();
    let entities = Entities::from_json_value(
        json!([{
            "uid": {"type": "User", "id": input["principal"]["id"]},
            "attrs": {
                "roles": input["principal"]["roles"],
                "groups": input["principal"]["groups"],
            },
            "parents": []
        }]),
        None,
    )
    .unwrap();
    let mut ctx = input.as_object().unwrap().clone();
    ctx.remove("principal");
    let context = Context::from_json_value(Value::Object(ctx), None).unwrap();
    let action = EntityUid::from_str("Action::\"invoke\"").unwrap();
    let resource =
        EntityUid::from_str(&format!("Tool::\"{}\"", input["tool"].as_str().unwrap())).unwrap();
    let request = Request::new(uid, action, resource, context, None).unwrap();
    (request, entities)
}

/// Asserts that both engines decide the same on `input`: Cedar denies
/// exactly when we deny, and the policies Cedar says determined its decision
/// are our matched deny rules (when denied) or all our matched rules plus the
/// catch-all (when allowed).
fn assert_agree(set: &CompiledSet, policies: &PolicySet, input: &Value) -> (Effect, usize) {
    let ours = set.evaluate(input).unwrap();
    let (request, entities) = cedar_request(input);
    let answer = Authorizer::new().is_authorized(&request, policies, &entities);
    let errors: Vec<String> = answer
        .diagnostics()
        .errors()
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "cedar errors: {errors:?}");
    let denied = ours.effect == Effect::Deny;
    assert_eq!(
        answer.decision() == CedarDecision::Deny,
        denied,
        "effect: ours {} vs cedar {:?} on {input}",
        ours.effect,
        answer.decision()
    );
    let mut expected: BTreeSet<String> = ours
        .matched
        .iter()
        .filter(|m| !denied || m.effect == Effect::Deny)
        .map(|m| format!("{}/{}", m.policy, m.rule))
        .collect();
    if !denied {
        expected.insert(CATCH_ALL.to_string());
    }
    let got: BTreeSet<String> = answer
        .diagnostics()
        .reason()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(got, expected, "determining policies on {input}");
    (ours.effect, ours.matched.len())
}

/// p50, p99 and p99.9 in ns of `n` individually timed calls.
fn percentiles(name: &str, n: usize, mut f: impl FnMut()) -> u128 {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_nanos());
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((n as f64 - 1.0) * q) as usize];
    println!(
        "{name} individually timed (n={n}): p50 {} ns, p99 {} ns, p99.9 {} ns",
        at(0.50),
        at(0.99),
        at(0.999)
    );
    at(0.50)
}

fn main() {
    let rules = rules();
    let set = compile("bench.policy", &source(&rules)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.rule_count(), 50);
    let policies = cedar_policies(&rules);
    assert_eq!(rules.iter().flatten().filter(|r| r.deny).count(), 10);
    for (i, v) in inputs().iter().enumerate() {
        let (effect, matched) = assert_agree(&set, &policies, v);
        println!("input {i}: both engines agree: {effect}, {matched} matched rules");
    }

    let input = input();
    let d = set.evaluate(&input).unwrap();
    println!(
        "decision: effect {}, {} matched rules, {} obligations, fuel {}",
        d.effect,
        d.matched.len(),
        d.obligations.len(),
        d.fuel_used
    );
    let (request, entities) = cedar_request(&input);
    let authorizer = Authorizer::new();

    let mut c = Criterion::default().configure_from_args();
    c.bench_function("decision/50-rules", |b| {
        b.iter(|| set.evaluate(black_box(&input)).unwrap())
    });
    c.bench_function("cedar/50-policies", |b| {
        b.iter(|| authorizer.is_authorized(black_box(&request), &policies, &entities))
    });
    c.bench_function("compile/50-rules", |b| {
        let src = source(&rules);
        b.iter(|| compile("bench.policy", black_box(&src)).unwrap())
    });
    c.final_summary();

    // Fewer samples for a run under `valgrind --tool=callgrind`.
    let n = std::env::var("DECISION_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let ours = percentiles("decision/50-rules", n, || {
        black_box(set.evaluate(black_box(&input)).unwrap());
    });
    let cedar = percentiles("cedar/50-policies", n, || {
        black_box(authorizer.is_authorized(black_box(&request), &policies, &entities));
    });
    println!(
        "ours/cedar p50 ratio: {:.3} (cedar takes {:.1}x as long as ours)",
        ours as f64 / cedar as f64,
        cedar as f64 / ours as f64
    );
}
