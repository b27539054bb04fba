//! What the interpreter is built from, loaded and cached once for GhostRun
//! and the orchestrator alike: the plan, its pinned policy sets, the capsule
//! version's labels and the context policies see (`env` included). Both
//! build their [`Engine`] through [`Loader::engine`], so a preflight and the
//! run it is cited by decide with the same policies, labels and `env`.
//!
//! ```text
//! plan(hash)            compiler.GetPlan           cached by (tenant, hash): plans are write-once
//! policy_sets(plan)     policy.GetPolicy × n       compiled once per content hash
//! labels(plan)          registry.GetCapsule        cached by (tenant, capsule content hash)
//! context(who, now)     env from `[ghostrun] policy_env`, roles and groups sorted
//! prepared(plan)        Engine::new(..).with_capsule_labels(..), cached by (tenant, hash)
//! engine(plan, context) the same, compiled for the call (any plan, even a modified copy)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use anumate_engine::{Context, Engine};
use anumate_errors::{Error, ErrorCode, Result};
use anumate_policy::CompiledSet;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_service::clients::{
    Caller, CompilerClient, PolicyClient, RegistryClient, UpstreamError,
};
use serde_json::Value;

/// Entries kept per cache before it is emptied.
const MAX_CACHED: usize = 4096;

/// Capsule labels, as a capsule version declares them.
pub type Labels = BTreeMap<String, String>;

/// An upstream's error, `UNAVAILABLE` naming `what`.
pub(crate) fn upstream(e: &UpstreamError, what: &str) -> Error {
    let err = e.to_error();
    if err.code == ErrorCode::Unavailable {
        return Error::new(
            ErrorCode::Unavailable,
            format!("{what} is unavailable: {}", e.message()),
        );
    }
    err
}

/// The shared loader (cheap to clone: the caches are shared).
#[derive(Clone)]
pub struct Loader {
    inner: Arc<Inner>,
}

struct Inner {
    compiler: Arc<dyn CompilerClient>,
    policy: Arc<dyn PolicyClient>,
    registry: Option<Arc<dyn RegistryClient>>,
    env: Value,
    plans: Mutex<HashMap<(String, String), Arc<cpb::ExecutablePlan>>>,
    sets: Mutex<HashMap<String, Arc<CompiledSet>>>,
    labels: Mutex<HashMap<(String, String), Arc<Labels>>>,
    /// Compiled interpreters by (tenant, plan hash), in the default context.
    engines: Mutex<HashMap<(String, String), Engine>>,
}

fn cached<K: std::hash::Hash + Eq, V: Clone>(m: &Mutex<HashMap<K, V>>, k: &K) -> Option<V> {
    m.lock().ok().and_then(|m| m.get(k).cloned())
}

fn remember<K: std::hash::Hash + Eq, V>(m: &Mutex<HashMap<K, V>>, k: K, v: V) {
    if let Ok(mut m) = m.lock() {
        if m.len() >= MAX_CACHED {
            m.clear();
        }
        m.insert(k, v);
    }
}

impl Loader {
    /// Plans from `compiler`, policies from `policy`, capsule labels from
    /// `registry` (`None`: policies see no labels; embedded uses only), and
    /// `env` (`[ghostrun] policy_env`) as the `env` policies see.
    pub fn new(
        compiler: Arc<dyn CompilerClient>,
        policy: Arc<dyn PolicyClient>,
        registry: Option<Arc<dyn RegistryClient>>,
        env: &BTreeMap<String, Value>,
    ) -> Loader {
        Loader {
            inner: Arc::new(Inner {
                compiler,
                policy,
                registry,
                env: Value::Object(env.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
                plans: Mutex::default(),
                sets: Mutex::default(),
                labels: Mutex::default(),
                engines: Mutex::default(),
            }),
        }
    }

    /// The compiler this loader reads plans from.
    pub fn compiler(&self) -> &Arc<dyn CompilerClient> {
        &self.inner.compiler
    }

    /// `env` as policies see it.
    pub fn env(&self) -> &Value {
        &self.inner.env
    }

    /// The plan `hash` of `tenant` (cached: plans are write-once).
    ///
    /// # Errors
    /// The compiler's error (`UNAVAILABLE` when it cannot be reached).
    pub async fn plan(
        &self,
        caller: &Caller,
        tenant: &str,
        hash: &str,
    ) -> Result<Arc<cpb::ExecutablePlan>> {
        let key = (tenant.to_string(), hash.to_string());
        if let Some(p) = cached(&self.inner.plans, &key) {
            return Ok(p);
        }
        let resp = self
            .inner
            .compiler
            .get_plan(
                caller,
                cpb::GetPlanRequest {
                    plan_hash: hash.to_string(),
                },
            )
            .await
            .map_err(|e| upstream(&e, "the compiler"))?;
        let plan = Arc::new(
            resp.plan
                .ok_or_else(|| Error::internal("the compiler answered without a plan"))?,
        );
        remember(&self.inner.plans, key, plan.clone());
        Ok(plan)
    }

    /// The plan's pinned policy sets, in `plan.policies` order, compiled
    /// once per content hash (content-addressed: shared by tenants).
    ///
    /// # Errors
    /// The policy service's error, or `INTERNAL` when a stored policy does
    /// not have the content the plan pins or does not compile.
    pub async fn policy_sets(
        &self,
        caller: &Caller,
        plan: &cpb::ExecutablePlan,
    ) -> Result<Vec<Arc<CompiledSet>>> {
        let mut out = Vec::with_capacity(plan.policies.len());
        for r in &plan.policies {
            if let Some(s) = cached(&self.inner.sets, &r.content_hash) {
                out.push(s);
                continue;
            }
            let resp = self
                .inner
                .policy
                .get_policy(
                    caller,
                    ppb::GetPolicyRequest {
                        name: r.name.clone(),
                        version: r.version.to_string(),
                    },
                )
                .await
                .map_err(|e| upstream(&e, "the policy service"))?;
            let v = resp
                .version
                .ok_or_else(|| Error::internal("the policy service answered without a version"))?;
            if v.content_hash != r.content_hash {
                return Err(Error::internal(format!(
                    "policy {}@{} has content {} but the plan pins {}",
                    r.name, r.version, v.content_hash, r.content_hash
                )));
            }
            let file = format!("{}.policy", r.name);
            let source = v.source;
            let set = anumate_cpu::run(move || {
                anumate_policy::compile(&file, &source).map_err(|e| Error::internal(e.to_string()))
            })
            .await?;
            let set = Arc::new(set);
            remember(&self.inner.sets, r.content_hash.clone(), set.clone());
            out.push(set);
        }
        Ok(out)
    }

    /// The `metadata.labels` of the plan's capsule version (immutable, so
    /// cached by the capsule's content hash); empty without a registry.
    ///
    /// # Errors
    /// The registry's error, or `INTERNAL` when the stored version does not
    /// have the content the plan was compiled from.
    pub async fn labels(
        &self,
        caller: &Caller,
        tenant: &str,
        plan: &cpb::ExecutablePlan,
    ) -> Result<Arc<Labels>> {
        let Some(registry) = &self.inner.registry else {
            return Ok(Arc::default());
        };
        let key = (
            tenant.to_string(),
            format!(
                "{}@{}#{}",
                plan.capsule_name, plan.capsule_version, plan.capsule_content_hash
            ),
        );
        if let Some(l) = cached(&self.inner.labels, &key) {
            return Ok(l);
        }
        let resp = registry
            .get_capsule(
                caller,
                rpb::GetCapsuleRequest {
                    name: plan.capsule_name.clone(),
                    version: plan.capsule_version.to_string(),
                },
            )
            .await
            .map_err(|e| upstream(&e, "the registry"))?;
        let v = resp
            .version
            .ok_or_else(|| Error::internal("the registry answered without a version"))?;
        if !plan.capsule_content_hash.is_empty() && v.content_hash != plan.capsule_content_hash {
            return Err(Error::internal(format!(
                "capsule {}@{} has content {} but the plan was compiled from {}",
                plan.capsule_name, plan.capsule_version, v.content_hash, plan.capsule_content_hash
            )));
        }
        let labels: Arc<Labels> = Arc::new(v.labels.into_iter().collect());
        remember(&self.inner.labels, key, labels.clone());
        Ok(labels)
    }

    /// What policies see besides the call: the principal (roles and groups
    /// sorted), `now` (whole seconds, RFC 3339 UTC) and this loader's `env`.
    pub fn context(
        &self,
        tenant: &str,
        principal: &str,
        roles: &[String],
        groups: &[String],
        now_secs: i64,
    ) -> Context {
        let mut roles = roles.to_vec();
        roles.sort();
        let mut groups = groups.to_vec();
        groups.sort();
        Context {
            tenant: tenant.to_string(),
            principal: principal.to_string(),
            roles,
            groups,
            now: chrono::DateTime::from_timestamp(now_secs, 0)
                .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .unwrap_or_default(),
            env: self.inner.env.clone(),
        }
    }

    /// Everything the engine of `plan` needs besides the context: its
    /// policy sets and capsule labels.
    ///
    /// # Errors
    /// See [`policy_sets`](Self::policy_sets) and [`labels`](Self::labels).
    pub async fn parts(
        &self,
        caller: &Caller,
        tenant: &str,
        plan: &cpb::ExecutablePlan,
    ) -> Result<(Vec<Arc<CompiledSet>>, Arc<Labels>)> {
        let sets = self.policy_sets(caller, plan).await?;
        let labels = self.labels(caller, tenant, plan).await?;
        Ok((sets, labels))
    }

    /// The interpreter of `plan` of `tenant` with its policy sets and
    /// capsule labels, in the default context: compiled once per plan
    /// (expressions, argument templates, the inputs schema), then shared.
    /// Only for a plan as the compiler gave it (the cache trusts its hash);
    /// [`engine`](Self::engine) compiles any plan, such as a modified copy.
    ///
    /// # Errors
    /// See [`parts`](Self::parts); `INTERNAL` for a plan the interpreter refuses.
    pub async fn prepared(
        &self,
        caller: &Caller,
        tenant: &str,
        plan: &cpb::ExecutablePlan,
    ) -> Result<Engine> {
        let key = (tenant.to_string(), plan.plan_hash.clone());
        if let Some(e) = cached(&self.inner.engines, &key) {
            return Ok(e);
        }
        let (sets, labels) = self.parts(caller, tenant, plan).await?;
        let engine = build(plan, sets, &labels, Context::default())?;
        if !plan.plan_hash.is_empty() {
            remember(&self.inner.engines, key, engine.clone());
        }
        Ok(engine)
    }

    /// The interpreter of `plan` in `context` (see [`context`](Self::context)),
    /// compiled for this call: `plan` may be a modified copy of a stored plan
    /// (the orchestrator decides a compensation on one).
    ///
    /// # Errors
    /// See [`parts`](Self::parts); `INTERNAL` for a plan the interpreter refuses.
    pub async fn engine(
        &self,
        caller: &Caller,
        plan: &cpb::ExecutablePlan,
        context: Context,
    ) -> Result<Engine> {
        let tenant = context.tenant.clone();
        let (sets, labels) = self.parts(caller, &tenant, plan).await?;
        build(plan, sets, &labels, context)
    }
}

/// The interpreter of `plan` with its policy sets, capsule labels and context.
///
/// # Errors
/// `INTERNAL` for a plan the interpreter refuses.
pub fn build(
    plan: &cpb::ExecutablePlan,
    sets: Vec<Arc<CompiledSet>>,
    labels: &Labels,
    context: Context,
) -> Result<Engine> {
    Engine::new(plan, sets, context)
        .map(|e| e.with_capsule_labels(labels))
        .map_err(|e| {
            Error::internal(format!(
                "plan {} cannot be interpreted: {e}",
                plan.plan_hash
            ))
        })
}
