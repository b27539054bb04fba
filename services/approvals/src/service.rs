//! The operations of [`Approvals`]: open, read, list, decide, cancel, and
//! wait for an outcome.

use std::time::Duration;

use anumate_errors::{Error, Reason, Result};
use anumate_events::EventContext;
use anumate_proto::approvals::v1 as pb;
use anumate_store::TenantTx;
use tokio::sync::broadcast::error::RecvError;

use crate::commit::Decided;
use crate::convert::{self, Event};
use crate::rules::{self, Action, Applied, Approval, Decider, Effect, RuleRef, Stage, Status};
use crate::{Approvals, Change, notify, receipting, repo};

/// Who is calling: the verified principal, its tenant and groups.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Tenant id.
    pub tenant: String,
    /// Principal (`user:<id>`, `svc:<name>`).
    pub principal: String,
    /// Group names from the token's `groups` claim.
    pub groups: Vec<String>,
    /// A platform service identity (the orchestrator).
    pub service: bool,
}

impl Caller {
    fn decider(&self) -> Decider<'_> {
        Decider {
            principal: &self.principal,
            groups: &self.groups,
        }
    }
}

/// The final state of an approval, for the party waiting on it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `APPROVED`, `REJECTED`, `EXPIRED` or `CANCELLED`.
    pub state: pb::ApprovalState,
    /// The approval as decided.
    pub approval: pb::Approval,
}

/// Largest `args_preview` kept, in bytes of JSON.
const MAX_PREVIEW: usize = 64 * 1024;
/// Longest id, name or reason accepted, in bytes.
const MAX_TEXT: usize = 4096;
/// Most approvals a `ListApprovals` page holds.
const MAX_PAGE: i32 = 500;
/// Pending approvals examined per `actionable_by_me` page at most.
const MAX_SCAN: usize = 5000;
/// How often a waiter re-reads the approval when nothing woke it (a
/// decision taken by another replica).
const WAIT_POLL: Duration = Duration::from_secs(1);

fn text(field: &str, value: &str, required: bool) -> Result<String> {
    if required && value.trim().is_empty() {
        return Err(Error::invalid_argument(field, "required"));
    }
    if value.len() > MAX_TEXT {
        return Err(Error::invalid_argument(
            field,
            format!("at most {MAX_TEXT} bytes"),
        ));
    }
    Ok(value.to_owned())
}

fn duration_micros(
    field: &str,
    d: Option<&pbjson_types::Duration>,
    default_secs: u64,
) -> Result<i64> {
    let Some(d) = d else {
        return Ok(i64::try_from(default_secs)
            .unwrap_or(i64::MAX / 1_000_000)
            .saturating_mul(1_000_000));
    };
    if !(0..1_000_000_000).contains(&d.nanos) && !(-999_999_999..=0).contains(&d.nanos) {
        return Err(Error::invalid_argument(field, "nanos out of range"));
    }
    let micros = d
        .seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(d.nanos) / 1000))
        .ok_or_else(|| Error::invalid_argument(field, "out of range"))?;
    Ok(micros)
}

/// A checked request as a new, not yet opened, approval.
pub(crate) fn new_approval(
    caller: &Caller,
    r: &pb::RequestApprovalRequest,
    cfg: &crate::ApprovalsConfig,
    now: i64,
) -> Result<Approval> {
    let run_id = text("run_id", &r.run_id, true)?;
    let step_id = text("step_id", &r.step_id, true)?;
    let plan_hash = anumate_crypto::parse_digest("plan_hash", &r.plan_hash)?;
    let args_sha256 = anumate_crypto::parse_digest("args_sha256", &r.args_sha256)?;
    let tool = text("tool", &r.tool, true)?;
    let rule = r
        .rule
        .as_ref()
        .ok_or_else(|| Error::invalid_argument("rule", "required"))?;
    let rule = RuleRef {
        policy: text("rule.policy", &rule.policy, true)?,
        policy_version: rule.policy_version,
        content_hash: rule.content_hash.clone(),
        rule: text("rule.rule", &rule.rule, true)?,
    };
    let requester = if caller.service && !r.requester.is_empty() {
        rules::principal_of(&text("requester", &r.requester, false)?)
    } else {
        caller.principal.clone()
    };
    let exclude = rules::parse_entries("exclude", &r.exclude, true)?;
    let mut barred = exclude.clone();
    barred.push(requester.clone());
    if r.stages.is_empty() {
        return Err(Error::invalid_argument("stages", "name at least one stage"));
    }
    if r.stages.len() > rules::MAX_STAGES {
        return Err(Error::invalid_argument(
            "stages",
            format!("at most {} stages", rules::MAX_STAGES),
        ));
    }
    let mut stages = Vec::with_capacity(r.stages.len());
    for (i, s) in r.stages.iter().enumerate() {
        let approvers =
            rules::parse_entries(&format!("stages[{i}].approvers"), &s.approvers, false)?;
        let quorum = rules::check_quorum(
            &format!("stages[{i}].quorum"),
            &approvers,
            s.quorum,
            &barred,
        )?;
        let name = if s.name.is_empty() {
            format!("stage-{}", i + 1)
        } else {
            text(&format!("stages[{i}].name"), &s.name, false)?
        };
        stages.push(Stage {
            name,
            approvers,
            quorum,
            approved_by: Vec::new(),
            approved: false,
            expire_at: None,
            escalated: false,
            delegates: Vec::new(),
            delegated_away: Vec::new(),
        });
    }
    let escalate_to = rules::parse_entries("escalate_to", &r.escalate_to, true)?;
    if let Some(bad) = escalate_to.iter().find(|e| barred.contains(e)) {
        return Err(Error::invalid_argument(
            "escalate_to",
            format!("{bad} may not decide this approval (requester or excluded)"),
        ));
    }
    let escalate_quorum = if escalate_to.is_empty() {
        1
    } else {
        rules::check_quorum(
            "escalate_quorum",
            &escalate_to,
            r.escalate_quorum.max(1),
            &barred,
        )?
    };
    let expires_after = duration_micros(
        "expires_after",
        r.expires_after.as_ref(),
        cfg.default_expiry_secs,
    )?;
    if expires_after <= 0 {
        return Err(Error::invalid_argument(
            "expires_after",
            "must be positive: the expiry would be in the past",
        ));
    }
    let remind_before = duration_micros(
        "remind_before",
        r.remind_before.as_ref(),
        cfg.remind_before_secs,
    )?;
    if remind_before < 0 {
        return Err(Error::invalid_argument(
            "remind_before",
            "must not be negative",
        ));
    }
    let args_preview = match &r.args_preview {
        None => None,
        Some(s) => {
            let json = serde_json::to_value(s).map_err(Error::internal)?;
            if json.to_string().len() > MAX_PREVIEW {
                return Err(Error::invalid_argument(
                    "args_preview",
                    format!("at most {MAX_PREVIEW} bytes of JSON"),
                ));
            }
            Some(json)
        }
    };
    if !(0..=100).contains(&r.risk_score) {
        return Err(Error::invalid_argument(
            "risk_score",
            "must be within 0-100",
        ));
    }
    Ok(Approval {
        id: uuid::Uuid::now_v7().to_string(),
        run_id,
        step_id,
        plan_hash,
        args_sha256,
        tool,
        destructive: r.destructive,
        rule,
        reason: text("reason", &r.reason, false)?,
        requester,
        exclude,
        capsule: text("capsule", &r.capsule, false)?,
        capsule_version: r.capsule_version.max(0),
        args_preview,
        risk_level: r.risk_level,
        risk_score: r.risk_score,
        stages,
        current: 0,
        status: Status::Pending,
        decisions: Vec::new(),
        escalate_to,
        escalate_quorum,
        expires_after,
        remind_before,
        timer_gen: 0,
        version: 1,
        created_at: now,
        decided_at: None,
    })
}

fn not_found(id: &str) -> Error {
    Error::because(Reason::ApprovalNotFound, format!("no approval {id:?}"))
}

/// Schedules the timers of `a`'s current stage (its generation).
pub(crate) async fn schedule(tx: &TenantTx, a: &Approval) -> Result<()> {
    let Some(expire_at) = a.expire_at() else {
        return Ok(());
    };
    repo::insert_timer(tx, &a.id, repo::EXPIRE, a.timer_gen, expire_at).await?;
    let remind_at = expire_at.saturating_sub(a.remind_before);
    // No reminder when the stage opens within the lead time.
    if a.remind_before > 0 && remind_at > a.decisions.last().map_or(a.created_at, |d| d.at) {
        repo::insert_timer(tx, &a.id, repo::REMIND, a.timer_gen, remind_at).await?;
    }
    Ok(())
}

/// Appends the event of `a`'s last decision, if it has one.
pub(crate) async fn append_event(tx: &TenantTx, a: &Approval) -> Result<()> {
    let ctx = || EventContext {
        subject: "",
        plan_hash: Some(&a.plan_hash),
        traceparent: None,
    };
    let subject = format!("approvals/{}", a.id);
    let ctx = EventContext {
        subject: &subject,
        ..ctx()
    };
    match convert::event_of_last(tx.tenant_id(), a) {
        None => {}
        Some(Event::Granted(e)) => drop(anumate_events::append(tx, &e, ctx).await?),
        Some(Event::Rejected(e)) => drop(anumate_events::append(tx, &e, ctx).await?),
        Some(Event::Delegated(e)) => drop(anumate_events::append(tx, &e, ctx).await?),
        Some(Event::Escalated(e)) => drop(anumate_events::append(tx, &e, ctx).await?),
        Some(Event::Expired(e)) => drop(anumate_events::append(tx, &e, ctx).await?),
        Some(Event::Cancelled(e)) => drop(anumate_events::append(tx, &e, ctx).await?),
    }
    Ok(())
}

impl Approvals {
    /// Broadcasts a committed change to in-process waiters.
    pub(crate) fn changed(&self, tenant: &str, a: &Approval) {
        // No receiver is fine: nobody waits.
        let _ = self.inner.changes.send(Change {
            tenant: tenant.to_owned(),
            approval_id: a.id.clone(),
            state: convert::state(a.status),
        });
    }

    /// Opens an approval, or returns the existing one of the same call
    /// (`false`).
    pub async fn request(
        &self,
        caller: &Caller,
        r: &pb::RequestApprovalRequest,
    ) -> Result<(pb::Approval, bool)> {
        let now = self.now();
        let mut a = new_approval(caller, r, &self.inner.cfg, now)?;
        a.reason = self.redact(&a.reason);
        a.open(now);
        let tx = self.inner.store.write(&caller.tenant).await?;
        if !repo::insert(&tx, &a).await? {
            let existing = repo::find_call(&tx, &a.run_id, &a.step_id, &a.args_sha256)
                .await?
                .ok_or_else(|| Error::internal("approval of the call vanished"))?;
            return Ok((convert::approval(&existing), false));
        }
        let subject = format!("approvals/{}", a.id);
        anumate_events::append(
            &tx,
            &convert::requested(&caller.tenant, &a),
            EventContext {
                subject: &subject,
                plan_hash: Some(&a.plan_hash),
                traceparent: None,
            },
        )
        .await?;
        schedule(&tx, &a).await?;
        let view = convert::approval(&a);
        notify::enqueue(&tx, &self.inner.cfg.notify, &view).await?;
        tx.commit().await?;
        self.changed(&caller.tenant, &a);
        Ok((view, true))
    }

    /// One approval with its history.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<pb::Approval> {
        Ok(convert::approval(&self.load(tenant, id).await?))
    }

    async fn load(&self, tenant: &str, id: &str) -> Result<Approval> {
        if id.is_empty() {
            return Err(Error::invalid_argument("approval_id", "required"));
        }
        repo::read(&self.inner.store, tenant, id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    /// A page of approvals, newest first, and the next page token.
    pub async fn list(
        &self,
        caller: &Caller,
        r: &pb::ListApprovalsRequest,
    ) -> Result<(Vec<pb::Approval>, String)> {
        if r.page_size < 0 {
            return Err(Error::invalid_argument("page_size", "must not be negative"));
        }
        let size = match r.page_size {
            0 => 50,
            n => n.min(MAX_PAGE),
        } as usize;
        let token = if r.page_token.is_empty() {
            None
        } else {
            uuid::Uuid::parse_str(&r.page_token)
                .map_err(|_| Error::invalid_argument("page_token", "malformed page token"))?;
            Some(r.page_token.as_str())
        };
        let state = if r.actionable_by_me {
            crate::repo::state_number(Status::Pending)
        } else {
            r.state
        };
        let tx = self.inner.store.read(&caller.tenant).await?;
        let mut out = Vec::new();
        let mut before = token.map(str::to_owned);
        let mut scanned = 0;
        loop {
            let batch = repo::list(
                &tx,
                &repo::Filter {
                    state,
                    run: &r.run_id,
                    before_id: before.as_deref(),
                    limit: i64::try_from(size + 1).unwrap_or(501),
                },
            )
            .await?;
            let exhausted = batch.len() <= size;
            for a in batch {
                if out.len() == size {
                    // One more exists: the page ends at the last one kept.
                    let last = out
                        .last()
                        .map(|x: &Approval| x.id.clone())
                        .unwrap_or_default();
                    return Ok((out.iter().map(convert::approval).collect(), last));
                }
                scanned += 1;
                before = Some(a.id.clone());
                if !r.actionable_by_me || a.actionable_by(caller.decider()) {
                    out.push(a);
                }
            }
            if exhausted {
                return Ok((out.iter().map(convert::approval).collect(), String::new()));
            }
            if scanned >= MAX_SCAN {
                // Stop scanning: the token resumes after the last examined.
                return Ok((
                    out.iter().map(convert::approval).collect(),
                    before.unwrap_or_default(),
                ));
            }
        }
    }

    /// Approves, rejects or delegates as `caller`.
    pub async fn decide(
        &self,
        caller: &Caller,
        id: &str,
        action: Action<'_>,
        comment: &str,
        etag: &str,
    ) -> Result<pb::Approval> {
        let d = caller.decider();
        let comment = &self.redact(comment);
        // A few rounds at most: a round is lost only to a concurrent decision
        // on the same approval.
        // Optimistically: decided on the approval as read, then stored (in
        // a group commit with the tenant's other decisions, see
        // [`crate::commit`]) only if no other change committed since (its
        // version is unchanged), else decided again on the fresh one. No row
        // lock is held while deciding and the approval is read once per
        // round.
        for _ in 0..8 {
            let now = self.now();
            let mut a = self.load(&caller.tenant, id).await?;
            let read = a.version;
            let effect = match rules::decide(&mut a, d, &action, comment, etag, now)? {
                Applied::Repeat => return Ok(convert::approval(&a)),
                Applied::Recorded(effect) => effect,
            };
            let receipt = self.receipt_first(&caller.tenant, &a).await?;
            // Signed here, on the caller's task, not in the batch.
            let prepared = match &self.inner.receipts {
                Some(r) if r.appends_in_transaction() => {
                    Some(receipting::prepare(r.as_ref(), &caller.tenant, &a)?)
                }
                _ => None,
            };
            let decided = Decided {
                a,
                read: Some(read),
                effect,
                receipt,
                prepared,
            };
            if let Some(a) = self.submit(&caller.tenant, decided).await? {
                return Ok(convert::approval(&a));
            }
        }
        Err(Error::new(
            anumate_errors::ErrorCode::Unavailable,
            "the approval is changing too fast; retry",
        ))
    }

    /// The receipt of `planned`'s last decision when it must be appended
    /// before the decision's transaction (a remote receipts service); `None`
    /// when it is appended inside that transaction, or not at all (no
    /// receipts service).
    pub(crate) async fn receipt_first(
        &self,
        tenant: &str,
        planned: &Approval,
    ) -> Result<Option<String>> {
        match &self.inner.receipts {
            Some(receipts) if !receipts.appends_in_transaction() => {
                receipting::append(receipts.as_ref(), tenant, planned)
                    .await
                    .map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Withdraws a pending approval (a no-op for a cancelled one).
    pub async fn cancel(&self, caller: &Caller, id: &str, reason: &str) -> Result<pb::Approval> {
        let reason = self.redact(&text("reason", reason, false)?);
        for _ in 0..8 {
            let now = self.now();
            let mut planned = self.load(&caller.tenant, id).await?;
            if !rules::cancel(&mut planned, &caller.principal, &reason, now)? {
                return Ok(convert::approval(&planned));
            }
            let receipt = self.receipt_first(&caller.tenant, &planned).await?;
            let tx = self.inner.store.write(&caller.tenant).await?;
            let mut a = repo::load(&tx, id, true)
                .await?
                .ok_or_else(|| not_found(id))?;
            if !rules::cancel(&mut a, &caller.principal, &reason, now)? {
                return Ok(convert::approval(&a));
            }
            if !same_last_decision(&planned, &a) {
                continue;
            }
            self.commit_locked(tx, &caller.tenant, &mut a, receipt, Effect::Cancelled)
                .await?;
            return Ok(convert::approval(&a));
        }
        Err(Error::new(
            anumate_errors::ErrorCode::Unavailable,
            "the approval is changing too fast; retry",
        ))
    }

    /// Waits until approval `id` of `tenant` is final and returns its
    /// outcome: woken in-process right after the deciding commit, and
    /// re-reading every second for decisions taken by other replicas.
    pub async fn wait(&self, tenant: &str, id: &str) -> Result<Outcome> {
        let mut changes = self.subscribe();
        loop {
            let a = self.load(tenant, id).await?;
            if a.status.is_final() {
                return Ok(Outcome {
                    state: convert::state(a.status),
                    approval: convert::approval(&a),
                });
            }
            let deadline = tokio::time::sleep(WAIT_POLL);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    change = changes.recv() => match change {
                        Ok(c) if c.tenant == tenant && c.approval_id == id => break,
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => {
                            return Err(Error::internal("the approvals service stopped"));
                        }
                    },
                }
            }
        }
    }
}

/// Whether the decision recorded on the fresh approval is the one that was
/// planned (and perhaps receipted first): the approval did not change in
/// between in a way that matters.
fn same_last_decision(planned: &Approval, fresh: &Approval) -> bool {
    match (planned.decisions.last(), fresh.decisions.last()) {
        (Some(p), Some(f)) => receipting::content(planned, p) == receipting::content(fresh, f),
        _ => false,
    }
}
