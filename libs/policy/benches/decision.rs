//! Decision latency on a realistic compiled set: 10 policies, 50 rules, mixed
//! string/number/list conditions, 2 regexes. Prints criterion's estimate and
//! then p50/p99 from individually timed decisions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use anumate_policy::{CompiledSet, compile};
use criterion::Criterion;
use serde_json::{Value, json};

const TOOLS: [&str; 5] = [
    "payments.refund",
    "http.get",
    "email.send",
    "crm.update",
    "db.query",
];

/// 10 policies × 5 rules; rules 0 and 1 of policy 0 use regexes.
fn source() -> String {
    let mut s = String::new();
    for p in 0..10 {
        s.push_str(&format!(
            "policy \"policy-{p}\" {{\n  description: \"generated\"\n"
        ));
        for r in 0..5 {
            let tool = TOOLS[(p + r) % TOOLS.len()];
            let n = p * 5 + r;
            let cond = match (p, r) {
                (0, 0) => format!("tool == \"{tool}\" and args.order_id matches '^ord_[a-z0-9]+$'"),
                (0, 1) => "args.to matches '@(example|test)\\\\.com$'".to_string(),
                (_, 0) => format!(
                    "tool == \"{tool}\" and args.amount > {} and args.currency != \"INR\"",
                    1000 * n
                ),
                (_, 1) => format!(
                    "tool == \"{tool}\" and not (principal.roles contains \"finance-lead\") and args.amount >= {}",
                    500 * n
                ),
                (_, 2) => format!(
                    "tenant in [\"t-{n}\", \"t-{}\", \"acme\"] and env.region == \"in-south\"",
                    n + 1
                ),
                (_, 3) => format!(
                    "starts_with(tool, \"{}\") and \"ops\" in principal.groups",
                    &tool[..3]
                ),
                _ => format!(
                    "step.id == \"step-{n}\" or (args.items > {n} and capsule.name == \"refund-small-orders\")"
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
            s.push_str(&format!(
                "  rule \"r{r}\" priority {} {{\n    when {cond}\n    then {action}\n  }}\n",
                (n * 7) % 13
            ));
        }
        s.push_str("}\n");
    }
    s
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

fn compiled() -> CompiledSet {
    let set = compile("bench.policy", &source()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.rule_count(), 50);
    set
}

fn percentiles(set: &CompiledSet, input: &Value) {
    let n = 200_000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        black_box(set.evaluate(black_box(input)).unwrap());
        samples.push(t.elapsed().as_nanos());
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((n as f64 - 1.0) * q) as usize];
    println!(
        "decision/50-rules individually timed (n={n}): p50 {} ns, p99 {} ns, p99.9 {} ns",
        at(0.50),
        at(0.99),
        at(0.999)
    );
}

fn main() {
    let set = compiled();
    let input = input();
    let d = set.evaluate(&input).unwrap();
    println!(
        "decision: effect {}, {} matched rules, {} obligations, fuel {}",
        d.effect,
        d.matched.len(),
        d.obligations.len(),
        d.fuel_used
    );
    let mut c = Criterion::default().configure_from_args();
    c.bench_function("decision/50-rules", |b| {
        b.iter(|| set.evaluate(black_box(&input)).unwrap())
    });
    c.bench_function("compile/50-rules", |b| {
        let src = source();
        b.iter(|| compile("bench.policy", black_box(&src)).unwrap())
    });
    c.final_summary();
    percentiles(&set, &input);
}
