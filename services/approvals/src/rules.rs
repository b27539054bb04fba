//! The decision rules as plain functions over [`Approval`]: eligibility,
//! quorum validation, approving, rejecting, delegating, escalation and
//! expiry. Nothing here touches the database or the wire; the service loads
//! an approval, applies one of these, and stores the result with its events
//! in one transaction.

use anumate_errors::{Error, Reason, Result};
use serde::{Deserialize, Serialize};

/// Most entries one approver list (or `exclude`) may name.
pub const MAX_PRINCIPALS: usize = 64;
/// Most stages one approval may have.
pub const MAX_STAGES: usize = 8;
/// Highest quorum accepted (a stage with a group supplies any number).
pub const MAX_QUORUM: u32 = 100;
/// Longest comment kept, in bytes.
pub const MAX_COMMENT: usize = 4096;

/// State of an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Waiting for decisions.
    Pending,
    /// Every stage reached its quorum.
    Approved,
    /// Somebody rejected it.
    Rejected,
    /// Expired undecided (after escalation, if any).
    Expired,
    /// Withdrawn because its run ended.
    Cancelled,
}

impl Status {
    /// Whether no decision can change it any more.
    pub fn is_final(self) -> bool {
        self != Status::Pending
    }
}

/// What a decision did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Approved the current stage.
    Approve,
    /// Rejected the approval.
    Reject,
    /// Handed the actor's place to `delegate_to`.
    Delegate,
    /// The stage was escalated on expiry.
    Escalate,
    /// The approval expired.
    Expire,
    /// The approval was withdrawn.
    Cancel,
}

impl Kind {
    /// Lower-case name, as in receipts.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Approve => "approve",
            Kind::Reject => "reject",
            Kind::Delegate => "delegate",
            Kind::Escalate => "escalate",
            Kind::Expire => "expire",
            Kind::Cancel => "cancel",
        }
    }
}

/// The actor of timer decisions.
pub const SYSTEM: &str = "system";

/// One decision, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// `user:<id>`, `svc:<name>` or [`SYSTEM`].
    pub actor: String,
    /// What it did.
    pub kind: Kind,
    /// 0-based stage.
    pub stage: usize,
    /// Comment, as given.
    pub comment: String,
    /// The delegate, for [`Kind::Delegate`].
    #[serde(default)]
    pub delegate_to: String,
    /// The new approvers, for [`Kind::Escalate`].
    #[serde(default)]
    pub escalate_to: Vec<String>,
    /// Receipt id (empty when no receipts service is configured).
    #[serde(default)]
    pub receipt_id: String,
    /// Unix microseconds.
    pub at: i64,
    /// Taken after the stage was escalated.
    #[serde(default)]
    pub escalated: bool,
}

/// One ordered stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Name (`stage-<n>` by default).
    pub name: String,
    /// Eligible entries: `user:<id>` or `group:<name>`.
    pub approvers: Vec<String>,
    /// Distinct approvals needed.
    pub quorum: u32,
    /// Principals whose approval counts in the current round, in order.
    #[serde(default)]
    pub approved_by: Vec<String>,
    /// True once the quorum is reached.
    #[serde(default)]
    pub approved: bool,
    /// When the stage expires; `None` until it opens.
    #[serde(default)]
    pub expire_at: Option<i64>,
    /// True once escalated.
    #[serde(default)]
    pub escalated: bool,
    /// Entries made eligible by delegation.
    #[serde(default)]
    pub delegates: Vec<String>,
    /// Principals that delegated their place away.
    #[serde(default)]
    pub delegated_away: Vec<String>,
}

/// The policy rule that asked for an approval.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// Policy name.
    pub policy: String,
    /// Policy version.
    pub policy_version: i32,
    /// `sha256:` content hash of the policy version.
    pub content_hash: String,
    /// Rule name.
    pub rule: String,
}

/// An approval: what it covers, its stages and every decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// UUIDv7.
    pub id: String,
    /// Run id.
    pub run_id: String,
    /// Step id.
    pub step_id: String,
    /// `sha256:<hex>`.
    pub plan_hash: String,
    /// `sha256:<hex>`.
    pub args_sha256: String,
    /// Tool the step calls.
    pub tool: String,
    /// The tool is destructive.
    pub destructive: bool,
    /// The rule that asked.
    pub rule: RuleRef,
    /// The rule's reason.
    pub reason: String,
    /// Principal that started the run.
    pub requester: String,
    /// Principals that may not decide besides the requester.
    pub exclude: Vec<String>,
    /// Capsule name.
    pub capsule: String,
    /// Capsule version.
    pub capsule_version: i32,
    /// Redacted preview of the arguments.
    pub args_preview: Option<serde_json::Value>,
    /// `ghostrun.v1.RiskLevel` number.
    pub risk_level: i32,
    /// 0-100.
    pub risk_score: i32,
    /// The stages.
    pub stages: Vec<Stage>,
    /// Index of the stage being decided; `stages.len()` once approved.
    pub current: usize,
    /// State.
    pub status: Status,
    /// Decisions, oldest first.
    pub decisions: Vec<Decision>,
    /// Escalation approvers (empty: expiry ends it).
    pub escalate_to: Vec<String>,
    /// Quorum of an escalated stage.
    pub escalate_quorum: u32,
    /// Per-stage open time, microseconds.
    pub expires_after: i64,
    /// Reminder lead time, microseconds.
    pub remind_before: i64,
    /// Bumped each time a stage opens or escalates: timers of an older
    /// generation are stale.
    pub timer_gen: i64,
    /// Bumped on every change (the etag).
    pub version: i64,
    /// Unix microseconds.
    pub created_at: i64,
    /// Unix microseconds, once final.
    pub decided_at: Option<i64>,
}

/// Who is deciding: the verified principal and its groups.
#[derive(Debug, Clone, Copy)]
pub struct Decider<'a> {
    /// Principal (`user:<id>`; a bare subject is read as a user).
    pub principal: &'a str,
    /// Group names from the token (`controllers`, or `group:controllers`).
    pub groups: &'a [String],
}

/// The principal name of a token subject: `user:<id>` for a bare subject,
/// the subject itself when it already has a kind (`svc:orchestrator`).
pub fn principal_of(subject: &str) -> String {
    if subject.contains(':') {
        subject.to_owned()
    } else {
        format!("user:{subject}")
    }
}

/// A checked `user:<id>` or `group:<name>` entry; `field` names it in errors.
pub fn parse_entry(field: &str, entry: &str) -> Result<String> {
    let (kind, name) = entry.split_once(':').ok_or_else(|| {
        Error::invalid_argument(
            field,
            format!("{entry:?} is not `user:<id>` or `group:<name>`"),
        )
    })?;
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',');
    if !matches!(kind, "user" | "group") || !name_ok {
        return Err(Error::invalid_argument(
            field,
            format!("{entry:?} is not `user:<id>` or `group:<name>`"),
        ));
    }
    Ok(entry.to_owned())
}

/// Checks a list of entries (non-empty unless `may_be_empty`), removing
/// duplicates while keeping order.
pub fn parse_entries(field: &str, entries: &[String], may_be_empty: bool) -> Result<Vec<String>> {
    if entries.is_empty() && !may_be_empty {
        return Err(Error::invalid_argument(field, "name at least one approver"));
    }
    if entries.len() > MAX_PRINCIPALS {
        return Err(Error::invalid_argument(
            field,
            format!("at most {MAX_PRINCIPALS} entries"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let e = parse_entry(&format!("{field}[{i}]"), e)?;
        if !out.contains(&e) {
            out.push(e);
        }
    }
    Ok(out)
}

/// Checks that `approvers` can supply `quorum` distinct approvals when
/// `barred` may not decide: a group supplies any number of members; users
/// count once each. `field` names the quorum in errors.
pub fn check_quorum(
    field: &str,
    approvers: &[String],
    quorum: i32,
    barred: &[String],
) -> Result<u32> {
    let quorum = u32::try_from(quorum)
        .ok()
        .filter(|q| (1..=MAX_QUORUM).contains(q))
        .ok_or_else(|| {
            Error::invalid_argument(field, format!("must be between 1 and {MAX_QUORUM}"))
        })?;
    if approvers.iter().any(|a| a.starts_with("group:")) {
        return Ok(quorum);
    }
    let seats = approvers.iter().filter(|a| !barred.contains(a)).count();
    if quorum as usize > seats {
        return Err(Error::invalid_argument(
            field,
            format!(
                "a quorum of {quorum} needs {quorum} distinct approvers, but only {seats} user(s) who may decide are named and no group"
            ),
        ));
    }
    Ok(quorum)
}

/// Whether `entry` names the decider (its principal, or one of its groups).
fn matches(entry: &str, d: Decider<'_>) -> bool {
    if entry == d.principal {
        return true;
    }
    entry.strip_prefix("group:").is_some_and(|group| {
        d.groups
            .iter()
            .any(|g| g.strip_prefix("group:").unwrap_or(g) == group)
    })
}

impl Approval {
    /// Principals barred from deciding: the requester and `exclude`.
    pub fn barred(&self) -> Vec<String> {
        let mut barred = self.exclude.clone();
        barred.push(self.requester.clone());
        barred
    }

    /// The stage being decided, while pending.
    pub fn current_stage(&self) -> Option<&Stage> {
        match self.status {
            Status::Pending => self.stages.get(self.current),
            _ => None,
        }
    }

    /// The etag clients compare.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.version)
    }

    /// When the current stage expires, while pending.
    pub fn expire_at(&self) -> Option<i64> {
        self.current_stage().and_then(|s| s.expire_at)
    }

    /// Checks that `d` may decide the current stage now: not barred
    /// (`SELF_APPROVAL`), and eligible (`NOT_AN_APPROVER`).
    pub fn check_eligible(&self, d: Decider<'_>) -> Result<()> {
        if d.principal == self.requester {
            return Err(Error::because(
                Reason::SelfApproval,
                "the principal that started the run cannot decide its approval",
            ));
        }
        if self.exclude.iter().any(|e| e == d.principal) {
            return Err(Error::because(
                Reason::SelfApproval,
                "this principal is excluded from deciding this approval",
            ));
        }
        let stage = self.current_stage().ok_or_else(already_decided)?;
        let eligible = !stage.delegated_away.iter().any(|p| p == d.principal)
            && stage
                .approvers
                .iter()
                .chain(&stage.delegates)
                .any(|e| matches(e, d));
        if eligible {
            Ok(())
        } else {
            Err(Error::because(
                Reason::NotAnApprover,
                format!(
                    "{} is not an approver of stage {:?}",
                    d.principal, stage.name
                ),
            ))
        }
    }

    /// Whether `d` may decide the current stage now.
    pub fn actionable_by(&self, d: Decider<'_>) -> bool {
        self.check_eligible(d).is_ok() && self.earlier_vote(d.principal).is_none()
    }

    /// The approve or reject `principal` already recorded.
    fn earlier_vote(&self, principal: &str) -> Option<&Decision> {
        self.decisions
            .iter()
            .find(|x| x.actor == principal && matches!(x.kind, Kind::Approve | Kind::Reject))
    }

    fn record(&mut self, decision: Decision) {
        self.decisions.push(decision);
        self.version += 1;
    }

    /// Opens stage `index` at `now`: its expiry starts and a new timer
    /// generation begins.
    fn open_stage(&mut self, index: usize, now: i64) {
        self.current = index;
        self.timer_gen += 1;
        if let Some(stage) = self.stages.get_mut(index) {
            stage.expire_at = Some(now.saturating_add(self.expires_after));
        }
    }

    /// Opens the first stage of a new approval.
    pub fn open(&mut self, now: i64) {
        self.open_stage(0, now);
    }
}

fn already_decided() -> Error {
    Error::because(
        Reason::ApprovalAlreadyDecided,
        "the approval is no longer pending",
    )
}

/// What a decision did to an approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Recorded; the approval changed.
    Recorded(Effect),
    /// The same principal repeated the same decision: nothing changed.
    Repeat,
}

/// The visible effect of a recorded decision, for its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// A vote that did not complete a stage.
    Voted,
    /// The stage reached its quorum and the next one opened.
    StageApproved,
    /// The last stage reached its quorum.
    Granted,
    /// Rejected.
    Rejected,
    /// A delegation.
    Delegated,
    /// A stage escalated.
    Escalated,
    /// Expired.
    Expired,
    /// Cancelled.
    Cancelled,
}

/// A decision asked for by a principal.
#[derive(Debug, Clone)]
pub enum Action<'a> {
    /// Approve, having seen `args_sha256`.
    Approve {
        /// What the approver saw (checked).
        args_sha256: &'a str,
    },
    /// Reject.
    Reject,
    /// Hand the place to `to`.
    Delegate {
        /// A checked entry.
        to: &'a str,
    },
}

/// Applies `action` by `d` at `now` with `comment`; `etag`, when non-empty,
/// must be the approval's. Errors leave `a` unchanged.
pub fn decide(
    a: &mut Approval,
    d: Decider<'_>,
    action: &Action<'_>,
    comment: &str,
    etag: &str,
    now: i64,
) -> Result<Applied> {
    if comment.len() > MAX_COMMENT {
        return Err(Error::invalid_argument(
            "comment",
            format!("at most {MAX_COMMENT} bytes"),
        ));
    }
    if let Action::Approve { args_sha256 } = action
        && *args_sha256 != a.args_sha256
    {
        return Err(Error::because(
            Reason::ApprovalArgsMismatch,
            format!(
                "the approval covers arguments {}, not {args_sha256}: re-read the approval",
                a.args_sha256
            ),
        )
        .with_metadata("args_sha256", a.args_sha256.clone()));
    }
    // A retry of a recorded decision is answered before anything that may
    // have changed since (state, etag).
    let kind = match action {
        Action::Approve { .. } => Kind::Approve,
        Action::Reject => Kind::Reject,
        Action::Delegate { .. } => Kind::Delegate,
    };
    match kind {
        Kind::Approve | Kind::Reject => {
            if let Some(earlier) = a.earlier_vote(d.principal) {
                return if earlier.kind == kind {
                    Ok(Applied::Repeat)
                } else {
                    Err(Error::because(
                        Reason::ApprovalAlreadyDecided,
                        format!(
                            "{} already chose to {} this approval; a decision is final",
                            d.principal,
                            earlier.kind.as_str()
                        ),
                    ))
                };
            }
        }
        _ => {
            if let Action::Delegate { to } = action
                && a.decisions.iter().any(|x| {
                    x.kind == Kind::Delegate
                        && x.actor == d.principal
                        && x.stage == a.current
                        && x.delegate_to == *to
                })
            {
                return Ok(Applied::Repeat);
            }
        }
    }
    if a.status.is_final() {
        return Err(already_decided());
    }
    if !etag.is_empty() && etag != a.etag() {
        return Err(Error::because(
            Reason::EtagMismatch,
            "the approval changed since it was read",
        )
        .with_metadata("current_etag", a.etag()));
    }
    a.check_eligible(d)?;
    if let Some(earlier) = a
        .decisions
        .iter()
        .find(|x| x.actor == d.principal && x.kind == Kind::Delegate && x.stage == a.current)
    {
        // Unreachable while delegated_away is kept, but a vote after handing
        // the place away must never count.
        return Err(Error::because(
            Reason::NotAnApprover,
            format!(
                "{} delegated this stage to {}",
                d.principal, earlier.delegate_to
            ),
        ));
    }
    let stage_index = a.current;
    let escalated = a.stages.get(stage_index).is_some_and(|s| s.escalated);
    let decision = Decision {
        actor: d.principal.to_owned(),
        kind,
        stage: stage_index,
        comment: comment.to_owned(),
        delegate_to: String::new(),
        escalate_to: Vec::new(),
        receipt_id: String::new(),
        at: now,
        escalated,
    };
    let effect = match action {
        Action::Reject => {
            a.status = Status::Rejected;
            a.decided_at = Some(now);
            a.record(decision);
            Effect::Rejected
        }
        Action::Approve { .. } => {
            let last = stage_index + 1 == a.stages.len();
            let Some(stage) = a.stages.get_mut(stage_index) else {
                return Err(Error::internal("approval has no current stage"));
            };
            stage.approved_by.push(d.principal.to_owned());
            let reached = stage.approved_by.len() >= stage.quorum as usize;
            if reached {
                stage.approved = true;
            }
            a.record(decision);
            match (reached, last) {
                (false, _) => Effect::Voted,
                (true, true) => {
                    a.current = a.stages.len();
                    a.status = Status::Approved;
                    a.decided_at = Some(now);
                    Effect::Granted
                }
                (true, false) => {
                    a.open_stage(stage_index + 1, now);
                    Effect::StageApproved
                }
            }
        }
        Action::Delegate { to } => {
            let to = (*to).to_owned();
            if a.barred().contains(&to) {
                return Err(Error::invalid_argument(
                    "delegate_to",
                    format!("{to} may not decide this approval (requester or excluded)"),
                ));
            }
            let Some(stage) = a.stages.get_mut(stage_index) else {
                return Err(Error::internal("approval has no current stage"));
            };
            if stage.delegated_away.contains(&to) || to == d.principal {
                return Err(Error::invalid_argument(
                    "delegate_to",
                    format!("{to} delegated this stage before: delegating back would be a cycle"),
                ));
            }
            if stage.approvers.contains(&to) || stage.delegates.contains(&to) {
                return Err(Error::invalid_argument(
                    "delegate_to",
                    format!("{to} is already eligible in this stage"),
                ));
            }
            if stage.delegates.len() >= MAX_PRINCIPALS {
                return Err(Error::new(
                    anumate_errors::ErrorCode::ResourceExhausted,
                    format!("a stage takes at most {MAX_PRINCIPALS} delegations"),
                )
                .with_metadata("limit", MAX_PRINCIPALS.to_string()));
            }
            stage.delegates.push(to.clone());
            stage.delegated_away.push(d.principal.to_owned());
            a.record(Decision {
                delegate_to: to,
                ..decision
            });
            Effect::Delegated
        }
    };
    Ok(Applied::Recorded(effect))
}

/// What a due expiry timer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Escalate the current stage.
    Escalate,
    /// End the approval as expired.
    Expire,
}

/// What an expiry timer of generation `gen` does at `now`, if anything: the
/// approval must be pending, still in that generation and past its stage's
/// expiry.
pub fn due_expiry(a: &Approval, generation: i64, now: i64) -> Option<Expiry> {
    let stage = a.current_stage()?;
    if a.timer_gen != generation || stage.expire_at.is_none_or(|at| at > now) {
        return None;
    }
    if !stage.escalated && !a.escalate_to.is_empty() {
        Some(Expiry::Escalate)
    } else {
        Some(Expiry::Expire)
    }
}

/// Applies an expiry (see [`due_expiry`]) at `now`.
pub fn expire(a: &mut Approval, what: Expiry, now: i64) -> Result<Effect> {
    let index = a.current;
    let escalate_to = a.escalate_to.clone();
    let escalate_quorum = a.escalate_quorum.max(1);
    let Some(stage) = a.stages.get_mut(index) else {
        return Err(Error::internal("approval has no current stage"));
    };
    let was_escalated = stage.escalated;
    let mut decision = Decision {
        actor: SYSTEM.to_owned(),
        kind: Kind::Expire,
        stage: index,
        comment: String::new(),
        delegate_to: String::new(),
        escalate_to: Vec::new(),
        receipt_id: String::new(),
        at: now,
        escalated: was_escalated,
    };
    let effect = match what {
        Expiry::Escalate => {
            // A fresh round: earlier approvals stay in the history only.
            stage.approvers = escalate_to.clone();
            stage.quorum = escalate_quorum;
            stage.approved_by.clear();
            stage.delegates.clear();
            stage.delegated_away.clear();
            stage.escalated = true;
            decision.kind = Kind::Escalate;
            decision.escalate_to = escalate_to;
            a.open_stage(index, now);
            Effect::Escalated
        }
        Expiry::Expire => {
            a.status = Status::Expired;
            a.decided_at = Some(now);
            Effect::Expired
        }
    };
    a.record(decision);
    Ok(effect)
}

/// Withdraws a pending approval; `Ok(false)` when it was already cancelled.
pub fn cancel(a: &mut Approval, actor: &str, reason: &str, now: i64) -> Result<bool> {
    match a.status {
        Status::Cancelled => return Ok(false),
        Status::Pending => {}
        _ => return Err(already_decided()),
    }
    a.status = Status::Cancelled;
    a.decided_at = Some(now);
    let stage = a.current;
    a.record(Decision {
        actor: actor.to_owned(),
        kind: Kind::Cancel,
        stage,
        comment: reason.to_owned(),
        delegate_to: String::new(),
        escalate_to: Vec::new(),
        receipt_id: String::new(),
        at: now,
        escalated: false,
    });
    Ok(true)
}

#[cfg(test)]
mod tests;
