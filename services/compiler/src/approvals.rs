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

use anumate_policy::ast::{
    ActionKind, BinaryOp, Expr, ExprKind, Path, PolicyFile, Segment, UnaryOp,
};
use anumate_proto::compiler::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use serde_json::Value;

/// A policy version the plan is governed by, with its parsed source.
#[derive(Debug, Clone)]
pub struct ResolvedPolicy {
    /// Policy name.
    pub name: String,
    /// Version number.
    pub version: i64,
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
        version: i64,
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
    pub capsule_version: i64,
    /// The step's templated arguments.
    pub args: &'a Value,
}

#[derive(Debug, Clone, PartialEq)]
enum Pv {
    Known(Value),
    Unknown,
}

fn has_template(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("${{"),
        Value::Array(items) => items.iter().any(has_template),
        Value::Object(map) => map.values().any(has_template),
        _ => false,
    }
}

fn path(p: &Path, f: &Facts<'_>) -> Pv {
    let field = |i: usize| match p.segments.get(i) {
        Some(Segment::Field(n) | Segment::Key(n)) => Some(n.as_str()),
        _ => None,
    };
    let n = p.segments.len();
    match p.root.as_str() {
        "tool" if n == 0 => Pv::Known(Value::from(f.tool)),
        "step" if n == 1 && field(0) == Some("id") => Pv::Known(Value::from(f.step_id)),
        "capsule" if n == 1 && field(0) == Some("name") => Pv::Known(Value::from(f.capsule_name)),
        "capsule" if n == 1 && field(0) == Some("version") => {
            Pv::Known(Value::from(f.capsule_version))
        }
        "args" => {
            let mut cur = f.args;
            for seg in &p.segments {
                if has_template_str(cur) {
                    return Pv::Unknown;
                }
                let next = match seg {
                    Segment::Field(k) | Segment::Key(k) => cur.get(k.as_str()),
                    Segment::Index(i) => usize::try_from(*i).ok().and_then(|i| cur.get(i)),
                };
                match next {
                    Some(v) => cur = v,
                    // Absent here; a connector or default could still supply it at run time.
                    None => return Pv::Unknown,
                }
            }
            if has_template(cur) {
                Pv::Unknown
            } else {
                Pv::Known(cur.clone())
            }
        }
        _ => Pv::Unknown,
    }
}

fn has_template_str(v: &Value) -> bool {
    matches!(v, Value::String(s) if s.contains("${{"))
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn json_eq(a: &Value, b: &Value) -> Option<bool> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            Some(num(&Value::Number(x.clone())) == num(&Value::Number(y.clone())))
        }
        (Value::String(x), Value::String(y)) => Some(x == y),
        (Value::Bool(x), Value::Bool(y)) => Some(x == y),
        (Value::Null, Value::Null) => Some(true),
        // Mixed types or structures: leave to run time.
        _ => None,
    }
}

fn membership(needle: &Value, hay: &Value) -> Option<bool> {
    match hay {
        Value::Array(items) => {
            let mut out = Some(false);
            for item in items {
                match json_eq(needle, item) {
                    Some(true) => return Some(true),
                    Some(false) => {}
                    None => out = None,
                }
            }
            out
        }
        Value::String(s) => needle.as_str().map(|n| s.contains(n)),
        Value::Object(map) => needle.as_str().map(|k| map.contains_key(k)),
        _ => None,
    }
}

fn known_bool(v: &Pv) -> Option<bool> {
    match v {
        Pv::Known(Value::Bool(b)) => Some(*b),
        _ => None,
    }
}

fn eval(e: &Expr, f: &Facts<'_>) -> Pv {
    use Pv::{Known, Unknown};
    match &e.kind {
        ExprKind::Null => Known(Value::Null),
        ExprKind::Bool(b) => Known(Value::Bool(*b)),
        ExprKind::Int(i) => Known(Value::from(*i)),
        ExprKind::Float(x) => {
            serde_json::Number::from_f64(*x).map_or(Unknown, |n| Known(Value::Number(n)))
        }
        ExprKind::Str(s) => Known(Value::from(s.as_str())),
        ExprKind::List(items) => {
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                match eval(i, f) {
                    Known(v) => out.push(v),
                    Unknown => return Unknown,
                }
            }
            Known(Value::Array(out))
        }
        ExprKind::Object(members) => {
            let mut out = serde_json::Map::new();
            for (k, v) in members {
                match eval(v, f) {
                    Known(v) => {
                        out.insert(k.clone(), v);
                    }
                    Unknown => return Unknown,
                }
            }
            Known(Value::Object(out))
        }
        ExprKind::Path(p) => path(p, f),
        ExprKind::Unary(UnaryOp::Not, x) => match known_bool(&eval(x, f)) {
            Some(b) => Known(Value::Bool(!b)),
            None => Unknown,
        },
        ExprKind::Unary(UnaryOp::Neg, _) | ExprKind::Call(..) => Unknown,
        ExprKind::Binary(op, a, b) => binary(*op, a, b, f),
    }
}

fn binary(op: BinaryOp, a: &Expr, b: &Expr, f: &Facts<'_>) -> Pv {
    use Pv::{Known, Unknown};
    let (x, y) = (eval(a, f), eval(b, f));
    let boolean = |r: Option<bool>| r.map_or(Unknown, |b| Known(Value::Bool(b)));
    match op {
        BinaryOp::And => match (known_bool(&x), known_bool(&y)) {
            (Some(false), _) | (_, Some(false)) => Known(Value::Bool(false)),
            (Some(true), Some(true)) => Known(Value::Bool(true)),
            _ => Unknown,
        },
        BinaryOp::Or => match (known_bool(&x), known_bool(&y)) {
            (Some(true), _) | (_, Some(true)) => Known(Value::Bool(true)),
            (Some(false), Some(false)) => Known(Value::Bool(false)),
            _ => Unknown,
        },
        _ => {
            let (Known(x), Known(y)) = (x, y) else {
                return Unknown;
            };
            match op {
                BinaryOp::Eq => boolean(json_eq(&x, &y)),
                BinaryOp::Ne => boolean(json_eq(&x, &y).map(|b| !b)),
                BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
                    let ord = match (&x, &y) {
                        (Value::Number(_), Value::Number(_)) => {
                            num(&x).zip(num(&y)).and_then(|(p, q)| p.partial_cmp(&q))
                        }
                        (Value::String(p), Value::String(q)) => Some(p.cmp(q)),
                        _ => None,
                    };
                    boolean(ord.map(|o| match op {
                        BinaryOp::Lt => o.is_lt(),
                        BinaryOp::Le => o.is_le(),
                        BinaryOp::Gt => o.is_gt(),
                        _ => o.is_ge(),
                    }))
                }
                BinaryOp::In => boolean(membership(&x, &y)),
                BinaryOp::Contains => boolean(membership(&y, &x)),
                BinaryOp::Matches => match (x.as_str(), y.as_str()) {
                    (Some(s), Some(re)) => {
                        boolean(regex::Regex::new(re).ok().map(|r| r.is_match(s)))
                    }
                    _ => Unknown,
                },
                _ => Unknown,
            }
        }
    }
}

/// Action arguments are literals (the policy checker enforces it).
fn literal(e: &Expr) -> Value {
    match &e.kind {
        ExprKind::Bool(b) => Value::Bool(*b),
        ExprKind::Int(i) => Value::from(*i),
        ExprKind::Float(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        ExprKind::Str(s) => Value::from(s.as_str()),
        ExprKind::List(items) => Value::Array(items.iter().map(literal).collect()),
        ExprKind::Object(members) => Value::Object(
            members
                .iter()
                .map(|(k, v)| (k.clone(), literal(v)))
                .collect(),
        ),
        _ => Value::Null,
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn quorum(v: Option<&Value>) -> i32 {
    v.and_then(Value::as_i64)
        .and_then(|q| i32::try_from(q).ok())
        .unwrap_or(1)
}

/// The obligation one `require_approval(...)` action produces (as the policy
/// service builds it for a decision).
fn obligation(args: &[(String, Value)], rule: ppb::RuleRef) -> ppb::ApprovalObligation {
    let get = |name: &str| args.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let stages = match get("stages").and_then(Value::as_array) {
        Some(stages) if !stages.is_empty() => stages
            .iter()
            .enumerate()
            .map(|(i, s)| ppb::ApprovalStage {
                name: s
                    .get("name")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("stage-{}", i + 1), str::to_string),
                approvers: strings(s.get("approvers")),
                quorum: quorum(s.get("quorum")),
            })
            .collect(),
        _ => vec![ppb::ApprovalStage {
            name: "stage-1".into(),
            approvers: strings(get("approvers")),
            quorum: quorum(get("quorum")),
        }],
    };
    ppb::ApprovalObligation {
        stages,
        reason: get("reason")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        expires_after: None,
        escalate_to: Vec::new(),
        rule: Some(rule),
    }
}

fn rule_ref(p: &ResolvedPolicy, rule: &anumate_policy::ast::Rule) -> ppb::RuleRef {
    let start = anumate_policy::line_col(&p.source, rule.span.start);
    let end = anumate_policy::line_col(&p.source, rule.span.end);
    let int = |x: u32| i32::try_from(x).unwrap_or(i32::MAX);
    ppb::RuleRef {
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
                    Pv::Known(Value::Bool(true)) => pb::ApprovalCertainty::Always,
                    Pv::Known(_) => continue,
                    Pv::Unknown => pb::ApprovalCertainty::Conditional,
                };
                for a in approvals {
                    let args: Vec<(String, Value)> = a
                        .args
                        .iter()
                        .map(|arg| (arg.name.clone(), literal(&arg.value)))
                        .collect();
                    out.push(pb::StaticApprovalNeed {
                        step_id: facts.step_id.to_string(),
                        certainty: certainty as i32,
                        obligation: Some(obligation(&args, rule_ref(p, rule))),
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

    fn when(src: &str, args: Value) -> Pv {
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
        let t = Pv::Known(Value::Bool(true));
        let f = Pv::Known(Value::Bool(false));
        assert_eq!(when("tool == 'payments.refund'", json!({})), t);
        assert_eq!(when("tool == 'email.send'", json!({})), f);
        assert_eq!(
            when(
                "tool == 'payments.refund' and args.amount > 5",
                json!({"amount": "${{ inputs.a }}"})
            ),
            Pv::Unknown
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
        assert_eq!(when("args.currency != 'INR'", json!({})), Pv::Unknown);
        assert_eq!(
            when(
                "tool in ['payments.refund', 'x'] or principal.id == 'a'",
                json!({})
            ),
            t
        );
        assert_eq!(
            when("not (principal.roles contains 'lead')", json!({})),
            Pv::Unknown
        );
        assert_eq!(when("step.id matches '^ref'", json!({})), t);
        assert_eq!(when("capsule.version >= 3", json!({})), f);
        assert_eq!(when("args.n == '1'", json!({"n": 1})), Pv::Unknown);
    }
}
