//! The Plan Compiler service (SPEC §4): capsule versions into immutable,
//! content-addressed ExecutablePlans.
//!
//! ```text
//! Compile(name, version) ──▶ registry.GetCapsule   (in-process, or gRPC with the caller's token)
//!                        ──▶ registry.GetTool × n  (the tenant's current tools; the
//!                                                    built-ins and [[compiler.tools]] otherwise)
//!                        ──▶ policy.GetPolicy × n  (published versions, pinned by hash)
//!                        ──▶ plan::compile          (pure: validate, levels, approvals,
//!                                                    estimate, plan_hash)
//!                        ──▶ plans table + outbox `plan.compiled` (one transaction)
//! ```
//! [`plan::compile`] does no I/O and is what the golden vectors and the
//! benchmark exercise. [`Compiler`] fetches its inputs through the registry's
//! and policy service's clients ([`Upstreams`]: in-process, with no socket,
//! when they run in the same process as in `anumate dev`; over gRPC
//! otherwise), stores plans by (tenant, hash) and keeps a small
//! in-memory memo from (tenant, inputs) to the stored plan so a repeated
//! compile skips parsing and compiling. Another tenant's plan is invisible
//! (`NOT_FOUND`, reason `PLAN_NOT_FOUND`).
#![forbid(unsafe_code)]

pub mod approvals;
pub mod catalogue;
pub mod grpc;
mod module;
pub mod plan;
mod repo;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anumate_errors::{Error, ErrorCode, Reason, Result};
use anumate_proto::compiler::v1 as pb;
use anumate_proto::events::v1 as ev;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_service::clients::{self, Caller, Grpc, PolicyClient, RegistryClient, UpstreamError};
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;

pub use approvals::ResolvedPolicy;
pub use catalogue::{Catalogue, ToolSpec};
pub use grpc::CompilerGrpc;
pub use module::module;
pub use plan::{COMPILER_VERSION, CompileInput, compile, plan_hash};
pub use repo::MIGRATIONS as REPO_MIGRATIONS;

/// Every migration the compiler needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(repo::MIGRATIONS)
}

/// `[compiler]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompilerConfig {
    /// gRPC address of the registry (`http://host:port`), used when the
    /// registry does not run in this process (`anumate dev` and `serve all`
    /// call it in-process); empty means this server's own listener.
    pub registry_url: String,
    /// gRPC address of the policy service, used when it does not run in this
    /// process; empty means this server's own listener.
    pub policy_url: String,
    /// Per-attempt timeout of steps that declare none, in seconds.
    pub default_step_timeout_secs: u64,
    /// Most entries in the in-memory compile memo.
    pub memo_entries: usize,
    /// Tools added to (or overriding) the built-in catalogue.
    pub tools: Vec<ToolSpec>,
}

impl Default for CompilerConfig {
    fn default() -> Self {
        CompilerConfig {
            registry_url: String::new(),
            policy_url: String::new(),
            default_step_timeout_secs: 30,
            memo_entries: 4096,
            tools: Vec::new(),
        }
    }
}

/// Who is acting, and the token to forward to the registry and policy service.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Tenant id.
    pub tenant: String,
    /// Principal subject.
    pub subject: String,
    /// The caller's `authorization` header value, forwarded as is when the
    /// compiler has no service keys to act for the caller with.
    pub authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The verified caller, for whom the compiler reads its upstreams.
    pub principal: Option<anumate_auth::Principal>,
}

/// Where the compiler's inputs come from: the registry's and the policy
/// service's clients, in-process when they run in this process (no socket),
/// else over gRPC.
#[derive(Clone)]
pub struct Upstreams {
    /// The registry.
    pub registry: Arc<dyn RegistryClient>,
    /// The policy service.
    pub policy: Arc<dyn PolicyClient>,
}

impl Upstreams {
    /// The given clients.
    pub fn new(registry: Arc<dyn RegistryClient>, policy: Arc<dyn PolicyClient>) -> Upstreams {
        Upstreams { registry, policy }
    }

    /// gRPC clients of the two services, lazily connecting.
    pub fn lazy(registry_url: &str, policy_url: &str) -> Result<Upstreams> {
        let registry = clients::channel("compiler.registry_url", registry_url)?;
        let policy = clients::channel("compiler.policy_url", policy_url)?;
        Ok(Upstreams {
            registry: Arc::new(Grpc::new(registry)),
            policy: Arc::new(Grpc::new(policy)),
        })
    }
}

/// The result of [`Compiler::compile`].
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The plan, as stored.
    pub plan: Arc<pb::ExecutablePlan>,
    /// True when it was already stored.
    pub cache_hit: bool,
}

/// (tenant, inputs key) → the plan stored for them.
type PlanMemo = HashMap<(String, String), Arc<pb::ExecutablePlan>>;

/// The compiler service.
#[derive(Clone)]
pub struct Compiler {
    store: Store,
    upstreams: Upstreams,
    catalogue: Arc<Catalogue>,
    default_timeout: Duration,
    limits: anumate_capsule::Limits,
    memo: Arc<Mutex<PlanMemo>>,
    /// Parsed capsules by content hash (content-addressed, so shared by tenants).
    parsed: Arc<Mutex<HashMap<String, Arc<anumate_capsule::Capsule>>>>,
    memo_entries: usize,
    /// Stored plans by (tenant, hash): write-once rows, so never stale.
    plans: Arc<quick_cache::sync::Cache<String, Arc<pb::ExecutablePlan>, PlanWeight>>,
}

/// Bytes of stored plans the compiler keeps decoded in memory.
const PLAN_CACHE_BYTES: u64 = 32 << 20;

/// A plan's weight in the cache: its encoded size plus a fixed overhead.
#[derive(Clone)]
struct PlanWeight;

impl quick_cache::Weighter<String, Arc<pb::ExecutablePlan>> for PlanWeight {
    fn weight(&self, _key: &String, plan: &Arc<pb::ExecutablePlan>) -> u64 {
        512 + prost::Message::encoded_len(plan.as_ref()) as u64
    }
}

/// The service name the compiler acts as upstream.
pub const SERVICE_NAME: &str = "compiler";

/// The actor as the caller of an upstream: the compiler acting for it (a
/// delegated service token over gRPC when the compiler has service keys,
/// else the caller's own token forwarded).
fn caller(actor: &Actor) -> Caller {
    match &actor.principal {
        Some(principal) => Caller::Delegated {
            principal: principal.clone(),
            service: SERVICE_NAME,
            forward: actor.authorization.clone(),
        },
        None => Caller::User {
            tenant: actor.tenant.clone(),
            subject: actor.subject.clone(),
            authorization: actor.authorization.clone(),
        },
    }
}

fn check_name(name: &str) -> Result<()> {
    anumate_errors::check_dns_label("capsule_name", name)
}

/// An upstream failure, keeping its product code; `reason` is added when the
/// upstream gave none of ours.
fn upstream_error(e: &UpstreamError, what: &str) -> Error {
    let mut err = e.to_error();
    if err.code == ErrorCode::Unavailable || e.code() == tonic::Code::Unavailable {
        err = Error::new(
            ErrorCode::Unavailable,
            format!("{what} is unavailable: {}", e.message()),
        );
    }
    err
}

impl Compiler {
    /// A compiler storing plans in `store` and fetching inputs from `upstreams`.
    pub fn new(store: Store, upstreams: Upstreams, cfg: &CompilerConfig) -> Result<Compiler> {
        Ok(Compiler {
            store,
            upstreams,
            catalogue: Arc::new(Catalogue::new(&cfg.tools)?),
            default_timeout: Duration::from_secs(cfg.default_step_timeout_secs.max(1)),
            limits: anumate_capsule::Limits::default(),
            memo: Arc::new(Mutex::new(HashMap::new())),
            parsed: Arc::new(Mutex::new(HashMap::new())),
            memo_entries: cfg.memo_entries.max(1),
            plans: Arc::new(quick_cache::sync::Cache::with_weighter(
                4096,
                PLAN_CACHE_BYTES,
                PlanWeight,
            )),
        })
    }

    /// The tool catalogue in force.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// Fetches the capsule version.
    async fn fetch_capsule(
        &self,
        actor: &Actor,
        name: &str,
        version: &str,
    ) -> Result<rpb::CapsuleVersion> {
        // The registry's NOT_FOUND says which is missing, the capsule
        // (`CAPSULE_NOT_FOUND`) or the version (`CAPSULE_VERSION_NOT_FOUND`).
        let got = self
            .upstreams
            .registry
            .get_capsule(
                &caller(actor),
                rpb::GetCapsuleRequest {
                    name: name.to_string(),
                    version: version.to_string(),
                },
            )
            .await
            .map_err(|s| upstream_error(&s, "the registry"))?;
        let v = got
            .version
            .ok_or_else(|| Error::internal("registry answered without a version"))?;
        let named = version.parse::<i64>().is_ok();
        if v.status == rpb::VersionStatus::Deprecated as i32 && !named {
            return Err(Error::because(
                Reason::VersionDeprecated,
                format!(
                    "version {} of capsule {name} is deprecated; name it by number to compile it anyway",
                    v.version
                ),
            ));
        }
        Ok(v)
    }

    /// Resolves each policy name to its published version.
    async fn fetch_policies(
        &self,
        actor: &Actor,
        names: &[String],
    ) -> Result<Vec<ppb::PolicyVersion>> {
        let policy = &self.upstreams.policy;
        let caller = caller(actor);
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted.dedup();
        // One lookup per policy, all in flight at once; the first missing
        // one in name order is the error, whatever answered first.
        let lookups = sorted.into_iter().map(|name| {
            let caller = &caller;
            async move {
                let request = ppb::GetPolicyRequest {
                    name: name.clone(),
                    version: "published".to_string(),
                };
                (name, policy.get_policy(caller, request).await)
            }
        });
        let answers = futures::future::join_all(lookups).await;
        let mut out = Vec::with_capacity(answers.len());
        for (name, answer) in answers {
            match answer {
                Ok(r) => {
                    out.push(r.version.ok_or_else(|| {
                        Error::internal("policy service answered without a version")
                    })?)
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // The policy service says whether the policy or its
                    // published version is missing.
                    let (reason, message) = if s.to_error().reason == Reason::PolicyVersionNotFound
                    {
                        (
                            Reason::PolicyVersionNotFound,
                            format!("policy {name} has no published version; publish one first"),
                        )
                    } else {
                        (
                            Reason::PolicyNotFound,
                            format!("the capsule refers to policy {name}, which does not exist"),
                        )
                    };
                    return Err(
                        Error::because(reason, message).with_metadata("policy", name.clone())
                    );
                }
                Err(s) => return Err(upstream_error(&s, "the policy service")),
            }
        }
        Ok(out)
    }

    /// The tenant's own bindings of `names`, sorted: each tool's current
    /// version in the registry's catalogue. A name the tenant does not
    /// declare (or whose versions are all deprecated) is left to the
    /// defaults.
    async fn fetch_tools(&self, actor: &Actor, names: &[String]) -> Result<Vec<pb::ToolBinding>> {
        let registry = &self.upstreams.registry;
        let caller = caller(actor);
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        sorted.dedup();
        // One lookup per tool, all in flight at once (a compile, even a
        // remembered one, resolves its tools first).
        let lookups = sorted.into_iter().map(|name| {
            let caller = &caller;
            async move {
                let request = rpb::GetToolRequest {
                    name: name.clone(),
                    version: String::new(),
                };
                match registry.get_tool(caller, request).await {
                    Ok(r) => {
                        let version = r.version.ok_or_else(|| {
                            Error::internal("registry answered without a tool version")
                        })?;
                        catalogue::tenant_binding(&version).map(Some)
                    }
                    Err(e) if e.code() == tonic::Code::NotFound => Ok(None),
                    Err(e) => Err(upstream_error(&e, "the registry")),
                }
            }
        });
        let out: Vec<pb::ToolBinding> = futures::future::try_join_all(lookups)
            .await?
            .into_iter()
            .flatten()
            .collect();
        Ok(out)
    }

    fn memo_key(
        &self,
        version: &rpb::CapsuleVersion,
        policies: &[ppb::PolicyVersion],
        tools: &[pb::ToolBinding],
    ) -> String {
        let items: Vec<serde_json::Value> = policies
            .iter()
            .map(|p| serde_json::json!([p.name, p.version, p.content_hash]))
            .collect();
        let tools: Vec<serde_json::Value> = tools
            .iter()
            .map(|t| serde_json::json!([t.tool, t.tool_version, t.tool_hash]))
            .collect();
        let key = serde_json::json!({
            "capsule": [version.name, version.version, version.content_hash],
            "policies": items,
            "tools": tools,
            "catalogue": self.catalogue.fingerprint(),
            "timeout": self.default_timeout.as_millis() as u64,
        });
        anumate_crypto::content_hash(&key).1
    }

    /// The plan a previous compile of the same inputs stored, if remembered.
    fn memo_get(&self, tenant: &str, key: &str) -> Option<Arc<pb::ExecutablePlan>> {
        self.memo
            .lock()
            .ok()
            .and_then(|m| m.get(&(tenant.to_string(), key.to_string())).cloned())
    }

    fn memo_put(&self, tenant: &str, key: String, plan: Arc<pb::ExecutablePlan>) {
        if let Ok(mut m) = self.memo.lock() {
            if m.len() >= self.memo_entries {
                m.clear();
            }
            m.insert((tenant.to_string(), key), plan);
        }
    }

    /// Compiles (or finds the stored plan for) a capsule version.
    pub async fn compile(&self, actor: &Actor, name: &str, version: &str) -> Result<Compiled> {
        check_name(name)?;
        if !matches!(version, "" | "published" | "latest")
            && !version.parse::<i64>().is_ok_and(|v| v > 0)
        {
            return Err(Error::invalid_argument(
                "version",
                format!("{version:?} is not a version number, \"published\" or \"latest\""),
            ));
        }
        let cv = self.fetch_capsule(actor, name, version).await?;
        let capsule = self.parse_capsule(&cv).await?;
        // The tools and the policies at once: neither needs the other.
        let (tools, versions) = futures::future::try_join(
            self.fetch_tools(actor, &capsule.spec.tools),
            self.fetch_policies(actor, &capsule.spec.policies),
        )
        .await?;
        self.compile_fetched(actor, &cv, &capsule, &versions, &tools)
            .await
    }

    /// Parses a fetched version (on the CPU pool), reusing the parse of the
    /// same content.
    async fn parse_capsule(
        &self,
        cv: &rpb::CapsuleVersion,
    ) -> Result<Arc<anumate_capsule::Capsule>> {
        if let Some(c) = self
            .parsed
            .lock()
            .ok()
            .and_then(|m| m.get(&cv.content_hash).cloned())
        {
            return Ok(c);
        }
        let (source, limits) = (cv.source_yaml.clone(), self.limits.clone());
        let (name, version) = (cv.name.clone(), cv.version);
        let capsule = Arc::new(
            anumate_cpu::run(move || {
                anumate_capsule::parse(&source, &limits).map_err(|r| {
                    Error::internal(format!(
                        "stored capsule {name}@{version} does not parse: {r}"
                    ))
                })
            })
            .await?,
        );
        if let Ok(mut m) = self.parsed.lock() {
            if m.len() >= self.memo_entries {
                m.clear();
            }
            m.insert(cv.content_hash.clone(), capsule.clone());
        }
        Ok(capsule)
    }

    /// The part of [`Compiler::compile`] after the inputs were fetched (`tools`:
    /// the tenant's own bindings): the memo, the compile itself and storing
    /// the plan. Public for the benchmark.
    pub async fn compile_fetched(
        &self,
        actor: &Actor,
        cv: &rpb::CapsuleVersion,
        capsule: &Arc<anumate_capsule::Capsule>,
        versions: &[ppb::PolicyVersion],
        tools: &[pb::ToolBinding],
    ) -> Result<Compiled> {
        let key = self.memo_key(cv, versions, tools);
        if let Some(plan) = self.memo_get(&actor.tenant, &key) {
            return Ok(Compiled {
                plan,
                cache_hit: true,
            });
        }
        // Parsing the policies and compiling are CPU work: off the runtime.
        let (capsule, versions) = (capsule.clone(), versions.to_vec());
        let (capsule_version, content_hash) = (cv.version, cv.content_hash.clone());
        let catalogue = match tools.is_empty() {
            true => self.catalogue.clone(),
            false => Arc::new(self.catalogue.overlay(tools.to_vec())),
        };
        let default_timeout = self.default_timeout;
        let mut plan = anumate_cpu::run(move || {
            let policies = versions
                .iter()
                .map(|v| ResolvedPolicy::new(&v.name, v.version, &v.content_hash, &v.source))
                .collect::<Result<Vec<_>>>()?;
            plan::compile(&CompileInput {
                capsule: &capsule,
                capsule_version,
                capsule_content_hash: &content_hash,
                policies: &policies,
                catalogue: &catalogue,
                default_timeout,
            })
        })
        .await?;
        plan.created_by = actor.subject.clone();
        let compiled = self.store_plan(actor, plan).await?;
        self.memo_put(&actor.tenant, key, compiled.plan.clone());
        Ok(compiled)
    }

    /// Stores a plan and its `plan.compiled` event, or returns the stored one.
    async fn store_plan(&self, actor: &Actor, plan: pb::ExecutablePlan) -> Result<Compiled> {
        let tx = self.store.write(&actor.tenant).await?;
        if let Some(stored) = repo::get(&tx, &plan.plan_hash).await? {
            return Ok(Compiled {
                plan: Arc::new(stored),
                cache_hit: true,
            });
        }
        let now = anumate_store::now_micros();
        if !repo::insert(&tx, &plan, now).await? {
            // A concurrent compile stored it first.
            drop(tx);
            let tx = self.store.read(&actor.tenant).await?;
            let stored = repo::get(&tx, &plan.plan_hash)
                .await?
                .ok_or_else(|| Error::internal("plan vanished after a conflicting insert"))?;
            return Ok(Compiled {
                plan: Arc::new(stored),
                cache_hit: true,
            });
        }
        let approval_steps = {
            let mut ids: Vec<&str> = plan
                .approval_needs
                .iter()
                .map(|n| n.step_id.as_str())
                .collect();
            ids.sort();
            ids.dedup();
            ids.len()
        };
        let subject = format!("plans/{}", plan.plan_hash);
        anumate_events::append(
            &tx,
            &ev::PlanCompiled {
                tenant_id: actor.tenant.clone(),
                plan_hash: plan.plan_hash.clone(),
                capsule_name: plan.capsule_name.clone(),
                capsule_version: plan.capsule_version,
                capsule_content_hash: plan.capsule_content_hash.clone(),
                policy_set_hash: plan.policy_set_hash.clone(),
                step_count: i32::try_from(plan.steps.len()).unwrap_or(i32::MAX),
                approval_step_count: i32::try_from(approval_steps).unwrap_or(i32::MAX),
                actor: actor.subject.clone(),
            },
            anumate_events::EventContext {
                subject: &subject,
                plan_hash: Some(&plan.plan_hash),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        tracing::info!(tenant = %actor.tenant, capsule = %plan.capsule_name, version = plan.capsule_version,
            plan_hash = %plan.plan_hash, steps = plan.steps.len(), "plan compiled");
        let mut plan = plan;
        plan.create_time = Some(repo::timestamp(now));
        Ok(Compiled {
            plan: Arc::new(plan),
            cache_hit: false,
        })
    }

    /// A stored plan of the actor's tenant, by its hash in any form
    /// [`anumate_crypto::parse_digest`] accepts.
    pub async fn get(&self, actor: &Actor, hash: &str) -> Result<pb::ExecutablePlan> {
        let hash = anumate_crypto::parse_digest("plan_hash", hash)?;
        // The tenant is part of the key: a plan is served only to the
        // tenant that stored it. Stored plans are write-once (the table
        // refuses UPDATE and DELETE), so an entry never goes stale.
        let key = format!("{}/{hash}", actor.tenant);
        if let Some(plan) = self.plans.get(&key) {
            return Ok(plan.as_ref().clone());
        }
        let tx = self.store.read(&actor.tenant).await?;
        let plan = repo::get(&tx, &hash).await?.ok_or_else(|| {
            Error::because(Reason::PlanNotFound, format!("plan {hash} not found"))
        })?;
        drop(tx);
        self.plans.insert(key, Arc::new(plan.clone()));
        Ok(plan)
    }

    /// The tenant's plans, newest first, in summary form.
    pub async fn list(
        &self,
        actor: &Actor,
        capsule: &str,
        version: i32,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<pb::ExecutablePlan>, String)> {
        if !capsule.is_empty() {
            check_name(capsule)?;
        }
        if version < 0 || (version > 0 && capsule.is_empty()) {
            return Err(Error::invalid_argument(
                "capsule_version",
                "must be positive and comes with capsule_name",
            ));
        }
        let tx = self.store.read(&actor.tenant).await?;
        repo::list(&tx, capsule, version, page_size, page_token).await
    }
}
