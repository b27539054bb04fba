//! The orchestrator (SPEC §6): durable, governed execution of plans.
//!
//! A run is journaled in the database (`orch_runs`, `orch_steps`,
//! `orch_history`): every state change commits with its history entry (what
//! `WatchRun` and `ListRunHistory` read) and its event (outbox) in one
//! transaction. Workers lease runnable runs from `orch_work` (`FOR UPDATE
//! SKIP LOCKED` and a lease expiry on PostgreSQL, so replicas share the work
//! and a dead replica's runs are taken over; one pool per process on
//! SQLite) and drive them with the shared interpreter (`anumate-engine`):
//! per call the policy decision on the real arguments, an approval when it
//! says so, a capability token for exactly that call, `ConnectorHub.Invoke`
//! with an idempotency key of (run, step), a receipt, the event.
//!
//! The orchestrator calls other services as itself on behalf of the run's
//! starter (a delegated service token), whose tenant, subject, roles and
//! groups are stored with the run: a run resumed hours later acts for the
//! same principal.
#![forbid(unsafe_code)]

pub mod grpc;
mod metrics;
mod module;
mod repo;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anumate_errors::{Error, ErrorCode, Reason, Result, Violation};
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::events::v1 as ev;
use anumate_proto::ghostrun::v1 as gpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_service::clients::{
    ApprovalsClient, Caller, CapTokensClient, CompilerClient, ConnectorHubClient, GhostRunClient,
    PolicyClient, ReceiptsClient, TenantSettings, TenantSettingsClient, UpstreamError,
};
use anumate_store::{Migration, Store, TenantTx};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use grpc::OrchestratorGrpc;
pub use module::module;
pub use repo::MIGRATIONS as REPO_MIGRATIONS;

/// The service name in service tokens (`svc:orchestrator`).
pub const SERVICE_NAME: &str = "orchestrator";

/// The actor of changes the orchestrator makes on its own.
pub const SELF_ACTOR: &str = "svc:orchestrator";

/// Every migration the orchestrator needs (the outbox's too).
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(repo::MIGRATIONS)
}

/// `[orchestrator]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestratorConfig {
    /// Compiler address; empty: this process, else this server's listener.
    pub compiler_url: String,
    /// Policy service address; empty as above.
    pub policy_url: String,
    /// Approvals service address; empty as above.
    pub approvals_url: String,
    /// Connector hub address; empty as above.
    pub connectors_url: String,
    /// Captokens address; empty as above.
    pub captokens_url: String,
    /// GhostRun address; empty as above.
    pub ghostrun_url: String,
    /// Receipts address; empty as above.
    pub receipts_url: String,
    /// Registry address (tenant settings); empty as above.
    pub registry_url: String,
    /// The `aud` of capability tokens (the connector hub's `[connectors] audience`).
    pub token_audience: String,
    /// Runs driven at once by this process (default 32). A driven run
    /// mostly waits on the database and its calls, so this is well above
    /// the cores: on 2 cores the bench's steps/s rose from 8 to 32 workers
    /// and fell again at 64. A run waiting for an approval holds none.
    pub workers: usize,
    /// Ready steps of one run that act at once (independent branches of
    /// its plan run concurrently, each with its own attempt, token, call
    /// and receipt).
    pub max_parallel_steps: usize,
    /// How long a claimed run stays leased without a heartbeat (seconds).
    pub lease_secs: u64,
    /// How often idle workers look for due work (milliseconds).
    pub poll_ms: u64,
    /// How often a run waiting for an approval checks it (milliseconds).
    pub approval_poll_ms: u64,
    /// Longest request (bytes) `Execute` accepts.
    pub max_request_bytes: usize,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        OrchestratorConfig {
            compiler_url: String::new(),
            policy_url: String::new(),
            approvals_url: String::new(),
            connectors_url: String::new(),
            captokens_url: String::new(),
            ghostrun_url: String::new(),
            receipts_url: String::new(),
            registry_url: String::new(),
            token_audience: "anumate-connectors".into(),
            workers: 32,
            max_parallel_steps: 8,
            lease_secs: 30,
            poll_ms: 200,
            approval_poll_ms: 500,
            max_request_bytes: 1024 * 1024,
        }
    }
}

/// Who started a run: stored with it, so every later call acts for them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Starter {
    pub tenant: String,
    pub subject: String,
    pub roles: Vec<String>,
    pub groups: Vec<String>,
    /// The W3C `traceparent` of the call that started the run (when traces
    /// are exported): every pass over the run, however much later, joins
    /// that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Starter {
    /// The caller the orchestrator presents upstream: itself, for the starter.
    pub fn caller(&self) -> Caller {
        Caller::Delegated {
            principal: anumate_auth::Principal {
                tenant_id: self.tenant.clone(),
                subject: self.subject.clone(),
                service: None,
                on_behalf_of: None,
                issuer: String::new(),
                roles: self
                    .roles
                    .iter()
                    .filter_map(|r| anumate_auth::Role::parse(r))
                    .collect(),
                token_id: None,
                groups: self.groups.clone(),
            },
            service: SERVICE_NAME,
            forward: None,
        }
    }
}

/// The caller of an RPC.
#[derive(Debug, Clone)]
pub struct Actor {
    pub starter: Starter,
}

/// The upstream services the orchestrator calls.
#[derive(Clone)]
pub struct Upstreams {
    pub compiler: Arc<dyn CompilerClient>,
    pub policy: Arc<dyn PolicyClient>,
    pub approvals: Arc<dyn ApprovalsClient>,
    pub hub: Arc<dyn ConnectorHubClient>,
    pub ghostrun: Arc<dyn GhostRunClient>,
    pub receipts: Arc<dyn ReceiptsClient>,
    pub settings: Arc<dyn TenantSettingsClient>,
    /// Mints each call's token: the captokens service of this process when
    /// it runs here (no RPC per call), else gRPC.
    pub tokens: Arc<dyn CapTokensClient>,
    /// Revokes a run's tokens when it ends (gRPC).
    pub captokens: worker::CapTokens,
    /// Plans, policy sets, capsule labels and the policies' `env`: the
    /// loader GhostRun builds its engines with, so a run decides as its
    /// preflight did.
    pub plans: anumate_ghostrun::Loader,
}

/// The orchestrator.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    up: Upstreams,
    cfg: OrchestratorConfig,
    worker_id: String,
    wake: tokio::sync::Notify,
    changed: tokio::sync::broadcast::Sender<(String, String)>,
    /// Runs this process is driving (a run is driven by one task at a time).
    driving: Mutex<std::collections::HashSet<(String, String)>>,
    /// Approvals steps driven here wait for: approval id → (tenant, run),
    /// so an in-process decision wakes the run at once (see `nudge`).
    awaiting: Mutex<HashMap<String, (String, String)>>,
    /// Runs nudged since their driver last looked (tenant, run).
    nudged: Mutex<std::collections::HashSet<(String, String)>>,
    /// Runs driven here, as last read or saved (see `Orchestrator::save`).
    known: Mutex<HashMap<(String, String), worker::Known>>,
}

fn upstream(e: &UpstreamError, what: &str) -> Error {
    let err = e.to_error();
    if err.code == ErrorCode::Unavailable {
        return Error::new(
            ErrorCode::Unavailable,
            format!("{what} is unavailable: {}", e.message()),
        );
    }
    err
}

pub(crate) fn now_micros() -> i64 {
    anumate_store::now_micros()
}

pub(crate) fn ts(micros: i64) -> Option<pbjson_types::Timestamp> {
    Some(anumate_proto::timestamp_from_micros(micros))
}

/// Whether a run state is terminal.
pub fn is_terminal(state: i32) -> bool {
    matches!(
        pb::RunState::try_from(state),
        Ok(pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled)
    )
}

fn run_not_found(id: &str) -> Error {
    Error::because(Reason::RunNotFound, format!("run {id:?} not found"))
}

fn state_name(state: i32) -> &'static str {
    pb::RunState::try_from(state)
        .map(|s| s.as_str_name())
        .unwrap_or("RUN_STATE_UNSPECIFIED")
}

impl Orchestrator {
    /// An orchestrator over `store`, calling `up`.
    pub fn new(store: Store, up: Upstreams, cfg: OrchestratorConfig) -> Orchestrator {
        let (changed, _) = tokio::sync::broadcast::channel(1024);
        Orchestrator {
            inner: Arc::new(Inner {
                store,
                up,
                cfg,
                worker_id: format!("orchestrator-{}", uuid::Uuid::new_v4()),
                wake: tokio::sync::Notify::new(),
                changed,
                driving: Mutex::default(),
                awaiting: Mutex::default(),
                nudged: Mutex::default(),
                known: Mutex::default(),
            }),
        }
    }

    /// This process's lease holder name.
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    async fn plan(
        &self,
        caller: &Caller,
        tenant: &str,
        hash: &str,
    ) -> Result<Arc<cpb::ExecutablePlan>> {
        self.inner.up.plans.plan(caller, tenant, hash).await
    }

    /// The engine of a run: its plan, policies and the starter's context at
    /// the run's creation time.
    pub(crate) async fn engine(
        &self,
        starter: &Starter,
        plan_hash: &str,
        created_at: i64,
    ) -> Result<(Arc<cpb::ExecutablePlan>, anumate_engine::Engine)> {
        let caller = starter.caller();
        let plan = self.plan(&caller, &starter.tenant, plan_hash).await?;
        // The stored plan is compiled once per process (the loader's
        // cache by tenant and hash), not on every pass over the run.
        let loader = &self.inner.up.plans;
        let context = loader.context(
            &starter.tenant,
            &starter.subject,
            &starter.roles,
            &starter.groups,
            created_at.div_euclid(1_000_000),
        );
        let engine = loader
            .prepared(&caller, &starter.tenant, &plan)
            .await?
            .with_context(context);
        Ok((plan, engine))
    }

    /// The interpreter of `plan` for a run created at `created_at` (the
    /// compensation of a step is decided on a copy of its plan).
    pub(crate) async fn engine_of(
        &self,
        starter: &Starter,
        plan: &cpb::ExecutablePlan,
        created_at: i64,
    ) -> Result<anumate_engine::Engine> {
        let loader = &self.inner.up.plans;
        let context = loader.context(
            &starter.tenant,
            &starter.subject,
            &starter.roles,
            &starter.groups,
            created_at.div_euclid(1_000_000),
        );
        loader.engine(&starter.caller(), plan, context).await
    }

    /// The starter's tenant settings; the defaults (preflight required)
    /// when the registry cannot be asked.
    async fn settings(&self, starter: &Starter) -> TenantSettings {
        match self
            .inner
            .up
            .settings
            .get_tenant_settings(&starter.caller())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(tenant = %starter.tenant, error = %e, "tenant settings unavailable; using the defaults");
                TenantSettings::default()
            }
        }
    }

    /// `Execute`.
    pub async fn execute(
        &self,
        actor: &Actor,
        r: pb::ExecuteRequest,
        header_key: Option<String>,
    ) -> Result<(pb::Run, bool)> {
        let key = match (r.idempotency_key.is_empty(), header_key) {
            (true, None) => {
                return Err(Error::invalid_argument(
                    "idempotency_key",
                    "is required (in the request or the idempotency-key metadata)",
                ));
            }
            (true, Some(h)) => h,
            (false, Some(h)) if h != r.idempotency_key => {
                return Err(Error::invalid_argument(
                    "idempotency_key",
                    "differs from the idempotency-key metadata",
                ));
            }
            (false, _) => r.idempotency_key.clone(),
        };
        if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
            return Err(Error::invalid_argument(
                "idempotency_key",
                "must be 1-128 printable ASCII characters without spaces",
            ));
        }
        if r.plan_hash.is_empty() {
            return Err(Error::invalid_argument("plan_hash", "is required"));
        }
        let plan_hash = anumate_crypto::parse_digest("plan_hash", &r.plan_hash)?;
        check_labels(&r.labels)?;
        let timeout_ms = match &r.timeout {
            None => 0,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Error::invalid_argument("timeout", "must not be negative"));
            }
            Some(d) if d.seconds > 365 * 86400 => {
                return Err(Error::invalid_argument(
                    "timeout",
                    "must be at most 365 days",
                ));
            }
            Some(d) => d.seconds * 1000 + i64::from(d.nanos) / 1_000_000,
        };
        let inputs = match &r.inputs {
            None => json!({}),
            Some(s) => anumate_engine::json::struct_json(s)
                .map_err(|e| Error::invalid_argument("inputs", e.to_string()))?,
        };
        let inputs_hash = anumate_engine::json::digest(&inputs);
        let labels: BTreeMap<&String, &String> = r.labels.iter().collect();
        let request = json!({
            "plan_hash": plan_hash,
            "inputs_hash": inputs_hash,
            "preflight_id": r.preflight_id,
            "labels": labels,
            "timeout_ms": timeout_ms,
        });
        let tenant = actor.starter.tenant.clone();
        let settings = self.settings(&actor.starter).await;
        if let Some(found) = self.by_key(&tenant, &key, &request, &settings).await? {
            return Ok((found, false));
        }

        let (plan, engine) = self
            .engine(&actor.starter, &plan_hash, now_micros())
            .await?;
        if let Err(v) = engine.start(&inputs) {
            let summary = v
                .iter()
                .map(|x| format!("{}: {}", x.field, x.description))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("inputs do not match the plan's inputs schema: {summary}"),
            )
            .with_violations(v));
        }
        if !r.preflight_id.is_empty() || settings.require_preflight {
            self.check_preflight(actor, &r.preflight_id, &plan_hash, &inputs_hash, &settings)
                .await?;
        }

        let now = now_micros();
        let run_id = uuid::Uuid::now_v7().to_string();
        let mut run = pb::Run {
            run_id: run_id.clone(),
            plan_hash: plan_hash.clone(),
            capsule_name: plan.capsule_name.clone(),
            capsule_version: plan.capsule_version,
            state: pb::RunState::Pending as i32,
            inputs: Some(anumate_engine::json::to_struct(&inputs)),
            inputs_hash: inputs_hash.clone(),
            preflight_id: r.preflight_id.clone(),
            idempotency_key: key.clone(),
            created_by: actor.starter.subject.clone(),
            create_time: ts(now),
            update_time: ts(now),
            labels: r.labels.clone(),
            timeout: r.timeout.filter(|_| timeout_ms > 0),
            deadline: (timeout_ms > 0)
                .then(|| ts(now + timeout_ms * 1000))
                .flatten(),
            ..Default::default()
        };
        let steps: Vec<pb::StepRun> = plan
            .steps
            .iter()
            .map(|s| pb::StepRun {
                step_id: s.id.clone(),
                tool: s.tool.clone(),
                state: pb::StepState::Pending as i32,
                attempt_timeout: s.timeout,
                ..Default::default()
            })
            .collect();
        let tx = self.inner.store.write(&tenant).await?;
        let row = repo::RunRow {
            run: run.clone(),
            request: request.clone(),
            principal: actor.starter.clone(),
        };
        if let Err(e) = repo::insert_run(&tx, &row, now).await {
            drop(tx);
            // A concurrent Execute with the same key won.
            if let Some(found) = self.by_key(&tenant, &key, &request, &settings).await? {
                return Ok((found, false));
            }
            return Err(e);
        }
        for (i, s) in steps.iter().enumerate() {
            repo::put_step(&tx, &run_id, i, s).await?;
        }
        journal(
            &tx,
            &mut run,
            None,
            "run.started",
            &actor.starter.subject,
            "",
            0,
        )
        .await?;
        anumate_events::append(
            &tx,
            &ev::RunStarted {
                tenant_id: tenant.clone(),
                run_id: run_id.clone(),
                plan_hash: plan_hash.clone(),
                capsule_name: run.capsule_name.clone(),
                capsule_version: run.capsule_version,
                inputs_hash: inputs_hash.clone(),
                preflight_id: r.preflight_id.clone(),
                actor: actor.starter.subject.clone(),
            },
            event_ctx(&run_id, &plan_hash),
        )
        .await
        .map_err(Error::internal)?;
        repo::schedule(&tx, &run_id, now).await?;
        tx.commit().await?;
        tracing::info!(tenant = %tenant, run = %run_id, plan_hash = %plan_hash, "run accepted");
        self.notify_changed(&tenant, &run_id);
        self.inner.wake.notify_one();
        run.steps = steps;
        Ok((run, true))
    }

    /// The run of an idempotency key, when the request matches; the key is
    /// freed when older than the retention.
    async fn by_key(
        &self,
        tenant: &str,
        key: &str,
        request: &Value,
        settings: &TenantSettings,
    ) -> Result<Option<pb::Run>> {
        let found = {
            let tx = self.inner.store.read(tenant).await?;
            repo::run_by_key(&tx, key).await?
        };
        let Some(found) = found else {
            return Ok(None);
        };
        let created = found
            .run
            .create_time
            .as_ref()
            .map(anumate_proto::micros_from_timestamp_saturating)
            .unwrap_or(0);
        let retention =
            i64::try_from(settings.idempotency_retention.as_micros()).unwrap_or(i64::MAX);
        if created.saturating_add(retention) < now_micros() {
            let tx = self.inner.store.write(tenant).await?;
            repo::retire_key(&tx, &found.run.run_id).await?;
            tx.commit().await?;
            return Ok(None);
        }
        if let (Some(old), Some(new)) = (found.request.as_object(), request.as_object()) {
            for (field, v) in new {
                if old.get(field) != Some(v) {
                    return Err(Error::because(
                        Reason::IdempotencyKeyReused,
                        format!(
                            "idempotency key {key:?} was used for run {} with another {field}",
                            found.run.run_id
                        ),
                    )
                    .with_metadata("field", field.as_str())
                    .with_metadata("run_id", found.run.run_id.as_str()));
                }
            }
        }
        Ok(Some(self.load(tenant, &found.run.run_id).await?))
    }

    async fn check_preflight(
        &self,
        actor: &Actor,
        id: &str,
        plan_hash: &str,
        inputs_hash: &str,
        settings: &TenantSettings,
    ) -> Result<()> {
        if id.is_empty() {
            return Err(Error::because(
                Reason::PreflightRequired,
                "this tenant requires a preflight: run `anumate preflight` and cite its id as preflight_id",
            ));
        }
        let report = self
            .inner
            .up
            .ghostrun
            .get_preflight(
                &actor.starter.caller(),
                gpb::GetPreflightRequest {
                    preflight_id: id.to_string(),
                },
            )
            .await
            .map_err(|e| upstream(&e, "GhostRun"))?
            .report
            .ok_or_else(|| Error::internal("GhostRun answered without a report"))?;
        if report.plan_hash != plan_hash {
            return Err(Error::because(
                Reason::PreflightMismatch,
                format!(
                    "preflight {id} is for plan {}, not {plan_hash}",
                    report.plan_hash
                ),
            )
            .with_metadata("field", "plan_hash"));
        }
        if report.inputs_hash != inputs_hash {
            return Err(Error::because(
                Reason::PreflightMismatch,
                format!(
                    "preflight {id} was made with other inputs ({})",
                    report.inputs_hash
                ),
            )
            .with_metadata("field", "inputs_hash"));
        }
        same_policy_env(id, report.policy_env.as_ref(), self.inner.up.plans.env())?;
        if report.verdict == gpb::PreflightVerdict::Fail as i32 {
            return Err(Error::because(
                Reason::PreflightFailed,
                format!("preflight {id} failed; fix what it reports and preflight again"),
            ));
        }
        if !report.citable {
            return Err(Error::because(
                Reason::PreflightFailed,
                format!("preflight {id} used fixtures and may not be cited"),
            ));
        }
        let ttl = i64::try_from(settings.preflight_citation_ttl.as_micros()).unwrap_or(i64::MAX);
        let made = report
            .create_time
            .as_ref()
            .map_or(0, anumate_proto::micros_from_timestamp_saturating);
        let tenant_expiry = anumate_proto::timestamp_from_micros(made.saturating_add(ttl));
        let expiry = match &report.citation_expire_time {
            Some(t)
                if anumate_proto::micros_from_timestamp_saturating(t)
                    < made.saturating_add(ttl) =>
            {
                *t
            }
            _ => tenant_expiry,
        };
        if anumate_proto::micros_from_timestamp_saturating(&expiry) < now_micros() {
            let t = &expiry;
            return Err(Error::because(
                Reason::PreflightExpired,
                format!("preflight {id} may no longer be cited; preflight again"),
            )
            .with_metadata(
                "expire_time",
                chrono::DateTime::from_timestamp(t.seconds, 0)
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_default(),
            ));
        }
        Ok(())
    }

    /// A run with its steps, read in one statement (one round trip on
    /// PostgreSQL: `GetRun` is what clients poll).
    pub async fn load(&self, tenant: &str, run_id: &str) -> Result<pb::Run> {
        let (row, steps) = repo::run_and_steps(&self.inner.store, tenant, run_id)
            .await?
            .ok_or_else(|| run_not_found(run_id))?;
        let mut run = row.run;
        run.steps = steps;
        Ok(run)
    }

    /// `GetRun`.
    pub async fn get(&self, actor: &Actor, run_id: &str) -> Result<pb::Run> {
        if run_id.is_empty() {
            return Err(Error::invalid_argument("run_id", "is required"));
        }
        self.load(&actor.starter.tenant, run_id).await
    }

    /// `ListRuns`.
    pub async fn list(
        &self,
        actor: &Actor,
        r: &pb::ListRunsRequest,
    ) -> Result<(Vec<pb::Run>, String)> {
        let plan_hash = if r.plan_hash.is_empty() {
            String::new()
        } else {
            anumate_crypto::parse_digest("plan_hash", &r.plan_hash)?
        };
        let micros = |t: &Option<pbjson_types::Timestamp>, field: &str| -> Result<Option<i64>> {
            t.as_ref()
                .map(|t| {
                    anumate_proto::micros_from_timestamp(t)
                        .map_err(|e| Error::invalid_argument(field, e.to_string()))
                })
                .transpose()
        };
        let filter = repo::Filter {
            state: r.state,
            plan_hash: &plan_hash,
            capsule_name: &r.capsule_name,
            created_by: &r.created_by,
            after: micros(&r.create_time_after, "create_time_after")?,
            before: micros(&r.create_time_before, "create_time_before")?,
        };
        let tx = self.inner.store.read(&actor.starter.tenant).await?;
        let (runs, next) = repo::list(&tx, &filter, r.page_size, &r.page_token).await?;
        let runs = runs
            .into_iter()
            .filter(|run| r.labels.iter().all(|(k, v)| run.labels.get(k) == Some(v)))
            .map(|run| pb::Run {
                inputs: None,
                steps: Vec::new(),
                ..run
            })
            .collect();
        Ok((runs, next))
    }

    /// `ListRunHistory`.
    pub async fn history(
        &self,
        actor: &Actor,
        r: &pb::ListRunHistoryRequest,
    ) -> Result<(Vec<pb::RunHistoryEntry>, String)> {
        let tenant = &actor.starter.tenant;
        let size = match r.page_size {
            n if n < 0 => return Err(Error::invalid_argument("page_size", "must not be negative")),
            0 => 100,
            n => i64::from(n.min(1000)),
        };
        let after = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Error::invalid_argument("page_token", "is malformed"))?
        };
        let tx = self.inner.store.read(tenant).await?;
        if repo::get_run(&tx, &r.run_id, false).await?.is_none() {
            return Err(run_not_found(&r.run_id));
        }
        let mut rows = repo::history(&tx, &r.run_id, after, size + 1).await?;
        let more = rows.len() as i64 > size;
        rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        let next = if more {
            rows.last()
                .map(|(e, _)| e.sequence.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows.into_iter().map(|(e, _)| e).collect(), next))
    }

    /// Changes after `after` for `WatchRun`.
    pub(crate) async fn changes(
        &self,
        tenant: &str,
        run_id: &str,
        after: i64,
    ) -> Result<Vec<pb::WatchRunResponse>> {
        let tx = self.inner.store.read(tenant).await?;
        Ok(repo::history(&tx, run_id, after, 256)
            .await?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// A receiver of (tenant, run) pairs whose journal changed in this process.
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<(String, String)> {
        self.inner.changed.subscribe()
    }

    pub(crate) fn notify_changed(&self, tenant: &str, run_id: &str) {
        let _ = self
            .inner
            .changed
            .send((tenant.to_string(), run_id.to_string()));
    }

    /// Runs a control change on a locked, non-terminal run (etag checked).
    async fn control<F>(
        &self,
        actor: &Actor,
        run_id: &str,
        etag: &str,
        terminal_ok: bool,
        change: F,
    ) -> Result<pb::Run>
    where
        F: FnOnce(&mut pb::Run, &mut Vec<pb::StepRun>) -> Result<Vec<Change>>,
    {
        if run_id.is_empty() {
            return Err(Error::invalid_argument("run_id", "is required"));
        }
        let tenant = actor.starter.tenant.clone();
        let tx = self.inner.store.write(&tenant).await?;
        let row = repo::get_run(&tx, run_id, true)
            .await?
            .ok_or_else(|| run_not_found(run_id))?;
        let mut run = row.run;
        if !etag.is_empty() && etag != run.etag {
            return Err(Error::because(
                Reason::EtagMismatch,
                format!("run {run_id} changed since it was read"),
            )
            .with_metadata("current_etag", run.etag.as_str()));
        }
        if is_terminal(run.state) {
            if terminal_ok {
                run.steps = repo::steps(&tx, run_id).await?;
                return Ok(run);
            }
            return Err(Error::because(
                Reason::RunTerminal,
                format!("run {run_id} has ended ({})", state_name(run.state)),
            )
            .with_metadata("state", state_name(run.state)));
        }
        let mut steps = repo::steps(&tx, run_id).await?;
        let changes = change(&mut run, &mut steps)?;
        for c in &changes {
            let step = c.step.and_then(|i| steps.get(i));
            if let Some(i) = c.step
                && let Some(s) = steps.get(i)
            {
                repo::put_step(&tx, run_id, i, s).await?;
            }
            journal(
                &tx,
                &mut run,
                step,
                c.kind,
                &actor.starter.subject,
                &c.message,
                0,
            )
            .await?;
            if let Some(event) = &c.event {
                event.append(&tx, &run).await?;
            }
        }
        if changes.iter().any(|c| c.wake) {
            repo::schedule(&tx, run_id, now_micros()).await?;
        }
        tx.commit().await?;
        self.notify_changed(&tenant, run_id);
        if changes.iter().any(|c| c.wake) {
            self.inner.wake.notify_one();
        }
        run.steps = steps;
        Ok(run)
    }

    /// `PauseRun`.
    pub async fn pause(&self, actor: &Actor, r: &pb::PauseRunRequest) -> Result<pb::Run> {
        let who = actor.starter.subject.clone();
        let reason = bounded_reason(&r.reason)?;
        self.control(actor, &r.run_id, &r.etag, false, |run, _| {
            if run.state == pb::RunState::Paused as i32 {
                return Ok(vec![]);
            }
            run.paused_from = run.state;
            run.state = pb::RunState::Paused as i32;
            run.state_reason = reason.clone();
            Ok(vec![Change::run("run.paused", &reason).with_event(
                RunEvent::Paused {
                    reason: reason.clone(),
                    actor: who,
                },
            )])
        })
        .await
    }

    /// `ResumeRun`.
    pub async fn resume(&self, actor: &Actor, r: &pb::ResumeRunRequest) -> Result<pb::Run> {
        let who = actor.starter.subject.clone();
        self.control(actor, &r.run_id, &r.etag, false, |run, _| {
            if run.state != pb::RunState::Paused as i32 {
                return Ok(vec![]);
            }
            run.state = match run.paused_from {
                0 => pb::RunState::Running as i32,
                s => s,
            };
            run.paused_from = 0;
            Ok(vec![
                Change::run("run.resumed", "")
                    .with_event(RunEvent::Resumed { actor: who })
                    .waking(),
            ])
        })
        .await
    }

    /// `CancelRun`: accepted at once; a worker stops the run.
    pub async fn cancel(&self, actor: &Actor, r: &pb::CancelRunRequest) -> Result<pb::Run> {
        let reason = bounded_reason(&r.reason)?;
        self.control(actor, &r.run_id, &r.etag, true, |run, _| {
            if run.cancel_requested {
                return Ok(vec![]);
            }
            run.cancel_requested = true;
            run.state_reason = reason.clone();
            if run.state == pb::RunState::Paused as i32 {
                run.state = run.paused_from;
                run.paused_from = 0;
            }
            Ok(vec![Change::run("run.cancel_requested", &reason).waking()])
        })
        .await
    }

    /// `KillRun`: the run ends `CANCELLED` before this returns.
    pub async fn kill(&self, actor: &Actor, r: &pb::KillRunRequest) -> Result<pb::Run> {
        let reason = bounded_reason(&r.reason)?;
        let run = self
            .control(actor, &r.run_id, &r.etag, true, |run, steps| {
                let now = now_micros();
                let mut changes = Vec::new();
                for (i, s) in steps.iter_mut().enumerate() {
                    if step_is_done(s.state) {
                        continue;
                    }
                    for a in s.attempts.iter_mut().chain(&mut s.compensation_attempts) {
                        if a.state == pb::AttemptState::Running as i32 {
                            a.state = pb::AttemptState::Abandoned as i32;
                            a.end_time = ts(now);
                        }
                    }
                    // A step being compensated had succeeded: it stays on
                    // record as a compensation that did not finish.
                    (s.state, s.state_reason) = match pb::StepState::try_from(s.state) {
                        Ok(pb::StepState::Pending) => {
                            (pb::StepState::Skipped as i32, "the run was killed".into())
                        }
                        Ok(pb::StepState::Compensating) => (
                            pb::StepState::CompensationFailed as i32,
                            "the run was killed during the step's compensation".into(),
                        ),
                        _ => (pb::StepState::Cancelled as i32, "the run was killed".into()),
                    };
                    s.end_time = ts(now);
                    changes.push(Change::step(i, "step.cancelled", "the run was killed"));
                }
                run.killed = true;
                run.cancel_requested = true;
                run.state = pb::RunState::Cancelled as i32;
                run.paused_from = 0;
                run.state_reason = reason.clone();
                run.end_time = ts(now);
                changes.push(
                    Change::run("run.killed", &reason).with_event(RunEvent::Cancelled {
                        reason: reason.clone(),
                        actor: actor.starter.subject.clone(),
                    }),
                );
                Ok(changes)
            })
            .await?;
        if run.killed {
            self.after_end(&actor.starter, &run).await;
        }
        Ok(run)
    }

    /// `ResolveStep`.
    pub async fn resolve(&self, actor: &Actor, r: &pb::ResolveStepRequest) -> Result<pb::Run> {
        let action =
            pb::ResolveAction::try_from(r.action).unwrap_or(pb::ResolveAction::Unspecified);
        if action == pb::ResolveAction::Unspecified {
            return Err(Error::invalid_argument("action", "is required"));
        }
        if r.reason.trim().is_empty() {
            return Err(Error::invalid_argument("reason", "is required"));
        }
        let reason = bounded_reason(&r.reason)?;
        let output = match &r.output {
            Some(v) => anumate_engine::json::value_json(v, 0)
                .map_err(|e| Error::invalid_argument("output", e.to_string()))?,
            None => Value::Null,
        };
        let who = actor.starter.subject.clone();
        // The receipt first (who resolved the step, how and why), once the
        // change is known to apply to the run as it is; then the change,
        // naming the receipt. A run that changed in between refuses the
        // change as before (its etag), leaving the receipt of an attempt.
        let precheck = {
            let tx = self.inner.store.read(&actor.starter.tenant).await?;
            match repo::get_run(&tx, &r.run_id, false).await? {
                Some(row)
                    if !is_terminal(row.run.state)
                        && (r.etag.is_empty() || r.etag == row.run.etag) =>
                {
                    let mut run = row.run;
                    let mut steps = repo::steps(&tx, &r.run_id).await?;
                    let before = steps
                        .iter()
                        .find(|s| s.step_id == r.step_id)
                        .map(|s| s.state);
                    resolve_change(
                        &mut run,
                        &mut steps,
                        r,
                        action,
                        &reason,
                        &output,
                        who.clone(),
                    )?;
                    Some((run, before.unwrap_or(0)))
                }
                // Not found, ended or stale: the change below says so.
                _ => None,
            }
        };
        let receipt = match &precheck {
            Some((run, before)) => {
                let content = json!({
                    "resolution": action.as_str_name(),
                    "resolved_by": who,
                    "reason": reason,
                    "step_state_before": state_name_step(*before),
                    "output_digest": if action == pb::ResolveAction::MarkSucceeded {
                        anumate_engine::json::digest(&output)
                    } else {
                        String::new()
                    },
                });
                self.receipt(
                    &actor.starter,
                    run,
                    &r.step_id,
                    0,
                    &[],
                    content,
                    &format!("resolve:{}:{}:{}", run.run_id, r.step_id, run.etag),
                )
                .await?
            }
            None => String::new(),
        };
        self.control(actor, &r.run_id, &r.etag, false, |run, steps| {
            let changes = resolve_change(run, steps, r, action, &reason, &output, who)?;
            if let Some(s) = steps.iter_mut().find(|s| s.step_id == r.step_id) {
                s.resolution_receipt_id = receipt;
            }
            Ok(changes)
        })
        .await
    }

    /// After a run ended by a control call: open approvals cancelled and the
    /// run's tokens revoked (best effort; logged).
    pub(crate) async fn after_end(&self, starter: &Starter, run: &pb::Run) {
        let caller = starter.caller();
        for s in &run.steps {
            if s.state != pb::StepState::Cancelled as i32 {
                continue;
            }
            for id in &s.approval_ids {
                if let Err(e) = self
                    .inner
                    .up
                    .approvals
                    .cancel_approval(
                        &caller,
                        anumate_proto::approvals::v1::CancelApprovalRequest {
                            approval_id: id.clone(),
                            reason: "the run ended".into(),
                        },
                    )
                    .await
                {
                    tracing::warn!(run = %run.run_id, approval = %id, error = %e, "could not cancel an approval of an ended run");
                }
            }
        }
        if let Err(e) = self
            .inner
            .up
            .captokens
            .revoke_run(&caller, &run.run_id, &run.state_reason)
            .await
        {
            tracing::warn!(run = %run.run_id, error = %e, "could not revoke the tokens of an ended run");
        }
    }
}

/// The change `ResolveStep` makes to a run and its steps.
fn resolve_change(
    run: &mut pb::Run,
    steps: &mut [pb::StepRun],
    r: &pb::ResolveStepRequest,
    action: pb::ResolveAction,
    reason: &str,
    output: &Value,
    who: String,
) -> Result<Vec<Change>> {
    let reason = reason.to_string();
    let i = steps
        .iter()
        .position(|s| s.step_id == r.step_id)
        .ok_or_else(|| {
            Error::because(
                Reason::StepNotFound,
                format!("run {} has no step {:?}", run.run_id, r.step_id),
            )
        })?;
    let s = &mut steps[i];
    let state = pb::StepState::try_from(s.state).unwrap_or(pb::StepState::Unspecified);
    let allowed = match action {
        pb::ResolveAction::Retry => {
            matches!(state, pb::StepState::NeedsAttention | pb::StepState::Failed)
        }
        _ => state == pb::StepState::NeedsAttention,
    };
    if !allowed {
        return Err(Error::because(
            Reason::StepNotResolvable,
            format!(
                "step {:?} is {} and cannot be resolved with {}",
                s.step_id,
                state.as_str_name(),
                action.as_str_name()
            ),
        )
        .with_metadata("state", state.as_str_name()));
    }
    let now = now_micros();
    match action {
        pb::ResolveAction::Retry => {
            s.state = pb::StepState::Pending as i32;
            s.failure = None;
            s.end_time = None;
        }
        pb::ResolveAction::MarkSucceeded => {
            s.state = pb::StepState::Succeeded as i32;
            s.output = Some(anumate_engine::json::to_value(output));
            s.end_time = ts(now);
        }
        _ => {
            s.state = pb::StepState::Failed as i32;
            s.failure = Some(pb::Failure {
                kind: pb::FailureKind::ToolError as i32,
                code: "MARKED_FAILED".into(),
                message: reason.clone(),
                retryable: false,
                step_id: s.step_id.clone(),
            });
            s.end_time = ts(now);
        }
    }
    s.state_reason = reason.clone();
    if run.state == pb::RunState::Failed as i32 {
        run.state = pb::RunState::Running as i32;
        run.failure = None;
        run.end_time = None;
    }
    Ok(vec![
        Change::step(i, "step.resolved", &reason)
            .with_event(RunEvent::Resolved {
                step_id: r.step_id.clone(),
                action,
                reason: reason.clone(),
                actor: who,
            })
            .waking(),
    ])
}

fn state_name_step(state: i32) -> &'static str {
    pb::StepState::try_from(state).map_or("STEP_STATE_UNSPECIFIED", |s| s.as_str_name())
}

fn bounded_reason(reason: &str) -> Result<String> {
    if reason.chars().count() > 1024 {
        return Err(Error::invalid_argument(
            "reason",
            "is longer than 1024 characters",
        ));
    }
    if reason.chars().any(|c| c.is_control() && c != '\n') {
        return Err(Error::invalid_argument("reason", "has control characters"));
    }
    Ok(reason.to_string())
}

fn check_labels(labels: &HashMap<String, String>) -> Result<()> {
    if labels.len() > 16 {
        return Err(Error::invalid_argument("labels", "at most 16 labels"));
    }
    for (k, v) in labels {
        let ok = (1..=63).contains(&k.len())
            && k.starts_with(|c: char| c.is_ascii_lowercase())
            && k.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if !ok {
            return Err(Error::invalid_argument(
                &format!("labels.{k}"),
                "keys are 1-63 characters of [a-z0-9_.-] starting with a letter",
            ));
        }
        if v.chars().count() > 256 || v.chars().any(char::is_control) {
            return Err(Error::invalid_argument(
                &format!("labels.{k}"),
                "values are at most 256 characters without control characters",
            ));
        }
    }
    Ok(())
}

/// Whether a step state is final for scheduling.
pub(crate) fn step_is_done(state: i32) -> bool {
    matches!(
        pb::StepState::try_from(state),
        Ok(pb::StepState::Succeeded
            | pb::StepState::Failed
            | pb::StepState::Skipped
            | pb::StepState::Cancelled
            | pb::StepState::Compensated
            | pb::StepState::CompensationFailed)
    )
}

pub(crate) fn event_ctx<'a>(
    subject: &'a str,
    plan_hash: &'a str,
) -> anumate_events::EventContext<'a> {
    anumate_events::EventContext {
        subject,
        plan_hash: Some(plan_hash),
        ..Default::default()
    }
}

/// One journaled change a control call or a worker makes.
pub(crate) struct Change {
    pub step: Option<usize>,
    pub kind: &'static str,
    pub message: String,
    pub event: Option<RunEvent>,
    pub wake: bool,
}

impl Change {
    pub fn run(kind: &'static str, message: &str) -> Change {
        Change {
            step: None,
            kind,
            message: message.to_string(),
            event: None,
            wake: false,
        }
    }

    pub fn step(i: usize, kind: &'static str, message: &str) -> Change {
        Change {
            step: Some(i),
            ..Change::run(kind, message)
        }
    }

    pub fn with_event(mut self, e: RunEvent) -> Change {
        self.event = Some(e);
        self
    }

    pub fn waking(mut self) -> Change {
        self.wake = true;
        self
    }
}

/// Events of control calls.
pub(crate) enum RunEvent {
    Paused {
        reason: String,
        actor: String,
    },
    Resumed {
        actor: String,
    },
    Cancelled {
        reason: String,
        actor: String,
    },
    Resolved {
        step_id: String,
        action: pb::ResolveAction,
        reason: String,
        actor: String,
    },
}

impl RunEvent {
    async fn append(&self, tx: &TenantTx, run: &pb::Run) -> Result<()> {
        let tenant_id = tx.tenant_id().to_string();
        let ctx = event_ctx(&run.run_id, &run.plan_hash);
        let r = match self {
            RunEvent::Paused { reason, actor } => {
                anumate_events::append(
                    tx,
                    &ev::RunPaused {
                        tenant_id,
                        run_id: run.run_id.clone(),
                        plan_hash: run.plan_hash.clone(),
                        paused_from: run.paused_from,
                        reason: reason.clone(),
                        actor: actor.clone(),
                    },
                    ctx,
                )
                .await
            }
            RunEvent::Resumed { actor } => {
                anumate_events::append(
                    tx,
                    &ev::RunResumed {
                        tenant_id,
                        run_id: run.run_id.clone(),
                        plan_hash: run.plan_hash.clone(),
                        state: run.state,
                        actor: actor.clone(),
                    },
                    ctx,
                )
                .await
            }
            RunEvent::Cancelled { reason, actor } => {
                anumate_events::append(
                    tx,
                    &ev::RunCancelled {
                        tenant_id,
                        run_id: run.run_id.clone(),
                        plan_hash: run.plan_hash.clone(),
                        killed: run.killed,
                        compensated_step_ids: Vec::new(),
                        reason: reason.clone(),
                        receipt_id: run.receipt_id.clone(),
                        actor: actor.clone(),
                    },
                    ctx,
                )
                .await
            }
            RunEvent::Resolved {
                step_id,
                action,
                reason,
                actor,
            } => {
                anumate_events::append(
                    tx,
                    &ev::StepResolved {
                        tenant_id,
                        run_id: run.run_id.clone(),
                        plan_hash: run.plan_hash.clone(),
                        step_id: step_id.clone(),
                        action: *action as i32,
                        reason: reason.clone(),
                        receipt_id: String::new(),
                        actor: actor.clone(),
                    },
                    ctx,
                )
                .await
            }
        };
        r.map(|_| ()).map_err(Error::internal)
    }
}

/// Records one change of `run` (and `step`): the run's sequence and etag
/// move on, the run row is saved, and the history entry (with the change
/// `WatchRun` streams) is appended, all in `tx`.
pub(crate) async fn journal(
    tx: &TenantTx,
    run: &mut pb::Run,
    step: Option<&pb::StepRun>,
    kind: &str,
    actor: &str,
    message: &str,
    attempt: i32,
) -> Result<()> {
    let entry = journal_entry(run, step, kind, actor, message, attempt);
    repo::update_run(tx, run).await?;
    entry.append(tx, &run.run_id).await
}

/// One journal entry of a change of `run`, not yet stored.
pub(crate) struct JournalEntry {
    entry: pb::RunHistoryEntry,
    change: pb::WatchRunResponse,
    at: i64,
}

impl JournalEntry {
    /// Stores the entry (the run itself is saved apart).
    pub(crate) async fn append(&self, tx: &TenantTx, run_id: &str) -> Result<()> {
        repo::append_history(tx, run_id, &self.entry, &self.change, self.at).await
    }
}

/// [`journal`]'s entry: moves `run` to its next sequence (etag, update
/// time) and returns the entry, leaving the writes to the caller.
pub(crate) fn journal_entry(
    run: &mut pb::Run,
    step: Option<&pb::StepRun>,
    kind: &str,
    actor: &str,
    message: &str,
    attempt: i32,
) -> JournalEntry {
    let now = now_micros();
    run.sequence += 1;
    run.etag = format!("\"{}\"", run.sequence);
    run.update_time = ts(now);
    let entry = pb::RunHistoryEntry {
        sequence: run.sequence,
        time: ts(now),
        r#type: kind.to_string(),
        step_id: step.map(|s| s.step_id.clone()).unwrap_or_default(),
        attempt,
        run_state: run.state,
        step_state: step.map(|s| s.state).unwrap_or_default(),
        actor: actor.to_string(),
        message: message.chars().take(1024).collect(),
    };
    let change = pb::WatchRunResponse {
        sequence: run.sequence,
        time: ts(now),
        change: Some(match step {
            Some(s) => pb::watch_run_response::Change::Step(s.clone()),
            None => pb::watch_run_response::Change::Run(pb::Run {
                inputs: None,
                steps: Vec::new(),
                ..run.clone()
            }),
        }),
    };
    JournalEntry {
        entry,
        change,
        at: now,
    }
}

/// For tests: the violations of inputs against a plan's schema.
#[doc(hidden)]
pub fn violations_summary(v: &[Violation]) -> String {
    v.iter()
        .map(|x| format!("{}: {}", x.field, x.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The policies' `env` a cited preflight decided with (`seen`, from its
/// report) must be this deployment's (`ours`): else its decisions say
/// nothing about this run's (`PREFLIGHT_MISMATCH`, `field: policy_env`).
fn same_policy_env(
    id: &str,
    seen: Option<&pbjson_types::Struct>,
    ours: &serde_json::Value,
) -> Result<()> {
    let seen = match seen {
        Some(env) => anumate_engine::json::struct_json(env)
            .map_err(|e| Error::internal(format!("the report's policy_env: {e}")))?,
        None => serde_json::Value::Object(serde_json::Map::new()),
    };
    if &seen == ours {
        return Ok(());
    }
    Err(Error::because(
        Reason::PreflightMismatch,
        format!(
            "preflight {id} was made with another policy env ({seen}) than this \
             orchestrator's ([ghostrun] policy_env); preflight again"
        ),
    )
    .with_metadata("field", "policy_env"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn env(v: serde_json::Value) -> pbjson_types::Struct {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_preflight_cites_only_with_this_deployments_policy_env() {
        let ours = json!({"stage": "prod", "replicas": 3});
        // The same env (a Struct's numbers are doubles): cited.
        assert!(same_policy_env("p1", Some(&env(ours.clone())), &ours).is_ok());
        // Nothing on either side: cited.
        assert!(same_policy_env("p1", None, &json!({})).is_ok());
        // Another stage, or none where this deployment has one: refused.
        for seen in [Some(env(json!({"stage": "staging", "replicas": 3}))), None] {
            let e = same_policy_env("p1", seen.as_ref(), &ours).unwrap_err();
            assert_eq!(e.reason, Reason::PreflightMismatch);
            assert!(
                e.metadata
                    .iter()
                    .any(|(k, v)| k == "field" && v == "policy_env"),
                "{e:?}"
            );
        }
    }
}
