//! The compile function itself: a parsed capsule version, its resolved
//! policies and the tool catalogue in, an [`pb::ExecutablePlan`] out. No I/O.
//!
//! Checks, all reported at once as `INVALID_DOCUMENT` violations (each with
//! `ErrorInfo.metadata["reason"]` naming the first problem's class and
//! `["reasons"]` every class found):
//! `tool_not_allowed` (a step's tool outside `spec.tools`), `duplicate_step`,
//! `unknown_need`, `cycle`, `bad_expression` (a `${{ }}` or `if:` that does
//! not parse or type-check against the inputs and upstream steps, via
//! `anumate_policy::check_template_expr`), `bad_arguments` (arguments that
//! the tool's input schema rejects). A tool in the allow-list without a
//! catalogue binding is `FAILED_PRECONDITION` with reason `TOOL_NOT_DECLARED`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anumate_capsule::{Capsule, InputSpec, Step};
use anumate_errors::{Error, ErrorCode, Result, Violation};
use anumate_policy::TemplateScope;
use anumate_proto::compiler::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use serde_json::{Map, Value, json};

use crate::approvals::{Facts, ResolvedPolicy, step_needs};
use crate::catalogue::{Catalogue, duration_of};

/// Version of this compiler, recorded in plans (not hashed).
pub const COMPILER_VERSION: &str = concat!("anumate-compiler/", env!("CARGO_PKG_VERSION"));

/// Everything a compile needs, already fetched.
pub struct CompileInput<'a> {
    /// The parsed capsule version.
    pub capsule: &'a Capsule,
    /// Its version number.
    pub capsule_version: i32,
    /// Its `sha256:` content hash.
    pub capsule_content_hash: &'a str,
    /// The capsule's policies, resolved to versions (any order).
    pub policies: &'a [ResolvedPolicy],
    /// Tool bindings.
    pub catalogue: &'a Catalogue,
    /// Per-attempt timeout of steps that declare none.
    pub default_timeout: Duration,
}

struct Problems {
    violations: Vec<Violation>,
    reasons: Vec<&'static str>,
}

impl Problems {
    fn add(&mut self, reason: &'static str, v: Violation) {
        if !self.reasons.contains(&reason) {
            self.reasons.push(reason);
        }
        self.violations.push(v);
    }

    fn into_result(self, capsule: &str, version: i32) -> Result<()> {
        if self.violations.is_empty() {
            return Ok(());
        }
        let n = self.violations.len();
        let first = self.reasons.first().copied().unwrap_or("invalid");
        let mut err = Error::new(
            ErrorCode::InvalidDocument,
            format!(
                "capsule {capsule} version {version} does not compile: {n} problem{} ({})",
                if n == 1 { "" } else { "s" },
                self.reasons.join(", ")
            ),
        )
        .with_violations(self.violations)
        .with_metadata("reason", first)
        .with_metadata("reasons", self.reasons.join(","));
        err.violations
            .sort_by_key(|v| v.position.unwrap_or((u32::MAX, u32::MAX)));
        Err(err)
    }
}

fn step_at(i: usize, step: &Step, field: &str, description: impl Into<String>) -> Violation {
    let path = if field.is_empty() {
        format!("spec.steps[{i}]")
    } else {
        format!("spec.steps[{i}].{field}")
    };
    Violation::at(path, step.position.0, step.position.1, description)
}

fn proto_duration(d: Duration) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn to_struct(v: &Value) -> Result<pbjson_types::Struct> {
    serde_json::from_value(v.clone()).map_err(Error::internal)
}

/// Orders the steps: returns each step's level, or the ids left on a cycle.
fn levels(
    steps: &[Step],
    index: &HashMap<&str, usize>,
) -> std::result::Result<Vec<i32>, Vec<usize>> {
    let n = steps.len();
    let mut indegree = vec![0usize; n];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, s) in steps.iter().enumerate() {
        for need in &s.needs {
            if let Some(&j) = index.get(need.as_str()) {
                indegree[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut level = vec![0i32; n];
    let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut done = 0;
    while let Some(j) = ready.pop() {
        done += 1;
        for &i in &dependents[j] {
            level[i] = level[i].max(level[j] + 1);
            indegree[i] -= 1;
            if indegree[i] == 0 {
                ready.push(i);
            }
        }
    }
    if done == n {
        Ok(level)
    } else {
        Err((0..n).filter(|&i| indegree[i] > 0).collect())
    }
}

/// One cycle through `start` among `on_cycle` steps, as ids `a -> b -> a`.
fn describe_cycle(steps: &[Step], index: &HashMap<&str, usize>, on_cycle: &[usize]) -> String {
    let members: BTreeSet<usize> = on_cycle.iter().copied().collect();
    let Some(&start) = on_cycle.first() else {
        return String::new();
    };
    let mut path = vec![start];
    let mut seen = BTreeSet::from([start]);
    let mut cur = start;
    loop {
        let next = steps[cur]
            .needs
            .iter()
            .filter_map(|n| index.get(n.as_str()).copied())
            .find(|j| members.contains(j));
        let Some(next) = next else { break };
        path.push(next);
        if !seen.insert(next) {
            break;
        }
        cur = next;
    }
    // Trim the lead-in so the text starts on the cycle itself.
    if let Some(&last) = path.last()
        && let Some(first) = path.iter().position(|&x| x == last)
    {
        path.drain(..first);
    }
    path.iter()
        .map(|&i| steps[i].id.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}

fn json_type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "null" => v.is_null(),
        _ => true,
    }
}

/// The JSON type a templated argument takes, where it can be seen.
fn template_type(s: &str, inputs: &BTreeMap<String, InputSpec>) -> Option<&'static str> {
    let exprs = anumate_capsule::expr::find_expressions(s).ok()?;
    match exprs.as_slice() {
        [e] if e.start == 0 && e.end == s.len() => {
            let name = e.body.strip_prefix("inputs.")?;
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return None;
            }
            inputs.get(name).map(|i| i.ty.name())
        }
        [] => Some("string"),
        // Text around or between expressions: interpolated into a string.
        _ => Some("string"),
    }
}

fn check_args(
    i: usize,
    step: &Step,
    schema: Option<&pbjson_types::Struct>,
    inputs: &BTreeMap<String, InputSpec>,
    problems: &mut Problems,
) {
    let Some(schema) = schema.and_then(|s| serde_json::to_value(s).ok()) else {
        return;
    };
    let empty = Map::new();
    let args = step.with.as_object().unwrap_or(&empty);
    let props = schema.get("properties").and_then(Value::as_object);
    for req in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if !args.contains_key(req) {
            problems.add(
                "bad_arguments",
                step_at(
                    i,
                    step,
                    "with",
                    format!("tool {} needs argument `{req}`", step.tool),
                ),
            );
        }
    }
    let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
    for (key, value) in args {
        let prop = props.and_then(|p| p.get(key));
        if prop.is_none() {
            if closed {
                let known: Vec<&str> = props
                    .map(|p| p.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                problems.add(
                    "bad_arguments",
                    step_at(
                        i,
                        step,
                        &format!("with.{key}"),
                        format!(
                            "tool {} has no argument `{key}` (it takes {})",
                            step.tool,
                            known.join(", ")
                        ),
                    ),
                );
            }
            continue;
        }
        let Some(want) = prop.and_then(|p| p.get("type")).and_then(Value::as_str) else {
            continue;
        };
        let got = match value {
            Value::String(s) if s.contains("${{") => template_type(s, inputs),
            v => {
                if json_type_ok(want, v) {
                    continue;
                }
                Some(match v {
                    Value::String(_) => "string",
                    Value::Bool(_) => "boolean",
                    Value::Number(_) => "number",
                    Value::Array(_) => "array",
                    Value::Object(_) => "object",
                    Value::Null => "null",
                })
            }
        };
        let compatible = match got {
            None => true,
            Some(g) => g == want || (want == "number" && g == "integer"),
        };
        if !compatible {
            problems.add(
                "bad_arguments",
                step_at(
                    i,
                    step,
                    &format!("with.{key}"),
                    format!(
                        "argument `{key}` of tool {} must be {want}, this is {}",
                        step.tool,
                        got.unwrap_or("unknown")
                    ),
                ),
            );
        }
    }
}

/// Every string in `v` with its path below `with`.
fn strings<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a str)>) {
    match v {
        Value::String(s) => out.push((path, s)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                strings(item, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                strings(item, format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

fn check_expr(
    i: usize,
    step: &Step,
    field: &str,
    body: &str,
    scope: &TemplateScope<'_>,
    problems: &mut Problems,
) {
    for v in anumate_policy::check_template_expr(body, scope) {
        let at = v
            .position
            .map(|(l, c)| format!(" (at {l}:{c} of `{body}`)"))
            .unwrap_or_default();
        problems.add(
            "bad_expression",
            step_at(i, step, field, format!("{}{at}", v.description)),
        );
    }
}

fn inputs_schema(inputs: &BTreeMap<String, InputSpec>) -> Value {
    let mut props = Map::new();
    let mut required = Vec::new();
    for (name, spec) in inputs {
        let mut p = Map::new();
        p.insert("type".into(), spec.ty.name().into());
        if let Some(e) = &spec.enum_values {
            p.insert("enum".into(), Value::Array(e.clone()));
        }
        let number = |x: f64| {
            if x.fract() == 0.0 && x.abs() < 9.0e15 {
                json!(x as i64)
            } else {
                json!(x)
            }
        };
        if let Some(m) = spec.minimum {
            p.insert("minimum".into(), number(m));
        }
        if let Some(m) = spec.maximum {
            p.insert("maximum".into(), number(m));
        }
        if let Some(m) = spec.min_length {
            p.insert("minLength".into(), m.into());
        }
        if let Some(m) = spec.max_length {
            p.insert("maxLength".into(), m.into());
        }
        if let Some(pat) = &spec.pattern {
            p.insert("pattern".into(), pat.clone().into());
        }
        if let Some(d) = &spec.default {
            p.insert("default".into(), d.clone());
        }
        if let Some(d) = &spec.description {
            p.insert("description".into(), d.clone().into());
        }
        if spec.required {
            required.push(Value::from(name.as_str()));
        }
        props.insert(name.clone(), Value::Object(p));
    }
    json!({"type": "object", "properties": props, "required": required})
}

fn retry_policy(step: &Step) -> pb::RetryPolicy {
    match &step.retry {
        None => pb::RetryPolicy {
            max_attempts: 1,
            backoff: pb::Backoff::Fixed as i32,
            ..Default::default()
        },
        Some(r) => {
            let exponential = r.backoff == anumate_capsule::Backoff::Exponential;
            pb::RetryPolicy {
                max_attempts: i32::try_from(r.max_attempts).unwrap_or(1),
                backoff: if exponential {
                    pb::Backoff::Exponential
                } else {
                    pb::Backoff::Fixed
                } as i32,
                initial_backoff: r.initial.map(proto_duration),
                max_backoff: r.max.map(proto_duration),
                multiplier: if exponential { 2.0 } else { 0.0 },
            }
        }
    }
}

/// Longest total wait of the retries of `r` (every attempt but the last waits).
fn retry_waits(r: &pb::RetryPolicy) -> Duration {
    let initial = duration_of(r.initial_backoff.as_ref()).unwrap_or_default();
    let cap = duration_of(r.max_backoff.as_ref());
    let mut total = Duration::ZERO;
    let mut wait = initial;
    for _ in 1..r.max_attempts.max(1) {
        let w = cap.map_or(wait, |c| wait.min(c));
        total = total.saturating_add(w);
        if r.backoff == pb::Backoff::Exponential as i32 {
            wait = wait.saturating_mul(2);
        }
    }
    total
}

fn estimate(
    steps: &[pb::PlanStep],
    index: &HashMap<&str, usize>,
    order: &[usize],
    catalogue: &[pb::ToolBinding],
) -> pb::Estimate {
    let binding = |tool: &str| catalogue.iter().find(|b| b.tool == tool);
    let mut notes = Vec::new();
    let mut no_duration = Vec::new();
    let mut expected = vec![Duration::ZERO; steps.len()];
    let mut worst = vec![Duration::ZERO; steps.len()];
    let mut costs: BTreeMap<String, (i64, usize)> = BTreeMap::new();
    let mut first_currency: Option<String> = None;
    let mut no_cost = Vec::new();
    for &i in order {
        let s = &steps[i];
        let b = binding(&s.tool);
        let typical = b.and_then(|b| duration_of(b.typical_duration.as_ref()));
        if typical.is_none() {
            no_duration.push(s.id.as_str());
        }
        let timeout = duration_of(s.timeout.as_ref()).unwrap_or_default();
        let retry = s.retry.unwrap_or_default();
        let attempts = u32::try_from(retry.max_attempts.max(1)).unwrap_or(1);
        let own_worst = timeout
            .saturating_mul(attempts)
            .saturating_add(retry_waits(&retry));
        let (mut e_in, mut w_in) = (Duration::ZERO, Duration::ZERO);
        for n in &s.needs {
            if let Some(&j) = index.get(n.as_str()) {
                e_in = e_in.max(expected[j]);
                w_in = w_in.max(worst[j]);
            }
        }
        expected[i] = e_in.saturating_add(typical.unwrap_or_default());
        worst[i] = w_in.saturating_add(own_worst);
        match b.filter(|b| !b.currency.is_empty()) {
            Some(b) => {
                first_currency.get_or_insert_with(|| b.currency.clone());
                let e = costs.entry(b.currency.clone()).or_default();
                e.0 = e.0.saturating_add(b.cost_micros);
                e.1 += 1;
            }
            None => no_cost.push(s.id.as_str()),
        }
    }
    if !no_duration.is_empty() {
        notes.push(format!(
            "no declared duration (counted as 0): {}",
            no_duration.join(", ")
        ));
    }
    if !no_cost.is_empty() && first_currency.is_some() {
        notes.push(format!("no declared cost: {}", no_cost.join(", ")));
    }
    let currency = first_currency.unwrap_or_default();
    for (c, (micros, n)) in &costs {
        if *c != currency {
            notes.push(format!(
                "{n} step(s) cost {micros} micro-{c}, not included in the {currency} total"
            ));
        }
    }
    pb::Estimate {
        expected_duration: Some(proto_duration(
            expected.iter().copied().max().unwrap_or_default(),
        )),
        max_duration: Some(proto_duration(
            worst.iter().copied().max().unwrap_or_default(),
        )),
        cost_micros: costs.get(&currency).map_or(0, |c| c.0),
        currency,
        notes,
    }
}

/// Compiles a capsule version into a plan and computes its hash. Everything
/// not part of the hash (`create_time`, `created_by`) is left unset.
pub fn compile(input: &CompileInput<'_>) -> Result<pb::ExecutablePlan> {
    let capsule = input.capsule;
    let spec = &capsule.spec;
    let tool_bindings = input.catalogue.resolve(&spec.tools)?;
    let mut problems = Problems {
        violations: Vec::new(),
        reasons: Vec::new(),
    };

    // Ids, tools, needs.
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(spec.steps.len());
    for (i, step) in spec.steps.iter().enumerate() {
        if index.insert(step.id.as_str(), i).is_some() {
            problems.add(
                "duplicate_step",
                step_at(i, step, "id", format!("duplicate step id `{}`", step.id)),
            );
        }
        if !spec.tools.contains(&step.tool) {
            problems.add(
                "tool_not_allowed",
                step_at(
                    i,
                    step,
                    "tool",
                    format!(
                        "tool {} is not in the capsule's allow-list ({})",
                        step.tool,
                        spec.tools.join(", ")
                    ),
                ),
            );
        }
    }
    for (i, step) in spec.steps.iter().enumerate() {
        for need in &step.needs {
            if !index.contains_key(need.as_str()) {
                problems.add(
                    "unknown_need",
                    step_at(
                        i,
                        step,
                        "needs",
                        format!("`needs` names unknown step `{need}`"),
                    ),
                );
            }
        }
    }
    let level = match levels(&spec.steps, &index) {
        Ok(level) => level,
        Err(on_cycle) => {
            let cycle = describe_cycle(&spec.steps, &index, &on_cycle);
            if let Some(&first) = on_cycle.first() {
                problems.add(
                    "cycle",
                    step_at(
                        first,
                        &spec.steps[first],
                        "needs",
                        format!("steps depend on each other in a cycle: {cycle}"),
                    ),
                );
            }
            // Nothing below makes sense without an order.
            return problems
                .into_result(&capsule.name, input.capsule_version)
                .map(|()| pb::ExecutablePlan::default());
        }
    };

    // Topological order (by level, then capsule order) and transitive upstreams.
    let mut order: Vec<usize> = (0..spec.steps.len()).collect();
    order.sort_by_key(|&i| (level[i], i));
    let mut upstream: Vec<BTreeSet<&str>> = vec![BTreeSet::new(); spec.steps.len()];
    for &i in &order {
        let mut up = BTreeSet::new();
        for need in &spec.steps[i].needs {
            if let Some(&j) = index.get(need.as_str()) {
                up.insert(spec.steps[j].id.as_str());
                up.extend(upstream[j].iter().copied());
            }
        }
        upstream[i] = up;
    }

    // Expressions and arguments.
    let input_names: Vec<&str> = spec.inputs.keys().map(String::as_str).collect();
    let known: Vec<&str> = spec.steps.iter().map(|s| s.id.as_str()).collect();
    let mut conditions: Vec<String> = vec![String::new(); spec.steps.len()];
    for (i, step) in spec.steps.iter().enumerate() {
        let up: Vec<&str> = upstream[i].iter().copied().collect();
        let scope = TemplateScope {
            inputs: &input_names,
            steps_upstream: &up,
            steps_known: &known,
        };
        let mut found = Vec::new();
        strings(&step.with, "with".into(), &mut found);
        for (field, text) in found {
            match anumate_capsule::expr::find_expressions(text) {
                Ok(exprs) => {
                    for e in exprs {
                        check_expr(i, step, &field, e.body, &scope, &mut problems);
                    }
                }
                Err(e) => problems.add("bad_expression", step_at(i, step, &field, e.to_string())),
            }
        }
        if let Some(cond) = &step.condition {
            match anumate_capsule::expr::find_expressions(cond) {
                Ok(exprs)
                    if exprs.len() == 1
                        && exprs[0].start == 0
                        && exprs[0].end == cond.trim_end().len() =>
                {
                    let body = exprs[0].body;
                    check_expr(i, step, "if", body, &scope, &mut problems);
                    conditions[i] = body.to_string();
                }
                Ok(_) => problems.add(
                    "bad_expression",
                    step_at(
                        i,
                        step,
                        "if",
                        "`if` must be exactly one `${{ … }}` expression",
                    ),
                ),
                Err(e) => problems.add("bad_expression", step_at(i, step, "if", e.to_string())),
            }
        }
        check_args(
            i,
            step,
            input
                .catalogue
                .get(&step.tool)
                .and_then(|b| b.input_schema.as_ref()),
            &spec.inputs,
            &mut problems,
        );
    }
    problems.into_result(&capsule.name, input.capsule_version)?;

    // The plan.
    let mut steps = Vec::with_capacity(spec.steps.len());
    for (i, step) in spec.steps.iter().enumerate() {
        let mut needs = step.needs.clone();
        needs.sort();
        needs.dedup();
        steps.push(pb::PlanStep {
            id: step.id.clone(),
            tool: step.tool.clone(),
            needs,
            condition: std::mem::take(&mut conditions[i]),
            args: Some(to_struct(&step.with)?),
            timeout: Some(proto_duration(
                step.timeout.unwrap_or(input.default_timeout),
            )),
            retry: Some(retry_policy(step)),
            level: level[i],
            compensation: match &step.compensate {
                Some(c) => Some(pb::Compensation {
                    tool: c.tool.clone(),
                    args: Some(to_struct(&c.with)?),
                    timeout: Some(proto_duration(c.timeout.unwrap_or(input.default_timeout))),
                }),
                None => None,
            },
        });
    }
    let depth = level.iter().copied().max().map_or(0, |m| m + 1);
    let mut levels_out: Vec<pb::PlanLevel> = (0..depth).map(|_| pb::PlanLevel::default()).collect();
    for (i, step) in spec.steps.iter().enumerate() {
        if let Some(l) = usize::try_from(level[i])
            .ok()
            .and_then(|l| levels_out.get_mut(l))
        {
            l.step_ids.push(step.id.clone());
        }
    }
    for l in &mut levels_out {
        l.step_ids.sort();
    }

    let mut policies: Vec<&ResolvedPolicy> = input.policies.iter().collect();
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    let refs: Vec<ppb::PolicyRef> = policies
        .iter()
        .map(|p| ppb::PolicyRef {
            name: p.name.clone(),
            version: p.version,
            content_hash: p.content_hash.clone(),
        })
        .collect();
    let sorted_policies: Vec<ResolvedPolicy> = policies.into_iter().cloned().collect();
    let mut approval_needs = Vec::new();
    for step in &spec.steps {
        approval_needs.extend(step_needs(
            &sorted_policies,
            &Facts {
                tool: &step.tool,
                step_id: &step.id,
                capsule_name: &capsule.name,
                capsule_version: input.capsule_version,
                args: &step.with,
            },
        ));
    }
    let mut allowed_tools = spec.tools.clone();
    allowed_tools.sort();
    allowed_tools.dedup();

    let estimate = estimate(&steps, &index, &order, &tool_bindings);
    let mut plan = pb::ExecutablePlan {
        plan_hash: String::new(),
        capsule_name: capsule.name.clone(),
        capsule_version: input.capsule_version,
        capsule_content_hash: input.capsule_content_hash.to_string(),
        inputs_schema: Some(to_struct(&inputs_schema(&spec.inputs))?),
        allowed_tools,
        steps,
        levels: levels_out,
        tool_bindings,
        policy_set_hash: policy_set_hash(&refs),
        policies: refs,
        approval_needs,
        estimate: Some(estimate),
        compiler_version: COMPILER_VERSION.to_string(),
        created_by: String::new(),
        create_time: None,
    };
    plan.plan_hash = plan_hash(&plan)?;
    Ok(plan)
}

/// The policy set hash of `refs` ([`anumate_crypto::policy_set_hash`], the
/// one the policy service reports for the same set).
pub fn policy_set_hash(refs: &[ppb::PolicyRef]) -> String {
    anumate_crypto::policy_set_hash(
        refs.iter()
            .map(|r| (r.name.as_str(), r.content_hash.as_str())),
    )
}

/// The executable content of a plan ([`anumate_crypto::plan_executable_content`]):
/// its proto3 JSON (defaults omitted) without `plan_hash`, `create_time`,
/// `created_by`, `compiler_version` and `estimate`.
pub fn executable_content(plan: &pb::ExecutablePlan) -> Result<Value> {
    anumate_crypto::plan_executable_content(plan)
}

/// `sha256:` + hex SHA-256 of the RFC 8785 form of [`executable_content`]
/// ([`anumate_crypto::plan_hash`]).
pub fn plan_hash(plan: &pb::ExecutablePlan) -> Result<String> {
    anumate_crypto::plan_hash(plan)
}
