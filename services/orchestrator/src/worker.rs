//! Workers: lease due runs from the work queue and drive them, one journaled
//! change at a time.
//!
//! A worker re-reads the run and its steps before every action (one round
//! trip on PostgreSQL), rebuilds the
//! interpreter's view from the journal (succeeded steps replay their
//! recorded outputs), and takes the next action of the first ready step:
//! skip, fail (deny, expression error), open or follow an approval, or call
//! the tool. A call is journaled as a `RUNNING` attempt (with its token and
//! idempotency key) before it is sent; a worker that finds such an attempt
//! (its process died mid-call) re-sends it with the same key for an
//! idempotent tool, and otherwise marks it `OUTCOME_UNKNOWN` and the step
//! `NEEDS_ATTENTION`.
//!
//! Every change applies the worker's change to the run as stored, so a
//! concurrent pause, cancel or kill is never overwritten: a killed or ended
//! run stops the worker, a paused run keeps `PAUSED` (the worker's state goes
//! to `paused_from`). On PostgreSQL a change is first sent in one round trip
//! on the run as the worker last saw it, fenced on the run's sequence and
//! the worker's lease (`repo::save_fenced`); when anything else changed the run
//! since, nothing is written and the change is applied again after
//! re-reading the run under its lock.

use std::sync::Arc;
use std::time::Duration;

use anumate_auth::ServiceIssuer;
use anumate_engine::{Finished, Step};
use anumate_errors::{Error, ErrorCode, Reason, Result};
use anumate_policy::Effect;
use anumate_proto::approvals::v1 as apb;
use anumate_proto::captokens::v1 as capb;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::events::v1 as ev;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::receipts::v1 as rcpb;
use anumate_service::CancellationToken;
use anumate_service::clients::{Caller, UpstreamError, UpstreamResult};
use anumate_store::TenantTx;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tracing::Instrument as _;

use crate::{
    Orchestrator, SELF_ACTOR, Starter, event_ctx, is_terminal, now_micros, repo, step_is_done, ts,
};

/// How long a call may take when its step sets no timeout.
const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The captokens service over gRPC for what `CapTokensClient` does not
/// offer (revoking a run's tokens), as the orchestrator acting for the
/// run's starter.
#[derive(Clone)]
pub struct CapTokens {
    channel: Channel,
    issuer: Option<ServiceIssuer>,
}

impl CapTokens {
    /// A client over `channel`, presenting tokens of `issuer` (minting for
    /// `orchestrator`).
    pub fn new(channel: Channel, issuer: Option<ServiceIssuer>) -> CapTokens {
        CapTokens { channel, issuer }
    }

    fn request<T>(&self, caller: &Caller, msg: T) -> UpstreamResult<tonic::Request<T>> {
        let Caller::Delegated { principal, .. } = caller else {
            return Err(UpstreamError::Local(Error::internal(
                "captokens calls act for the run's starter",
            )));
        };
        let issuer = self.issuer.as_ref().ok_or_else(|| {
            UpstreamError::Local(Error::internal("the orchestrator has no service issuer"))
        })?;
        let token = issuer.token_for(principal)?;
        let mut req = tonic::Request::new(msg);
        anumate_service::trace::inject(req.metadata_mut());
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|e| UpstreamError::Local(Error::internal(e)))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }

    /// `RevokeToken` for every token of a run.
    pub async fn revoke_run(
        &self,
        caller: &Caller,
        run_id: &str,
        reason: &str,
    ) -> UpstreamResult<()> {
        let req = self.request(
            caller,
            capb::RevokeTokenRequest {
                target: Some(capb::revoke_token_request::Target::RunId(
                    run_id.to_string(),
                )),
                reason: if reason.is_empty() {
                    "the run ended".into()
                } else {
                    reason.to_string()
                },
            },
        )?;
        let mut c =
            capb::cap_tokens_service_client::CapTokensServiceClient::new(self.channel.clone());
        c.revoke_token(req).await.map_err(UpstreamError::Remote)?;
        Ok(())
    }
}

/// What the queue row of a run becomes after a change.
enum Work {
    Keep,
    Unschedule,
}

/// What driving a run did.
enum Next {
    /// Something changed; look again.
    Again,
    /// Nothing to do before this time.
    Wait(i64),
    /// The run ended or waits for a human.
    Stop,
}

/// An event a worker change emits.
enum Ev {
    Started(ev::StepStarted),
    Completed(ev::StepCompleted),
    Failed(ev::StepFailed),
    Waiting(ev::StepWaitingApproval),
    Attention(ev::StepNeedsAttention),
    RunCompleted(ev::RunCompleted),
    RunFailed(ev::RunFailed),
    RunCancelled(ev::RunCancelled),
    Compensated(ev::StepCompensated),
}

impl Ev {
    async fn append(&self, tx: &TenantTx, run_id: &str, plan_hash: &str) -> Result<()> {
        let ctx = event_ctx(run_id, plan_hash);
        let r = match self {
            Ev::Started(m) => anumate_events::append(tx, m, ctx).await,
            Ev::Completed(m) => anumate_events::append(tx, m, ctx).await,
            Ev::Failed(m) => anumate_events::append(tx, m, ctx).await,
            Ev::Waiting(m) => anumate_events::append(tx, m, ctx).await,
            Ev::Attention(m) => anumate_events::append(tx, m, ctx).await,
            Ev::RunCompleted(m) => anumate_events::append(tx, m, ctx).await,
            Ev::RunFailed(m) => anumate_events::append(tx, m, ctx).await,
            Ev::RunCancelled(m) => anumate_events::append(tx, m, ctx).await,
            Ev::Compensated(m) => anumate_events::append(tx, m, ctx).await,
        };
        r.map(|_| ()).map_err(Error::internal)
    }
}

/// What one save changes besides the run itself.
struct Save<'a> {
    step: Option<(usize, &'a pb::StepRun)>,
    kind: &'a str,
    message: &'a str,
    attempt: i32,
    events: &'a [Ev],
    work: Work,
}

/// The run as the process driving it last read or saved it.
pub(crate) type Known = Arc<tokio::sync::Mutex<Seen>>;

/// What the process driving a run knows of it.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// The run as last read or saved here (`None`: not known).
    run: Option<pb::Run>,
    /// How many saves re-read the run under its lock ([`Orchestrator::
    /// save_locked`]: the run was not as known, or not known): while this
    /// stays the same, every change since was this process's own fenced
    /// save, so the run is exactly as known.
    relocked: u64,
}

/// A pass's view of the run, carried to the next pass of the same drive
/// (which then reads nothing): the starter, the request and the steps as
/// the pass left them, valid while [`Seen::relocked`] is still `relocked`
/// (then the stored run and steps are the known run and these steps).
pub(crate) struct Carry {
    principal: crate::Starter,
    request: Value,
    steps: Vec<pb::StepRun>,
    relocked: u64,
}

/// Writes one change of `run` (as stored when `tx` began, or, with
/// `fence`, as this process last saw it) into `tx`: `f`, the step, the
/// journal entries, the events and the queue.
async fn apply(
    tx: &TenantTx,
    run: &mut pb::Run,
    f: &impl Fn(&mut pb::Run),
    c: &Save<'_>,
    fence: Option<Fence<'_>>,
) -> Result<()> {
    let run_id = run.run_id.clone();
    let seen = run.sequence;
    let paused = run.state == pb::RunState::Paused as i32;
    let before = run.state;
    f(run);
    if paused && !is_terminal(run.state) && run.state != pb::RunState::Paused as i32 {
        run.paused_from = run.state;
        run.state = pb::RunState::Paused as i32;
    }
    // A step change streams only the step: journal the run's own state
    // change first, so `WatchRun` shows the run leave PENDING.
    let mut entries = Vec::with_capacity(2);
    if c.step.is_some() && run.state != before {
        let kind = if run.state == pb::RunState::Running as i32 {
            "run.running"
        } else {
            "run.state_changed"
        };
        entries.push(crate::journal_entry(run, None, kind, SELF_ACTOR, "", 0));
    }
    entries.push(crate::journal_entry(
        run,
        c.step.map(|(_, s)| s),
        c.kind,
        SELF_ACTOR,
        c.message,
        c.attempt,
    ));
    // The run is saved once, at its last sequence: fenced, first (it locks
    // the run, so concurrent saves of one run queue behind each other).
    match fence {
        Some(fence) => repo::save_fenced(tx, run, fence.owner, fence.until, seen).await?,
        None => repo::update_run(tx, run).await?,
    }
    if let Some((i, s)) = c.step {
        repo::put_step(tx, &run_id, i, s).await?;
    }
    for entry in &entries {
        entry.append(tx, &run_id).await?;
    }
    for e in c.events {
        e.append(tx, &run_id, &run.plan_hash).await?;
    }
    match c.work {
        Work::Keep => {}
        Work::Unschedule => repo::unschedule(tx, &run_id).await?,
    }
    Ok(())
}

/// The lease a fenced save holds and extends.
#[derive(Clone, Copy)]
struct Fence<'a> {
    owner: &'a str,
    until: i64,
}

/// The run ended or was killed under the worker: stop driving it.
fn stopped() -> Error {
    Error::because(Reason::RunTerminal, "the run ended under the worker")
}

fn failure(
    kind: pb::FailureKind,
    code: &str,
    message: &str,
    retryable: bool,
    step: &str,
) -> pb::Failure {
    pb::Failure {
        kind: kind as i32,
        code: code.to_string(),
        message: message.chars().take(2048).collect(),
        retryable,
        step_id: step.to_string(),
    }
}

fn duration_pb(micros: i64) -> Option<pbjson_types::Duration> {
    let micros = micros.max(0);
    Some(pbjson_types::Duration {
        seconds: micros / 1_000_000,
        nanos: i32::try_from((micros % 1_000_000) * 1000).unwrap_or(0),
    })
}

fn micros_of(t: &Option<pbjson_types::Timestamp>) -> i64 {
    t.as_ref()
        .map(anumate_proto::micros_from_timestamp_saturating)
        .unwrap_or(0)
}

impl Orchestrator {
    /// The worker pool: claims due runs and drives up to `workers` at once
    /// until `cancel`, then waits for the runs in hand.
    pub async fn run_workers(&self, cancel: CancellationToken) {
        let workers = self.inner.cfg.workers.max(1);
        let slots = Arc::new(tokio::sync::Semaphore::new(workers));
        let poll = Duration::from_millis(self.inner.cfg.poll_ms.max(10));
        loop {
            if cancel.is_cancelled() {
                break;
            }
            let free = slots.available_permits();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match self.claim(free).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "orchestrator: claiming work failed");
                        Vec::new()
                    }
                }
            };
            let idle = claimed.is_empty();
            for (tenant, run_id) in claimed {
                let key = (tenant.clone(), run_id.clone());
                let fresh = self
                    .inner
                    .driving
                    .lock()
                    .map(|mut d| d.insert(key.clone()))
                    .unwrap_or(false);
                if !fresh {
                    // Already driven here (its lease ran out mid-call): leave it.
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let this = self.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    this.drive_logged(&tenant, &run_id, &cancel).await;
                    if let Ok(mut d) = this.inner.driving.lock() {
                        d.remove(&key);
                    }
                    drop(permit);
                });
            }
            if idle || slots.available_permits() == 0 {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = self.inner.wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
        }
        let all = u32::try_from(workers).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(10), slots.acquire_many(all)).await;
    }

    async fn claim(&self, limit: usize) -> Result<Vec<(String, String)>> {
        let now = now_micros();
        let until = now + self.lease_micros();
        let tx = self.inner.store.system_write().await?;
        let got = repo::claim(
            &tx,
            &self.inner.worker_id,
            now,
            until,
            i64::try_from(limit).unwrap_or(64),
        )
        .await?;
        tx.commit().await?;
        Ok(got)
    }

    fn lease_micros(&self) -> i64 {
        i64::try_from(self.inner.cfg.lease_secs.max(1)).unwrap_or(30) * 1_000_000
    }

    async fn set_lease(&self, tenant: &str, run_id: &str, until: i64) -> Result<()> {
        let tx = self.inner.store.system_write().await?;
        repo::set_lease(&tx, tenant, run_id, &self.inner.worker_id, until).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn drive_logged(&self, tenant: &str, run_id: &str, cancel: &CancellationToken) {
        // Heartbeats keep the lease while a call takes long.
        let beat = {
            let this = self.clone();
            let (tenant, run_id) = (tenant.to_string(), run_id.to_string());
            let every =
                Duration::from_micros(u64::try_from(self.lease_micros() / 3).unwrap_or(1_000_000));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let until = now_micros() + this.lease_micros();
                    if let Err(e) = this.set_lease(&tenant, &run_id, until).await {
                        tracing::warn!(error = %e, "orchestrator: lease heartbeat failed");
                    }
                }
            })
        };
        let key = (tenant.to_string(), run_id.to_string());
        if let Ok(mut known) = self.inner.known.lock() {
            known.insert(key.clone(), Known::default());
        }
        let result = self.drive(tenant, run_id, cancel).await;
        if let Ok(mut known) = self.inner.known.lock() {
            known.remove(&key);
        }
        beat.abort();
        self.take_nudge(tenant, run_id);
        let retry_at = match &result {
            Ok(()) => None,
            Err(e) if e.reason == Reason::RunTerminal => None,
            Err(e) => {
                tracing::warn!(tenant, run = run_id, error = %e, "orchestrator: driving a run failed; retried later");
                Some(now_micros() + 1_000_000)
            }
        };
        if let Some(at) = retry_at
            && let Ok(tx) = self.inner.store.write(tenant).await
            && repo::reschedule(&tx, run_id, at).await.is_ok()
        {
            let _ = tx.commit().await;
        }
        if let Err(e) = self.set_lease(tenant, run_id, 0).await {
            tracing::warn!(tenant, run = run_id, error = %e, "orchestrator: releasing a lease failed");
        }
    }

    async fn drive(&self, tenant: &str, run_id: &str, cancel: &CancellationToken) -> Result<()> {
        let mut carry = None;
        loop {
            if cancel.is_cancelled() {
                return Ok(());
            }
            // The lease is kept by the heartbeat and extended by every
            // save (`repo::hold_lease`): a pass commits nothing for it.
            match self.advance(tenant, run_id, &mut carry).await? {
                Next::Again => {}
                Next::Stop => return Ok(()),
                Next::Wait(at) => {
                    let tx = self.inner.store.write(tenant).await?;
                    repo::reschedule(&tx, run_id, at).await?;
                    tx.commit().await?;
                    // A nudge during this pass was overwritten just now: look again.
                    if self.take_nudge(tenant, run_id) {
                        continue;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Saves one change: applies `f` to the run, saves `step`, journals
    /// the change, appends `events` and updates the queue, in one
    /// transaction fenced by the worker's lease.
    ///
    /// While this process drives the run it knows the run as last read or
    /// saved here; on PostgreSQL the save then goes in one round trip
    /// ([`repo::save_fenced`]: it commits only if the run is still at that
    /// sequence). Otherwise (or when something else changed the run: a
    /// control call, say) it re-reads the run under its lock first.
    #[allow(clippy::too_many_arguments)]
    async fn save(
        &self,
        tenant: &str,
        run_id: &str,
        f: impl Fn(&mut pb::Run),
        step: Option<(usize, &pb::StepRun)>,
        kind: &str,
        message: &str,
        attempt: i32,
        events: Vec<Ev>,
        work: Work,
    ) -> Result<pb::Run> {
        let change = Save {
            step,
            kind,
            message,
            attempt,
            events: &events,
            work,
        };
        let slot = self.known(tenant, run_id);
        let mut known = match &slot {
            Some(slot) => Some(slot.lock().await),
            None => None,
        };
        let seen = known.as_ref().and_then(|k| k.run.clone());
        if let Some(seen) = seen
            && self.inner.store.backend() == anumate_store::Backend::Postgres
            && let Some(run) = self.save_fenced(tenant, seen, &f, &change).await?
        {
            if let Some(k) = known.as_mut() {
                k.run = Some(run.clone());
            }
            self.notify_changed(tenant, run_id);
            return Ok(run);
        }
        let saved = self.save_locked(tenant, run_id, &f, &change).await;
        if let Some(k) = known.as_mut() {
            k.run = saved.as_ref().ok().cloned();
            k.relocked += 1;
        }
        let run = saved?;
        self.notify_changed(tenant, run_id);
        Ok(run)
    }

    /// [`Orchestrator::save`] on the run as this process last knew it, in
    /// one round trip; `None` when the fence refused it (nothing written).
    async fn save_fenced(
        &self,
        tenant: &str,
        mut run: pb::Run,
        f: &impl Fn(&mut pb::Run),
        change: &Save<'_>,
    ) -> Result<Option<pb::Run>> {
        if is_terminal(run.state) {
            return Err(stopped());
        }
        let tx = self.inner.store.write_deferred(tenant).await?;
        let until = now_micros() + self.lease_micros();
        let fence = Fence {
            owner: &self.inner.worker_id,
            until,
        };
        apply(&tx, &mut run, f, change, Some(fence)).await?;
        match tx.commit().await {
            Ok(()) => Ok(Some(run)),
            Err(e) if e.to_string().contains(repo::STALE) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// [`Orchestrator::save`] after re-reading the run under its lock.
    async fn save_locked(
        &self,
        tenant: &str,
        run_id: &str,
        f: &impl Fn(&mut pb::Run),
        change: &Save<'_>,
    ) -> Result<pb::Run> {
        let tx = self.inner.store.write(tenant).await?;
        let mut run = repo::get_run(&tx, run_id, true)
            .await?
            .ok_or_else(stopped)?
            .run;
        if is_terminal(run.state) {
            return Err(stopped());
        }
        // Fencing: another worker took the run over (this lease expired).
        // Holding it extends the lease too (no separate commit per pass).
        let until = now_micros() + self.lease_micros();
        if !repo::hold_lease(&tx, run_id, &self.inner.worker_id, until).await? {
            tracing::warn!(
                tenant,
                run = run_id,
                "orchestrator: lost the lease; stopping"
            );
            return Err(stopped());
        }
        apply(&tx, &mut run, f, change, None).await?;
        tx.commit().await?;
        Ok(run)
    }

    /// The run as this process last read or saved it while driving it
    /// (`None` inside: not known; no slot: not driven here).
    fn known(&self, tenant: &str, run_id: &str) -> Option<Known> {
        let known = self.inner.known.lock().ok()?;
        known
            .get(&(tenant.to_string(), run_id.to_string()))
            .cloned()
    }

    /// The token request for one call of `tool` with exactly these
    /// arguments, for the run's starter, living about as long as the call
    /// may take (1 to 5 minutes).
    #[allow(clippy::too_many_arguments)]
    fn token_request(
        &self,
        subject: &str,
        run_id: &str,
        plan_hash: &str,
        step_id: &str,
        tool: &str,
        args_sha256: &str,
        timeout: Duration,
        single_use: bool,
    ) -> capb::IssueTokenRequest {
        capb::IssueTokenRequest {
            audience: self.inner.cfg.token_audience.clone(),
            subject: subject.to_string(),
            run_id: run_id.to_string(),
            step_id: step_id.to_string(),
            plan_hash: plan_hash.to_string(),
            args_sha256: args_sha256.to_string(),
            capability: Some(capb::Capability {
                tool: tool.to_string(),
                actions: vec!["call".into()],
                constraints: None,
            }),
            ttl: Some(pbjson_types::Duration {
                seconds: i64::try_from(timeout.as_secs())
                    .unwrap_or(240)
                    .clamp(60, 300),
                nanos: 0,
            }),
            single_use,
        }
    }

    /// One action on the run: a pass over the run as stored, or, when the
    /// previous pass of this drive left `carry` and every change since was
    /// this process's own fenced save, over the run as known here (no read:
    /// it is what is stored). The view may be stale by as much as a read's
    /// would be by the time the pass saves: a change made meanwhile (a
    /// control call) fails the pass's fenced save, which then re-reads the
    /// run under its lock, as after a read.
    async fn advance(&self, tenant: &str, run_id: &str, carry: &mut Option<Carry>) -> Result<Next> {
        let slot = self.known(tenant, run_id);
        let carried = carry.take();
        let mut view = None;
        let mut relocked = 0;
        if let Some(slot) = &slot {
            let seen = slot.lock().await;
            relocked = seen.relocked;
            if let Some(c) = carried
                && c.relocked == seen.relocked
                && let Some(run) = &seen.run
            {
                let row = repo::RunRow {
                    run: run.clone(),
                    request: c.request,
                    principal: c.principal,
                };
                view = Some((row, c.steps));
            }
        }
        let (row, steps) = match view {
            Some(v) => v,
            None => {
                let Some((row, steps)) =
                    repo::run_and_steps(&self.inner.store, tenant, run_id).await?
                else {
                    return Ok(Next::Stop);
                };
                if let Some(slot) = &slot {
                    slot.lock().await.run = Some(row.run.clone());
                }
                (row, steps)
            }
        };
        // The pass joins the trace of the call that started the run, however
        // long ago: its calls upstream, receipts and events belong to it.
        let span = tracing::info_span!("run_pass", tenant, run = run_id);
        anumate_telemetry::continue_trace(&span, row.principal.traceparent.as_deref());
        let next = self
            .pass(tenant, run_id, row, steps)
            .instrument(span)
            .await?;
        if let (Next::Again, Some(c)) = (&next.0, next.1) {
            *carry = Some(Carry { relocked, ..c });
        }
        Ok(next.0)
    }

    /// One pass over a run as [`Orchestrator::advance`] read (or carried) it;
    /// with `Next::Again`, the view the next pass may carry.
    async fn pass(
        &self,
        tenant: &str,
        run_id: &str,
        row: repo::RunRow,
        mut steps: Vec<pb::StepRun>,
    ) -> Result<(Next, Option<Carry>)> {
        let run = row.run;
        let starter = row.principal;
        if is_terminal(run.state) || run.state == pb::RunState::Paused as i32 {
            let tx = self.inner.store.write_deferred(tenant).await?;
            repo::unschedule(&tx, run_id).await?;
            tx.commit().await?;
            return Ok((Next::Stop, None));
        }
        if run.cancel_requested {
            self.finish_cancel(tenant, &starter, run, steps).await?;
            return Ok((Next::Stop, None));
        }
        let now = now_micros();
        if run.deadline.is_some() && micros_of(&run.deadline) <= now {
            let f = failure(
                pb::FailureKind::Timeout,
                "RUN_TIMEOUT",
                "the run did not end before its deadline",
                false,
                "",
            );
            self.fail_run(tenant, &starter, &run, &mut steps, f).await?;
            return Ok((Next::Stop, None));
        }
        if let Some(s) = steps
            .iter()
            .find(|s| s.state == pb::StepState::Failed as i32)
        {
            let f = s.failure.clone().unwrap_or_else(|| {
                failure(
                    pb::FailureKind::Internal,
                    "",
                    "the step failed",
                    false,
                    &s.step_id,
                )
            });
            self.fail_run(tenant, &starter, &run, &mut steps, f).await?;
            return Ok((Next::Stop, None));
        }
        if steps
            .iter()
            .any(|s| s.state == pb::StepState::NeedsAttention as i32)
        {
            let tx = self.inner.store.write_deferred(tenant).await?;
            repo::unschedule(&tx, run_id).await?;
            tx.commit().await?;
            return Ok((Next::Stop, None));
        }

        let created_at = micros_of(&run.create_time);
        let (plan, engine) = self.engine(&starter, &run.plan_hash, created_at).await?;
        let inputs = match &run.inputs {
            Some(s) => anumate_engine::json::struct_json(s).map_err(Error::internal)?,
            None => json!({}),
        };
        let mut er = engine
            .start(&inputs)
            .map_err(|v| Error::internal(format!("stored inputs no longer match: {v:?}")))?;
        // Replay what the journal says happened.
        loop {
            let mut progressed = false;
            for i in er.ready() {
                let Some(s) = steps.get(i) else { continue };
                let state = pb::StepState::try_from(s.state).unwrap_or(pb::StepState::Unspecified);
                let result = match state {
                    pb::StepState::Succeeded
                    | pb::StepState::Compensating
                    | pb::StepState::Compensated
                    | pb::StepState::CompensationFailed => Some(Finished::Succeeded(
                        s.output
                            .as_ref()
                            .map(|v| anumate_engine::json::value_json(v, 0))
                            .transpose()
                            .map_err(Error::internal)?
                            .unwrap_or(Value::Null),
                    )),
                    pb::StepState::Failed | pb::StepState::Cancelled | pb::StepState::Skipped => {
                        Some(Finished::Failed)
                    }
                    _ => None,
                };
                if let Some(result) = result {
                    let d = er.decide(i).map_err(Error::internal)?;
                    if matches!(d, Step::Call { .. }) {
                        er.finish(i, result).map_err(Error::internal)?;
                    }
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        let ready = er.ready();
        if ready.is_empty() {
            if er.is_done() {
                self.complete_run(tenant, &starter, &run, &steps).await?;
                return Ok((Next::Stop, None));
            }
            // Steps in flight elsewhere (cannot happen under the lease): look later.
            return Ok((Next::Wait(now + 1_000_000), None));
        }
        // Every ready step acts in this pass, at most `max_parallel_steps`
        // of them at once (steps waiting for an approval only look at it and
        // take no slot); a step waiting to retry is left until its time.
        let limit = self.inner.cfg.max_parallel_steps.max(1);
        let mut wait = i64::MAX;
        let mut acts = Vec::new();
        let mut busy = 0;
        for i in ready {
            let Some(s) = steps.get(i) else { continue };
            if s.state == pb::StepState::WaitingRetry as i32
                && micros_of(&s.next_attempt_time) > now
            {
                wait = wait.min(micros_of(&s.next_attempt_time));
                continue;
            }
            let waits = s.state == pb::StepState::WaitingApproval as i32;
            if !waits {
                if busy >= limit {
                    // Over the bound: acts in a later pass.
                    continue;
                }
                busy += 1;
            }
            acts.push((i, er.decide(i).map_err(Error::internal)?));
        }
        let single = acts.len() == 1;
        let results = if single {
            let mut out = Vec::with_capacity(1);
            for (i, decided) in acts {
                out.push(
                    self.step_action(tenant, &starter, &run, &plan, &mut steps, i, decided)
                        .await,
                );
            }
            out
        } else {
            // Siblings run concurrently, each on its own copy of the steps
            // (a step action changes only its own step; every save re-reads
            // the run under its lock). All of them finish before the next
            // pass: a failing step lets the calls of its siblings end, and
            // that pass then fails the run (nothing new starts).
            let (starter, run, plan, steps) = (&starter, &run, &plan, &steps);
            futures::future::join_all(acts.into_iter().map(|(i, decided)| async move {
                let mut own = steps.clone();
                self.step_action(tenant, starter, run, plan, &mut own, i, decided)
                    .await
            }))
            .await
        };
        let mut again = false;
        let mut stop = false;
        let mut first_err = None;
        for r in results {
            match r {
                Ok(Next::Again) => again = true,
                Ok(Next::Wait(t)) => wait = wait.min(t),
                Ok(Next::Stop) => stop = true,
                Err(e) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if again {
            // One step acted on `steps` (siblings acted on copies): the
            // next pass may start from them.
            let carry = single.then(|| Carry {
                principal: starter,
                request: row.request,
                steps,
                relocked: 0,
            });
            return Ok((Next::Again, carry));
        }
        if wait == i64::MAX {
            if stop {
                return Ok((Next::Stop, None));
            }
            return Ok((Next::Wait(now + 1_000_000), None));
        }
        Ok((Next::Wait(wait), None))
    }

    /// The next action of ready step `i`.
    #[allow(clippy::too_many_arguments)]
    async fn step_action(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        plan: &cpb::ExecutablePlan,
        steps: &mut [pb::StepRun],
        i: usize,
        decided: Step,
    ) -> Result<Next> {
        let now = now_micros();
        let run_id = run.run_id.as_str();
        let (args, args_sha256, decision) = match decided {
            Step::SkippedByCondition | Step::SkippedUpstream { .. } => {
                let why = match &decided {
                    Step::SkippedUpstream { upstream } => {
                        format!("step {upstream:?} did not succeed")
                    }
                    _ => "its condition is false".to_string(),
                };
                let s = &mut steps[i];
                s.state = pb::StepState::Skipped as i32;
                s.state_reason = why.clone();
                s.end_time = ts(now);
                self.save(
                    tenant,
                    run_id,
                    |_| {},
                    Some((i, &*s)),
                    "step.skipped",
                    &why,
                    0,
                    vec![],
                    Work::Keep,
                )
                .await?;
                return Ok(Next::Again);
            }
            Step::ExpressionError { path, message } => {
                let msg = format!("{path}: {message}");
                let f = failure(
                    pb::FailureKind::ExpressionError,
                    "",
                    &msg,
                    false,
                    &steps[i].step_id,
                );
                self.fail_step(tenant, starter, run, steps, i, f, 0, "")
                    .await?;
                return Ok(Next::Again);
            }
            Step::Call {
                args,
                args_sha256,
                decision,
            } => (args, args_sha256, decision),
        };
        let tool = steps[i].tool.clone();
        let step_id = steps[i].step_id.clone();
        let redacted_args = anumate_ghostrun::report::redact(&args, &decision.redactions);
        match decision.effect {
            Effect::Deny => {
                let why = decision
                    .rules
                    .iter()
                    .flat_map(|r| r.reasons.iter().cloned())
                    .next()
                    .unwrap_or_else(|| "a policy denied the call".into());
                let code = if decision.rules.iter().any(|r| r.set.is_none()) {
                    "TOOL_NOT_ALLOWED"
                } else {
                    "POLICY_DENIED"
                };
                let receipt = self
                    .receipt(
                        starter,
                        run,
                        &step_id,
                        0,
                        &[],
                        json!({"tool": tool, "args_sha256": args_sha256, "outcome": "denied", "reason": why}),
                        &format!("step:{run_id}:{step_id}:denied"),
                    )
                    .await?;
                let f = failure(pb::FailureKind::PolicyDenied, code, &why, false, &step_id);
                self.fail_step(tenant, starter, run, steps, i, f, 0, &receipt)
                    .await?;
                return Ok(Next::Again);
            }
            Effect::RequireApproval => {
                match self
                    .approval(
                        tenant,
                        starter,
                        run,
                        plan,
                        steps,
                        i,
                        &args_sha256,
                        &redacted_args,
                        &decision,
                    )
                    .await?
                {
                    None => {}
                    Some(next) => return Ok(next),
                }
            }
            Effect::Allow => {}
        }
        self.call(
            tenant,
            starter,
            run,
            plan,
            steps,
            i,
            &args,
            &args_sha256,
            &redacted_args,
            &decision,
        )
        .await
    }

    /// Opens or follows the step's approval: `None` when it is granted.
    #[allow(clippy::too_many_arguments)]
    async fn approval(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        plan: &cpb::ExecutablePlan,
        steps: &mut [pb::StepRun],
        i: usize,
        args_sha256: &str,
        redacted_args: &Value,
        decision: &anumate_engine::StepDecision,
    ) -> Result<Option<Next>> {
        let caller = starter.caller();
        let now = now_micros();
        let poll = now + i64::try_from(self.inner.cfg.approval_poll_ms).unwrap_or(500) * 1000;
        let run_id = run.run_id.as_str();
        let step_id = steps[i].step_id.clone();
        if let Some(id) = steps[i].approval_ids.last().cloned() {
            let a = self
                .inner
                .up
                .approvals
                .get_approval(
                    &caller,
                    apb::GetApprovalRequest {
                        approval_id: id.clone(),
                    },
                )
                .await
                .map_err(|e| e.to_error())?
                .approval
                .ok_or_else(|| Error::internal("the approvals service sent no approval"))?;
            if a.state == apb::ApprovalState::Pending as i32 {
                self.await_approval(&id, tenant, run_id);
            } else {
                self.forget_approval(&id);
            }
            let (kind, code) = match apb::ApprovalState::try_from(a.state) {
                Ok(apb::ApprovalState::Approved) => {
                    if a.args_sha256 == args_sha256 {
                        return Ok(None);
                    }
                    (pb::FailureKind::Internal, "APPROVAL_ARGS_MISMATCH")
                }
                Ok(apb::ApprovalState::Pending) => {
                    // A sibling's call set the run RUNNING meanwhile: it
                    // waits again once nothing else runs.
                    if steps[i].state != pb::StepState::WaitingApproval as i32
                        || run.state == pb::RunState::Running as i32
                    {
                        let s = &mut steps[i];
                        s.state = pb::StepState::WaitingApproval as i32;
                        self.save(
                            tenant,
                            run_id,
                            |r| r.state = pb::RunState::WaitingApproval as i32,
                            Some((i, &*s)),
                            "step.waiting_approval",
                            "",
                            0,
                            vec![],
                            Work::Keep,
                        )
                        .await?;
                    }
                    return Ok(Some(Next::Wait(poll)));
                }
                Ok(apb::ApprovalState::Rejected) => {
                    (pb::FailureKind::ApprovalRejected, "APPROVAL_REJECTED")
                }
                Ok(apb::ApprovalState::Expired) => {
                    (pb::FailureKind::ApprovalExpired, "APPROVAL_EXPIRED")
                }
                _ => (pb::FailureKind::ApprovalRejected, "APPROVAL_CANCELLED"),
            };
            let f = failure(
                kind,
                code,
                &format!("approval {id} was not granted ({code})"),
                false,
                &step_id,
            );
            self.fail_step(tenant, starter, run, steps, i, f, 0, "")
                .await?;
            return Ok(Some(Next::Again));
        }
        let Some(need) = decision.approvals.first() else {
            let f = failure(
                pb::FailureKind::Internal,
                "",
                "approval required without approvers",
                false,
                &step_id,
            );
            self.fail_step(tenant, starter, run, steps, i, f, 0, "")
                .await?;
            return Ok(Some(Next::Again));
        };
        let pref = plan.policies.get(need.set);
        let binding = plan.tool_bindings.iter().find(|b| b.tool == steps[i].tool);
        let request = apb::RequestApprovalRequest {
            run_id: run_id.to_string(),
            step_id: step_id.clone(),
            plan_hash: run.plan_hash.clone(),
            args_sha256: args_sha256.to_string(),
            tool: steps[i].tool.clone(),
            destructive: binding
                .is_some_and(|b| b.side_effect == cpb::SideEffect::Destructive as i32),
            rule: Some(ppb::PolicyRuleRef {
                policy: need.policy.clone(),
                policy_version: pref.map_or(0, |p| p.version),
                content_hash: pref.map(|p| p.content_hash.clone()).unwrap_or_default(),
                rule: need.rule.clone(),
                span: None,
            }),
            reason: need.reason.clone().unwrap_or_default(),
            requester: starter.subject.clone(),
            stages: need
                .stages
                .iter()
                .map(|s| apb::StageRequest {
                    name: s.name.clone(),
                    approvers: s.approvers.clone(),
                    quorum: s.quorum,
                })
                .collect(),
            capsule: run.capsule_name.clone(),
            capsule_version: run.capsule_version,
            args_preview: Some(anumate_engine::json::to_struct(redacted_args)),
            ..Default::default()
        };
        let a = self
            .inner
            .up
            .approvals
            .request_approval(&caller, request)
            .await
            .map_err(|e| e.to_error())?
            .approval
            .ok_or_else(|| Error::internal("the approvals service sent no approval"))?;
        self.await_approval(&a.approval_id, tenant, run_id);
        let s = &mut steps[i];
        s.approval_ids.push(a.approval_id.clone());
        s.state = pb::StepState::WaitingApproval as i32;
        let event = Ev::Waiting(ev::StepWaitingApproval {
            tenant_id: tenant.to_string(),
            run_id: run_id.to_string(),
            plan_hash: run.plan_hash.clone(),
            step_id: step_id.clone(),
            tool: s.tool.clone(),
            args_sha256: args_sha256.to_string(),
            approval_id: a.approval_id.clone(),
            actor: starter.subject.clone(),
        });
        self.save(
            tenant,
            run_id,
            |r| {
                r.state = pb::RunState::WaitingApproval as i32;
                if r.start_time.is_none() {
                    r.start_time = ts(now);
                }
            },
            Some((i, &*s)),
            "step.waiting_approval",
            &format!("approval {} opened", a.approval_id),
            0,
            vec![event],
            Work::Keep,
        )
        .await?;
        Ok(Some(Next::Wait(poll)))
    }

    /// Calls the tool of step `i` (the decision allows it).
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        plan: &cpb::ExecutablePlan,
        steps: &mut [pb::StepRun],
        i: usize,
        args: &Value,
        args_sha256: &str,
        redacted_args: &Value,
        decision: &anumate_engine::StepDecision,
    ) -> Result<Next> {
        let caller = starter.caller();
        let run_id = run.run_id.as_str();
        let step_id = steps[i].step_id.clone();
        let tool = steps[i].tool.clone();
        let key = format!("{run_id}/{step_id}");
        let binding = plan.tool_bindings.iter().find(|b| b.tool == tool);
        let idempotent = binding.is_some_and(|b| b.idempotent);
        let single_use = binding.is_none_or(|b| b.side_effect != cpb::SideEffect::Read as i32);
        let in_flight = steps[i]
            .attempts
            .last()
            .is_some_and(|a| a.state == pb::AttemptState::Running as i32);
        if in_flight && !idempotent {
            let s = &mut steps[i];
            let n = s.attempts.len();
            if let Some(a) = s.attempts.last_mut() {
                a.state = pb::AttemptState::OutcomeUnknown as i32;
                a.end_time = ts(now_micros());
            }
            let why = format!(
                "the process died while attempt {n} of {tool} was in flight and {tool} is not idempotent: check the target system, then resolve the step"
            );
            s.state = pb::StepState::NeedsAttention as i32;
            s.state_reason = why.clone();
            let event = Ev::Attention(ev::StepNeedsAttention {
                tenant_id: tenant.to_string(),
                run_id: run_id.to_string(),
                plan_hash: run.plan_hash.clone(),
                step_id: step_id.clone(),
                tool: tool.clone(),
                attempt: i32::try_from(n).unwrap_or(i32::MAX),
                idempotency_key: key.clone(),
                reason: why.clone(),
                actor: SELF_ACTOR.into(),
            });
            self.save(
                tenant,
                run_id,
                |_| {},
                Some((i, &*s)),
                "step.needs_attention",
                &why,
                i32::try_from(n).unwrap_or(i32::MAX),
                vec![event],
                Work::Unschedule,
            )
            .await?;
            return Ok(Next::Stop);
        }
        let step_def = plan.steps.get(i);
        let timeout = attempt_timeout(step_def.and_then(|s| s.timeout.as_ref()));
        let issued = self
            .inner
            .up
            .tokens
            .issue(
                &caller,
                self.token_request(
                    &starter.subject,
                    run_id,
                    &run.plan_hash,
                    &step_id,
                    &tool,
                    args_sha256,
                    timeout,
                    single_use,
                ),
            )
            .await;
        let issued = match issued {
            Ok(t) => t,
            Err(e) if e.code() == tonic::Code::Unavailable => {
                tracing::warn!(run = run_id, step = %step_id, error = %e, "captokens unavailable; retrying");
                return Ok(Next::Wait(now_micros() + 1_000_000));
            }
            Err(e) => {
                let f = failure(
                    pb::FailureKind::TokenRejected,
                    "TOKEN_NOT_ISSUED",
                    &e.message(),
                    false,
                    &step_id,
                );
                self.fail_step(tenant, starter, run, steps, i, f, 0, "")
                    .await?;
                return Ok(Next::Again);
            }
        };
        let jti = issued
            .claims
            .as_ref()
            .map(|c| c.jti.clone())
            .unwrap_or_default();
        let started = now_micros();
        let attempt_no;
        {
            let s = &mut steps[i];
            if in_flight {
                if let Some(a) = s.attempts.last_mut() {
                    a.token_jti = jti.clone();
                    a.lease_holder = self.inner.worker_id.clone();
                }
                attempt_no = i32::try_from(s.attempts.len()).unwrap_or(i32::MAX);
                s.state_reason.clear();
            } else {
                attempt_no = i32::try_from(s.attempts.len() + 1).unwrap_or(i32::MAX);
                s.attempts.push(pb::StepAttempt {
                    attempt: attempt_no,
                    state: pb::AttemptState::Running as i32,
                    args_sha256: args_sha256.to_string(),
                    args: Some(anumate_engine::json::to_struct(redacted_args)),
                    decision: Some(decision_pb(plan, decision)),
                    token_jti: jti.clone(),
                    start_time: ts(started),
                    idempotency_key: key.clone(),
                    lease_holder: self.inner.worker_id.clone(),
                    kind: pb::AttemptKind::Call as i32,
                    ..Default::default()
                });
            }
            s.state = pb::StepState::Running as i32;
            s.next_attempt_time = None;
            if s.start_time.is_none() {
                s.start_time = ts(started);
            }
            let event = Ev::Started(ev::StepStarted {
                tenant_id: tenant.to_string(),
                run_id: run_id.to_string(),
                plan_hash: run.plan_hash.clone(),
                step_id: step_id.clone(),
                tool: tool.clone(),
                attempt: attempt_no,
                args_sha256: args_sha256.to_string(),
                token_jti: jti.clone(),
                actor: starter.subject.clone(),
            });
            self.save(
                tenant,
                run_id,
                |r| {
                    r.state = pb::RunState::Running as i32;
                    if r.start_time.is_none() {
                        r.start_time = ts(started);
                    }
                },
                Some((i, &*s)),
                "attempt.started",
                "",
                attempt_no,
                vec![event],
                Work::Keep,
            )
            .await?;
        }
        let sent = tokio::time::timeout(
            timeout,
            self.inner.up.hub.invoke(
                &caller,
                conpb::InvokeRequest {
                    tool: tool.clone(),
                    args: Some(anumate_engine::json::to_struct(args)),
                    idempotency_key: key.clone(),
                    capability_token: issued.token,
                },
                timeout,
            ),
        )
        .await;
        let ended = now_micros();
        if let Ok(Err(e)) = &sent
            && let Some(next) = in_flight_resend_at(&e.to_error(), ended)
        {
            return self
                .wait_in_flight(tenant, run_id, steps, i, attempt_no, next)
                .await;
        }
        let outcome: std::result::Result<conpb::InvokeResponse, pb::Failure> = match sent {
            Err(_) => Err(failure(
                pb::FailureKind::Timeout,
                "ATTEMPT_TIMEOUT",
                &format!("the call took longer than {timeout:?}"),
                true,
                &step_id,
            )),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                let err = e.to_error();
                let reason = err.reason;
                let (kind, retryable) = match err.code {
                    ErrorCode::Unavailable => (pb::FailureKind::ConnectorUnavailable, true),
                    ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => {
                        (pb::FailureKind::TokenRejected, false)
                    }
                    _ if reason == Reason::ConnectorFailed => (pb::FailureKind::ToolError, false),
                    _ => (pb::FailureKind::ToolError, false),
                };
                let msg = anumate_ghostrun::report::redact(
                    &Value::String(err.message.clone()),
                    &decision.redactions,
                );
                Err(failure(
                    kind,
                    reason.as_str(),
                    msg.as_str().unwrap_or(""),
                    retryable,
                    &step_id,
                ))
            }
        };
        crate::metrics::attempt(&tool, &outcome, ended - started);
        match outcome {
            Ok(resp) => {
                let output = match &resp.output {
                    Some(o) => anumate_engine::json::struct_json(o).map_err(Error::internal)?,
                    None => json!({}),
                };
                let shown = anumate_ghostrun::report::redact(&output, &decision.redactions);
                let output_digest = anumate_engine::json::digest(&shown);
                let receipt = self
                    .receipt(
                        starter,
                        run,
                        &step_id,
                        attempt_no,
                        std::slice::from_ref(&jti),
                        json!({
                            "tool": tool,
                            "args_sha256": args_sha256,
                            "output_digest": output_digest,
                            "idempotency_key": key,
                            "replayed": resp.replayed,
                            "connector": resp.connector,
                            "outcome": "succeeded",
                        }),
                        // With the token's jti: a re-send after a crash has a
                        // new token (and may be a replay), so its receipt is its
                        // own, not a conflicting copy of the dead process's.
                        &format!("step:{run_id}:{step_id}:{attempt_no}:{jti}"),
                    )
                    .await?;
                let s = &mut steps[i];
                if let Some(a) = s.attempts.last_mut() {
                    a.state = pb::AttemptState::Succeeded as i32;
                    a.end_time = ts(ended);
                    a.receipt_id = receipt.clone();
                }
                s.state = pb::StepState::Succeeded as i32;
                s.output = Some(anumate_engine::json::to_value(&shown));
                s.end_time = ts(ended);
                let event = Ev::Completed(ev::StepCompleted {
                    tenant_id: tenant.to_string(),
                    run_id: run_id.to_string(),
                    plan_hash: run.plan_hash.clone(),
                    step_id: step_id.clone(),
                    tool: tool.clone(),
                    attempt: attempt_no,
                    args_sha256: args_sha256.to_string(),
                    output_digest,
                    duration: duration_pb(ended - started),
                    receipt_id: receipt,
                    actor: starter.subject.clone(),
                });
                self.save(
                    tenant,
                    run_id,
                    |_| {},
                    Some((i, &*s)),
                    "step.completed",
                    "",
                    attempt_no,
                    vec![event],
                    Work::Keep,
                )
                .await?;
                Ok(Next::Again)
            }
            Err(f) => {
                let receipt = self
                    .receipt(
                        starter,
                        run,
                        &step_id,
                        attempt_no,
                        std::slice::from_ref(&jti),
                        json!({
                            "tool": tool,
                            "args_sha256": args_sha256,
                            "idempotency_key": key,
                            "outcome": "failed",
                            "code": f.code,
                            "message": f.message,
                        }),
                        // With the token's jti: a re-send after a crash has a
                        // new token (and may be a replay), so its receipt is its
                        // own, not a conflicting copy of the dead process's.
                        &format!("step:{run_id}:{step_id}:{attempt_no}:{jti}"),
                    )
                    .await?;
                let max = u32::try_from(steps[i].attempts.len()).unwrap_or(u32::MAX);
                let allowed = step_def
                    .and_then(|d| d.retry.as_ref())
                    .map_or(1, |r| u32::try_from(r.max_attempts).unwrap_or(1).max(1));
                let s = &mut steps[i];
                if let Some(a) = s.attempts.last_mut() {
                    a.state = pb::AttemptState::Failed as i32;
                    a.end_time = ts(ended);
                    a.receipt_id = receipt.clone();
                    a.failure = Some(f.clone());
                }
                if f.retryable && max < allowed {
                    let backoff = backoff(step_def.and_then(|d| d.retry.as_ref()), max);
                    let next = ended + backoff;
                    s.state = pb::StepState::WaitingRetry as i32;
                    s.next_attempt_time = ts(next);
                    let event = Ev::Failed(ev::StepFailed {
                        tenant_id: tenant.to_string(),
                        run_id: run_id.to_string(),
                        plan_hash: run.plan_hash.clone(),
                        step_id: step_id.clone(),
                        tool: tool.clone(),
                        attempt: attempt_no,
                        failure_kind: f.kind,
                        code: f.code.clone(),
                        message: f.message.clone(),
                        will_retry: true,
                        next_attempt_time: ts(next),
                        receipt_id: receipt,
                        actor: starter.subject.clone(),
                    });
                    self.save(
                        tenant,
                        run_id,
                        |_| {},
                        Some((i, &*s)),
                        "step.retry_scheduled",
                        &f.message,
                        attempt_no,
                        vec![event],
                        Work::Keep,
                    )
                    .await?;
                    return Ok(Next::Wait(next));
                }
                self.fail_step(tenant, starter, run, steps, i, f, attempt_no, &receipt)
                    .await?;
                Ok(Next::Again)
            }
        }
    }

    /// The hub holds step `i`'s key for another call still in flight
    /// (`CALL_IN_FLIGHT`: usually a dead process's call this one re-sends),
    /// so this call did nothing and spent nothing. The attempt stays
    /// `RUNNING` (its outcome is the held call's), no attempt is spent and
    /// the run does not fail: the step waits in `WAITING_RETRY` until `next`
    /// (about when the hub takes the key over), journaled, so a restarted
    /// process keeps waiting, and is then re-sent with the same key and a
    /// fresh token.
    async fn wait_in_flight(
        &self,
        tenant: &str,
        run_id: &str,
        steps: &mut [pb::StepRun],
        i: usize,
        attempt: i32,
        next: i64,
    ) -> Result<Next> {
        let s = &mut steps[i];
        let at = chrono::DateTime::from_timestamp_micros(next).map_or_else(String::new, |t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        });
        let why = format!(
            "the connector hub holds key {}/{} for a call still in flight (CALL_IN_FLIGHT): \
             re-sent with the same key at {at}",
            run_id, s.step_id
        );
        tracing::warn!(tenant, run = run_id, step = %s.step_id, resend_at = %at, "orchestrator: CALL_IN_FLIGHT; waiting for the hub's key");
        s.state = pb::StepState::WaitingRetry as i32;
        s.next_attempt_time = ts(next);
        s.state_reason = why.clone();
        self.save(
            tenant,
            run_id,
            |_| {},
            Some((i, &*s)),
            "step.in_flight_wait",
            &why,
            attempt,
            vec![],
            Work::Keep,
        )
        .await?;
        Ok(Next::Wait(next))
    }

    /// Fails step `i` for good (the run fails on the next pass).
    #[allow(clippy::too_many_arguments)]
    async fn fail_step(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        steps: &mut [pb::StepRun],
        i: usize,
        f: pb::Failure,
        attempt: i32,
        receipt: &str,
    ) -> Result<()> {
        let s = &mut steps[i];
        s.state = pb::StepState::Failed as i32;
        s.failure = Some(f.clone());
        s.end_time = ts(now_micros());
        let event = Ev::Failed(ev::StepFailed {
            tenant_id: tenant.to_string(),
            run_id: run.run_id.clone(),
            plan_hash: run.plan_hash.clone(),
            step_id: s.step_id.clone(),
            tool: s.tool.clone(),
            attempt,
            failure_kind: f.kind,
            code: f.code.clone(),
            message: f.message.clone(),
            will_retry: false,
            next_attempt_time: None,
            receipt_id: receipt.to_string(),
            actor: starter.subject.clone(),
        });
        self.save(
            tenant,
            &run.run_id,
            |_| {},
            Some((i, &*s)),
            "step.failed",
            &f.message,
            attempt,
            vec![event],
            Work::Keep,
        )
        .await?;
        Ok(())
    }

    /// Appends a receipt of the run (retried briefly; then the error).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn receipt(
        &self,
        starter: &Starter,
        run: &pb::Run,
        step_id: &str,
        attempt: i32,
        jtis: &[String],
        content: Value,
        dedupe_key: &str,
    ) -> Result<String> {
        let kind = if step_id.is_empty() {
            rcpb::ReceiptKind::RunOutcome
        } else {
            rcpb::ReceiptKind::StepExecution
        };
        let request = rcpb::AppendReceiptRequest {
            kind: kind as i32,
            subject: Some(rcpb::ReceiptSubject {
                run_id: run.run_id.clone(),
                step_id: step_id.to_string(),
                attempt,
                plan_hash: run.plan_hash.clone(),
                approval_id: String::new(),
                jtis: jtis.iter().filter(|j| !j.is_empty()).cloned().collect(),
            }),
            content: Some(anumate_engine::json::to_struct(&content)),
            dedupe_key: dedupe_key.to_string(),
        };
        let caller = starter.caller();
        let mut last = None;
        for n in 0..3u64 {
            match anumate_service::clients::append_receipt_first(
                self.inner.up.receipts.as_ref(),
                &caller,
                request.clone(),
                (
                    "the step's receipt",
                    "the run continues when it can be appended",
                ),
            )
            .await
            {
                Ok(id) => return Ok(id),
                Err(e) if e.code == ErrorCode::Unavailable => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100 * (n + 1))).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::internal("no receipt")))
    }

    async fn complete_run(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        steps: &[pb::StepRun],
    ) -> Result<()> {
        let count = |st: pb::StepState| {
            i32::try_from(steps.iter().filter(|s| s.state == st as i32).count()).unwrap_or(i32::MAX)
        };
        let succeeded = count(pb::StepState::Succeeded);
        let skipped = count(pb::StepState::Skipped);
        let now = now_micros();
        let receipt = self
            .receipt(
                starter,
                run,
                "",
                0,
                &[],
                json!({"outcome": "succeeded", "succeeded_steps": succeeded, "skipped_steps": skipped, "inputs_hash": run.inputs_hash}),
                &format!("run:{}:outcome", run.run_id),
            )
            .await?;
        let started = micros_of(&run.create_time);
        let event = Ev::RunCompleted(ev::RunCompleted {
            tenant_id: tenant.to_string(),
            run_id: run.run_id.clone(),
            plan_hash: run.plan_hash.clone(),
            succeeded_steps: succeeded,
            skipped_steps: skipped,
            duration: duration_pb(now - started),
            receipt_id: receipt.clone(),
            actor: run.created_by.clone(),
        });
        self.save(
            tenant,
            &run.run_id,
            |r| {
                r.state = pb::RunState::Succeeded as i32;
                r.paused_from = 0;
                r.end_time = ts(now);
                r.receipt_id = receipt.clone();
            },
            None,
            "run.completed",
            "",
            0,
            vec![event],
            Work::Unschedule,
        )
        .await?;
        tracing::info!(tenant, run = %run.run_id, "run succeeded");
        Ok(())
    }

    async fn fail_run(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        steps: &mut [pb::StepRun],
        f: pb::Failure,
    ) -> Result<()> {
        let now = now_micros();
        // Steps that will not run now; one needing attention keeps its state.
        let stop = |st| match st {
            pb::StepState::Pending => Some(pb::StepState::Skipped),
            pb::StepState::WaitingApproval
            | pb::StepState::WaitingRetry
            | pb::StepState::Running => Some(pb::StepState::Cancelled),
            _ => None,
        };
        self.end_open_steps(tenant, &run.run_id, steps, stop, "the run failed", now)
            .await?;
        let receipt = self
            .receipt(
                starter,
                run,
                "",
                0,
                &[],
                json!({"outcome": "failed", "failed_step_id": f.step_id, "code": f.code, "message": f.message}),
                &format!("run:{}:outcome", run.run_id),
            )
            .await?;
        let event = Ev::RunFailed(ev::RunFailed {
            tenant_id: tenant.to_string(),
            run_id: run.run_id.clone(),
            plan_hash: run.plan_hash.clone(),
            failed_step_id: f.step_id.clone(),
            failure_kind: f.kind,
            message: f.message.clone(),
            duration: duration_pb(now - micros_of(&run.create_time)),
            receipt_id: receipt.clone(),
            actor: run.created_by.clone(),
        });
        let message = f.message.clone();
        let ended = self
            .save(
                tenant,
                &run.run_id,
                |r| {
                    r.state = pb::RunState::Failed as i32;
                    r.paused_from = 0;
                    r.failure = Some(f.clone());
                    r.end_time = ts(now);
                    r.receipt_id = receipt.clone();
                },
                None,
                "run.failed",
                &message,
                0,
                vec![event],
                Work::Unschedule,
            )
            .await?;
        let mut ended = ended;
        ended.steps = steps.to_vec();
        self.after_end(starter, &ended).await;
        tracing::info!(tenant, run = %run.run_id, "run failed");
        Ok(())
    }

    /// A cancel request: steps not done stop, open approvals are cancelled,
    /// the run's tokens revoked, and the run ends `CANCELLED`.
    async fn finish_cancel(
        &self,
        tenant: &str,
        starter: &Starter,
        run: pb::Run,
        mut steps: Vec<pb::StepRun>,
    ) -> Result<()> {
        let now = now_micros();
        // Every step not done stops; a compensation under way continues below.
        let stop = |st| match st {
            pb::StepState::Pending => Some(pb::StepState::Skipped),
            pb::StepState::Compensating => None,
            st if step_is_done(st as i32) => None,
            _ => Some(pb::StepState::Cancelled),
        };
        self.end_open_steps(
            tenant,
            &run.run_id,
            &mut steps,
            stop,
            "the run was cancelled",
            now,
        )
        .await?;
        let compensated = self.compensate(tenant, starter, &run, &mut steps).await?;
        let now = now_micros();
        let receipt = self
            .receipt(
                starter,
                &run,
                "",
                0,
                &[],
                json!({"outcome": "cancelled", "reason": run.state_reason}),
                &format!("run:{}:outcome", run.run_id),
            )
            .await?;
        let event = Ev::RunCancelled(ev::RunCancelled {
            tenant_id: tenant.to_string(),
            run_id: run.run_id.clone(),
            plan_hash: run.plan_hash.clone(),
            killed: false,
            compensated_step_ids: compensated,
            reason: run.state_reason.clone(),
            receipt_id: receipt.clone(),
            actor: run.created_by.clone(),
        });
        let mut ended = self
            .save(
                tenant,
                &run.run_id,
                |r| {
                    r.state = pb::RunState::Cancelled as i32;
                    r.paused_from = 0;
                    r.end_time = ts(now);
                    r.receipt_id = receipt.clone();
                },
                None,
                "run.cancelled",
                &run.state_reason,
                0,
                vec![event],
                Work::Unschedule,
            )
            .await?;
        ended.steps = steps;
        self.after_end(starter, &ended).await;
        Ok(())
    }

    fn await_approval(&self, approval_id: &str, tenant: &str, run_id: &str) {
        if let Ok(mut m) = self.inner.awaiting.lock() {
            m.insert(
                approval_id.to_string(),
                (tenant.to_string(), run_id.to_string()),
            );
        }
    }

    fn take_nudge(&self, tenant: &str, run_id: &str) -> bool {
        self.inner
            .nudged
            .lock()
            .is_ok_and(|mut n| !n.is_empty() && n.remove(&(tenant.to_string(), run_id.to_string())))
    }

    fn forget_approval(&self, approval_id: &str) {
        if let Ok(mut m) = self.inner.awaiting.lock() {
            m.remove(approval_id);
        }
    }

    /// An approval of this process was decided (or ended): the run waiting
    /// for it is due now and a worker wakes, instead of the step noticing at
    /// its next poll (`approval_poll_ms`). Approvals decided in another
    /// process are still seen by that poll.
    pub async fn nudge(&self, tenant: &str, approval_id: &str) {
        let run = self
            .inner
            .awaiting
            .lock()
            .ok()
            .and_then(|mut m| m.remove(approval_id));
        let Some((owner, run_id)) = run else { return };
        if owner != tenant {
            return;
        }
        // Before the queue row: a driver rescheduling the run after this
        // sees the mark (see `drive`).
        if let Ok(mut n) = self.inner.nudged.lock() {
            n.insert((owner, run_id.clone()));
        }
        let due = async {
            let tx = self.inner.store.write(tenant).await?;
            repo::schedule(&tx, &run_id, now_micros()).await?;
            tx.commit().await?;
            Ok::<(), Error>(())
        };
        match due.await {
            Ok(()) => self.inner.wake.notify_one(),
            Err(e) => {
                tracing::warn!(tenant, run = %run_id, error = %e, "orchestrator: an approval nudge failed; the poll picks the run up");
            }
        }
    }

    /// Ends the steps that will not run any more, each with its journal
    /// entry: `stop` maps a step state to its end state (`None`: keep it).
    async fn end_open_steps(
        &self,
        tenant: &str,
        run_id: &str,
        steps: &mut [pb::StepRun],
        stop: impl Fn(pb::StepState) -> Option<pb::StepState>,
        why: &str,
        now: i64,
    ) -> Result<()> {
        for (i, s) in steps.iter_mut().enumerate() {
            let st = pb::StepState::try_from(s.state).unwrap_or(pb::StepState::Unspecified);
            let Some(new) = stop(st) else { continue };
            s.state = new as i32;
            s.state_reason = why.to_string();
            s.end_time = ts(now);
            self.save(
                tenant,
                run_id,
                |_| {},
                Some((i, &*s)),
                "step.cancelled",
                why,
                0,
                vec![],
                Work::Keep,
            )
            .await?;
        }
        Ok(())
    }

    /// Runs the declared compensations of the succeeded steps, the latest
    /// completed first, each a governed call of its own (policy decision on
    /// its rendered arguments, a token, the hub with the key
    /// `<run>/<step>/compensate`, a receipt). Returns the ids of the steps
    /// whose compensation ran (successfully or not).
    async fn compensate(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        steps: &mut [pb::StepRun],
    ) -> Result<Vec<String>> {
        let has_comp = |plan: &cpb::ExecutablePlan, i: usize| {
            plan.steps
                .get(i)
                .and_then(|d| d.compensation.as_ref())
                .is_some_and(|c| !c.tool.is_empty())
        };
        let pending = |st: i32| {
            st == pb::StepState::Succeeded as i32 || st == pb::StepState::Compensating as i32
        };
        let plan = self
            .plan(&starter.caller(), &starter.tenant, &run.plan_hash)
            .await?;
        let mut todo: Vec<usize> = (0..steps.len())
            .filter(|&i| pending(steps[i].state) && has_comp(&plan, i))
            .collect();
        // Reverse completion order: what happened last is undone first.
        todo.sort_by_key(|&i| std::cmp::Reverse(micros_of(&steps[i].end_time)));
        if !todo.is_empty() {
            let inputs = match &run.inputs {
                Some(s) => anumate_engine::json::struct_json(s).map_err(Error::internal)?,
                None => json!({}),
            };
            // What templates see: every step's recorded output.
            let mut seen = serde_json::Map::new();
            for s in steps.iter() {
                let output = s
                    .output
                    .as_ref()
                    .map(|v| anumate_engine::json::value_json(v, 0))
                    .transpose()
                    .map_err(Error::internal)?
                    .unwrap_or(Value::Null);
                seen.insert(
                    s.step_id.clone(),
                    json!({"output": output, "status": "succeeded"}),
                );
            }
            let seen = Value::Object(seen);
            for i in todo {
                self.compensate_step(tenant, starter, run, &plan, steps, i, &inputs, &seen)
                    .await?;
            }
        }
        Ok(steps
            .iter()
            .filter(|s| {
                s.state == pb::StepState::Compensated as i32
                    || s.state == pb::StepState::CompensationFailed as i32
            })
            .map(|s| s.step_id.clone())
            .collect())
    }

    /// The compensation of step `i`, to its end: `COMPENSATED` or
    /// `COMPENSATION_FAILED`.
    #[allow(clippy::too_many_arguments)]
    async fn compensate_step(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        plan: &cpb::ExecutablePlan,
        steps: &mut [pb::StepRun],
        i: usize,
        inputs: &Value,
        seen: &Value,
    ) -> Result<()> {
        let run_id = run.run_id.as_str();
        let step_id = steps[i].step_id.clone();
        let Some(comp) = plan.steps.get(i).and_then(|d| d.compensation.clone()) else {
            return Ok(());
        };
        let tool = comp.tool.clone();
        let key = format!("{run_id}/{step_id}/compensate");
        let binding = plan.tool_bindings.iter().find(|b| b.tool == tool);
        let idempotent = binding.is_some_and(|b| b.idempotent);
        let single_use = binding.is_none_or(|b| b.side_effect != cpb::SideEffect::Read as i32);
        if steps[i].state != pb::StepState::Compensating as i32 {
            let s = &mut steps[i];
            s.state = pb::StepState::Compensating as i32;
            s.state_reason = "the run was cancelled; compensating".into();
            self.save(
                tenant,
                run_id,
                |_| {},
                Some((i, &*s)),
                "step.compensating",
                &tool,
                0,
                vec![],
                Work::Keep,
            )
            .await?;
        }
        // A compensation in flight when a process died: re-sent with its key
        // only when the tool is idempotent.
        let in_flight = steps[i]
            .compensation_attempts
            .last()
            .is_some_and(|a| a.state == pb::AttemptState::Running as i32);
        if in_flight && !idempotent {
            let n = steps[i].compensation_attempts.len();
            if let Some(a) = steps[i].compensation_attempts.last_mut() {
                a.state = pb::AttemptState::OutcomeUnknown as i32;
                a.end_time = ts(now_micros());
            }
            let why = format!(
                "the process died while compensation attempt {n} of {tool} was in flight and {tool} is not idempotent: check the target system"
            );
            return self
                .end_compensation(tenant, starter, run, steps, i, &tool, Err(why), "")
                .await;
        }

        // The decision on the compensating call, with its real arguments.
        let ids: Vec<&str> = plan.steps.iter().map(|d| d.id.as_str()).collect();
        let input_names: Vec<&str> = inputs
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let scope = anumate_policy::TemplateScope {
            inputs: &input_names,
            steps_upstream: &ids,
            steps_known: &ids,
        };
        let raw = match &comp.args {
            Some(a) => anumate_engine::json::struct_json(a).map_err(Error::internal)?,
            None => json!({}),
        };
        let rendered = anumate_engine::Template::compile(&raw, "compensate.with", &scope)
            .and_then(|t| t.render(inputs, seen, "compensate.with"));
        let args = match rendered {
            Ok(a) => a,
            Err(e) => {
                return self
                    .end_compensation(
                        tenant,
                        starter,
                        run,
                        steps,
                        i,
                        &tool,
                        Err(e.to_string()),
                        "",
                    )
                    .await;
            }
        };
        let args_sha256 = anumate_engine::json::digest(&args);
        let mut as_step = plan.clone();
        if let Some(d) = as_step.steps.get_mut(i) {
            d.tool = tool.clone();
            d.args = None;
            d.condition = String::new();
            d.compensation = None;
        }
        let engine = self
            .engine_of(starter, &as_step, micros_of(&run.create_time))
            .await?;
        let decision = engine
            .decision(i, &args)
            .map_err(|e| Error::internal(format!("the compensation's policy decision: {e}")))?;
        let decision_pb = decision_pb(plan, &decision);
        let redacted_args = anumate_ghostrun::report::redact(&args, &decision.redactions);
        if decision.effect != Effect::Allow {
            let why = if decision.effect == Effect::Deny {
                decision
                    .rules
                    .iter()
                    .flat_map(|r| r.reasons.iter().cloned())
                    .next()
                    .unwrap_or_else(|| "a policy denied the compensation".into())
            } else {
                "a policy requires an approval for the compensation; compensations on cancel do not wait for approvals".into()
            };
            let n = i32::try_from(steps[i].compensation_attempts.len() + 1).unwrap_or(i32::MAX);
            let receipt = self
                .receipt(
                    starter,
                    run,
                    &step_id,
                    n,
                    &[],
                    json!({"compensation": true, "tool": tool, "args_sha256": args_sha256, "outcome": "denied", "reason": why}),
                    &format!("compensate:{run_id}:{step_id}:denied"),
                )
                .await?;
            steps[i].compensation_attempts.push(pb::StepAttempt {
                attempt: n,
                state: pb::AttemptState::Failed as i32,
                args_sha256: args_sha256.clone(),
                args: Some(anumate_engine::json::to_struct(&redacted_args)),
                decision: Some(decision_pb),
                receipt_id: receipt.clone(),
                start_time: ts(now_micros()),
                end_time: ts(now_micros()),
                idempotency_key: key.clone(),
                kind: pb::AttemptKind::Compensation as i32,
                failure: Some(failure(
                    pb::FailureKind::PolicyDenied,
                    "POLICY_DENIED",
                    &why,
                    false,
                    &step_id,
                )),
                ..Default::default()
            });
            return self
                .end_compensation(tenant, starter, run, steps, i, &tool, Err(why), &receipt)
                .await;
        }

        let timeout = attempt_timeout(comp.timeout.as_ref());
        let caller = starter.caller();
        // A retryable failure is tried again a few times: nothing else will
        // undo the step once the run has ended.
        const MAX_COMPENSATION_ATTEMPTS: usize = 3;
        loop {
            let issued = self
                .inner
                .up
                .tokens
                .issue(
                    &caller,
                    self.token_request(
                        &starter.subject,
                        run_id,
                        &run.plan_hash,
                        &step_id,
                        &tool,
                        &args_sha256,
                        timeout,
                        single_use,
                    ),
                )
                .await;
            let issued = match issued {
                Ok(t) => t,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    // Retried by the caller's next pass (the run stays cancelling).
                    return Err(e.to_error());
                }
                Err(e) => {
                    let why = format!("no token for the compensation: {}", e.message());
                    return self
                        .end_compensation(tenant, starter, run, steps, i, &tool, Err(why), "")
                        .await;
                }
            };
            let jti = issued
                .claims
                .as_ref()
                .map(|c| c.jti.clone())
                .unwrap_or_default();
            let started = now_micros();
            let attempt_no;
            {
                let s = &mut steps[i];
                let resend = s
                    .compensation_attempts
                    .last()
                    .is_some_and(|a| a.state == pb::AttemptState::Running as i32);
                if resend {
                    if let Some(a) = s.compensation_attempts.last_mut() {
                        a.token_jti = jti.clone();
                        a.lease_holder = self.inner.worker_id.clone();
                    }
                    attempt_no = i32::try_from(s.compensation_attempts.len()).unwrap_or(i32::MAX);
                } else {
                    attempt_no =
                        i32::try_from(s.compensation_attempts.len() + 1).unwrap_or(i32::MAX);
                    s.compensation_attempts.push(pb::StepAttempt {
                        attempt: attempt_no,
                        state: pb::AttemptState::Running as i32,
                        args_sha256: args_sha256.clone(),
                        args: Some(anumate_engine::json::to_struct(&redacted_args)),
                        decision: Some(decision_pb.clone()),
                        token_jti: jti.clone(),
                        start_time: ts(started),
                        idempotency_key: key.clone(),
                        lease_holder: self.inner.worker_id.clone(),
                        kind: pb::AttemptKind::Compensation as i32,
                        ..Default::default()
                    });
                }
                self.save(
                    tenant,
                    run_id,
                    |_| {},
                    Some((i, &*s)),
                    "compensation.started",
                    &tool,
                    attempt_no,
                    vec![],
                    Work::Keep,
                )
                .await?;
            }
            let sent = tokio::time::timeout(
                timeout,
                self.inner.up.hub.invoke(
                    &caller,
                    conpb::InvokeRequest {
                        tool: tool.clone(),
                        args: Some(anumate_engine::json::to_struct(&args)),
                        idempotency_key: key.clone(),
                        capability_token: issued.token,
                    },
                    timeout,
                ),
            )
            .await;
            let ended = now_micros();
            if let Ok(Err(e)) = &sent
                && let Some(next) = in_flight_resend_at(&e.to_error(), ended)
            {
                // Nothing happened and no attempt is spent: the attempt
                // stays RUNNING and is re-sent (after a restart too).
                tracing::warn!(tenant, run = run_id, step = %step_id, "orchestrator: CALL_IN_FLIGHT on a compensation; waiting for the hub's key");
                let wait =
                    (next - ended).clamp(IN_FLIGHT_MIN_WAIT, COMPENSATION_IN_FLIGHT_MAX_WAIT);
                tokio::time::sleep(Duration::from_micros(
                    u64::try_from(wait).unwrap_or(1_000_000),
                ))
                .await;
                continue;
            }
            let outcome: std::result::Result<conpb::InvokeResponse, (String, String, bool)> =
                match sent {
                    Err(_) => Err((
                        "ATTEMPT_TIMEOUT".into(),
                        format!("the compensation took longer than {timeout:?}"),
                        true,
                    )),
                    Ok(Ok(resp)) => Ok(resp),
                    Ok(Err(e)) => {
                        let err = e.to_error();
                        let msg = anumate_ghostrun::report::redact(
                            &Value::String(err.message.clone()),
                            &decision.redactions,
                        );
                        Err((
                            err.reason.as_str().to_string(),
                            msg.as_str().unwrap_or("").to_string(),
                            err.code == ErrorCode::Unavailable,
                        ))
                    }
                };
            let content = match &outcome {
                Ok(resp) => {
                    let output = match &resp.output {
                        Some(o) => anumate_engine::json::struct_json(o).map_err(Error::internal)?,
                        None => json!({}),
                    };
                    let shown = anumate_ghostrun::report::redact(&output, &decision.redactions);
                    json!({
                        "compensation": true,
                        "tool": tool,
                        "args_sha256": args_sha256,
                        "output_digest": anumate_engine::json::digest(&shown),
                        "idempotency_key": key,
                        "replayed": resp.replayed,
                        "connector": resp.connector,
                        "outcome": "succeeded",
                    })
                }
                Err((code, message, _)) => json!({
                    "compensation": true,
                    "tool": tool,
                    "args_sha256": args_sha256,
                    "idempotency_key": key,
                    "outcome": "failed",
                    "code": code,
                    "message": message,
                }),
            };
            let receipt = self
                .receipt(
                    starter,
                    run,
                    &step_id,
                    attempt_no,
                    std::slice::from_ref(&jti),
                    content,
                    &format!("compensate:{run_id}:{step_id}:{attempt_no}:{jti}"),
                )
                .await?;
            let s = &mut steps[i];
            if let Some(a) = s.compensation_attempts.last_mut() {
                a.end_time = ts(ended);
                a.receipt_id = receipt.clone();
                match &outcome {
                    Ok(_) => a.state = pb::AttemptState::Succeeded as i32,
                    Err((code, message, retryable)) => {
                        a.state = pb::AttemptState::Failed as i32;
                        a.failure = Some(failure(
                            pb::FailureKind::ToolError,
                            code,
                            message,
                            *retryable,
                            &step_id,
                        ));
                    }
                }
            }
            match outcome {
                Ok(_) => {
                    return self
                        .end_compensation(tenant, starter, run, steps, i, &tool, Ok(()), &receipt)
                        .await;
                }
                Err((_, message, true))
                    if steps[i].compensation_attempts.len() < MAX_COMPENSATION_ATTEMPTS =>
                {
                    let s = &steps[i];
                    self.save(
                        tenant,
                        run_id,
                        |_| {},
                        Some((i, s)),
                        "compensation.retry_scheduled",
                        &message,
                        attempt_no,
                        vec![],
                        Work::Keep,
                    )
                    .await?;
                    let n = u32::try_from(steps[i].compensation_attempts.len()).unwrap_or(1);
                    let wait = backoff(plan.steps.get(i).and_then(|d| d.retry.as_ref()), n);
                    tokio::time::sleep(Duration::from_micros(
                        u64::try_from(wait.min(10_000_000)).unwrap_or(1_000_000),
                    ))
                    .await;
                }
                Err((_, message, _)) => {
                    return self
                        .end_compensation(
                            tenant,
                            starter,
                            run,
                            steps,
                            i,
                            &tool,
                            Err(message),
                            &receipt,
                        )
                        .await;
                }
            }
        }
    }

    /// Records the end of step `i`'s compensation and emits
    /// `StepCompensated`.
    #[allow(clippy::too_many_arguments)]
    async fn end_compensation(
        &self,
        tenant: &str,
        starter: &Starter,
        run: &pb::Run,
        steps: &mut [pb::StepRun],
        i: usize,
        tool: &str,
        result: std::result::Result<(), String>,
        receipt: &str,
    ) -> Result<()> {
        let s = &mut steps[i];
        let (state, message) = match &result {
            Ok(()) => (pb::StepState::Compensated, String::new()),
            Err(m) => (pb::StepState::CompensationFailed, m.clone()),
        };
        s.state = state as i32;
        s.state_reason = if message.is_empty() {
            "compensated after the run was cancelled".into()
        } else {
            format!("compensation failed: {message}")
        };
        let event = Ev::Compensated(ev::StepCompensated {
            tenant_id: tenant.to_string(),
            run_id: run.run_id.clone(),
            plan_hash: run.plan_hash.clone(),
            step_id: s.step_id.clone(),
            tool: tool.to_string(),
            succeeded: result.is_ok(),
            message: message.clone(),
            receipt_id: receipt.to_string(),
            actor: starter.subject.clone(),
        });
        let n = i32::try_from(s.compensation_attempts.len()).unwrap_or(i32::MAX);
        let kind = if result.is_ok() {
            "step.compensated"
        } else {
            "step.compensation_failed"
        };
        self.save(
            tenant,
            &run.run_id,
            |_| {},
            Some((i, &*s)),
            kind,
            &message,
            n,
            vec![event],
            Work::Keep,
        )
        .await?;
        Ok(())
    }
}

/// The policy decision as `GetRun` shows it on an attempt: the effect, the
/// matched rules (policy, version, content hash, rule) and their reasons.
fn decision_pb(plan: &cpb::ExecutablePlan, d: &anumate_engine::StepDecision) -> ppb::Decision {
    let effect = |e: Effect| match e {
        Effect::Allow => ppb::Effect::Allow,
        Effect::RequireApproval => ppb::Effect::RequireApproval,
        Effect::Deny => ppb::Effect::Deny,
    } as i32;
    ppb::Decision {
        effect: effect(d.effect),
        matched_rules: d
            .rules
            .iter()
            .map(|r| {
                let set = r.set.and_then(|i| plan.policies.get(i));
                ppb::MatchedRule {
                    rule: Some(ppb::PolicyRuleRef {
                        policy: set.map_or_else(|| r.policy.clone(), |p| p.name.clone()),
                        policy_version: set.map_or(0, |p| p.version),
                        content_hash: set.map(|p| p.content_hash.clone()).unwrap_or_default(),
                        rule: r.rule.clone(),
                        span: None,
                    }),
                    priority: i32::try_from(r.priority).unwrap_or(i32::MAX),
                    effect: effect(r.effect),
                    reason: r.reasons.first().cloned().unwrap_or_default(),
                }
            })
            .collect(),
        obligations: None,
        reasons: d
            .rules
            .iter()
            .flat_map(|r| r.reasons.iter().cloned())
            .collect(),
        denied_by_allow_list: d.rules.iter().any(|r| r.set.is_none()),
    }
}

/// The shortest wait before a call the hub answered `CALL_IN_FLIGHT` is
/// re-sent (micros).
const IN_FLIGHT_MIN_WAIT: i64 = 100_000;
/// The longest: the hub may name a take-over time far ahead (its default
/// in-flight lease is 5 minutes) while the held call may still record its
/// result sooner, so the step looks again at least this often (micros).
const IN_FLIGHT_MAX_WAIT: i64 = 60_000_000;
/// The wait when the hub names no take-over time (micros).
const IN_FLIGHT_DEFAULT_WAIT: i64 = 2_000_000;
/// A compensation waits inline, so it looks again at least this often (micros).
const COMPENSATION_IN_FLIGHT_MAX_WAIT: i64 = 10_000_000;

/// When to re-send a call the hub answered `CALL_IN_FLIGHT` (`None` for
/// any other error): just after the hub's `lease_expire_time` (when it
/// takes the key over from a call that never ends), bounded to
/// [`IN_FLIGHT_MIN_WAIT`, `IN_FLIGHT_MAX_WAIT`] from `now`.
fn in_flight_resend_at(err: &Error, now: i64) -> Option<i64> {
    if err.reason != Reason::CallInFlight {
        return None;
    }
    let expires = err
        .metadata
        .iter()
        .find(|(k, _)| k == "lease_expire_time")
        .and_then(|(_, v)| chrono::DateTime::parse_from_rfc3339(v).ok())
        .map(|t| t.timestamp_micros());
    Some(match expires {
        // A little after the take-over time, so the hub's clock has passed it.
        Some(t) => t
            .saturating_add(50_000)
            .clamp(now + IN_FLIGHT_MIN_WAIT, now + IN_FLIGHT_MAX_WAIT),
        None => now + IN_FLIGHT_DEFAULT_WAIT,
    })
}

/// Backoff before attempt `done + 1` (micros).
/// A declared attempt timeout, or the default when none (or zero) is declared.
fn attempt_timeout(declared: Option<&pbjson_types::Duration>) -> Duration {
    declared
        .filter(|d| d.seconds > 0 || d.nanos > 0)
        .map_or(DEFAULT_ATTEMPT_TIMEOUT, |d| {
            Duration::new(
                u64::try_from(d.seconds).unwrap_or(0),
                u32::try_from(d.nanos).unwrap_or(0),
            )
        })
}

fn backoff(retry: Option<&cpb::RetryPolicy>, done: u32) -> i64 {
    let micros = |d: Option<&pbjson_types::Duration>, default: i64| {
        d.map_or(default, |d| {
            d.seconds * 1_000_000 + i64::from(d.nanos) / 1000
        })
        .max(1000)
    };
    let initial = micros(retry.and_then(|r| r.initial_backoff.as_ref()), 1_000_000);
    let max = micros(retry.and_then(|r| r.max_backoff.as_ref()), 60_000_000);
    let mult = retry.map_or(2.0, |r| {
        if r.multiplier >= 1.0 {
            r.multiplier
        } else {
            2.0
        }
    });
    let exp = i32::try_from(done.saturating_sub(1)).unwrap_or(30).min(30);
    let d = (initial as f64) * mult.powi(exp);
    (d.min(max as f64)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(expire: Option<&str>) -> Error {
        let e = Error::because(Reason::CallInFlight, "held");
        match expire {
            Some(t) => e.with_metadata("lease_expire_time", t),
            None => e,
        }
    }

    #[test]
    fn call_in_flight_is_resent_just_after_the_hubs_take_over_time() {
        // 2026-12-04T20:00:00Z
        let now = 1_796_414_400_000_000;
        let at = |s: &str| in_flight_resend_at(&in_flight(Some(s)), now);
        assert_eq!(
            at("2026-12-04T20:00:03.000000Z"),
            Some(now + 3_000_000 + 50_000)
        );
        // Already past: soon, not at once.
        assert_eq!(at("2026-12-04T19:59:00Z"), Some(now + IN_FLIGHT_MIN_WAIT));
        // The hub's default 5 minutes: look again within a minute.
        assert_eq!(at("2026-12-04T20:05:00Z"), Some(now + IN_FLIGHT_MAX_WAIT));
        assert_eq!(
            in_flight_resend_at(&in_flight(None), now),
            Some(now + IN_FLIGHT_DEFAULT_WAIT)
        );
        assert_eq!(at("not a time"), Some(now + IN_FLIGHT_DEFAULT_WAIT));
        // Any other error is not a wait.
        let other = Error::because(Reason::ConnectorFailed, "boom")
            .with_metadata("lease_expire_time", "2026-12-04T20:00:03Z");
        assert_eq!(in_flight_resend_at(&other, now), None);
    }
}
