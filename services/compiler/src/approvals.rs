//! Static approval needs: which steps will or may wait for approval, found by
//! evaluating each enabled `require_approval` rule's condition with what is
//! known at compile time.
//!
//! Evaluation is three-valued. Known facts are the step's `tool`, `step.id`,
//! `capsule.name` / `capsule.version` and the step's *literal* arguments (an
//! argument whose value contains `${{ … }}` is unknown). Everything else —
//! `principal`, `env`, `now`, `output`, templated arguments, function calls,
//! arithmetic — is unknown. A condition that is true whatever the unknowns is
//! `ALWAYS`; one that is false is no need; anything else is `CONDITIONAL`.
//! Unknown is the safe answer: a comparison whose runtime meaning could differ
//! (mixed types, non-boolean logic operands) is unknown rather than guessed.
//! The evaluation itself is `anumate_policy::partial` (on the evaluator's own
//! comparison rules); the obligations are the ones a decision would carry
//! (`anumate_policy::approval_obligation`, `Obligation::approval_stages`).

use anumate_policy::ast::{ActionKind, Expr, Path, PolicyFile, Segment};
use anumate_policy::partial::{Partial, eval_partial};
use anumate_policy::{Obligation, approval_obligation};
use anumate_proto::compiler::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use serde_json::Value;

/// A policy version the plan is governed by, with its parsed source.
#[derive(Debug, Clone)]
pub struct ResolvedPolicy {
    /// Policy name.
    pub name: String,
    /// Version number.
    pub version: i32,
    /// `sha256:` content hash of the version.
    pub content_hash: String,
    /// The DSL source.
    pub source: String,
    /// The parsed source.
    pub ast: PolicyFile,
}

impl ResolvedPolicy {
    /// Parses `source`; a stored version always parses, so failure is internal.
    pub fn new(
        name: &str,
        version: i32,
        content_hash: &str,
        source: &str,
    ) -> anumate_errors::Result<ResolvedPolicy> {
        let ast = anumate_policy::parse(&format!("{name}@{version}"), source).map_err(|e| {
            anumate_errors::Error::internal(format!(
                "stored policy {name}@{version} does not parse: {e}"
            ))
        })?;
        Ok(ResolvedPolicy {
            name: name.to_string(),
            version,
            content_hash: content_hash.to_string(),
            source: source.to_string(),
            ast,
        })
    }
}

/// What is known about one step at compile time.
pub struct Facts<'a> {
    /// The step's tool.
    pub tool: &'a str,
    /// The step id.
    pub step_id: &'a str,
    /// Capsule name.
    pub capsule_name: &'a str,
    /// Capsule version.
    pub capsule_version: i32,
    /// The step's templated arguments.
    pub args: &'a Value,
}

fn has_template(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("${{"),
        Value::Array(items) => items.iter().any(has_template),
        Value::Object(map) => map.values().any(has_template),
        _ => false,
    }
}

fn has_template_str(v: &Value) -> bool {
    matches!(v, Value::String(s) if s.contains("${{"))
}

/// What the step's facts say about `p`.
fn path(p: &Path, f: &Facts<'_>) -> Partial {
    let field = |i: usize| match p.segments.get(i) {
        Some(Segment::Field(n) | Segment::Key(n)) => Some(n.as_str()),
        _ => None,
    };
    let n = p.segments.len();
    match p.root.as_str() {
        "tool" if n == 0 => Partial::Known(Value::from(f.tool)),
        "step" if n == 1 && field(0) == Some("id") => Partial::Known(Value::from(f.step_id)),
        "capsule" if n == 1 && field(0) == Some("name") => {
            Partial::Known(Value::from(f.capsule_name))
        }
        "capsule" if n == 1 && field(0) == Some("version") => {
            Partial::Known(Value::from(f.capsule_version))
        }
        "args" => {
            let mut cur = f.args;
            for seg in &p.segments {
                if has_template_str(cur) {
                    return Partial::Unknown;
                }
                let next = match seg {
                    Segment::Field(k) | Segment::Key(k) => cur.get(k.as_str()),
                    Segment::Index(i) => usize::try_from(*i).ok().and_then(|i| cur.get(i)),
                };
                match next {
                    Some(v) => cur = v,
                    // Absent here; a connector or default could still supply it at run time.
                    None => return Partial::Unknown,
                }
            }
            if has_template(cur) {
                Partial::Unknown
            } else {
                Partial::Known(cur.clone())
            }
        }
        _ => Partial::Unknown,
    }
}

/// A rule condition evaluated three-valued on the step's facts.
fn eval(e: &Expr, f: &Facts<'_>) -> Partial {
    eval_partial(e, &|p: &Path| path(p, f))
}

/// The proto form of an approval obligation (as the policy service sends it
/// in a decision).
fn obligation(o: &Obligation, rule: ppb::PolicyRuleRef) -> ppb::ApprovalObligation {
    let reason = match o {
        Obligation::RequireApproval { reason, .. } => reason.clone().unwrap_or_default(),
        _ => String::new(),
    };
    ppb::ApprovalObligation {
        stages: o
            .approval_stages()
            .into_iter()
            .map(|s| ppb::RequiredApprovalStage {
                name: s.name,
                approvers: s.approvers,
                quorum: s.quorum,
            })
            .collect(),
        reason,
        expires_after: None,
        escalate_to: Vec::new(),
        rule: Some(rule),
    }
}

fn rule_ref(p: &ResolvedPolicy, rule: &anumate_policy::ast::Rule) -> ppb::PolicyRuleRef {
    let start = anumate_policy::line_col(&p.source, rule.span.start);
    let end = anumate_policy::line_col(&p.source, rule.span.end);
    let int = |x: u32| i32::try_from(x).unwrap_or(i32::MAX);
    ppb::PolicyRuleRef {
        policy: p.name.clone(),
        policy_version: p.version,
        content_hash: p.content_hash.clone(),
        rule: rule.id.clone(),
        span: Some(ppb::SourceSpan {
            source_name: format!("{}@{}", p.name, p.version),
            start_line: int(start.line),
            start_column: int(start.col),
            end_line: int(end.line),
            end_column: int(end.col),
            start_offset: i32::try_from(rule.span.start).unwrap_or(i32::MAX),
            end_offset: i32::try_from(rule.span.end).unwrap_or(i32::MAX),
        }),
    }
}

/// The approval needs of one step, in policy order then rule order.
pub fn step_needs(policies: &[ResolvedPolicy], facts: &Facts<'_>) -> Vec<pb::StaticApprovalNeed> {
    let mut out = Vec::new();
    for p in policies {
        for policy in &p.ast.policies {
            for rule in policy.rules.iter().filter(|r| r.enabled) {
                let approvals: Vec<_> = rule
                    .actions
                    .iter()
                    .filter(|a| a.kind == ActionKind::RequireApproval)
                    .collect();
                if approvals.is_empty() {
                    continue;
                }
                let certainty = match eval(&rule.when, facts) {
                    Partial::Known(Value::Bool(true)) => pb::ApprovalCertainty::Always,
                    Partial::Known(_) => continue,
                    Partial::Unknown => pb::ApprovalCertainty::Conditional,
                };
                for o in approvals.into_iter().filter_map(approval_obligation) {
                    out.push(pb::StaticApprovalNeed {
                        step_id: facts.step_id.to_string(),
                        certainty: certainty as i32,
                        obligation: Some(obligation(&o, rule_ref(p, rule))),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn when(src: &str, args: Value) -> Partial {
        let e = anumate_policy::parse_expr(src).unwrap_or_else(|e| panic!("{e}"));
        let facts = Facts {
            tool: "payments.refund",
            step_id: "refund",
            capsule_name: "c",
            capsule_version: 2,
            args: &args,
        };
        eval(&e, &facts)
    }

    #[test]
    fn three_valued_conditions() {
        let t = Partial::Known(Value::Bool(true));
        let f = Partial::Known(Value::Bool(false));
        assert_eq!(when("tool == 'payments.refund'", json!({})), t);
        assert_eq!(when("tool == 'email.send'", json!({})), f);
        assert_eq!(
            when(
                "tool == 'payments.refund' and args.amount > 5",
                json!({"amount": "${{ inputs.a }}"})
            ),
            Partial::Unknown
        );
        assert_eq!(
            when(
                "tool == 'email.send' and args.amount > 5",
                json!({"amount": "${{ inputs.a }}"})
            ),
            f
        );
        assert_eq!(when("args.amount > 5", json!({"amount": 9})), t);
        assert_eq!(
            when("args.currency != 'INR'", json!({"currency": "INR"})),
            f
        );
        assert_eq!(when("args.currency != 'INR'", json!({})), Partial::Unknown);
        assert_eq!(
            when(
                "tool in ['payments.refund', 'x'] or principal.id == 'a'",
                json!({})
            ),
            t
        );
        assert_eq!(
            when("not (principal.roles contains 'lead')", json!({})),
            Partial::Unknown
        );
        assert_eq!(when("step.id matches '^ref'", json!({})), t);
        assert_eq!(when("capsule.version >= 3", json!({})), f);
        assert_eq!(when("args.n == '1'", json!({"n": 1})), Partial::Unknown);
    }
}
