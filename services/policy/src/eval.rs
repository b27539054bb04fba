//! Evaluation, tests and redaction.

use std::sync::Arc;

use anumate_errors::{Error, ErrorCode, Reason, Result, Violation};
use anumate_policy::{EvalError, Obligation, POLICY_INPUT};
use anumate_proto::policy::v1 as pb;
use anumate_redaction::{Detector, RedactionConfig, Redactor, Replacement};
use serde_json::{Value, json};

use crate::analyze::{Compiled, pb_effect};
use crate::{Actor, Policies, check_name, repo};

/// What to evaluate or test.
pub enum EvalTarget {
    /// Stored versions.
    Refs(Vec<pb::PolicyRef>),
    /// Ad-hoc source and its name.
    Source(String, String),
}

/// The evaluation input as sent.
pub enum EvalInput {
    /// A structured value (already JSON).
    Value(Value),
    /// JSON text.
    Json(String),
}

/// The value a `Redact` call works on.
pub enum RedactValue {
    /// A structured value.
    Struct(Value),
    /// JSON text.
    Json(String),
    /// Free text.
    Text(String),
}

/// One compiled unit taking part in a decision.
struct Unit {
    compiled: Arc<Compiled>,
}

fn fuel_error(e: EvalError) -> Error {
    match e {
        EvalError::FuelExhausted {
            limit,
            policy,
            rule,
        } => Error::because(
            Reason::FuelExhausted,
            format!("evaluation ran out of fuel (limit {limit}) in rule {policy}/{rule}"),
        )
        .with_metadata("limit", "fuel")
        .with_metadata("policy", policy)
        .with_metadata("rule", rule),
        EvalError::InputNotObject => {
            Error::invalid_argument("input", "the input must be a JSON object")
        }
    }
}

/// Parses and checks the input: a JSON object with known top-level fields;
/// `tenant` forced to the caller's, `now` defaulted to the server clock.
fn prepare_input(input: EvalInput, tenant: &str, max_bytes: usize) -> Result<Value> {
    let (mut value, field) = match input {
        EvalInput::Value(v) => (v, "input_struct"),
        EvalInput::Json(text) => {
            if text.len() > max_bytes {
                return Err(Error::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "input_json is {} bytes; the limit is {max_bytes}",
                        text.len()
                    ),
                ));
            }
            let v = serde_json::from_str::<Value>(&text).map_err(|e| {
                let line = u32::try_from(e.line()).unwrap_or(u32::MAX);
                let col = u32::try_from(e.column()).unwrap_or(u32::MAX);
                Error::new(
                    ErrorCode::InvalidArgument,
                    format!("input_json: malformed JSON at {line}:{col}: {e}"),
                )
                .with_violations(vec![Violation::at(
                    "input_json",
                    line,
                    col,
                    format!("malformed JSON: {e}"),
                )])
            })?;
            (v, "input_json")
        }
    };
    let Value::Object(map) = &mut value else {
        return Err(Error::invalid_argument(
            field,
            "the input must be a JSON object",
        ));
    };
    let unknown: Vec<Violation> = map
        .keys()
        .filter(|k| !POLICY_INPUT.roots.iter().any(|(n, _)| n == k))
        .map(|k| Violation::new(format!("{field}.{k}"), format!("unknown input field `{k}`")))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("{field} has {} unknown top-level field(s)", unknown.len()),
        )
        .with_violations(unknown));
    }
    map.insert("tenant".into(), Value::String(tenant.to_string()));
    if !map.contains_key("now") {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        map.insert("now".into(), Value::String(now));
    }
    Ok(value)
}

fn detectors_of(names: &[String]) -> Vec<Detector> {
    names
        .iter()
        .filter_map(|n| anumate_policy::builtins::Detector::named(n))
        .flat_map(|d| d.redaction_detectors().iter().copied())
        .collect()
}

fn pb_detector(d: Detector) -> pb::Detector {
    match d {
        Detector::Email => pb::Detector::Email,
        Detector::Phone => pb::Detector::Phone,
        Detector::Card => pb::Detector::Card,
        Detector::Iban => pb::Detector::Iban,
        Detector::Ssn => pb::Detector::Ssn,
        Detector::Ipv4 => pb::Detector::Ipv4,
        Detector::Ipv6 => pb::Detector::Ipv6,
        Detector::ApiKey => pb::Detector::ApiKey,
        Detector::Jwt => pb::Detector::Jwt,
    }
}

fn from_pb_detector(d: i32) -> Result<Vec<Detector>> {
    Ok(match pb::Detector::try_from(d) {
        Ok(pb::Detector::Email) => vec![Detector::Email],
        Ok(pb::Detector::Phone) => vec![Detector::Phone],
        Ok(pb::Detector::Card) => vec![Detector::Card],
        Ok(pb::Detector::Iban) => vec![Detector::Iban],
        Ok(pb::Detector::Ssn) => vec![Detector::Ssn],
        Ok(pb::Detector::Ipv4) => vec![Detector::Ipv4],
        Ok(pb::Detector::ApiKey) => vec![Detector::ApiKey],
        Ok(pb::Detector::Ipv6) => vec![Detector::Ipv6],
        Ok(pb::Detector::Jwt) => vec![Detector::Jwt],
        _ => {
            return Err(Error::invalid_argument(
                "redactions.detectors",
                format!("unknown Detector value {d}"),
            ));
        }
    })
}

/// A redactor for explicit field paths and detectors.
fn redactor(fields: &[String], detectors: Vec<Detector>, with: &str) -> Result<Redactor> {
    Redactor::new(RedactionConfig {
        detectors,
        replacement: if with.is_empty() {
            Replacement::Label
        } else {
            Replacement::Fixed(with.to_string())
        },
        field_paths: fields.to_vec(),
    })
    .map_err(|e| Error::invalid_argument("redactions.fields", e.to_string()))
}

/// The redactors for a decision's redact obligations, with field paths also
/// applied under `args.` and `output.` (where a call's values live).
fn obligation_redactors(redactions: &[pb::Redaction]) -> Vec<Redactor> {
    redactions
        .iter()
        .filter_map(|r| {
            let mut fields = Vec::new();
            for f in &r.fields {
                fields.extend([f.clone(), format!("args.{f}"), format!("output.{f}")]);
            }
            let detectors = r
                .detectors
                .iter()
                .filter_map(|&d| from_pb_detector(d).ok())
                .flatten()
                .collect();
            match redactor(&fields, detectors, &r.replacement) {
                Ok(x) => Some(x),
                Err(e) => {
                    tracing::warn!(error = %e, "redaction obligation has an unusable field path");
                    // Fall back to the detectors alone rather than logging unredacted.
                    redactor(&[], Detector::ALL.to_vec(), &r.replacement).ok()
                }
            }
        })
        .collect()
}

/// Evaluates `units` on `input` ([`anumate_policy::decide`]) and builds the
/// proto decision.
fn decide(units: &[Unit], input: &Value) -> Result<(pb::Decision, u64)> {
    let sets: Vec<&anumate_policy::CompiledSet> = units.iter().map(|u| &u.compiled.set).collect();
    let d = anumate_policy::decide(&sets, input).map_err(fuel_error)?;
    let mut decision = pb::Decision {
        effect: pb_effect(d.effect),
        ..Default::default()
    };
    let mut obligations = pb::Obligations::default();
    for r in d.rules {
        let m = r.rule;
        let compiled = units.get(r.set).map(|u| &u.compiled);
        let policy = compiled.and_then(|c| c.policy(&m.policy));
        let rule = policy.and_then(|p| p.rule(&m.rule));
        let rule_ref = pb::PolicyRuleRef {
            policy: m.policy.clone(),
            policy_version: policy.map_or(0, |p| p.version),
            content_hash: policy.map(|p| p.content_hash.clone()).unwrap_or_default(),
            rule: m.rule.clone(),
            span: rule.and_then(|r| r.summary.span.clone()),
        };
        for o in r.obligations {
            match o {
                Obligation::Redact {
                    fields,
                    detectors,
                    with,
                } => obligations.redactions.push(pb::Redaction {
                    fields: fields.clone(),
                    detectors: detectors_of(detectors)
                        .into_iter()
                        .map(|d| pb_detector(d) as i32)
                        .collect(),
                    replacement: with.clone().unwrap_or_default(),
                    rule: Some(rule_ref.clone()),
                }),
                Obligation::RequireApproval { reason, .. } => {
                    obligations.approvals.push(pb::ApprovalObligation {
                        stages: o
                            .approval_stages()
                            .into_iter()
                            .map(|s| pb::RequiredApprovalStage {
                                name: s.name,
                                approvers: s.approvers,
                                quorum: s.quorum,
                            })
                            .collect(),
                        reason: reason.clone().unwrap_or_default(),
                        expires_after: None,
                        escalate_to: Vec::new(),
                        rule: Some(rule_ref.clone()),
                    });
                }
                Obligation::Log { .. } => {}
            }
        }
        let reason = r.reasons.join("; ");
        if !reason.is_empty() {
            decision.reasons.push(reason.clone());
        }
        decision.matched_rules.push(pb::MatchedRule {
            rule: Some(rule_ref),
            priority: i32::try_from(m.priority).unwrap_or(0),
            effect: pb_effect(m.effect),
            reason,
        });
    }
    decision.obligations = Some(obligations);
    Ok((decision, d.fuel_used))
}

impl Policies {
    /// Resolves one reference to a stored version.
    async fn resolve(
        &self,
        tx: &anumate_store::TenantTx,
        r: &pb::PolicyRef,
    ) -> Result<pb::PolicyVersion> {
        check_name("policies.name", &r.name)?;
        if r.version < 0 {
            return Err(Error::invalid_argument(
                "policies.version",
                "must not be negative",
            ));
        }
        if !r.content_hash.is_empty() {
            let hash = anumate_crypto::parse_digest("policies.content_hash", &r.content_hash)?;
            // Exact content keeps working after deprecation or deletion.
            let Some(v) = repo::find_by_hash(tx, &r.name, &hash).await? else {
                return Err(if repo::ever_pushed(tx, &r.name).await? {
                    Error::because(
                        Reason::PolicyVersionNotFound,
                        format!("policy {} has no version with content hash {hash}", r.name),
                    )
                } else {
                    Error::because(
                        Reason::PolicyNotFound,
                        format!("policy {} not found", r.name),
                    )
                });
            };
            if r.version > 0 && r.version != v.version {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "policy {} version {} does not have content hash {hash} (version {} does)",
                        r.name, r.version, v.version
                    ),
                ));
            }
            return Ok(v);
        }
        let policy = repo::visible_policy(tx, &r.name).await?;
        let number = if r.version > 0 {
            r.version
        } else if policy.published_version > 0 {
            policy.published_version
        } else {
            return Err(Error::because(
                Reason::PolicyVersionNotFound,
                format!("policy {} has no published version", r.name),
            ));
        };
        repo::get_version(tx, &r.name, number).await
    }

    async fn units(&self, actor: &Actor, target: &EvalTarget) -> Result<Vec<Unit>> {
        match target {
            EvalTarget::Source(source, name) => Ok(vec![Unit {
                compiled: self.compiled_source(source, name).await?,
            }]),
            EvalTarget::Refs(refs) => {
                if refs.is_empty() {
                    return Err(Error::invalid_argument(
                        "policy_set.policies",
                        "name at least one policy",
                    ));
                }
                let mut names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
                names.sort_unstable();
                if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                    return Err(Error::invalid_argument(
                        "policy_set.policies",
                        format!("policy {} is named more than once", w[0]),
                    ));
                }
                let tx = self.store.read(&actor.tenant).await?;
                let mut units = Vec::new();
                for r in refs {
                    let v = self.resolve(&tx, r).await?;
                    units.push(Unit {
                        compiled: self.compiled_version(&actor.tenant, &v).await?,
                    });
                }
                units.sort_by(|a, b| {
                    let name = |u: &Unit| u.compiled.policies.first().map(|p| p.name.clone());
                    name(a).cmp(&name(b))
                });
                Ok(units)
            }
        }
    }

    /// Evaluates stored policies or ad-hoc source on one input, logs the
    /// decision (redacted) and returns it.
    pub async fn evaluate(
        &self,
        actor: &Actor,
        target: EvalTarget,
        input: EvalInput,
        allowed_tools: &[String],
    ) -> Result<pb::EvaluatePolicyResponse> {
        let (tenant, max_bytes) = (actor.tenant.clone(), self.cfg.max_input_bytes);
        let input = anumate_cpu::run(move || prepare_input(input, &tenant, max_bytes)).await?;
        let units = self.units(actor, &target).await?;
        let mut refs: Vec<pb::PolicyRef> = units
            .iter()
            .flat_map(|u| u.compiled.policies.iter())
            .map(|p| pb::PolicyRef {
                name: p.name.clone(),
                version: p.version,
                content_hash: p.content_hash.clone(),
            })
            .collect();
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        let tool = input.get("tool").and_then(Value::as_str).unwrap_or("");
        let (decision, fuel) =
            if !allowed_tools.is_empty() && !allowed_tools.iter().any(|t| t == tool) {
                (
                    pb::Decision {
                        effect: pb::Effect::Deny as i32,
                        matched_rules: Vec::new(),
                        obligations: Some(pb::Obligations::default()),
                        reasons: vec![format!(
                            "tool \"{tool}\" is not in the capsule's allow-list"
                        )],
                        denied_by_allow_list: true,
                    },
                    0,
                )
            } else {
                // Evaluation is bounded by fuel, not by time: off the runtime.
                let input = Arc::new(input.clone());
                anumate_cpu::run(move || decide(&units, &input)).await?
            };
        let response = pb::EvaluatePolicyResponse {
            decision: Some(decision),
            policy_set_hash: anumate_crypto::policy_set_hash(
                refs.iter()
                    .map(|r| (r.name.as_str(), r.content_hash.as_str())),
            ),
            policies: refs,
            fuel_used: i64::try_from(fuel).unwrap_or(i64::MAX),
        };
        self.log_decision(actor, &input, &response).await?;
        Ok(response)
    }

    async fn log_decision(
        &self,
        actor: &Actor,
        input: &Value,
        resp: &pb::EvaluatePolicyResponse,
    ) -> Result<()> {
        let decision = resp.decision.clone().unwrap_or_default();
        let redactors = obligation_redactors(
            decision
                .obligations
                .as_ref()
                .map_or(&[][..], |o| o.redactions.as_slice()),
        );
        let mut logged = input.clone();
        for r in &redactors {
            r.redact_json(&mut logged);
        }
        let decision_json = serde_json::to_string(&decision).map_err(Error::internal)?;
        let policies = serde_json::to_string(&resp.policies).map_err(Error::internal)?;
        let mut input_json = serde_json::to_string(&logged).map_err(Error::internal)?;
        if input_json.len() > self.cfg.max_logged_input_bytes {
            input_json = json!({
                "omitted": true,
                "bytes": input_json.len(),
                "sha256": anumate_crypto::sha256_hex(input_json.as_bytes()),
            })
            .to_string();
        }
        let effect =
            pb::Effect::try_from(decision.effect).map_or("unspecified", |e| e.as_str_name());
        let id = uuid::Uuid::now_v7().to_string();
        let tx = self.store.write(&actor.tenant).await?;
        repo::insert_decision(
            &tx,
            &repo::DecisionRow {
                id: &id,
                principal: &actor.subject,
                effect,
                policy_set_hash: &resp.policy_set_hash,
                policies: &policies,
                input_json: &input_json,
                decision_json: &decision_json,
                fuel_used: resp.fuel_used,
            },
            anumate_store::now_micros(),
        )
        .await?;
        if let Some(cutoff) = self.decision_purge_cutoff(&actor.tenant) {
            let purged = repo::purge_decisions(&tx, cutoff).await?;
            if purged > 0 {
                tracing::info!(tenant = %actor.tenant, purged, "decision log rows past retention deleted");
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The retention cutoff (Unix microseconds) when `tenant`'s decision log
    /// is due a purge: retention on and no purge in the last minute.
    fn decision_purge_cutoff(&self, tenant: &str) -> Option<i64> {
        const PURGE_EVERY_MICROS: i64 = 60_000_000;
        if self.cfg.decision_retention_hours == 0 {
            return None;
        }
        let now = anumate_store::now_micros();
        let keep = i64::try_from(self.cfg.decision_retention_hours)
            .unwrap_or(i64::MAX)
            .saturating_mul(3_600_000_000);
        let mut purged = self.purged.lock().unwrap_or_else(|e| e.into_inner());
        let last = purged.entry(tenant.to_string()).or_insert(i64::MIN);
        if now.saturating_sub(*last) < PURGE_EVERY_MICROS {
            return None;
        }
        *last = now;
        Some(now.saturating_sub(keep))
    }

    /// Runs the `test` blocks of a stored version or of ad-hoc source.
    pub async fn test(
        &self,
        actor: &Actor,
        target: EvalTarget,
        name_filter: &str,
    ) -> Result<pb::TestPolicyResponse> {
        let units = self.units(actor, &target).await?;
        let name_filter = name_filter.to_owned();
        anumate_cpu::run(move || Ok(run_tests(&units, &name_filter))).await
    }

    /// Applies redactions (all built-in detectors when none are given).
    pub fn redact(
        &self,
        value: RedactValue,
        redactions: &[pb::Redaction],
    ) -> Result<pb::RedactResponse> {
        let field_lists: Vec<Vec<String>> = if redactions.is_empty() {
            vec![Vec::new()]
        } else {
            redactions.iter().map(|r| r.fields.clone()).collect()
        };
        let redactors = if redactions.is_empty() {
            vec![Redactor::default()]
        } else {
            redactions
                .iter()
                .map(|r| {
                    let mut detectors = Vec::new();
                    for &d in &r.detectors {
                        detectors.extend(from_pb_detector(d)?);
                    }
                    redactor(&r.fields, detectors, &r.replacement)
                })
                .collect::<Result<Vec<_>>>()?
        };
        let redact_value = |v: &mut Value| {
            let mut findings = Vec::new();
            for (r, fields) in redactors.iter().zip(field_lists.iter()) {
                let mut before = std::collections::HashMap::new();
                scalars(v, String::new(), &mut before);
                let report = r.redact_json(v);
                for p in report.paths {
                    findings.extend(attribute(r, fields, &before, &p));
                }
            }
            findings
        };
        use pb::redact_response::Value as Out;
        Ok(match value {
            RedactValue::Text(text) => {
                let mut out = text;
                let mut findings = Vec::new();
                for r in &redactors {
                    for m in r.find(&out) {
                        findings.push(pb::RedactionFinding {
                            path: "$".into(),
                            detector: pb_detector(m.detector) as i32,
                            field: String::new(),
                            count: 1,
                        });
                    }
                    out = r.redact_str(&out).into_owned();
                }
                pb::RedactResponse {
                    value: Some(Out::Text(out)),
                    findings,
                }
            }
            RedactValue::Json(text) => {
                self.check_size("value_json", &text)?;
                let mut v: Value = serde_json::from_str(&text).map_err(|e| {
                    let line = u32::try_from(e.line()).unwrap_or(u32::MAX);
                    let col = u32::try_from(e.column()).unwrap_or(u32::MAX);
                    Error::new(
                        ErrorCode::InvalidArgument,
                        format!("value_json: malformed JSON at {line}:{col}: {e}"),
                    )
                    .with_violations(vec![Violation::at(
                        "value_json",
                        line,
                        col,
                        format!("malformed JSON: {e}"),
                    )])
                })?;
                let findings = redact_value(&mut v);
                pb::RedactResponse {
                    value: Some(Out::ValueJson(anumate_crypto::content_hash(&v).0)),
                    findings,
                }
            }
            RedactValue::Struct(mut v) => {
                let findings = redact_value(&mut v);
                let out: pbjson_types::Value =
                    serde_json::from_value(v).map_err(Error::internal)?;
                pb::RedactResponse {
                    value: Some(Out::ValueStruct(out)),
                    findings,
                }
            }
        })
    }
}

/// Every scalar that redaction could change, by the path format of
/// `RedactionReport::paths` (`a.b[2].c`).
fn scalars(v: &Value, path: String, out: &mut std::collections::HashMap<String, String>) {
    match v {
        Value::String(s) => {
            out.insert(path, s.clone());
        }
        Value::Number(n) => {
            out.insert(path, n.to_string());
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                scalars(item, format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                scalars(item, p, out);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// Whether the field pattern `pattern` names the concrete `path` (the
/// redaction library's field-path grammar, the one the redactor applied).
fn field_matches(pattern: &str, path: &str) -> bool {
    pattern
        .parse::<anumate_redaction::FieldPath>()
        .is_ok_and(|p| p.matches(path))
}

/// The findings for one changed path: the field pattern that named it, or
/// the detectors that matched its original text.
fn attribute(
    r: &Redactor,
    fields: &[String],
    before: &std::collections::HashMap<String, String>,
    path: &str,
) -> Vec<pb::RedactionFinding> {
    let json_path = if path.is_empty() {
        "$".to_string()
    } else if path.starts_with('[') {
        format!("${path}")
    } else {
        format!("$.{path}")
    };
    let finding = |detector: i32, field: String, count: i32| pb::RedactionFinding {
        path: json_path.clone(),
        detector,
        field,
        count,
    };
    if let Some(f) = fields.iter().find(|f| field_matches(f, path)) {
        return vec![finding(0, f.clone(), 1)];
    }
    let Some(text) = before.get(path) else {
        // A redacted object key: the path names it in redacted form.
        return vec![finding(0, String::new(), 1)];
    };
    let mut counts: Vec<(Detector, i32)> = Vec::new();
    for m in r.find(text) {
        match counts.iter_mut().find(|(d, _)| *d == m.detector) {
            Some((_, n)) => *n += 1,
            None => counts.push((m.detector, 1)),
        }
    }
    counts
        .into_iter()
        .map(|(d, n)| finding(pb_detector(d) as i32, String::new(), n))
        .collect()
}

/// Runs the `test` blocks of `units` whose name contains `name_filter`.
fn run_tests(units: &[Unit], name_filter: &str) -> pb::TestPolicyResponse {
    let mut resp = pb::TestPolicyResponse::default();
    for unit in units {
        for t in anumate_policy::run_tests(&unit.compiled.set) {
            if !name_filter.is_empty() && !t.name.contains(name_filter) {
                continue;
            }
            let passed = t.passed();
            let decision = match &t.actual {
                Ok(_) => t.actual.as_ref().ok().map(|d| pb::Decision {
                    effect: pb_effect(d.effect),
                    matched_rules: d
                        .matched
                        .iter()
                        .map(|m| {
                            let policy = unit.compiled.policy(&m.policy);
                            let rule = policy.and_then(|p| p.rule(&m.rule));
                            pb::MatchedRule {
                                rule: Some(pb::PolicyRuleRef {
                                    policy: m.policy.clone(),
                                    policy_version: policy.map_or(0, |p| p.version),
                                    content_hash: policy
                                        .map(|p| p.content_hash.clone())
                                        .unwrap_or_default(),
                                    rule: m.rule.clone(),
                                    span: rule.and_then(|r| r.summary.span.clone()),
                                }),
                                priority: i32::try_from(m.priority).unwrap_or(0),
                                effect: pb_effect(m.effect),
                                reason: rule.map(|r| r.reason.clone()).unwrap_or_default(),
                            }
                        })
                        .collect(),
                    obligations: None,
                    reasons: d.reasons.iter().map(|r| (*r).to_string()).collect(),
                    denied_by_allow_list: false,
                }),
                Err(_) => None,
            };
            let line = i32::try_from(t.at.line).unwrap_or(i32::MAX);
            let col = i32::try_from(t.at.col).unwrap_or(i32::MAX);
            if passed {
                resp.passed_count += 1;
            } else {
                resp.failed_count += 1;
            }
            resp.results.push(pb::TestResult {
                policy: t.policy.clone(),
                name: t.name.clone(),
                passed,
                expected_effect: pb_effect(t.expected),
                decision,
                failure_message: t.diff(),
                // Tests report their start position only (no byte offsets).
                span: Some(pb::SourceSpan {
                    source_name: unit.compiled.source_name.clone(),
                    start_line: line,
                    start_column: col,
                    end_line: line,
                    end_column: col,
                    start_offset: 0,
                    end_offset: 0,
                }),
            });
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_patterns() {
        assert!(field_matches("customer.email", "customer.email"));
        assert!(field_matches("items[*].card", "items[3].card"));
        assert!(field_matches("*.ssn", "person.ssn"));
        assert!(field_matches("a['odd key']", "a.odd key"));
        assert!(!field_matches("customer.email", "customer.phone"));
        assert!(!field_matches("items[*].card", "items.card"));
        assert!(!field_matches("customer", "customer.email"));
    }

    #[test]
    fn cache_compiles_once_and_evicts_oldest() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let cache = crate::cache::Cache::new(2);
        let compiles = AtomicUsize::new(0);
        let make = || {
            compiles.fetch_add(1, Ordering::SeqCst);
            crate::analyze::compile("t", "policy \"p\" { }", 0, 100, true)
        };
        let a = cache.get_or_try_insert("a", make).unwrap();
        let a2 = cache.get_or_try_insert("a", make).unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &a2));
        assert_eq!(compiles.load(Ordering::SeqCst), 1);
        cache.get_or_try_insert("b", make).unwrap();
        cache.get_or_try_insert("c", make).unwrap(); // evicts "a"
        cache.get_or_try_insert("a", make).unwrap();
        assert_eq!(compiles.load(Ordering::SeqCst), 4);
        // Errors are not cached.
        let bad =
            cache.get_or_try_insert("bad", || crate::analyze::compile("t", "nope", 0, 100, true));
        assert!(bad.is_err());
    }
}
