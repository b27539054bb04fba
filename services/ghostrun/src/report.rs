//! The preflight itself, without I/O: walk the plan on the shared interpreter
//! with the simulator's outputs and write the report (SPEC §5). The golden
//! reports and the benchmark call [`simulate`] directly.

use std::sync::Arc;

use anumate_engine::sim::{self, Fixture, SimError, Simulator, Source};
use anumate_engine::{Context, Engine, Finished, Status, Step, StepDecision, json as ej};
use anumate_errors::{Error, Reason, Result, Violation};
use anumate_policy::{Effect, Obligation};
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::ghostrun::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use serde_json::Value;

/// Everything a report depends on.
pub struct SimInput<'a> {
    /// The plan.
    pub plan: &'a cpb::ExecutablePlan,
    /// Its interpreter with its policy sets and capsule labels, as
    /// [`Loader::prepared`](crate::Loader::prepared) gives it (any context:
    /// the simulation runs in `context`).
    pub engine: Engine,
    /// Who and when, as policies see it (`now` is RFC 3339 whole seconds).
    pub context: Context,
    /// Evaluation time echoed in the report (the same instant as `context.now`).
    pub evaluation_time: pbjson_types::Timestamp,
    /// The inputs as sent.
    pub inputs: &'a Value,
    /// The fixtures as sent.
    pub fixtures: &'a [pb::Fixture],
    /// The seed.
    pub seed: u64,
}

const POINTS_WRITE: i32 = 10;
const POINTS_DESTRUCTIVE: i32 = 25;
const POINTS_APPROVAL: i32 = 15;
const POINTS_DENIED: i32 = 30;
const POINTS_LARGE_AMOUNT: i32 = 10;
const POINTS_SKIPPED_BY_OUTPUT: i32 = 5;
const POINTS_NO_IDEMPOTENCY: i32 = 5;
const POINTS_FAILED: i32 = 20;

/// Simulates the run and writes the report (without id, creator, times of
/// storage or citation: the caller adds those).
///
/// # Errors
/// `INVALID_ARGUMENT`: inputs not matching the schema
/// (`PREFLIGHT_INPUTS_INVALID`, one violation per field) or bad fixtures
/// (`PREFLIGHT_FIXTURE_INVALID`); `INTERNAL` for a plan the interpreter refuses.
pub fn simulate(input: &SimInput<'_>) -> Result<pb::PreflightReport> {
    simulate_json(input).map(|(report, _)| report)
}

/// [`simulate`], with the report's JSON as hashed (see [`report_hash`]):
/// the service completes and stores that JSON instead of converting the
/// report a second time.
///
/// # Errors
/// See [`simulate`].
pub fn simulate_json(input: &SimInput<'_>) -> Result<(pb::PreflightReport, Value)> {
    let plan = input.plan;
    let engine = input.engine.with_context(input.context.clone());
    let fixtures = fixtures(plan, input.fixtures)?;
    let mut run = engine.start(input.inputs).map_err(|v| {
        Error::because(
            Reason::PreflightInputsInvalid,
            format!(
                "inputs do not match the plan's inputs schema: {}",
                summary(&v)
            ),
        )
        .with_violations(v)
    })?;
    let sim = Simulator::new(input.seed, &fixtures);
    let binding = |tool: &str| plan.tool_bindings.iter().find(|b| b.tool == tool);

    let mut steps: Vec<Option<pb::StepPreview>> = vec![None; engine.len()];
    let mut factors: Vec<pb::RiskFactor> = Vec::new();
    while !run.is_done() {
        let ready = run.ready();
        if ready.is_empty() {
            break;
        }
        for i in ready {
            let id = engine.step_id(i).to_string();
            let tool = engine.step_tool(i).to_string();
            let b = binding(&tool);
            let step = run
                .decide(i)
                .map_err(|e| Error::internal(format!("interpreter: {e}")))?;
            let mut p = pb::StepPreview {
                step_id: id.clone(),
                tool: tool.clone(),
                ..Default::default()
            };
            match step {
                Step::SkippedByCondition => {
                    p.outcome = pb::StepOutcome::SkippedByCondition as i32;
                    p.skip_reason = "its `if` is false".into();
                    p.issues.push(issue(
                        pb::Severity::Info,
                        "SKIPPED_BY_CONDITION",
                        "the step's `if` is false with these inputs and outputs",
                        &id,
                        "if",
                    ));
                    factors.push(factor(
                        "SKIPPED_BY_OUTPUT",
                        format!("step {id} would be skipped by its condition"),
                        POINTS_SKIPPED_BY_OUTPUT,
                        &id,
                    ));
                }
                Step::SkippedUpstream { upstream } => {
                    p.outcome = pb::StepOutcome::SkippedUpstream as i32;
                    p.skip_reason = format!("needs {upstream}, which would not succeed");
                }
                Step::ExpressionError { path, message } => {
                    p.outcome = pb::StepOutcome::Fails as i32;
                    p.skip_reason = format!("{path}: {message}");
                    p.issues.push(issue(
                        pb::Severity::Error,
                        "EXPRESSION_ERROR",
                        &message,
                        &id,
                        &path,
                    ));
                }
                Step::Call {
                    args,
                    args_sha256,
                    decision,
                } => {
                    p.args = Some(ej::to_struct(&redact(&args, &decision.redactions)));
                    p.args_sha256 = args_sha256;
                    p.decision = Some(decision_pb(plan, &decision));
                    p.approvals = decision
                        .approvals
                        .iter()
                        .map(|a| approval_pb(plan, a))
                        .collect();
                    let side = b.map_or(cpb::SideEffect::Unspecified, |b| b.side_effect());
                    match side {
                        cpb::SideEffect::Write => factors.push(factor(
                            "WRITE_TOOL",
                            format!("step {id} writes with {tool}"),
                            POINTS_WRITE,
                            &id,
                        )),
                        cpb::SideEffect::Destructive => factors.push(factor(
                            "DESTRUCTIVE_TOOL",
                            format!("step {id} calls destructive tool {tool}"),
                            POINTS_DESTRUCTIVE,
                            &id,
                        )),
                        _ => {}
                    }
                    if decision.effect != Effect::Allow && has_amount(&args) {
                        factors.push(factor(
                            "LARGE_AMOUNT",
                            format!(
                                "an amount in step {id}'s arguments crosses a policy threshold"
                            ),
                            POINTS_LARGE_AMOUNT,
                            &id,
                        ));
                    }
                    if decision.effect == Effect::Deny {
                        p.outcome = pb::StepOutcome::Denied as i32;
                        p.skip_reason = "denied by policy".into();
                        let why = decision
                            .rules
                            .iter()
                            .find(|r| r.effect == Effect::Deny)
                            .map_or_else(String::new, |r| {
                                let name = if r.policy.is_empty() {
                                    r.rule.clone()
                                } else {
                                    format!("{}/{}", r.policy, r.rule)
                                };
                                match r.reasons.first() {
                                    Some(reason) => format!("{name}: {reason}"),
                                    None => name,
                                }
                            });
                        p.issues.push(issue(
                            pb::Severity::Error,
                            "POLICY_DENIED",
                            &format!("the call would be denied ({why})"),
                            &id,
                            "",
                        ));
                        factors.push(factor(
                            "POLICY_DENIED",
                            format!("step {id} would be denied"),
                            POINTS_DENIED,
                            &id,
                        ));
                        run.finish(i, Finished::Denied)
                            .map_err(|e| Error::internal(format!("interpreter: {e}")))?;
                        steps[i] = Some(p);
                        continue;
                    }
                    if decision.effect == Effect::RequireApproval {
                        factors.push(factor(
                            "APPROVAL_REQUIRED",
                            format!("step {id} waits for approval"),
                            POINTS_APPROVAL,
                            &id,
                        ));
                    } else if side == cpb::SideEffect::Destructive {
                        p.issues.push(issue(
                            pb::Severity::Warning,
                            "DESTRUCTIVE_WITHOUT_APPROVAL",
                            "a destructive call would run without any approval",
                            &id,
                            "",
                        ));
                    }
                    let idempotent = b.is_some_and(|b| b.idempotent);
                    let simulated = sim.call(
                        &id,
                        &tool,
                        b.and_then(|b| b.output_schema.as_ref())
                            .and_then(|s| ej::struct_json(s).ok())
                            .as_ref(),
                        engine.max_attempts(i),
                    );
                    if simulated.attempts > 1 && !idempotent && side != cpb::SideEffect::Read {
                        factors.push(factor(
                            "NO_IDEMPOTENCY",
                            format!("step {id} would be retried but {tool} is not idempotent"),
                            POINTS_NO_IDEMPOTENCY,
                            &id,
                        ));
                    }
                    p.attempts = i32::try_from(simulated.attempts).unwrap_or(i32::MAX);
                    p.output_source = source_pb(simulated.source) as i32;
                    p.error = simulated.error.as_ref().map(error_pb);
                    match &simulated.output {
                        Some(out) => {
                            p.output = Some(ej::to_value(&redact(out, &decision.redactions)));
                            p.outcome = if decision.effect == Effect::RequireApproval {
                                pb::StepOutcome::WaitsForApproval
                            } else {
                                pb::StepOutcome::Runs
                            } as i32;
                            p.would_run = true;
                            if simulated.source == Source::Schema
                                && let Some(issue) = schema_mismatch(b, out, &id)
                            {
                                p.issues.push(issue);
                            }
                            run.finish(i, Finished::Succeeded(out.clone()))
                        }
                        None => {
                            p.outcome = pb::StepOutcome::Fails as i32;
                            p.would_run = true;
                            let e = simulated.error.clone().unwrap_or_else(|| SimError {
                                code: "UNKNOWN".into(),
                                message: String::new(),
                                retryable: false,
                            });
                            p.issues.push(issue(
                                pb::Severity::Error,
                                "TOOL_FAILED",
                                &format!(
                                    "{tool} fails with {} after {} attempt(s): {}",
                                    e.code, simulated.attempts, e.message
                                ),
                                &id,
                                "",
                            ));
                            factors.push(factor(
                                "TOOL_FAILED",
                                format!("step {id} would fail"),
                                POINTS_FAILED,
                                &id,
                            ));
                            run.finish(i, Finished::Failed)
                        }
                    }
                    .map_err(|e| Error::internal(format!("interpreter: {e}")))?;
                }
            }
            steps[i] = Some(p);
        }
    }
    let steps: Vec<pb::StepPreview> = steps.into_iter().flatten().collect();

    // Cost and duration of what would run.
    let estimate = estimate(plan, &engine, &run, &mut factors);

    factors.sort_by(|a, b| {
        b.points
            .cmp(&a.points)
            .then_with(|| a.step_id.cmp(&b.step_id))
            .then_with(|| a.code.cmp(&b.code))
    });
    let score = factors.iter().map(|f| f.points).sum::<i32>().min(100);
    let level = level(score);
    let issues: Vec<pb::Issue> = steps
        .iter()
        .flat_map(|s| s.issues.iter().cloned())
        .collect();
    let approvals_needed: Vec<pb::ApprovalNeeded> = steps
        .iter()
        .filter(|s| s.outcome == pb::StepOutcome::WaitsForApproval as i32)
        .flat_map(|s| {
            s.approvals.iter().map(|o| pb::ApprovalNeeded {
                step_id: s.step_id.clone(),
                obligation: Some(o.clone()),
            })
        })
        .collect();
    let worst = issues.iter().map(|i| i.severity).max().unwrap_or(0);
    let verdict = if worst == pb::Severity::Error as i32 {
        pb::PreflightVerdict::Fail
    } else if worst == pb::Severity::Warning as i32
        || !approvals_needed.is_empty()
        || matches!(level, pb::RiskLevel::High | pb::RiskLevel::Critical)
    {
        pb::PreflightVerdict::Warn
    } else {
        pb::PreflightVerdict::Pass
    };
    let c = &input.context;
    let mut report = pb::PreflightReport {
        plan_hash: plan.plan_hash.clone(),
        inputs_hash: ej::digest(input.inputs),
        seed: input.seed,
        fixtures_hash: if input.fixtures.is_empty() {
            String::new()
        } else {
            fixtures_hash(input.fixtures)?
        },
        verdict: verdict as i32,
        risk: Some(pb::Risk {
            score,
            level: level as i32,
            factors,
        }),
        steps,
        approvals_needed,
        estimate: Some(estimate),
        issues,
        policy_set_hash: plan.policy_set_hash.clone(),
        created_by: c.principal.clone(),
        evaluation_time: Some(input.evaluation_time),
        principal: Some(pb::PrincipalSnapshot {
            tenant_id: c.tenant.clone(),
            id: c.principal.clone(),
            roles: c.roles.clone(),
            groups: c.groups.clone(),
        }),
        simulator_version: sim::SIMULATOR_VERSION.into(),
        citable: input.fixtures.is_empty() && verdict != pb::PreflightVerdict::Fail,
        capsule_name: plan.capsule_name.clone(),
        capsule_version: plan.capsule_version,
        // What the decisions depended on besides the plan and the inputs.
        policy_env: match &c.env {
            Value::Object(m) if !m.is_empty() => Some(
                serde_json::from_value(c.env.clone())
                    .map_err(|e| Error::internal(format!("policy env is not a Struct: {e}")))?,
            ),
            _ => None,
        },
        capsule_labels: input
            .engine
            .capsule_labels()
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
        ..Default::default()
    };
    // Nothing `report_hash` leaves out is set yet: hash the report as is.
    let json = canonical(&report)?;
    report.report_hash = ej::digest(&json);
    Ok((report, json))
}

/// The stored JSON of `report`: `hashed` (its JSON as [`simulate_json`]
/// hashed it) with the fields set after the hash (id, hash, times).
///
/// # Errors
/// `INTERNAL` if a field does not convert (never for valid timestamps).
pub fn stored_json(report: &pb::PreflightReport, mut hashed: Value) -> Result<String> {
    if let Value::Object(m) = &mut hashed {
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("preflightId", Value::String(report.preflight_id.clone()));
        put("reportHash", Value::String(report.report_hash.clone()));
        for (k, t) in [
            ("createTime", &report.create_time),
            ("citationExpireTime", &report.citation_expire_time),
        ] {
            if let Some(t) = t {
                put(k, serde_json::to_value(t).map_err(Error::internal)?);
            }
        }
    }
    unintegral(&mut hashed);
    serde_json::to_string(&hashed).map_err(Error::internal)
}

/// Undoes [`integral`] where a `Struct` could not read it back: integers
/// of magnitude 2^53 or more (protobuf `Value` takes only exact ones) go
/// back to doubles. No other field of the report is a JSON integer that
/// large (64-bit fields are strings in the proto3 JSON mapping).
fn unintegral(v: &mut Value) {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            if let Some(f) = n.as_f64()
                && f.abs() >= EXACT
                && let Some(d) = serde_json::Number::from_f64(f)
            {
                *n = d;
            }
        }
        Value::Array(a) => a.iter_mut().for_each(unintegral),
        Value::Object(m) => m.values_mut().for_each(unintegral),
        _ => {}
    }
}

/// `sha256:` of the RFC 8785 JSON of the report without the fields that
/// differ between equal simulations (id, hash, storage and citation times).
pub fn report_hash(report: &pb::PreflightReport) -> Result<String> {
    let bare = pb::PreflightReport {
        preflight_id: String::new(),
        report_hash: String::new(),
        create_time: None,
        citation_expire_time: None,
        ..report.clone()
    };
    Ok(ej::digest(&canonical(&bare)?))
}

/// A message as JSON (the proto3 JSON mapping), keys sorted, integral
/// numbers as integers (a `Struct` carries doubles: `200`, not `200.0`).
pub fn canonical<T: serde::Serialize>(m: &T) -> Result<Value> {
    Ok(integral(ej::sorted(
        &serde_json::to_value(m).map_err(Error::internal)?,
    )))
}

fn integral(v: Value) -> Value {
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() <= 9_007_199_254_740_992.0 =>
            {
                #[allow(clippy::cast_possible_truncation)]
                Value::from(f as i64)
            }
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(integral).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, x)| (k, integral(x))).collect()),
        other => other,
    }
}

fn fixtures_hash(fixtures: &[pb::Fixture]) -> Result<String> {
    Ok(ej::digest(&canonical(&fixtures.to_vec())?))
}

fn summary(v: &[Violation]) -> String {
    v.iter()
        .map(|x| format!("{}: {}", x.field, x.description))
        .collect::<Vec<_>>()
        .join("; ")
}

fn fixture_error(field: String, description: impl Into<String>) -> Error {
    let description = description.into();
    Error::because(
        Reason::PreflightFixtureInvalid,
        format!("{field}: {description}"),
    )
    .with_violations(vec![Violation::new(field, description)])
}

/// The request's fixtures as the simulator's, each checked: it names a step
/// or tool of the plan, and its output matches the tool's output schema.
pub fn fixtures(plan: &cpb::ExecutablePlan, given: &[pb::Fixture]) -> Result<Vec<Fixture>> {
    let mut out = Vec::with_capacity(given.len());
    for (n, f) in given.iter().enumerate() {
        let at = |s: &str| format!("fixtures[{n}]{s}");
        let tool = if !f.step_id.is_empty() {
            let Some(step) = plan.steps.iter().find(|s| s.id == f.step_id) else {
                let known: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
                return Err(fixture_error(
                    at(".step_id"),
                    format!(
                        "the plan has no step {:?} (steps: {})",
                        f.step_id,
                        known.join(", ")
                    ),
                ));
            };
            step.tool.clone()
        } else if !f.tool.is_empty() {
            if !plan.steps.iter().any(|s| s.tool == f.tool) {
                return Err(fixture_error(
                    at(".tool"),
                    format!("no step of the plan calls {:?}", f.tool),
                ));
            }
            f.tool.clone()
        } else {
            return Err(fixture_error(at(""), "names neither a step_id nor a tool"));
        };
        if f.fail_times < 0 {
            return Err(fixture_error(at(".fail_times"), "must be ≥ 0"));
        }
        let (output, error) = match &f.result {
            Some(pb::fixture::Result::Output(v)) => (
                Some(
                    ej::value_json(v, 1)
                        .map_err(|e| fixture_error(at(".output"), e.to_string()))?,
                ),
                None,
            ),
            Some(pb::fixture::Result::Error(e)) => {
                if e.code.is_empty() {
                    return Err(fixture_error(at(".error.code"), "is required"));
                }
                (
                    None,
                    Some(SimError {
                        code: e.code.clone(),
                        message: e.message.clone(),
                        retryable: e.retryable,
                    }),
                )
            }
            None if f.fail_times > 0 => (None, None),
            None => return Err(fixture_error(at(""), "needs an output or an error")),
        };
        if let Some(o) = &output
            && let Some(schema) = plan
                .tool_bindings
                .iter()
                .find(|b| b.tool == tool)
                .and_then(|b| b.output_schema.as_ref())
                .and_then(|s| ej::struct_json(s).ok())
                .filter(|s| s.as_object().is_some_and(|m| !m.is_empty()))
        {
            let v = validator(&schema).map_err(Error::internal)?;
            if let Some(e) = v.iter_errors(o).next() {
                let path = e.instance_path().as_str().replace('/', ".");
                return Err(fixture_error(
                    at(&format!(".output{path}")),
                    format!("does not match {tool}'s output schema: {e}"),
                ));
            }
        }
        out.push(Fixture {
            step_id: (!f.step_id.is_empty()).then(|| f.step_id.clone()),
            tool: f.step_id.is_empty().then_some(tool),
            output,
            error,
            fail_times: u32::try_from(f.fail_times).unwrap_or(0),
        });
    }
    Ok(out)
}

fn schema_mismatch(b: Option<&cpb::ToolBinding>, out: &Value, id: &str) -> Option<pb::Issue> {
    let schema = ej::struct_json(b?.output_schema.as_ref()?).ok()?;
    let v = validator(&schema).ok()?;
    let e = v.iter_errors(out).next()?;
    Some(issue(
        pb::Severity::Warning,
        "OUTPUT_SCHEMA_MISMATCH",
        &format!("the simulator could not generate an output matching the schema: {e}"),
        id,
        "output",
    ))
}

/// Compiled output schemas by digest: compiling one costs far more than
/// validating with it, and a plan's tools repeat across preflights.
static VALIDATORS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, Arc<jsonschema::Validator>>>,
> = std::sync::LazyLock::new(Default::default);

fn validator(schema: &Value) -> std::result::Result<Arc<jsonschema::Validator>, String> {
    let key = ej::digest(schema);
    if let Some(v) = VALIDATORS.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(v);
    }
    let v = Arc::new(jsonschema::validator_for(schema).map_err(|e| e.to_string())?);
    if let Ok(mut m) = VALIDATORS.lock() {
        if m.len() >= 1024 {
            m.clear();
        }
        m.insert(key, v.clone());
    }
    Ok(v)
}

fn issue(severity: pb::Severity, code: &str, message: &str, step: &str, path: &str) -> pb::Issue {
    pb::Issue {
        severity: severity as i32,
        code: code.into(),
        message: message.into(),
        step_id: step.into(),
        path: path.into(),
    }
}

fn factor(code: &str, description: String, points: i32, step: &str) -> pb::RiskFactor {
    pb::RiskFactor {
        code: code.into(),
        description,
        points,
        step_id: step.into(),
    }
}

/// The risk level of a score.
pub fn level(score: i32) -> pb::RiskLevel {
    match score {
        ..=24 => pb::RiskLevel::Low,
        25..=49 => pb::RiskLevel::Medium,
        50..=74 => pb::RiskLevel::High,
        _ => pb::RiskLevel::Critical,
    }
}

fn has_amount(args: &Value) -> bool {
    match args {
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| (k.contains("amount") && v.is_number()) || has_amount(v)),
        Value::Array(a) => a.iter().any(has_amount),
        _ => false,
    }
}

fn source_pb(s: Source) -> pb::OutputSource {
    match s {
        Source::Schema => pb::OutputSource::Schema,
        Source::StepFixture => pb::OutputSource::StepFixture,
        Source::ToolFixture => pb::OutputSource::ToolFixture,
    }
}

fn error_pb(e: &SimError) -> pb::SimulatedError {
    pb::SimulatedError {
        code: e.code.clone(),
        message: e.message.clone(),
        retryable: e.retryable,
    }
}

fn effect_pb(e: Effect) -> ppb::Effect {
    match e {
        Effect::Allow => ppb::Effect::Allow,
        Effect::RequireApproval => ppb::Effect::RequireApproval,
        Effect::Deny => ppb::Effect::Deny,
    }
}

fn rule_ref(
    plan: &cpb::ExecutablePlan,
    set: Option<usize>,
    policy: &str,
    rule: &str,
) -> ppb::PolicyRuleRef {
    let r = set.and_then(|i| plan.policies.get(i));
    ppb::PolicyRuleRef {
        policy: r.map_or_else(|| policy.to_string(), |r| r.name.clone()),
        policy_version: r.map_or(0, |r| r.version),
        content_hash: r.map_or_else(String::new, |r| r.content_hash.clone()),
        rule: rule.into(),
        span: None,
    }
}

/// Where a matched rule is: its policy version (`refund-limits@3`, as the
/// policy service names stored sources) and the rule's lines and columns
/// (1-based; the byte offsets are not kept by the compiled set, so 0).
fn rule_span(
    plan: &cpb::ExecutablePlan,
    set: Option<usize>,
    span: Option<&anumate_policy::SourceSpan>,
) -> Option<ppb::SourceSpan> {
    let (r, span) = (set.and_then(|i| plan.policies.get(i))?, span?);
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    Some(ppb::SourceSpan {
        source_name: format!("{}@{}", r.name, r.version),
        start_line: int(span.start.line),
        start_column: int(span.start.col),
        end_line: int(span.end.line),
        end_column: int(span.end.col),
        start_offset: 0,
        end_offset: 0,
    })
}

fn approval_pb(
    plan: &cpb::ExecutablePlan,
    a: &anumate_engine::Approval,
) -> ppb::ApprovalObligation {
    ppb::ApprovalObligation {
        stages: a
            .stages
            .iter()
            .map(|s| ppb::RequiredApprovalStage {
                name: s.name.clone(),
                approvers: s.approvers.clone(),
                quorum: s.quorum,
            })
            .collect(),
        reason: a.reason.clone().unwrap_or_default(),
        rule: Some(ppb::PolicyRuleRef {
            span: rule_span(plan, Some(a.set), a.span.as_ref()),
            ..rule_ref(plan, Some(a.set), &a.policy, &a.rule)
        }),
        ..Default::default()
    }
}

fn decision_pb(plan: &cpb::ExecutablePlan, d: &StepDecision) -> ppb::Decision {
    ppb::Decision {
        effect: effect_pb(d.effect) as i32,
        matched_rules: d
            .rules
            .iter()
            .map(|r| ppb::MatchedRule {
                rule: Some(ppb::PolicyRuleRef {
                    span: rule_span(plan, r.set, r.span.as_ref()),
                    ..rule_ref(plan, r.set, &r.policy, &r.rule)
                }),
                priority: i32::try_from(r.priority).unwrap_or(i32::MAX),
                effect: effect_pb(r.effect) as i32,
                reason: r.reasons.first().cloned().unwrap_or_default(),
            })
            .collect(),
        obligations: Some(ppb::Obligations {
            redactions: d
                .redactions
                .iter()
                .filter_map(|o| match o {
                    Obligation::Redact {
                        fields,
                        detectors,
                        with,
                    } => Some(ppb::Redaction {
                        fields: fields.clone(),
                        detectors: detectors
                            .iter()
                            .filter_map(|d| {
                                ppb::Detector::from_str_name(&format!(
                                    "DETECTOR_{}",
                                    d.to_ascii_uppercase()
                                ))
                            })
                            .map(|d| d as i32)
                            .collect(),
                        replacement: with.clone().unwrap_or_default(),
                        rule: None,
                    }),
                    _ => None,
                })
                .collect(),
            approvals: d.approvals.iter().map(|a| approval_pb(plan, a)).collect(),
        }),
        reasons: d
            .rules
            .iter()
            .flat_map(|r| r.reasons.iter().cloned())
            .collect(),
        denied_by_allow_list: d.rules.iter().any(|r| r.set.is_none()),
    }
}

/// `v` with the decision's redactions applied: named fields replaced, and
/// strings any named detector finds.
pub fn redact(v: &Value, redactions: &[Obligation]) -> Value {
    let mut out = v.clone();
    for r in redactions {
        let Obligation::Redact {
            fields,
            detectors,
            with,
        } = r
        else {
            continue;
        };
        let text = Value::String(with.clone().unwrap_or_else(|| "[REDACTED]".into()));
        for f in fields {
            let mut at = &mut out;
            let parts: Vec<&str> = f.split('.').collect();
            for (k, p) in parts.iter().enumerate() {
                let Some(next) = at.as_object_mut().and_then(|m| m.get_mut(*p)) else {
                    break;
                };
                if k + 1 == parts.len() {
                    *next = text.clone();
                    break;
                }
                at = next;
            }
        }
        let found: Vec<anumate_policy::builtins::Detector> = detectors
            .iter()
            .filter_map(|d| anumate_policy::builtins::Detector::named(d))
            .collect();
        if !found.is_empty() {
            scrub(&mut out, &found, &text);
        }
    }
    out
}

fn scrub(v: &mut Value, detectors: &[anumate_policy::builtins::Detector], text: &Value) {
    match v {
        Value::String(s) if detectors.iter().any(|d| d.detect(s)) => *v = text.clone(),
        Value::Array(a) => a.iter_mut().for_each(|x| scrub(x, detectors, text)),
        Value::Object(m) => m.values_mut().for_each(|x| scrub(x, detectors, text)),
        _ => {}
    }
}

fn estimate(
    plan: &cpb::ExecutablePlan,
    engine: &Engine,
    run: &anumate_engine::Run<'_>,
    factors: &mut Vec<pb::RiskFactor>,
) -> cpb::Estimate {
    let ran = |i: usize| run.status(i) == Status::Succeeded || run.status(i) == Status::Failed;
    let mut cost: i64 = 0;
    let mut currency = String::new();
    let mut by_level: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    let mut max_total: i64 = 0;
    for (i, s) in plan.steps.iter().enumerate() {
        if !ran(i) || engine.step_id(i) != s.id {
            continue;
        }
        let b = plan.tool_bindings.iter().find(|b| b.tool == s.tool);
        if let Some(b) = b {
            cost = cost.saturating_add(b.cost_micros);
            if currency.is_empty() {
                currency = b.currency.clone();
            }
        }
        let typical = b
            .and_then(|b| b.typical_duration.as_ref())
            .map_or(0, millis);
        let slot = by_level.entry(s.level).or_default();
        *slot = (*slot).max(typical);
        let timeout = s.timeout.as_ref().map_or(0, millis);
        let attempts = i64::from(engine.max_attempts(i));
        max_total = max_total.saturating_add(timeout.saturating_mul(attempts));
    }
    if cost >= 1_000_000 {
        factors.push(factor(
            "COST",
            format!("the run would cost {} {currency}", fmt_micros(cost)),
            i32::try_from((cost / 1_000_000).min(15))
                .unwrap_or(15)
                .max(1),
            "",
        ));
    }
    let expected: i64 = by_level.values().sum();
    cpb::Estimate {
        expected_duration: Some(duration(expected)),
        max_duration: Some(duration(max_total)),
        cost_micros: cost,
        currency,
        notes: vec!["approval waits not included".into()],
    }
}

fn fmt_micros(m: i64) -> String {
    format!("{}.{:02}", m / 1_000_000, (m % 1_000_000) / 10_000)
}

fn millis(d: &pbjson_types::Duration) -> i64 {
    d.seconds.saturating_mul(1000) + i64::from(d.nanos / 1_000_000)
}

fn duration(ms: i64) -> pbjson_types::Duration {
    pbjson_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn levels_follow_the_score_bands() {
        let got: Vec<pb::RiskLevel> = [0, 24, 25, 49, 50, 74, 75, 100].map(level).to_vec();
        use pb::RiskLevel::*;
        assert_eq!(
            got,
            [Low, Low, Medium, Medium, High, High, Critical, Critical]
        );
    }

    #[test]
    fn redaction_replaces_named_fields_and_detected_values() {
        let r = [
            Obligation::Redact {
                fields: vec!["customer.email".into(), "missing.path".into()],
                detectors: Vec::new(),
                with: Some("***".into()),
            },
            Obligation::Redact {
                fields: Vec::new(),
                detectors: vec!["email".into()],
                with: None,
            },
        ];
        let v = json!({"customer": {"email": "a@b.example", "name": "Asha"}, "cc": ["x@y.example", "ok"]});
        assert_eq!(
            redact(&v, &r),
            json!({"customer": {"email": "***", "name": "Asha"}, "cc": ["[REDACTED]", "ok"]})
        );
    }

    #[test]
    fn amounts_are_found_at_any_depth() {
        assert!(has_amount(&json!({"x": [{"amount_cents": 5}]})));
        assert!(!has_amount(&json!({"amount": "5"})));
    }
}
