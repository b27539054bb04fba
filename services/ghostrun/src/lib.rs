//! GhostRun (SPEC §5): deterministic preflight of a plan on the shared
//! interpreter (`anumate-engine`), every tool call answered by the simulator.
//!
//! ```text
//! Preflight(plan_hash | capsule + version, inputs, fixtures, seed)
//!   ──▶ compiler.GetPlan / Compile         (in-process or gRPC, the caller's identity)
//!   ──▶ policy.GetPolicy × n (pinned)       (in-process or gRPC; compiled once per content hash)
//!   ──▶ registry.GetCapsule                 (the capsule version's labels; cached)
//!   ──▶ report::simulate                     (pure: inputs, fixtures, engine, simulator, risk, verdict)
//!   ──▶ registry tenant settings             (the citation expiry; in-process cached, or gRPC)
//!   ──▶ preflights table + outbox `preflight.completed` (one transaction)
//! ```
//! Bad inputs or fixtures are refused before anything is stored.
#![forbid(unsafe_code)]

pub mod grpc;
pub mod loader;
mod module;
mod repo;
pub mod report;

use std::collections::BTreeMap;
use std::sync::Arc;

use anumate_errors::{Error, Reason, Result};
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::events::v1 as ev;
use anumate_proto::ghostrun::v1 as pb;
use anumate_service::clients::{
    Caller, CompilerClient, PolicyClient, RegistryClient, TenantSettingsClient,
};
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;

pub use grpc::GhostRunGrpc;
pub use loader::Loader;
use loader::upstream;
pub use module::module;
pub use repo::MIGRATIONS as REPO_MIGRATIONS;

/// The service name GhostRun acts as towards its upstreams.
pub const SERVICE_NAME: &str = "ghostrun";

/// Every migration GhostRun needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(repo::MIGRATIONS)
}

/// `[ghostrun]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GhostRunConfig {
    /// gRPC address of the compiler when it does not run in this process;
    /// empty: this server's own listener.
    pub compiler_url: String,
    /// gRPC address of the policy service when it does not run in this
    /// process; empty: this server's own listener.
    pub policy_url: String,
    /// gRPC address of the registry (tenant settings) when it does not run
    /// in this process; empty: this server's own listener.
    pub registry_url: String,
    /// How long `Execute` may cite a report, in seconds, for a GhostRun
    /// built without the tenant settings (embedded in a test or a tool);
    /// the service reads each tenant's `preflight_citation_ttl` (registry
    /// tenant settings, default 1 h) instead.
    pub citation_ttl_secs: u64,
    /// Largest `inputs_json` accepted, in bytes.
    pub max_inputs_bytes: usize,
    /// `env` as policies see it, in preflights and in runs alike (the
    /// orchestrator reads this same key): facts about this deployment such
    /// as `{stage = "prod", region = "in-south"}`. Empty by default.
    pub policy_env: BTreeMap<String, serde_json::Value>,
}

impl Default for GhostRunConfig {
    fn default() -> Self {
        GhostRunConfig {
            compiler_url: String::new(),
            policy_url: String::new(),
            registry_url: String::new(),
            citation_ttl_secs: 3600,
            max_inputs_bytes: 256 * 1024,
            policy_env: BTreeMap::new(),
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Tenant id.
    pub tenant: String,
    /// Principal subject.
    pub subject: String,
    /// Roles, sorted.
    pub roles: Vec<String>,
    /// Groups, sorted.
    pub groups: Vec<String>,
    /// The caller's `authorization` header, forwarded when GhostRun has no
    /// service keys.
    pub authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The verified caller.
    pub principal: Option<anumate_auth::Principal>,
}

impl Actor {
    fn caller(&self) -> Caller {
        match &self.principal {
            Some(principal) => Caller::Delegated {
                principal: principal.clone(),
                service: SERVICE_NAME,
                forward: self.authorization.clone(),
            },
            None => Caller::User {
                tenant: self.tenant.clone(),
                subject: self.subject.clone(),
                authorization: self.authorization.clone(),
            },
        }
    }
}

/// The inputs of a preflight request, decoded.
pub enum Inputs {
    /// A `Struct`.
    Struct(Option<pbjson_types::Struct>),
    /// JSON object text.
    Json(String),
}

/// The GhostRun service.
#[derive(Clone)]
pub struct GhostRun {
    store: Store,
    compiler: Arc<dyn CompilerClient>,
    policy: Arc<dyn PolicyClient>,
    /// The tenants' settings (the citation expiry); `None`: `cfg.citation_ttl_secs`.
    settings: Option<Arc<dyn TenantSettingsClient>>,
    cfg: GhostRunConfig,
    /// Plans, policy sets, capsule labels and the policies' context: the
    /// same loader type the orchestrator builds its engines with.
    loader: Loader,
}

impl GhostRun {
    /// A service storing reports in `store`, reading plans from `compiler`
    /// and policies from `policy`.
    pub fn new(
        store: Store,
        compiler: Arc<dyn CompilerClient>,
        policy: Arc<dyn PolicyClient>,
        cfg: GhostRunConfig,
    ) -> GhostRun {
        let loader = Loader::new(compiler.clone(), policy.clone(), None, &cfg.policy_env);
        GhostRun {
            store,
            compiler,
            policy,
            settings: None,
            cfg,
            loader,
        }
    }

    /// Policies see the capsule version's labels (`capsule.labels`), read
    /// from `registry` (without one they see none).
    #[must_use]
    pub fn with_registry(mut self, registry: Arc<dyn RegistryClient>) -> GhostRun {
        self.loader = Loader::new(
            self.compiler.clone(),
            self.policy.clone(),
            Some(registry),
            &self.cfg.policy_env,
        );
        self
    }

    /// The loader this service builds its engines with.
    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// Reports are citable for the tenant's `preflight_citation_ttl`, read
    /// from `settings` on every preflight (the in-process client caches
    /// them until they change).
    #[must_use]
    pub fn with_settings(mut self, settings: Arc<dyn TenantSettingsClient>) -> GhostRun {
        self.settings = Some(settings);
        self
    }

    /// How long a report made now may be cited, in microseconds: the
    /// tenant's setting. A tenant whose settings cannot be read gets no
    /// report (`UNAVAILABLE`, nothing stored) rather than a longer expiry
    /// than it chose.
    async fn citation_ttl_micros(&self, actor: &Actor) -> Result<i64> {
        let ttl = match &self.settings {
            Some(settings) => {
                settings
                    .get_tenant_settings(&actor.caller())
                    .await
                    .map_err(|e| upstream(&e, "the tenant settings (registry)"))?
                    .preflight_citation_ttl
            }
            None => std::time::Duration::from_secs(self.cfg.citation_ttl_secs),
        };
        Ok(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX / 4))
    }

    async fn plan(
        &self,
        actor: &Actor,
        r: &pb::PreflightRequest,
    ) -> Result<Arc<cpb::ExecutablePlan>> {
        match (r.plan_hash.is_empty(), r.capsule_name.is_empty()) {
            (true, true) => {
                return Err(Error::invalid_argument(
                    "plan_hash",
                    "give a plan_hash or a capsule_name",
                ));
            }
            (false, false) => {
                return Err(Error::invalid_argument(
                    "capsule_name",
                    "give a plan_hash or a capsule_name, not both",
                ));
            }
            _ => {}
        }
        if !r.capsule_name.is_empty() {
            let resp = self
                .compiler
                .compile(
                    &actor.caller(),
                    cpb::CompileRequest {
                        capsule_name: r.capsule_name.clone(),
                        version: r.capsule_version.clone(),
                    },
                )
                .await
                .map_err(|e| upstream(&e, "the compiler"))?;
            let plan = resp
                .plan
                .ok_or_else(|| Error::internal("the compiler answered without a plan"))?;
            return Ok(Arc::new(plan));
        }
        let hash = anumate_crypto::parse_digest("plan_hash", &r.plan_hash)?;
        self.loader
            .plan(&actor.caller(), &actor.tenant, &hash)
            .await
    }

    /// Runs a preflight and stores its report.
    ///
    /// # Errors
    /// See the `Preflight` RPC.
    pub async fn preflight(
        &self,
        actor: &Actor,
        r: pb::PreflightRequest,
        inputs: Inputs,
    ) -> Result<pb::PreflightReport> {
        let inputs = self.inputs(inputs)?;
        let plan = self.plan(actor, &r).await?;
        let engine = self
            .loader
            .prepared(&actor.caller(), &actor.tenant, &plan)
            .await?;
        let ttl_micros = self.citation_ttl_micros(actor).await?;
        let now_micros = anumate_store::now_micros();
        // Whole seconds: what policies compare, and what the report echoes.
        let now_secs = now_micros.div_euclid(1_000_000);
        let context = self.loader.context(
            &actor.tenant,
            &actor.subject,
            &actor.roles,
            &actor.groups,
            now_secs,
        );
        let fixtures = r.fixtures.clone();
        let seed = r.seed;
        let plan2 = plan.clone();
        let (mut report, hashed) = anumate_cpu::run(move || {
            report::simulate_json(&report::SimInput {
                plan: &plan2,
                engine,
                context,
                evaluation_time: pbjson_types::Timestamp {
                    seconds: now_secs,
                    nanos: 0,
                },
                inputs: &inputs,
                fixtures: &fixtures,
                seed,
            })
        })
        .await?;
        report.preflight_id = uuid::Uuid::now_v7().to_string();
        report.create_time = Some(anumate_proto::timestamp_from_micros(now_micros));
        if report.citable {
            report.citation_expire_time = Some(anumate_proto::timestamp_from_micros(
                now_micros.saturating_add(ttl_micros),
            ));
        }
        let json = report::stored_json(&report, hashed)?;
        self.store_report(actor, &report, &json, now_micros).await?;
        Ok(report)
    }

    fn inputs(&self, inputs: Inputs) -> Result<serde_json::Value> {
        let v = match inputs {
            Inputs::Struct(None) => serde_json::json!({}),
            Inputs::Struct(Some(s)) => anumate_engine::json::struct_json(&s)
                .map_err(|e| Error::invalid_argument("inputs", e.to_string()))?,
            Inputs::Json(text) => {
                if text.len() > self.cfg.max_inputs_bytes {
                    return Err(Error::invalid_argument(
                        "inputs_json",
                        format!("is larger than {} bytes", self.cfg.max_inputs_bytes),
                    ));
                }
                let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                    Error::invalid_argument("inputs_json", format!("is not JSON: {e}"))
                })?;
                if !v.is_object() {
                    return Err(Error::invalid_argument(
                        "inputs_json",
                        "must be a JSON object",
                    ));
                }
                anumate_engine::json::sorted(&v)
            }
        };
        Ok(v)
    }

    async fn store_report(
        &self,
        actor: &Actor,
        report: &pb::PreflightReport,
        json: &str,
        now: i64,
    ) -> Result<()> {
        // The report and its event go with the commit: one durable round
        // trip on PostgreSQL (`Store::write_deferred`).
        let tx = self.store.write_deferred(&actor.tenant).await?;
        repo::insert(&tx, report, json, now).await?;
        let subject = format!("preflights/{}", report.preflight_id);
        let risk = report.risk.clone().unwrap_or_default();
        anumate_events::append(
            &tx,
            &ev::PreflightCompleted {
                tenant_id: actor.tenant.clone(),
                preflight_id: report.preflight_id.clone(),
                plan_hash: report.plan_hash.clone(),
                inputs_hash: report.inputs_hash.clone(),
                verdict: report.verdict,
                risk_score: risk.score,
                risk_level: risk.level,
                approvals_needed: i32::try_from(report.approvals_needed.len()).unwrap_or(i32::MAX),
                report_hash: report.report_hash.clone(),
                actor: actor.subject.clone(),
            },
            anumate_events::EventContext {
                subject: &subject,
                plan_hash: Some(&report.plan_hash),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(tenant = %actor.tenant, preflight = %report.preflight_id, plan_hash = %report.plan_hash,
            verdict = report.verdict, risk = risk.score, "preflight completed");
        Ok(())
    }

    /// A stored report of the actor's tenant.
    ///
    /// # Errors
    /// `NOT_FOUND` (`PREFLIGHT_NOT_FOUND`) for an unknown id.
    pub async fn get(&self, actor: &Actor, id: &str) -> Result<pb::PreflightReport> {
        let not_found = || {
            Error::because(
                Reason::PreflightNotFound,
                format!("preflight {id:?} not found"),
            )
        };
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(if id.is_empty() {
                Error::invalid_argument("preflight_id", "is required")
            } else {
                not_found()
            });
        }
        let tx = self.store.read(&actor.tenant).await?;
        repo::get(&tx, id).await?.ok_or_else(not_found)
    }

    /// The tenant's reports, newest first, without steps.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a malformed token or plan hash.
    pub async fn list(
        &self,
        actor: &Actor,
        r: &pb::ListPreflightsRequest,
    ) -> Result<(Vec<pb::PreflightReport>, String)> {
        let plan_hash = if r.plan_hash.is_empty() {
            String::new()
        } else {
            anumate_crypto::parse_digest("plan_hash", &r.plan_hash)?
        };
        let tx = self.store.read(&actor.tenant).await?;
        repo::list(
            &tx,
            &repo::Filter {
                plan_hash: &plan_hash,
                verdict: r.verdict,
                min_risk_level: r.min_risk_level,
            },
            r.page_size,
            &r.page_token,
        )
        .await
    }
}
