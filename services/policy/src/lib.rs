//! The Policy service (SPEC §3): versioned, content-hashed policies per
//! tenant, evaluation with decision logs, `test` blocks and redaction.
//!
//! [`Policies`] holds the domain logic and knows nothing of gRPC; [`grpc`]
//! adapts it to the generated `PolicyService` trait (authentication happens
//! in the `anumate_auth::AuthLayer` around it; handlers only check roles).
//!
//! - **Content hash.** A version's `canonical_json` is the RFC 8785 form of
//!   the parsed policy (rules with their `when` and actions pretty-printed,
//!   tests with `given` pretty-printed); comments, whitespace and positions are
//!   not part of it, so reformatting a policy does not create a version.
//! - **Compile cache.** Compiled sets are kept in a bounded map keyed by
//!   tenant, name, version and content hash (ad-hoc sources by the SHA-256 of
//!   their text), so a version is compiled once and reused by every
//!   evaluation; the oldest entry is evicted when the map is full.
//! - **Decision logs.** Every evaluation writes a `policy_decisions` row whose
//!   input has had the decision's redact obligations applied (their field
//!   paths, also under `args.` and `output.`, and their detectors). An input
//!   larger than `max_logged_input_bytes` is stored as
//!   `{"omitted": true, "bytes": N, "sha256": "<hex of the redacted input>"}`.
//!   Rows older than `decision_retention_hours` are deleted in the recording
//!   transaction, at most once a minute per tenant.
#![forbid(unsafe_code)]

mod analyze;
mod cache;
mod eval;
pub mod grpc;
mod module;
mod repo;

use std::collections::BTreeMap;
use std::sync::Arc;

use anumate_documents::{Documents, Draft};
use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::policy::v1 as pb;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};

pub use analyze::{Compiled, PolicyInfo, canonical_value};
pub use anumate_documents::{Actor, VersionSelector};
pub use eval::{EvalInput, EvalTarget, RedactValue};
pub use grpc::PolicyGrpc;
pub use module::module;
pub use repo::{MIGRATIONS as REPO_MIGRATIONS, PolicyKind};

/// Every migration the policy service needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(repo::MIGRATIONS)
}

/// `[policy]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Largest accepted policy source (pushed or ad hoc), in bytes.
    pub max_source_bytes: usize,
    /// Largest accepted evaluation input, in bytes of JSON.
    pub max_input_bytes: usize,
    /// Most compiled policy sets kept in memory.
    pub cache_entries: usize,
    /// Fuel per decision.
    pub fuel: u64,
    /// Hours a decision log row is kept; 0 keeps them forever.
    pub decision_retention_hours: u64,
    /// Largest redacted input stored with a decision, in bytes of JSON; a
    /// larger one is replaced by its size and SHA-256.
    pub max_logged_input_bytes: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            max_source_bytes: 256 * 1024,
            max_input_bytes: 1024 * 1024,
            cache_entries: 1024,
            fuel: anumate_policy::DEFAULT_FUEL,
            decision_retention_hours: 720,
            max_logged_input_bytes: 64 * 1024,
        }
    }
}

/// Result of a push.
pub type Pushed = anumate_documents::Pushed<PolicyKind>;

/// The policy service.
#[derive(Clone)]
pub struct Policies {
    store: Store,
    documents: Documents<PolicyKind>,
    cfg: PolicyConfig,
    cache: Arc<cache::Cache>,
    /// When each tenant's decision log was last purged (Unix microseconds).
    purged: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
}

pub(crate) use anumate_errors::check_dns_label as check_name;

/// Attaches rule summaries and the test count to a version read from the store.
fn with_rules(mut v: pb::PolicyVersion, info: &PolicyInfo) -> pb::PolicyVersion {
    v.rules = info.rules.iter().map(|r| r.summary.clone()).collect();
    v.test_count = info.test_count;
    v
}

impl Policies {
    /// A policy service over `store`.
    pub fn new(store: Store, cfg: &PolicyConfig) -> Policies {
        Policies {
            documents: Documents::new(store.clone(), PolicyKind),
            store,
            cfg: cfg.clone(),
            cache: Arc::new(cache::Cache::new(cfg.cache_entries)),
            purged: Arc::default(),
        }
    }

    /// The policies' lifecycle: list versions, publish, deprecate, delete.
    pub fn documents(&self) -> &Documents<PolicyKind> {
        &self.documents
    }

    /// The configuration in force.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    pub(crate) fn check_size(&self, field: &str, source: &str) -> Result<()> {
        if source.len() > self.cfg.max_source_bytes {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "{field} is {} bytes; the limit is {}",
                    source.len(),
                    self.cfg.max_source_bytes
                ),
            )
            .with_metadata("limit", self.cfg.max_source_bytes.to_string()));
        }
        Ok(())
    }

    /// Parses and compiles a one-policy document without storing it (on the
    /// CPU pool).
    pub async fn validate(&self, source: &str, source_name: &str) -> Result<Compiled> {
        self.check_size("source", source)?;
        let name = if source_name.is_empty() {
            "policy"
        } else {
            source_name
        }
        .to_owned();
        let (source, fuel) = (source.to_owned(), self.cfg.fuel);
        let compiled =
            anumate_cpu::run(move || analyze::compile(&name, &source, 0, fuel, true)).await?;
        if let Some(p) = compiled.policies.first() {
            check_name("source", &p.name).map_err(|_| {
                Error::new(
                    ErrorCode::InvalidDocument,
                    format!(
                        "policy name {:?} must be a DNS label: lowercase letters, digits and '-', at most 63",
                        p.name
                    ),
                )
            })?;
        }
        Ok(compiled)
    }

    /// Stores a new version (or returns the identical existing one).
    pub async fn push(
        &self,
        actor: &Actor,
        source: &str,
        source_name: &str,
        etag: &str,
        publish: bool,
    ) -> Result<Pushed> {
        let compiled = self.validate(source, source_name).await?;
        let info = compiled
            .policies
            .first()
            .ok_or_else(|| Error::internal("validated source without a policy"))?;
        let draft = Draft {
            name: &info.name,
            source,
            canonical_json: &info.canonical_json,
            content_hash: &info.content_hash,
            description: &info.description,
            labels: &BTreeMap::new(),
        };
        let mut pushed = self.documents.push(actor, &draft, etag, publish).await?;
        pushed.version = with_rules(pushed.version, info);
        Ok(pushed)
    }

    /// Stores every `policy` block of a file as a new version of the policy
    /// it names (or returns the identical existing one), all or none; the
    /// results in file order.
    pub async fn push_all(
        &self,
        actor: &Actor,
        source: &str,
        source_name: &str,
        publish: bool,
    ) -> Result<Vec<Pushed>> {
        self.check_size("source", source)?;
        let name = if source_name.is_empty() {
            "policy"
        } else {
            source_name
        }
        .to_owned();
        let (src, fuel) = (source.to_owned(), self.cfg.fuel);
        let compiled = anumate_cpu::run(move || {
            let blocks = analyze::split(&name, &src, fuel)?;
            blocks
                .into_iter()
                .map(|b| {
                    check_name("source", &b.name).map_err(|_| {
                        Error::new(
                            ErrorCode::InvalidDocument,
                            format!(
                                "policy name {:?} must be a DNS label: lowercase letters, digits and '-', at most 63",
                                b.name
                            ),
                        )
                        .with_violations(vec![anumate_errors::Violation::at(
                            &name,
                            b.at.0,
                            b.at.1,
                            "policy name must be a DNS label",
                        )])
                    })?;
                    // A block alone compiles as it did in the file; its
                    // rules' lines are those of the stored source.
                    let one = analyze::compile(&name, &b.source, 0, fuel, true)?;
                    let info = one
                        .policies
                        .into_iter()
                        .next()
                        .ok_or_else(|| Error::internal("a block without its policy"))?;
                    Ok((b.source, info))
                })
                .collect::<Result<Vec<(String, PolicyInfo)>>>()
        })
        .await?;
        let no_labels = BTreeMap::new();
        let drafts: Vec<Draft<'_>> = compiled
            .iter()
            .map(|(source, info)| Draft {
                name: &info.name,
                source,
                canonical_json: &info.canonical_json,
                content_hash: &info.content_hash,
                description: &info.description,
                labels: &no_labels,
            })
            .collect();
        let pushed = self.documents.push_all(actor, &drafts, publish).await?;
        Ok(pushed
            .into_iter()
            .zip(compiled.iter())
            .map(|(mut p, (_, info))| {
                p.version = with_rules(p.version, info);
                p
            })
            .collect())
    }

    /// The compiled form of a stored version, from the cache or compiled now
    /// (on the CPU pool).
    pub(crate) async fn compiled_version(
        &self,
        tenant: &str,
        v: &pb::PolicyVersion,
    ) -> Result<Arc<Compiled>> {
        let key = format!("{tenant}/{}@{}/{}", v.name, v.version, v.content_hash);
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit);
        }
        let name = format!("{}@{}", v.name, v.version);
        let (source, version, fuel) = (v.source.clone(), v.version, self.cfg.fuel);
        let compiled =
            anumate_cpu::run(move || analyze::compile(&name, &source, version, fuel, true)).await?;
        Ok(self.cache.insert(&key, compiled))
    }

    /// The compiled form of ad-hoc source (not stored), from the cache or
    /// compiled now (on the CPU pool).
    pub(crate) async fn compiled_source(
        &self,
        source: &str,
        source_name: &str,
    ) -> Result<Arc<Compiled>> {
        self.check_size("source", source)?;
        let name = if source_name.is_empty() {
            "source"
        } else {
            source_name
        };
        let key = format!(
            "adhoc/{name}/{}",
            anumate_crypto::sha256_hex(source.as_bytes())
        );
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit);
        }
        let (name, source, fuel) = (name.to_owned(), source.to_owned(), self.cfg.fuel);
        let compiled =
            anumate_cpu::run(move || analyze::compile(&name, &source, 0, fuel, false)).await?;
        Ok(self.cache.insert(&key, compiled))
    }

    /// Reads one version, with its rules.
    pub async fn get(
        &self,
        actor: &Actor,
        name: &str,
        selector: VersionSelector,
    ) -> Result<(pb::Policy, pb::PolicyVersion)> {
        let (policy, version) = self.documents.get(actor, name, selector).await?;
        let compiled = self.compiled_version(&actor.tenant, &version).await?;
        let version = match compiled.policies.first() {
            Some(info) => with_rules(version, info),
            None => version,
        };
        Ok((policy, version))
    }

    /// Lists policies by name.
    pub async fn list(
        &self,
        actor: &Actor,
        status: pb::PolicyVersionStatus,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<pb::Policy>, String)> {
        let status = repo::stored_status(status);
        self.documents
            .list(actor, &[], status, page_size, page_token)
            .await
    }
}
