//! One step decision (ready + render + policy), the interpreter's hot path.
//! Goal (issue 15): ≤ 10 µs p50.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use anumate_engine::{Context, Engine, json};
use anumate_proto::compiler::v1 as cpb;
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn bench(c: &mut Criterion) {
    let mut src = String::from("policy \"p\" {\n");
    for i in 0..10 {
        src.push_str(&format!(
            "  rule \"r{i}\" {{ when tool == \"t{i}\" and args.amount > {i}000 then require_approval(approvers: [\"group:g\"], quorum: 2) }}\n"
        ));
    }
    src.push('}');
    let set = anumate_policy::compile("bench.policy", &src).expect("policies");
    let plan = cpb::ExecutablePlan {
        plan_hash: "sha256:00".into(),
        allowed_tools: vec!["t1".into()],
        inputs_schema: Some(json::to_struct(&json!({
            "type": "object",
            "properties": {"amount": {"type": "integer"}, "order": {"type": "string"}}
        }))),
        steps: vec![cpb::PlanStep {
            id: "pay".into(),
            tool: "t1".into(),
            condition: "inputs.amount > 0".into(),
            args: Some(json::to_struct(&json!({
                "amount": "${{ inputs.amount }}",
                "memo": "order ${{ inputs.order }}",
                "currency": "EUR"
            }))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let engine = Engine::new(&plan, vec![Arc::new(set)], Context::default()).expect("engine");
    let inputs = json!({"amount": 5000, "order": "ord_1"});
    let run = engine.start(&inputs).expect("inputs");
    c.bench_function("step decision (ready + render + policy)", |b| {
        b.iter(|| {
            let mut r = run.clone();
            let ready = r.ready();
            r.decide(ready[0])
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
