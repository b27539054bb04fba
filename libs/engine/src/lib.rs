//! The plan interpreter (SPEC §6): one implementation, no I/O, of what a step
//! does next — readiness, its `if`, its rendered arguments, the policy
//! decision on the real call — shared by GhostRun (simulated outputs) and the
//! orchestrator (real outputs), so a preflight and a run cannot disagree.
//!
//! ```text
//! Engine::new(plan, policy sets, context)      once per plan
//!   .start(inputs) → Run                        inputs checked against the plan's schema
//! Run::ready() → [step]                         pending steps whose needs are all done
//! Run::decide(step) → Step                      skipped (condition / upstream) | call (args + decision)
//! Run::finish(step, Finished)                   the call's real or simulated result
//! ```
//! A step whose need did not succeed (failed, denied, skipped) is skipped
//! upstream; a step whose `if` is false is skipped by condition. The
//! decision combines the plan's allow-list (a tool outside it is denied
//! before any policy runs) with [`anumate_policy::decide`] over the plan's
//! pinned policy sets.
#![forbid(unsafe_code)]

pub mod inputs;
pub mod json;
pub mod sim;
pub mod template;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anumate_policy::{CompiledSet, Effect, Obligation, TemplateExpr, TemplateScope};
use anumate_proto::compiler::v1 as cpb;
use serde::Serialize;
use serde_json::{Map, Value, json};

pub use inputs::InputsSchema;
pub use template::{Template, TemplateError};

/// The policy rule id reported when a tool is outside the plan's allow-list.
pub const ALLOW_LIST_RULE: &str = "allow-list";

/// What policies see besides the call: who, where and when. Everything a
/// decision depends on is here, so a decision is a pure function of
/// (plan, context, inputs, outputs).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Context {
    /// Tenant id.
    pub tenant: String,
    /// Principal id (`user:…`, `svc:…`).
    pub principal: String,
    /// The principal's roles, sorted.
    pub roles: Vec<String>,
    /// The principal's groups, sorted.
    pub groups: Vec<String>,
    /// Evaluation time policies see: RFC 3339 UTC (`2026-01-01T00:00:00Z`).
    pub now: String,
    /// `env` as policies see it (an object).
    pub env: Value,
}

/// Why a plan cannot be interpreted (the compiler never produces one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plan step {step:?}: {message}")]
pub struct PlanError {
    /// Step concerned, empty for the plan.
    pub step: String,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug)]
struct StepDef {
    id: String,
    tool: String,
    needs: Vec<usize>,
    condition: Option<TemplateExpr>,
    args: Template,
    max_attempts: u32,
}

/// A plan ready to interpret many times. Cloning it, or giving it another
/// context ([`with_context`](Engine::with_context)), shares the compiled plan.
#[derive(Debug, Clone)]
pub struct Engine {
    core: Arc<Core>,
    context: Context,
    /// `capsule.labels` as policies see it (an object).
    capsule_labels: Value,
}

/// What does not depend on the context: compiled once per plan.
#[derive(Debug)]
struct Core {
    plan_hash: String,
    capsule_name: String,
    capsule_version: i32,
    steps: Vec<StepDef>,
    index: BTreeMap<String, usize>,
    allowed: BTreeSet<String>,
    sets: Vec<Arc<CompiledSet>>,
    inputs: InputsSchema,
}

/// A matched rule as a decision reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleHit {
    /// Index of the policy set (in the engine's order); `None` for the allow-list.
    pub set: Option<usize>,
    /// Policy name.
    pub policy: String,
    /// Rule id.
    pub rule: String,
    /// Rule priority.
    pub priority: i64,
    /// The rule's effect.
    pub effect: Effect,
    /// The `reason:` texts of the rule's actions.
    pub reasons: Vec<String>,
    /// Where the rule is in its policy's source (line and column, 1-based);
    /// `None` for the allow-list.
    pub span: Option<anumate_policy::SourceSpan>,
}

/// One approval the call waits for: who may approve and how many must, per stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approval {
    /// Index of the policy set of the rule asking.
    pub set: usize,
    /// Policy of the rule asking.
    pub policy: String,
    /// Rule asking.
    pub rule: String,
    /// Stages in order.
    pub stages: Vec<anumate_policy::ApprovalStage>,
    /// Why, when the rule says.
    pub reason: Option<String>,
    /// Where the rule is in its policy's source (line and column, 1-based).
    pub span: Option<anumate_policy::SourceSpan>,
}

/// The decision on one call with its real arguments.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDecision {
    /// deny > require_approval > allow.
    pub effect: Effect,
    /// Matched rules, higher priority first.
    pub rules: Vec<RuleHit>,
    /// Approvals the call waits for (only when the effect is `require_approval`).
    pub approvals: Vec<Approval>,
    /// Redactions to apply to the call's arguments and output wherever shown.
    pub redactions: Vec<Obligation>,
    /// Fuel spent.
    pub fuel_used: u64,
}

/// What the interpreter says a step does.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// Its `if` is false.
    SkippedByCondition,
    /// A need did not succeed.
    SkippedUpstream {
        /// The first need (in plan order) that did not succeed.
        upstream: String,
    },
    /// Its `if` or arguments could not be evaluated: the step fails.
    ExpressionError {
        /// `if` or `args.<path>`.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The call: rendered arguments and the decision on them.
    Call {
        /// Rendered arguments.
        args: Value,
        /// `sha256:` digest of their RFC 8785 form.
        args_sha256: String,
        /// The decision.
        decision: StepDecision,
    },
}

/// How a step ended, as the interpreter remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not decided yet.
    Pending,
    /// Decided as a call, result not reported yet.
    Calling,
    /// Succeeded with an output.
    Succeeded,
    /// Failed (tool error, expression error, approval rejected).
    Failed,
    /// Denied by policy.
    Denied,
    /// Skipped: its `if` was false.
    SkippedByCondition,
    /// Skipped: a need did not succeed.
    SkippedUpstream,
}

impl Status {
    /// Whether the step is over.
    pub fn is_done(self) -> bool {
        !matches!(self, Status::Pending | Status::Calling)
    }

    /// The `steps.<id>.status` templates see.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Calling => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Denied => "denied",
            Status::SkippedByCondition | Status::SkippedUpstream => "skipped",
        }
    }
}

/// The result of a call, reported back to the run.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// The tool returned this output.
    Succeeded(Value),
    /// The tool failed for good (retries exhausted) or approval was rejected.
    Failed,
    /// The policy denied the call.
    Denied,
}

/// Misuse of the step-by-step API by the driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriveError {
    /// No such step index.
    #[error("no step {0}")]
    NoStep(usize),
    /// The step is not ready (a need is not done) or already decided.
    #[error("step {0:?} is not ready")]
    NotReady(String),
    /// `finish` on a step that was not decided as a call.
    #[error("step {0:?} is not calling")]
    NotCalling(String),
}

impl Engine {
    /// Prepares `plan` with its pinned policy sets (in `plan.policies`
    /// order) for `context`.
    ///
    /// # Errors
    /// A step names an unknown need, or an expression or schema does not compile.
    pub fn new(
        plan: &cpb::ExecutablePlan,
        sets: Vec<Arc<CompiledSet>>,
        context: Context,
    ) -> Result<Engine, PlanError> {
        let err = |step: &str, message: String| PlanError {
            step: step.to_string(),
            message,
        };
        let index: BTreeMap<String, usize> = plan
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let schema = plan
            .inputs_schema
            .as_ref()
            .map(json::struct_json)
            .transpose()
            .map_err(|e| err("", format!("inputs_schema: {e}")))?;
        let input_names: Vec<String> = schema
            .as_ref()
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let input_refs: Vec<&str> = input_names.iter().map(String::as_str).collect();
        let inputs = InputsSchema::new(schema.as_ref())
            .map_err(|e| err("", format!("inputs_schema: {e}")))?;
        // Transitive upstream of each step, for the expressions' scope.
        let mut upstream: Vec<BTreeSet<usize>> = Vec::with_capacity(plan.steps.len());
        let mut needs_of: Vec<Vec<usize>> = Vec::with_capacity(plan.steps.len());
        for s in &plan.steps {
            let mut needs = Vec::with_capacity(s.needs.len());
            for n in &s.needs {
                let j = *index
                    .get(n)
                    .ok_or_else(|| err(&s.id, format!("needs unknown step {n:?}")))?;
                needs.push(j);
            }
            needs.sort_unstable();
            needs.dedup();
            needs_of.push(needs);
        }
        for i in 0..plan.steps.len() {
            let mut seen = BTreeSet::new();
            let mut stack: Vec<usize> = needs_of[i].clone();
            while let Some(j) = stack.pop() {
                if j == i {
                    return Err(err(&plan.steps[i].id, "is part of a cycle".into()));
                }
                if seen.insert(j) {
                    stack.extend(needs_of[j].iter().copied());
                }
            }
            upstream.push(seen);
        }
        let known: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
        let mut steps = Vec::with_capacity(plan.steps.len());
        for (i, s) in plan.steps.iter().enumerate() {
            let up: Vec<&str> = upstream[i].iter().map(|&j| known[j]).collect();
            let scope = TemplateScope {
                inputs: &input_refs,
                steps_upstream: &up,
                steps_known: &known,
            };
            let condition = if s.condition.trim().is_empty() {
                None
            } else {
                Some(
                    template::compile_expr(&s.condition, "if", &scope)
                        .map_err(|e| err(&s.id, e.to_string()))?,
                )
            };
            let args_json = s
                .args
                .as_ref()
                .map(json::struct_json)
                .transpose()
                .map_err(|e| err(&s.id, format!("args: {e}")))?
                .unwrap_or_else(|| json!({}));
            let args = Template::compile(&args_json, "args", &scope)
                .map_err(|e| err(&s.id, e.to_string()))?;
            let max_attempts = s
                .retry
                .as_ref()
                .map_or(1, |r| u32::try_from(r.max_attempts.max(1)).unwrap_or(1));
            steps.push(StepDef {
                id: s.id.clone(),
                tool: s.tool.clone(),
                needs: needs_of[i].clone(),
                condition,
                args,
                max_attempts,
            });
        }
        Ok(Engine {
            core: Arc::new(Core {
                plan_hash: plan.plan_hash.clone(),
                capsule_name: plan.capsule_name.clone(),
                capsule_version: plan.capsule_version,
                steps,
                index,
                allowed: plan.allowed_tools.iter().cloned().collect(),
                sets,
                inputs,
            }),
            context,
            capsule_labels: Value::Object(Map::new()),
        })
    }

    /// Policies see `labels` as `capsule.labels` (the capsule version's
    /// `metadata.labels`; empty until given).
    #[must_use]
    pub fn with_capsule_labels<'a>(
        mut self,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Engine {
        self.capsule_labels = Value::Object(
            labels
                .into_iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        );
        self
    }

    /// The same plan, policies and labels in `context`, without compiling
    /// anything again.
    #[must_use]
    pub fn with_context(&self, context: Context) -> Engine {
        Engine {
            core: self.core.clone(),
            context,
            capsule_labels: self.capsule_labels.clone(),
        }
    }

    /// `capsule.labels` as policies see it.
    pub fn capsule_labels(&self) -> &Value {
        &self.capsule_labels
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.core.steps.len()
    }

    /// Whether the plan has no steps.
    pub fn is_empty(&self) -> bool {
        self.core.steps.is_empty()
    }

    /// Step id at `i`.
    pub fn step_id(&self, i: usize) -> &str {
        self.core.steps.get(i).map_or("", |s| s.id.as_str())
    }

    /// Tool of the step at `i`.
    pub fn step_tool(&self, i: usize) -> &str {
        self.core.steps.get(i).map_or("", |s| s.tool.as_str())
    }

    /// Attempts the step's retry policy allows (≥ 1).
    pub fn max_attempts(&self, i: usize) -> u32 {
        self.core.steps.get(i).map_or(1, |s| s.max_attempts)
    }

    /// Index of step `id`.
    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.core.index.get(id).copied()
    }

    /// The context decisions are made in.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Checks `inputs` against the plan's schema and starts a run.
    ///
    /// # Errors
    /// Every violation, by field (`inputs.amount_cents: must be ≥ 1`).
    pub fn start(&self, inputs: &Value) -> Result<Run<'_>, Vec<anumate_errors::Violation>> {
        let inputs = self.core.inputs.check(inputs)?;
        Ok(Run {
            engine: self,
            inputs,
            status: vec![Status::Pending; self.core.steps.len()],
            steps: Value::Object(Map::new()),
        })
    }

    /// The decision on calling `tool` for step `i` with `args`.
    ///
    /// # Errors
    /// A policy ran out of fuel.
    pub fn decision(
        &self,
        i: usize,
        args: &Value,
    ) -> Result<StepDecision, anumate_policy::EvalError> {
        let step = &self.core.steps[i.min(self.core.steps.len().saturating_sub(1))];
        if !self.core.allowed.contains(&step.tool) {
            return Ok(StepDecision {
                effect: Effect::Deny,
                rules: vec![RuleHit {
                    set: None,
                    policy: String::new(),
                    rule: ALLOW_LIST_RULE.into(),
                    priority: i64::MAX,
                    effect: Effect::Deny,
                    reasons: vec![format!(
                        "tool {:?} is not in the capsule's allow-list",
                        step.tool
                    )],
                    span: None,
                }],
                approvals: Vec::new(),
                redactions: Vec::new(),
                fuel_used: 0,
            });
        }
        let c = &self.context;
        let input = json!({
            "tenant": c.tenant,
            "principal": {"id": c.principal, "roles": c.roles, "groups": c.groups},
            "capsule": {"name": self.core.capsule_name, "version": self.core.capsule_version, "labels": self.capsule_labels},
            "plan_hash": self.core.plan_hash,
            "step": {"id": step.id, "tool": step.tool},
            "tool": step.tool,
            "args": args,
            "env": c.env,
            "now": c.now,
        });
        let sets: Vec<&CompiledSet> = self.core.sets.iter().map(Arc::as_ref).collect();
        let d = anumate_policy::decide(&sets, &input)?;
        let mut out = StepDecision {
            effect: d.effect,
            rules: Vec::with_capacity(d.rules.len()),
            approvals: Vec::new(),
            redactions: Vec::new(),
            fuel_used: d.fuel_used,
        };
        for r in &d.rules {
            out.rules.push(RuleHit {
                set: Some(r.set),
                policy: r.rule.policy.clone(),
                rule: r.rule.rule.clone(),
                priority: r.rule.priority,
                effect: r.rule.effect,
                reasons: r.reasons.to_vec(),
                span: Some(r.rule.span),
            });
            for o in &r.obligations {
                match o {
                    Obligation::RequireApproval { reason, .. } => out.approvals.push(Approval {
                        set: r.set,
                        policy: r.rule.policy.clone(),
                        rule: r.rule.rule.clone(),
                        stages: o.approval_stages(),
                        reason: reason.clone(),
                        span: Some(r.rule.span),
                    }),
                    Obligation::Redact { .. } => out.redactions.push((*o).clone()),
                    Obligation::Log { .. } => {}
                }
            }
        }
        Ok(out)
    }
}

/// One interpretation of a plan: the inputs and what each step did so far.
#[derive(Debug, Clone)]
pub struct Run<'e> {
    engine: &'e Engine,
    inputs: Value,
    status: Vec<Status>,
    /// `{id: {output, status}}` as templates see it.
    steps: Value,
}

impl<'e> Run<'e> {
    /// The inputs, defaults filled in.
    pub fn inputs(&self) -> &Value {
        &self.inputs
    }

    /// The engine.
    pub fn engine(&self) -> &'e Engine {
        self.engine
    }

    /// Status of step `i`.
    pub fn status(&self, i: usize) -> Status {
        self.status.get(i).copied().unwrap_or(Status::Pending)
    }

    /// Whether every step is done.
    pub fn is_done(&self) -> bool {
        self.status.iter().all(|s| s.is_done())
    }

    /// Pending steps whose needs are all done, in plan order.
    pub fn ready(&self) -> Vec<usize> {
        (0..self.status.len())
            .filter(|&i| self.is_ready(i))
            .collect()
    }

    fn is_ready(&self, i: usize) -> bool {
        self.status[i] == Status::Pending
            && self.engine.core.steps[i]
                .needs
                .iter()
                .all(|&j| self.status[j].is_done())
    }

    /// Decides what ready step `i` does. Skips and expression errors are
    /// recorded at once; a call waits for [`finish`](Self::finish).
    ///
    /// # Errors
    /// `i` is unknown or not ready.
    pub fn decide(&mut self, i: usize) -> Result<Step, DriveError> {
        let engine = self.engine;
        let def = engine.core.steps.get(i).ok_or(DriveError::NoStep(i))?;
        if !self.is_ready(i) {
            return Err(DriveError::NotReady(def.id.clone()));
        }
        if let Some(&j) = def
            .needs
            .iter()
            .find(|&&j| self.status[j] != Status::Succeeded)
        {
            self.set(i, Status::SkippedUpstream, Value::Null);
            return Ok(Step::SkippedUpstream {
                upstream: engine.core.steps[j].id.clone(),
            });
        }
        if let Some(cond) = &def.condition {
            match cond.eval(&self.inputs, &self.steps) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false) | Value::Null) => {
                    self.set(i, Status::SkippedByCondition, Value::Null);
                    return Ok(Step::SkippedByCondition);
                }
                Ok(other) => {
                    self.set(i, Status::Failed, Value::Null);
                    return Ok(Step::ExpressionError {
                        path: "if".into(),
                        message: format!("must be true or false, got {other}"),
                    });
                }
                Err(e) => {
                    self.set(i, Status::Failed, Value::Null);
                    return Ok(Step::ExpressionError {
                        path: "if".into(),
                        message: e.to_string(),
                    });
                }
            }
        }
        let args = match def.args.render(&self.inputs, &self.steps, "args") {
            Ok(a) => a,
            Err(e) => {
                self.set(i, Status::Failed, Value::Null);
                return Ok(Step::ExpressionError {
                    path: e.path,
                    message: e.message,
                });
            }
        };
        let decision = match engine.decision(i, &args) {
            Ok(d) => d,
            Err(e) => {
                self.set(i, Status::Failed, Value::Null);
                return Ok(Step::ExpressionError {
                    path: "policy".into(),
                    message: e.to_string(),
                });
            }
        };
        self.status[i] = Status::Calling;
        Ok(Step::Call {
            args_sha256: json::digest(&args),
            args,
            decision,
        })
    }

    /// Records the result of the call decided for step `i`.
    ///
    /// # Errors
    /// The step was not decided as a call.
    pub fn finish(&mut self, i: usize, result: Finished) -> Result<(), DriveError> {
        let id = self
            .engine
            .core
            .steps
            .get(i)
            .ok_or(DriveError::NoStep(i))?
            .id
            .clone();
        if self.status[i] != Status::Calling {
            return Err(DriveError::NotCalling(id));
        }
        match result {
            Finished::Succeeded(out) => self.set(i, Status::Succeeded, out),
            Finished::Failed => self.set(i, Status::Failed, Value::Null),
            Finished::Denied => self.set(i, Status::Denied, Value::Null),
        }
        Ok(())
    }

    fn set(&mut self, i: usize, status: Status, output: Value) {
        self.status[i] = status;
        if let Value::Object(m) = &mut self.steps {
            m.insert(
                self.engine.core.steps[i].id.clone(),
                json!({"output": output, "status": status.as_str()}),
            );
        }
    }
}

#[cfg(test)]
mod tests;
