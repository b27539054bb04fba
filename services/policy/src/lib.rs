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

use std::sync::Arc;

use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::policy::v1 as pb;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};

pub use analyze::{Compiled, PolicyInfo, canonical_value};
pub use eval::{EvalInput, EvalTarget, RedactValue};
pub use grpc::PolicyGrpc;
pub use module::module;
pub use repo::MIGRATIONS as REPO_MIGRATIONS;

/// Every migration the policy service needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::MIGRATIONS
        .iter()
        .chain(repo::MIGRATIONS)
        .copied()
        .collect()
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

/// Who is acting: the tenant and principal from the verified token.
#[derive(Debug, Clone)]
pub struct Actor {
    /// Tenant id.
    pub tenant: String,
    /// Principal subject.
    pub subject: String,
}

/// How `GetPolicy` picks a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSelector {
    /// The highest published version.
    Published,
    /// The highest version in any state.
    Latest,
    /// This exact version.
    Number(i64),
}

impl VersionSelector {
    /// Parses `""`/`"published"`, `"latest"` or a positive number.
    pub fn parse(s: &str) -> Result<VersionSelector> {
        match s {
            "" | "published" => Ok(VersionSelector::Published),
            "latest" => Ok(VersionSelector::Latest),
            n => match n.parse::<i64>() {
                Ok(v) if v > 0 => Ok(VersionSelector::Number(v)),
                _ => Err(Error::invalid_argument(
                    "version",
                    format!("{n:?} is not a version number, \"published\" or \"latest\""),
                )),
            },
        }
    }
}

/// Result of a push.
pub struct Pushed {
    /// The new or existing version.
    pub version: pb::PolicyVersion,
    /// Whether a version was created.
    pub created: bool,
    /// The policy afterwards.
    pub policy: pb::Policy,
}

/// The policy service.
#[derive(Clone)]
pub struct Policies {
    store: Store,
    cfg: PolicyConfig,
    cache: Arc<cache::Cache>,
    /// When each tenant's decision log was last purged (Unix microseconds).
    purged: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
}

pub(crate) use anumate_errors::check_dns_label as check_name;

fn check_etag(policy: &pb::Policy, expected: &str) -> Result<()> {
    if !expected.is_empty() && policy.etag != expected {
        return Err(Error::new(
            ErrorCode::EtagMismatch,
            format!(
                "policy {} changed: etag is {}, request carried {expected}; re-read and retry",
                policy.name, policy.etag
            ),
        )
        .with_metadata("current_etag", policy.etag.clone()));
    }
    Ok(())
}

fn not_found(name: &str) -> Error {
    Error::not_found(format!("policy {name} not found"))
}

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
            store,
            cfg: cfg.clone(),
            cache: Arc::new(cache::Cache::new(cfg.cache_entries)),
            purged: Arc::default(),
        }
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
        // One retry covers two first pushes of a new name racing on its primary key.
        match self.push_once(actor, source, info, etag, publish).await {
            Err(e) if e.code == ErrorCode::AlreadyExists => {
                self.push_once(actor, source, info, etag, publish).await
            }
            other => other,
        }
    }

    async fn push_once(
        &self,
        actor: &Actor,
        source: &str,
        info: &PolicyInfo,
        etag: &str,
        publish: bool,
    ) -> Result<Pushed> {
        let name = info.name.as_str();
        let hash = info.content_hash.as_str();
        let tx = self.store.write(&actor.tenant).await?;
        let existing = repo::lock_policy(&tx, name).await?;
        if let Some(c) = &existing {
            if c.deleted {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("policy {name} was deleted; choose another name"),
                ));
            }
            check_etag(&c.proto, etag)?;
            if let Some(mut same) = repo::find_by_hash(&tx, name, hash).await? {
                let mut policy = c.proto.clone();
                if publish && same.status == pb::PolicyVersionStatus::Draft as i32 {
                    policy = self
                        .set_status(&tx, actor, c, &mut same, pb::PolicyVersionStatus::Published)
                        .await?;
                    tx.commit().await?;
                } else if publish && same.status == pb::PolicyVersionStatus::Deprecated as i32 {
                    return Err(Error::new(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "identical content is version {} which is deprecated; it cannot be published again",
                            same.version
                        ),
                    ));
                }
                return Ok(Pushed {
                    version: with_rules(same, info),
                    created: false,
                    policy,
                });
            }
        } else if !etag.is_empty() {
            return Err(Error::new(
                ErrorCode::EtagMismatch,
                format!("policy {name} does not exist yet; push without an etag to create it"),
            ));
        }

        let now = anumate_store::now_micros();
        let version_no = existing.as_ref().map_or(1, |c| c.proto.latest_version + 1);
        let version = pb::PolicyVersion {
            name: name.to_string(),
            version: version_no,
            status: if publish {
                pb::PolicyVersionStatus::Published
            } else {
                pb::PolicyVersionStatus::Draft
            } as i32,
            source: source.to_string(),
            canonical_json: info.canonical_json.clone(),
            content_hash: hash.to_string(),
            description: info.description.clone(),
            rules: Vec::new(),
            test_count: 0,
            created_by: actor.subject.clone(),
            create_time: Some(repo::timestamp(now)),
            publish_time: publish.then(|| repo::timestamp(now)),
            deprecate_time: None,
        };
        if existing.is_none() {
            repo::insert_policy(&tx, name, now).await?;
        }
        repo::insert_version(&tx, &version, now).await?;
        let published_version = if publish {
            version_no
        } else {
            existing.as_ref().map_or(0, |c| c.proto.published_version)
        };
        let policy = repo::update_after_push(
            &tx,
            existing.as_ref(),
            name,
            &info.description,
            version_no,
            published_version,
            now,
        )
        .await?;

        let subject = format!("policies/{name}/versions/{version_no}");
        let ctx = anumate_events::EventContext {
            subject: &subject,
            ..Default::default()
        };
        anumate_events::append(
            &tx,
            &ev::PolicyPushed {
                tenant_id: actor.tenant.clone(),
                name: name.to_string(),
                version: version_no,
                content_hash: hash.to_string(),
                actor: actor.subject.clone(),
            },
            name,
            ctx.clone(),
        )
        .await?;
        if publish {
            anumate_events::append(
                &tx,
                &ev::PolicyPublished {
                    tenant_id: actor.tenant.clone(),
                    name: name.to_string(),
                    version: version_no,
                    content_hash: hash.to_string(),
                    actor: actor.subject.clone(),
                },
                name,
                ctx,
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!(tenant = %actor.tenant, policy = %name, version = version_no, %hash, "policy version pushed");
        Ok(Pushed {
            version: with_rules(version, info),
            created: true,
            policy,
        })
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
        check_name("name", name)?;
        let tx = self.store.read(&actor.tenant).await?;
        let policy = repo::visible_policy(&tx, name).await?;
        let number = match selector {
            VersionSelector::Number(n) => n,
            VersionSelector::Latest => policy.latest_version,
            VersionSelector::Published if policy.published_version > 0 => policy.published_version,
            VersionSelector::Published => {
                return Err(Error::not_found(format!(
                    "policy {name} has no published version (latest is {}; ask for \"latest\" or a number)",
                    policy.latest_version
                )));
            }
        };
        let version = repo::get_version(&tx, name, number)
            .await?
            .ok_or_else(|| Error::not_found(format!("policy {name} has no version {number}")))?;
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
        page: Option<&anumate_proto::common::v1::PageRequest>,
    ) -> Result<(Vec<pb::Policy>, String)> {
        let (size, after) = repo::page_params(page)?;
        let tx = self.store.read(&actor.tenant).await?;
        repo::list_policies(&tx, status, size, after.as_deref()).await
    }

    /// Lists a policy's versions, newest first.
    pub async fn list_versions(
        &self,
        actor: &Actor,
        name: &str,
        page: Option<&anumate_proto::common::v1::PageRequest>,
    ) -> Result<(Vec<pb::PolicyVersion>, String)> {
        check_name("name", name)?;
        let (size, after) = repo::page_params(page)?;
        let before =
            match after {
                Some(token) => Some(token.parse::<i64>().map_err(|_| {
                    Error::invalid_argument("page.page_token", "malformed page token")
                })?),
                None => None,
            };
        let tx = self.store.read(&actor.tenant).await?;
        repo::visible_policy(&tx, name).await?;
        repo::list_versions(&tx, name, size, before).await
    }

    /// Publishes or deprecates a version.
    pub async fn transition(
        &self,
        actor: &Actor,
        name: &str,
        number: i64,
        etag: &str,
        target: pb::PolicyVersionStatus,
    ) -> Result<(pb::Policy, pb::PolicyVersion)> {
        check_name("name", name)?;
        let tx = self.store.write(&actor.tenant).await?;
        let policy = repo::lock_policy(&tx, name)
            .await?
            .filter(|c| !c.deleted)
            .ok_or_else(|| not_found(name))?;
        check_etag(&policy.proto, etag)?;
        let mut version = repo::get_version(&tx, name, number)
            .await?
            .ok_or_else(|| Error::not_found(format!("policy {name} has no version {number}")))?;
        if version.status == target as i32 {
            return Ok((policy.proto, version)); // no-op
        }
        if target == pb::PolicyVersionStatus::Published
            && version.status == pb::PolicyVersionStatus::Deprecated as i32
        {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "version {number} of {name} is deprecated and cannot be published again; push a new version"
                ),
            ));
        }
        let updated = self
            .set_status(&tx, actor, &policy, &mut version, target)
            .await?;
        tx.commit().await?;
        Ok((updated, version))
    }

    async fn set_status(
        &self,
        tx: &anumate_store::TenantTx,
        actor: &Actor,
        policy: &repo::PolicyRow,
        version: &mut pb::PolicyVersion,
        target: pb::PolicyVersionStatus,
    ) -> Result<pb::Policy> {
        let now = anumate_store::now_micros();
        repo::set_version_status(tx, &policy.proto.name, version.version, target, now).await?;
        version.status = target as i32;
        match target {
            pb::PolicyVersionStatus::Published => {
                version.publish_time = Some(repo::timestamp(now));
            }
            _ => version.deprecate_time = Some(repo::timestamp(now)),
        }
        let updated = repo::touch_policy(tx, &policy.proto.name, now).await?;
        let name = policy.proto.name.clone();
        let subject = format!("policies/{name}/versions/{}", version.version);
        let ctx = anumate_events::EventContext {
            subject: &subject,
            ..Default::default()
        };
        if target == pb::PolicyVersionStatus::Published {
            anumate_events::append(
                tx,
                &ev::PolicyPublished {
                    tenant_id: actor.tenant.clone(),
                    name: name.clone(),
                    version: version.version,
                    content_hash: version.content_hash.clone(),
                    actor: actor.subject.clone(),
                },
                &name,
                ctx,
            )
            .await?;
        } else {
            anumate_events::append(
                tx,
                &ev::PolicyDeprecated {
                    tenant_id: actor.tenant.clone(),
                    name: name.clone(),
                    version: version.version,
                    content_hash: version.content_hash.clone(),
                    actor: actor.subject.clone(),
                },
                &name,
                ctx,
            )
            .await?;
        }
        Ok(updated)
    }

    /// Soft-deletes a policy.
    pub async fn delete(&self, actor: &Actor, name: &str, etag: &str) -> Result<pb::Policy> {
        check_name("name", name)?;
        let tx = self.store.write(&actor.tenant).await?;
        let policy = repo::lock_policy(&tx, name)
            .await?
            .filter(|c| !c.deleted)
            .ok_or_else(|| not_found(name))?;
        check_etag(&policy.proto, etag)?;
        let now = anumate_store::now_micros();
        repo::soft_delete(&tx, name, now).await?;
        anumate_events::append(
            &tx,
            &ev::PolicyDeleted {
                tenant_id: actor.tenant.clone(),
                name: name.to_string(),
                actor: actor.subject.clone(),
            },
            name,
            anumate_events::EventContext {
                subject: &format!("policies/{name}"),
                ..Default::default()
            },
        )
        .await?;
        let deleted = repo::lock_policy(&tx, name)
            .await?
            .map_or(policy.proto, |c| c.proto);
        tx.commit().await?;
        Ok(deleted)
    }
}
