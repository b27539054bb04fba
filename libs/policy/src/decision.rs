//! Decisions over several compiled sets, and what their obligations mean
//! for approvals: one implementation for the policy service (decisions),
//! the compiler (static approval needs) and, later, preflight and the
//! orchestrator.

use std::cmp::Reverse;

use serde::Serialize;
use serde_json::Value;

#[cfg(test)]
use crate::approval_obligation;
use crate::compile::string_list;
use crate::{CompiledSet, Effect, EvalError, MatchedRule, Obligation};

/// One matched rule of an [`AssembledDecision`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecidedRule<'a> {
    /// Index of the set it came from, in the slice given to [`decide`].
    pub set: usize,
    /// The rule as the set reports it.
    pub rule: &'a MatchedRule,
    /// The obligations the rule's actions add, in action order. Approval
    /// obligations are left out unless the decision's effect is
    /// `require_approval` (a deny needs no approval; an allow none either).
    pub obligations: Vec<&'a Obligation>,
    /// The `reason:` texts of the rule's actions.
    pub reasons: &'a [String],
}

/// The decision of several sets on one input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AssembledDecision<'a> {
    /// The strongest effect of every set: deny > require_approval > allow.
    pub effect: Effect,
    /// Every matched rule: higher priority first, then set order, then each
    /// set's own report order.
    pub rules: Vec<DecidedRule<'a>>,
    /// Fuel spent, summed over the sets (each has its own limit).
    pub fuel_used: u64,
}

/// Evaluates each set on `input` and combines the results into one decision.
///
/// # Errors
/// The first set's [`EvalError`] (running out of fuel, an input that is not an
/// object); never a partial decision.
pub fn decide<'a>(
    sets: &[&'a CompiledSet],
    input: &Value,
) -> Result<AssembledDecision<'a>, EvalError> {
    let mut effect = Effect::Allow;
    let mut fuel_used: u64 = 0;
    let mut rules: Vec<(Reverse<i64>, usize, usize, DecidedRule<'a>)> = Vec::new();
    for (si, set) in sets.iter().enumerate() {
        let (matched, fuel) = set.evaluate_rules(input)?;
        fuel_used = fuel_used.saturating_add(fuel);
        for (pos, m) in matched.into_iter().enumerate() {
            effect = effect.max(m.rule.effect);
            rules.push((
                Reverse(m.rule.priority),
                si,
                pos,
                DecidedRule {
                    set: si,
                    rule: m.rule,
                    obligations: m.obligations.iter().collect(),
                    reasons: m.reasons,
                },
            ));
        }
    }
    rules.sort_by_key(|r| (r.0, r.1, r.2));
    let mut rules: Vec<DecidedRule<'a>> = rules.into_iter().map(|r| r.3).collect();
    if effect != Effect::RequireApproval {
        for r in &mut rules {
            r.obligations
                .retain(|o| !matches!(o, Obligation::RequireApproval { .. }));
        }
    }
    Ok(AssembledDecision {
        effect,
        rules,
        fuel_used,
    })
}

/// One stage of an approval: who may approve and how many must.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApprovalStage {
    /// `stage-N` (1-based) unless the policy names it.
    pub name: String,
    /// Who may approve (`group:…`, `user:…`).
    pub approvers: Vec<String>,
    /// How many approvals the stage needs; 1 unless given (or not an `i32`).
    pub quorum: i32,
}

impl Obligation {
    /// The approval stages of a `require_approval` obligation, empty for
    /// other obligations: its `stages` as written, or else one stage
    /// `stage-1` of its `approvers` and `quorum`.
    pub fn approval_stages(&self) -> Vec<ApprovalStage> {
        let Obligation::RequireApproval {
            approvers,
            quorum,
            stages,
            ..
        } = self
        else {
            return Vec::new();
        };
        if stages.is_empty() {
            return vec![ApprovalStage {
                name: "stage-1".into(),
                approvers: approvers.clone(),
                quorum: i32::try_from(*quorum).unwrap_or(1),
            }];
        }
        stages
            .iter()
            .enumerate()
            .map(|(i, s)| ApprovalStage {
                name: s
                    .get("name")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("stage-{}", i + 1), str::to_string),
                approvers: string_list(s.get("approvers")),
                quorum: s
                    .get("quorum")
                    .and_then(Value::as_i64)
                    .and_then(|q| i32::try_from(q).ok())
                    .unwrap_or(1),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
