//! Policy sets: compiling a checked file, evaluating decisions, running tests.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::ast::*;
use crate::builtins::DETECTORS;
use crate::check::{Checker, POLICY_INPUT, Schema, Ty, literal_json};
use crate::diag::{CompileError, LineCol, Span, line_col};
use crate::eval::{EvalError, Fuel, MAX_ROOTS, Node, Slots, eval_bool};

/// Fuel a decision gets unless [`CompiledSet::with_fuel`] says otherwise.
pub const DEFAULT_FUEL: u64 = 100_000;

/// Start and end of a piece of source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SourceSpan {
    /// First character.
    pub start: LineCol,
    /// Just past the last character.
    pub end: LineCol,
}

impl SourceSpan {
    fn of(src: &str, span: Span) -> Self {
        SourceSpan {
            start: line_col(src, span.start),
            end: line_col(src, span.end),
        }
    }
}

impl std::fmt::Display for SourceSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}–{}", self.start, self.end)
    }
}

/// Something the caller must do along with the effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Obligation {
    /// Redact these field paths and/or whatever these detectors find.
    Redact {
        /// Dotted field paths (`customer.email`).
        fields: Vec<String>,
        /// Detector names (`email`, `card`, …).
        detectors: Vec<String>,
        /// Replacement text, when given.
        with: Option<String>,
    },
    /// Wait for approval.
    RequireApproval {
        /// Who may approve (`group:finance-leads`, `user:…`).
        approvers: Vec<String>,
        /// How many approvals are needed (default 1).
        quorum: u32,
        /// Successive stages, each `{approvers: […], quorum: N}`, as written.
        stages: Vec<Value>,
        /// Why approval is needed.
        reason: Option<String>,
    },
    /// Write a decision log entry.
    Log {
        /// `debug`, `info` (default), `warn` or `error`.
        level: String,
        /// The message, when given.
        message: Option<String>,
    },
}

/// A rule that matched, as reported in a decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MatchedRule {
    /// The policy's name.
    pub policy: String,
    /// The rule's id.
    pub rule: String,
    /// The rule's priority.
    pub priority: i64,
    /// The strongest effect among the rule's actions (`allow` for redact/log only).
    pub effect: Effect,
    /// Where the rule is.
    pub span: SourceSpan,
}

/// The outcome of evaluating a policy set on one input.
///
/// The matched-rule records, obligations and reasons are built once at
/// compile time; a decision borrows them from its [`CompiledSet`], so
/// evaluating copies no strings (three vectors of references are all it
/// allocates, and only when some rule matched).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision<'a> {
    /// The combined effect: deny > require_approval > allow; allow when nothing matched.
    pub effect: Effect,
    /// Every matched rule, higher priority first, then source order.
    pub matched: Vec<&'a MatchedRule>,
    /// Obligations of the matched rules, in the same order.
    pub obligations: Vec<&'a Obligation>,
    /// The `reason:` texts of the matched rules' actions, in the same order.
    pub reasons: Vec<&'a str>,
    /// Fuel spent.
    pub fuel_used: u64,
}

#[derive(Debug)]
struct CompiledRule {
    policy_index: usize,
    /// What a decision reports when the rule matches.
    info: MatchedRule,
    when: Node,
    obligations: Vec<Obligation>,
    reasons: Vec<String>,
}

#[derive(Debug)]
struct CompiledTest {
    policy_index: usize,
    name: String,
    at: LineCol,
    given: Value,
    expect: Effect,
}

/// A compiled policy file, ready to evaluate many times.
#[derive(Debug)]
pub struct CompiledSet {
    policies: Vec<String>,
    /// Enabled rules in report order.
    rules: Vec<CompiledRule>,
    tests: Vec<CompiledTest>,
    fuel: u64,
}

/// Compiles a checked policy file. `file` names the source in diagnostics.
pub fn compile_file(file: &str, src: &str, ast: &PolicyFile) -> Result<CompiledSet, CompileError> {
    let mut cx = Checker::new(file, src, &POLICY_INPUT);
    let mut rules = Vec::new();
    let mut tests = Vec::new();
    let mut names = HashSet::new();
    for (pi, p) in ast.policies.iter().enumerate() {
        if !names.insert(p.name.as_str()) {
            cx.error(p.span, format!("duplicate policy `{}`", p.name));
        }
        let mut ids = HashSet::new();
        for (ri, r) in p.rules.iter().enumerate() {
            if !ids.insert(r.id.as_str()) {
                cx.error(
                    r.span,
                    format!("duplicate rule `{}` in policy `{}`", r.id, p.name),
                );
            }
            let when = if cx.nesting_ok(&r.when) {
                let (when, ty) = cx.expr(&r.when);
                if !ty.is_bool_or_any() {
                    cx.error(r.when.span, "`when` needs a boolean condition");
                }
                when
            } else {
                Node::Const(Value::Null)
            };
            let mut effect = Effect::Allow;
            let mut obligations = Vec::new();
            let mut reasons = Vec::new();
            for a in &r.actions {
                let c = action(&mut cx, a);
                effect = effect.max(c.effect);
                obligations.extend(c.obligation);
                reasons.extend(c.reason);
            }
            if r.enabled {
                rules.push((
                    (Reverse(r.priority), pi, ri),
                    CompiledRule {
                        policy_index: pi,
                        info: MatchedRule {
                            policy: p.name.clone(),
                            rule: r.id.clone(),
                            priority: r.priority,
                            effect,
                            span: SourceSpan::of(src, r.span),
                        },
                        when,
                        obligations,
                        reasons,
                    },
                ));
            }
        }
        let mut test_names = HashSet::new();
        for t in &p.tests {
            if !test_names.insert(t.name.as_str()) {
                cx.error(t.span, format!("duplicate test `{}`", t.name));
            }
            let given = given(&mut cx, &t.given, &POLICY_INPUT);
            tests.push(CompiledTest {
                policy_index: pi,
                name: t.name.clone(),
                at: line_col(src, t.span.start),
                given,
                expect: t.expect,
            });
        }
    }
    if !cx.diags.is_empty() {
        let mut diagnostics = cx.diags;
        diagnostics.sort_by_key(|d| d.span.start);
        return Err(CompileError {
            file: file.to_string(),
            diagnostics,
        });
    }
    rules.sort_by_key(|r| r.0);
    Ok(CompiledSet {
        policies: ast.policies.iter().map(|p| p.name.clone()).collect(),
        rules: rules.into_iter().map(|(_, r)| r).collect(),
        tests,
        fuel: DEFAULT_FUEL,
    })
}

impl Ty {
    fn is_bool_or_any(self) -> bool {
        matches!(self, Ty::Bool | Ty::Any)
    }
}

fn given(cx: &mut Checker<'_>, e: &Expr, schema: &Schema) -> Value {
    if !cx.nesting_ok(e) {
        return Value::Null;
    }
    // Check it like an expression first (duplicate keys and the like).
    let _ = cx.expr(e);
    let Some(v) = literal_json(e) else {
        cx.error(
            e.span,
            "`given` must be a literal object (no paths or calls)",
        );
        return Value::Null;
    };
    // A repeated key was reported by `cx.expr` above; the literal keeps its
    // last value, so the map may have fewer entries than the source.
    if let (Value::Object(_), ExprKind::Object(fields)) = (&v, &e.kind) {
        for (k, fe) in fields {
            if !schema.roots.iter().any(|(n, _)| n == k) {
                cx.error(fe.span, format!("`given` has unknown field `{k}`"));
            }
        }
    }
    v
}

struct CompiledAction {
    effect: Effect,
    obligation: Option<Obligation>,
    reason: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum ArgTy {
    Str,
    StrList,
    PosInt,
    ObjList,
}

fn allowed_args(kind: ActionKind) -> &'static [(&'static str, ArgTy)] {
    match kind {
        ActionKind::Allow | ActionKind::Deny => &[("reason", ArgTy::Str)],
        ActionKind::RequireApproval => &[
            ("approvers", ArgTy::StrList),
            ("quorum", ArgTy::PosInt),
            ("stages", ArgTy::ObjList),
            ("reason", ArgTy::Str),
        ],
        ActionKind::Redact => &[
            ("fields", ArgTy::StrList),
            ("detectors", ArgTy::StrList),
            ("with", ArgTy::Str),
        ],
        ActionKind::Log => &[("message", ArgTy::Str), ("level", ArgTy::Str)],
    }
}

fn action(cx: &mut Checker<'_>, a: &Action) -> CompiledAction {
    let allowed = allowed_args(a.kind);
    let mut vals: Vec<(&str, Value)> = Vec::new();
    for arg in &a.args {
        let Some((_, want)) = allowed.iter().find(|(n, _)| *n == arg.name) else {
            let names: Vec<_> = allowed.iter().map(|(n, _)| *n).collect();
            cx.error(
                arg.name_span,
                format!(
                    "`{}` has no argument `{}` (it takes {})",
                    a.kind.as_str(),
                    arg.name,
                    names.join(", ")
                ),
            );
            continue;
        };
        if vals.iter().any(|(n, _)| *n == arg.name) {
            cx.error(arg.name_span, format!("duplicate argument `{}`", arg.name));
            continue;
        }
        if !cx.nesting_ok(&arg.value) {
            continue;
        }
        let Some(v) = literal_json(&arg.value) else {
            cx.error(arg.value.span, "action arguments must be literals");
            continue;
        };
        let ok = match want {
            ArgTy::Str => v.is_string(),
            ArgTy::StrList => v.as_array().is_some_and(|l| l.iter().all(Value::is_string)),
            ArgTy::PosInt => v
                .as_u64()
                .is_some_and(|n| n >= 1 && n <= u64::from(u32::MAX)),
            ArgTy::ObjList => v.as_array().is_some_and(|l| l.iter().all(Value::is_object)),
        };
        if !ok {
            let what = match want {
                ArgTy::Str => "a string",
                ArgTy::StrList => "a list of strings",
                ArgTy::PosInt => "a positive integer",
                ArgTy::ObjList => "a list of objects",
            };
            cx.error(arg.value.span, format!("`{}` must be {what}", arg.name));
            continue;
        }
        vals.push((arg.name.as_str(), v));
    }
    let get = |n: &str| vals.iter().find(|(k, _)| *k == n).map(|(_, v)| v);
    let string = |n: &str| get(n).and_then(Value::as_str).map(str::to_string);
    let strings = |n: &str| string_list(get(n));
    let reason = string("reason");
    match a.kind {
        ActionKind::Allow => CompiledAction {
            effect: Effect::Allow,
            obligation: None,
            reason,
        },
        ActionKind::Deny => CompiledAction {
            effect: Effect::Deny,
            obligation: None,
            reason,
        },
        ActionKind::RequireApproval => {
            let obligation = require_approval(get);
            if let Obligation::RequireApproval {
                approvers, stages, ..
            } = &obligation
                && approvers.is_empty()
                && stages.is_empty()
            {
                cx.error(a.span, "`require_approval` needs `approvers` (or `stages`)");
            }
            CompiledAction {
                effect: Effect::RequireApproval,
                obligation: Some(obligation),
                reason,
            }
        }
        ActionKind::Redact => {
            let fields = strings("fields");
            let detectors = strings("detectors");
            if fields.is_empty() && detectors.is_empty() {
                cx.error(a.span, "`redact` needs `fields` or `detectors`");
            }
            for d in &detectors {
                if !DETECTORS.iter().any(|(n, _)| n == d) {
                    let known: Vec<_> = DETECTORS.iter().map(|(n, _)| *n).collect();
                    let span = a
                        .args
                        .iter()
                        .find(|x| x.name == "detectors")
                        .map_or(a.span, |x| x.value.span);
                    cx.error(
                        span,
                        format!("unknown detector `{d}` (known: {})", known.join(", ")),
                    );
                }
            }
            CompiledAction {
                effect: Effect::Allow,
                obligation: Some(Obligation::Redact {
                    fields,
                    detectors,
                    with: string("with"),
                }),
                reason: None,
            }
        }
        ActionKind::Log => {
            let level = string("level").unwrap_or_else(|| "info".to_string());
            if !["debug", "info", "warn", "error"].contains(&level.as_str()) {
                cx.error(
                    a.span,
                    format!("unknown log level `{level}` (debug, info, warn, error)"),
                );
            }
            CompiledAction {
                effect: Effect::Allow,
                obligation: Some(Obligation::Log {
                    level,
                    message: string("message"),
                }),
                reason: None,
            }
        }
    }
}

/// The `require_approval` obligation of an action whose (checked, literal)
/// arguments `get` returns by name: `quorum` 1 unless given.
fn require_approval<'v>(get: impl Fn(&str) -> Option<&'v Value>) -> Obligation {
    let string = |n: &str| get(n).and_then(Value::as_str).map(str::to_string);
    Obligation::RequireApproval {
        approvers: string_list(get("approvers")),
        quorum: get("quorum")
            .and_then(Value::as_u64)
            .and_then(|q| u32::try_from(q).ok())
            .unwrap_or(1),
        stages: get("stages")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        reason: string("reason"),
    }
}

/// The strings of a list value (others skipped); empty when not a list.
pub(crate) fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The `require_approval` obligation an action of a checked policy adds;
/// `None` for other actions. Compile-time analysis (the compiler's static
/// approval needs) gets exactly the obligation a decision would carry.
pub fn approval_obligation(action: &Action) -> Option<Obligation> {
    if action.kind != ActionKind::RequireApproval {
        return None;
    }
    let args: Vec<(&str, Value)> = action
        .args
        .iter()
        .filter_map(|a| Some((a.name.as_str(), literal_json(&a.value)?)))
        .collect();
    Some(require_approval(|n| {
        args.iter().find(|(k, _)| *k == n).map(|(_, v)| v)
    }))
}

/// Indexes the top-level fields of `input` by the schema's slots.
pub(crate) fn slots<'a>(schema: &Schema, input: &'a Value) -> Result<Slots<'a>, EvalError> {
    let Value::Object(map) = input else {
        return Err(EvalError::InputNotObject);
    };
    let mut slots: Slots<'a> = [None; MAX_ROOTS];
    for (k, v) in map {
        if let Some(i) = schema.roots.iter().position(|(n, _)| *n == k)
            && let Some(s) = slots.get_mut(i)
        {
            *s = Some(v);
        }
    }
    Ok(slots)
}

impl CompiledSet {
    /// This set with a different fuel limit per decision.
    pub fn with_fuel(mut self, fuel: u64) -> Self {
        self.fuel = fuel;
        self
    }

    /// The policy names, in source order.
    pub fn policy_names(&self) -> &[String] {
        &self.policies
    }

    /// Number of enabled rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Evaluates every enabled rule on `input` (a JSON object with the
    /// SPEC §3 fields) and combines the matches into a decision.
    pub fn evaluate(&self, input: &Value) -> Result<Decision<'_>, EvalError> {
        self.evaluate_only(input, None)
    }

    fn evaluate_only(
        &self,
        input: &Value,
        policy: Option<usize>,
    ) -> Result<Decision<'_>, EvalError> {
        let mut d = Decision {
            effect: Effect::Allow,
            matched: Vec::new(),
            obligations: Vec::new(),
            reasons: Vec::new(),
            fuel_used: 0,
        };
        d.fuel_used = self.each_match(input, policy, |r| {
            if d.matched.capacity() == 0 {
                // One allocation each for the common case.
                let n = self.rules.len().min(32);
                d.matched.reserve(n);
                d.obligations.reserve(n);
                d.reasons.reserve(n);
            }
            d.effect = d.effect.max(r.info.effect);
            d.matched.push(&r.info);
            d.obligations.extend(r.obligations.iter());
            d.reasons.extend(r.reasons.iter().map(String::as_str));
        })?;
        Ok(d)
    }

    /// Calls `hit` with each enabled rule (of `policy`, when given) whose
    /// condition is true, in report order; returns the fuel spent.
    fn each_match<'s>(
        &'s self,
        input: &Value,
        policy: Option<usize>,
        mut hit: impl FnMut(&'s CompiledRule),
    ) -> Result<u64, EvalError> {
        let slots = slots(&POLICY_INPUT, input)?;
        let mut fuel = Fuel::new(self.fuel);
        for r in &self.rules {
            if policy.is_some_and(|p| p != r.policy_index) {
                continue;
            }
            let matched =
                eval_bool(&r.when, &slots, &mut fuel).map_err(|_| EvalError::FuelExhausted {
                    limit: self.fuel,
                    policy: r.info.policy.clone(),
                    rule: r.info.rule.clone(),
                })?;
            if matched == Some(true) {
                hit(r);
            }
        }
        Ok(self.fuel - fuel.left)
    }

    /// Like [`evaluate`](Self::evaluate), with each matched rule's own
    /// obligations and reasons beside it (what [`decide`](crate::decide)
    /// assembles across sets).
    pub(crate) fn evaluate_rules(
        &self,
        input: &Value,
    ) -> Result<(Vec<RuleMatch<'_>>, u64), EvalError> {
        let mut out = Vec::new();
        let fuel = self.each_match(input, None, |r| {
            out.push(RuleMatch {
                rule: &r.info,
                obligations: &r.obligations,
                reasons: &r.reasons,
            });
        })?;
        Ok((out, fuel))
    }
}

/// One matched rule with what its actions add.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleMatch<'a> {
    pub(crate) rule: &'a MatchedRule,
    pub(crate) obligations: &'a [Obligation],
    pub(crate) reasons: &'a [String],
}

/// The result of one `test` block.
#[derive(Debug, Clone, PartialEq)]
pub struct TestOutcome<'a> {
    /// The policy the test belongs to.
    pub policy: String,
    /// The test's name.
    pub name: String,
    /// Where the test is.
    pub at: LineCol,
    /// The `expect` effect.
    pub expected: Effect,
    /// The decision (or why there is none).
    pub actual: Result<Decision<'a>, EvalError>,
}

impl TestOutcome<'_> {
    /// Whether the decision's effect is the expected one.
    pub fn passed(&self) -> bool {
        matches!(&self.actual, Ok(d) if d.effect == self.expected)
    }

    /// A readable expected-vs-actual report (empty when the test passed).
    pub fn diff(&self) -> String {
        if self.passed() {
            return String::new();
        }
        let mut s = format!("- expected: {}\n", self.expected);
        match &self.actual {
            Err(e) => {
                let _ = writeln!(s, "+ actual:   error: {e}");
            }
            Ok(d) => {
                let _ = writeln!(s, "+ actual:   {}", d.effect);
                if d.matched.is_empty() {
                    s.push_str("  matched:  (no rule)\n");
                }
                for m in &d.matched {
                    let _ = writeln!(
                        s,
                        "  matched:  {}/{} ({}) at {} priority {}",
                        m.policy, m.rule, m.effect, m.span, m.priority
                    );
                }
                for r in &d.reasons {
                    let _ = writeln!(s, "  reason:   {r}");
                }
            }
        }
        s
    }
}

/// Runs every `test` block, each against its own policy's rules.
pub fn run_tests(set: &CompiledSet) -> Vec<TestOutcome<'_>> {
    set.tests
        .iter()
        .map(|t| TestOutcome {
            policy: set
                .policies
                .get(t.policy_index)
                .cloned()
                .unwrap_or_default(),
            name: t.name.clone(),
            at: t.at,
            expected: t.expect,
            actual: set.evaluate_only(&t.given, Some(t.policy_index)),
        })
        .collect()
}
