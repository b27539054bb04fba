//! The orchestrator and GhostRun drive the same interpreter in different
//! ways: the orchestrator steps through ready steps in whatever order its
//! workers pick them up, with real outputs; GhostRun walks them in plan
//! order with simulated ones. Over random plans and outputs both must reach
//! the same decision for every step.

use std::collections::BTreeMap;
use std::sync::Arc;

use anumate_engine::sim::{Fixture, Simulator};
use anumate_engine::{Context, Engine, Finished, Step, json};
use anumate_proto::compiler::v1 as cpb;
use proptest::prelude::*;
use serde_json::{Value, json};

const POLICIES: &str = r#"
policy "p" {
  rule "big" { when args.n > 50 then require_approval(approvers: ["group:ops"], quorum: 2) }
  rule "odd-deny" { when tool == "t3" and args.n > 80 then deny(reason: "too much") }
}
"#;

#[derive(Debug, Clone)]
struct Spec {
    /// For each step: needs (indices below it), condition threshold, output n.
    steps: Vec<(Vec<usize>, Option<i64>, i64, u8)>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (1usize..8)
        .prop_flat_map(|n| {
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
                    proptest::option::of(0i64..100),
                    0i64..100,
                    0u8..5,
                ),
                n,
            )
        })
        .prop_map(|raw| Spec {
            steps: raw
                .into_iter()
                .enumerate()
                .map(|(i, (needs, cond, out, tool))| {
                    let mut needs: Vec<usize> = if i == 0 {
                        Vec::new()
                    } else {
                        needs.iter().map(|x| x.index(i)).collect()
                    };
                    needs.sort_unstable();
                    needs.dedup();
                    (needs, cond, out, tool)
                })
                .collect(),
        })
}

fn build(spec: &Spec) -> cpb::ExecutablePlan {
    let mut plan = cpb::ExecutablePlan {
        plan_hash: "sha256:00".into(),
        allowed_tools: vec!["t0".into(), "t1".into(), "t2".into(), "t3".into()],
        inputs_schema: Some(json::to_struct(&json!({
            "type": "object",
            "properties": {"base": {"type": "integer"}}
        }))),
        ..Default::default()
    };
    for (i, (needs, cond, _, tool)) in spec.steps.iter().enumerate() {
        let arg = needs.first().map_or_else(
            || "${{ inputs.base }}".to_string(),
            |j| format!("${{{{ steps.s{j}.output.n }}}}"),
        );
        plan.steps.push(cpb::PlanStep {
            id: format!("s{i}"),
            tool: format!("t{tool}"),
            needs: needs.iter().map(|j| format!("s{j}")).collect(),
            condition: match (cond, needs.first()) {
                (Some(c), Some(j)) => format!("steps.s{j}.output.n >= {c}"),
                (Some(c), None) => format!("inputs.base >= {c}"),
                _ => String::new(),
            },
            args: Some(json::to_struct(&json!({"n": arg}))),
            ..Default::default()
        });
    }
    plan
}

/// Decisions by step id, as a comparable string.
fn outcome(step: &Step) -> String {
    match step {
        Step::Call {
            args_sha256,
            decision,
            ..
        } => {
            format!(
                "call {args_sha256} {:?} {:?}",
                decision.effect, decision.rules
            )
        }
        other => format!("{other:?}"),
    }
}

fn finish_for(step: &Step, out: Value) -> Option<Finished> {
    match step {
        Step::Call { decision, .. } => Some(match decision.effect {
            anumate_policy::Effect::Deny => Finished::Denied,
            _ => Finished::Succeeded(out),
        }),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn orchestrator_and_ghostrun_paths_decide_alike(spec in spec(), base in 0i64..100, pick in any::<u64>()) {
        let set = anumate_policy::compile("p.policy", POLICIES).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let plan = build(&spec);
        let engine = Engine::new(&plan, vec![Arc::new(set)], Context::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let inputs = json!({"base": base});
        let outputs: Vec<Value> = spec.steps.iter().map(|s| json!({"n": s.2})).collect();

        // Orchestrator: real outputs, ready steps taken in a scrambled order.
        let mut real = BTreeMap::new();
        let mut run = engine.start(&inputs).map_err(|v| TestCaseError::fail(format!("{v:?}")))?;
        let mut k = pick;
        while !run.is_done() {
            let ready = run.ready();
            prop_assert!(!ready.is_empty());
            let i = ready[(k % ready.len() as u64) as usize];
            k = k.rotate_left(7) ^ 0x9E37;
            let step = run.decide(i).map_err(|e| TestCaseError::fail(e.to_string()))?;
            if let Some(f) = finish_for(&step, outputs[i].clone()) {
                run.finish(i, f).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            real.insert(i, outcome(&step));
        }

        // GhostRun: plan order, outputs from per-step fixtures through the simulator.
        let fixtures: Vec<Fixture> = outputs.iter().enumerate().map(|(i, o)| Fixture {
            step_id: Some(format!("s{i}")), tool: None, output: Some(o.clone()), error: None, fail_times: 0,
        }).collect();
        let sim = Simulator::new(0, &fixtures);
        let mut simulated = BTreeMap::new();
        let mut run = engine.start(&inputs).map_err(|v| TestCaseError::fail(format!("{v:?}")))?;
        for i in 0..engine.len() {
            let step = run.decide(i).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let out = sim.call(engine.step_id(i), engine.step_tool(i), None, 1).output.unwrap_or_default();
            if let Some(f) = finish_for(&step, out) {
                run.finish(i, f).map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            simulated.insert(i, outcome(&step));
        }
        prop_assert_eq!(real, simulated);
    }
}
