//! The Capsule Registry service (SPEC §2): versioned, signed Capsule documents
//! per tenant.
//!
//! [`Registry`] holds the domain logic and knows nothing of gRPC; [`grpc`]
//! adapts it to the generated `RegistryService` trait (authentication happens
//! in the `anumate_auth::AuthLayer` around it; handlers only check roles).
#![forbid(unsafe_code)]

mod diff;
pub mod grpc;
mod module;
mod repo;

use std::sync::Arc;
use std::time::Duration;

use anumate_capsule::Limits;
use anumate_crypto::KeyRing;
use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::registry::v1 as pb;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};

pub use grpc::RegistryGrpc;
pub use module::module;
pub use repo::MIGRATIONS as REPO_MIGRATIONS;

/// Every migration the registry needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::MIGRATIONS
        .iter()
        .chain(repo::MIGRATIONS)
        .copied()
        .collect()
}

/// `[registry]` configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Largest accepted capsule document, in bytes.
    pub max_document_bytes: usize,
    /// Most steps in a capsule.
    pub max_steps: usize,
    /// Most source lines per version that `DiffCapsuleVersions` compares;
    /// longer versions are refused with `FAILED_PRECONDITION`.
    pub diff_max_lines: usize,
    /// Time `DiffCapsuleVersions` spends matching lines, in milliseconds;
    /// past it the rest is reported as removed and added lines (approximate).
    pub diff_deadline_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        let limits = Limits::default();
        RegistryConfig {
            max_document_bytes: limits.max_document_bytes,
            max_steps: limits.max_steps,
            diff_max_lines: 50_000,
            diff_deadline_ms: 200,
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

/// How `GetCapsule` picks a version.
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

/// The registry.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    keys: Arc<KeyRing>,
    limits: Limits,
    diff_limits: diff::DiffLimits,
}

/// Result of a push.
pub struct Pushed {
    /// The new or existing version.
    pub version: pb::CapsuleVersion,
    /// Whether a version was created.
    pub created: bool,
    /// The capsule afterwards.
    pub capsule: pb::Capsule,
}

fn check_name(name: &str) -> Result<()> {
    anumate_errors::check_dns_label("name", name)
}

fn check_etag(capsule: &pb::Capsule, expected: &str) -> Result<()> {
    if !expected.is_empty() && capsule.etag != expected {
        return Err(Error::new(
            ErrorCode::EtagMismatch,
            format!(
                "capsule {} changed: etag is {}, request carried {expected}; re-read and retry",
                capsule.name, capsule.etag
            ),
        )
        .with_metadata("current_etag", capsule.etag.clone()));
    }
    Ok(())
}

impl Registry {
    /// A registry over `store`, signing with the ring's active key.
    pub fn new(store: Store, keys: Arc<KeyRing>, cfg: &RegistryConfig) -> Registry {
        let limits = Limits {
            max_document_bytes: cfg.max_document_bytes,
            max_steps: cfg.max_steps,
            ..Limits::default()
        };
        Registry {
            store,
            keys,
            limits,
            diff_limits: diff::DiffLimits {
                max_lines: cfg.diff_max_lines,
                deadline: Duration::from_millis(cfg.diff_deadline_ms),
            },
        }
    }

    /// The document limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Parses, validates and canonicalizes a document without storing it
    /// (on the CPU pool: a 1 MiB document takes milliseconds).
    pub async fn validate(
        &self,
        source: &str,
        source_name: &str,
    ) -> Result<(anumate_capsule::Capsule, String, String)> {
        if source.len() > self.limits.max_document_bytes {
            // Refused by its length alone; not worth copying to the pool.
            return validate_document(source, source_name, &self.limits);
        }
        let (source, source_name) = (source.to_owned(), source_name.to_owned());
        let limits = self.limits.clone();
        anumate_cpu::run(move || validate_document(&source, &source_name, &limits)).await
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
        let (capsule, canonical, hash) = self.validate(source, source_name).await?;
        // One retry covers two first pushes of a new name racing on its primary key.
        match self
            .push_once(actor, source, &capsule, &canonical, &hash, etag, publish)
            .await
        {
            Err(e) if e.code == ErrorCode::AlreadyExists => {
                self.push_once(actor, source, &capsule, &canonical, &hash, etag, publish)
                    .await
            }
            other => other,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn push_once(
        &self,
        actor: &Actor,
        source: &str,
        doc: &anumate_capsule::Capsule,
        canonical: &str,
        hash: &str,
        etag: &str,
        publish: bool,
    ) -> Result<Pushed> {
        let tx = self.store.write(&actor.tenant).await?;
        let existing = repo::lock_capsule(&tx, &doc.name).await?;
        if let Some(c) = &existing {
            if c.deleted {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    format!("capsule {} was deleted; choose another name", doc.name),
                ));
            }
            check_etag(&c.proto, etag)?;
            if let Some(mut same) = repo::find_by_hash(&tx, &doc.name, hash).await? {
                let mut capsule = c.proto.clone();
                if publish && same.status == pb::VersionStatus::Draft as i32 {
                    capsule = self
                        .set_status(&tx, actor, c, &mut same, pb::VersionStatus::Published)
                        .await?;
                    tx.commit().await?;
                } else if publish && same.status == pb::VersionStatus::Deprecated as i32 {
                    return Err(Error::new(
                        ErrorCode::FailedPrecondition,
                        format!(
                            "identical content is version {} which is deprecated; it cannot be published again",
                            same.version
                        ),
                    ));
                }
                return Ok(Pushed {
                    version: same,
                    created: false,
                    capsule,
                });
            }
        } else if !etag.is_empty() {
            return Err(Error::new(
                ErrorCode::EtagMismatch,
                format!(
                    "capsule {} does not exist yet; push without an etag to create it",
                    doc.name
                ),
            ));
        }

        let now = anumate_store::now_micros();
        let version_no = existing.as_ref().map_or(1, |c| c.proto.latest_version + 1);
        let key = self.keys.active();
        let version = pb::CapsuleVersion {
            name: doc.name.clone(),
            version: version_no,
            status: if publish {
                pb::VersionStatus::Published
            } else {
                pb::VersionStatus::Draft
            } as i32,
            source_yaml: source.to_string(),
            canonical_json: canonical.to_string(),
            content_hash: hash.to_string(),
            signature: key.sign_b64url(canonical.as_bytes()),
            kid: key.kid().to_string(),
            description: doc.description.clone(),
            labels: doc.labels.clone().into_iter().collect(),
            created_by: actor.subject.clone(),
            create_time: Some(repo::timestamp(now)),
            publish_time: publish.then(|| repo::timestamp(now)),
            deprecate_time: None,
        };
        if existing.is_none() {
            repo::insert_capsule(&tx, &doc.name, now).await?;
        }
        repo::insert_version(&tx, &version, now).await?;
        let published_version = if publish {
            version_no
        } else {
            existing.as_ref().map_or(0, |c| c.proto.published_version)
        };
        let capsule = repo::update_after_push(
            &tx,
            existing.as_ref(),
            doc,
            version_no,
            published_version,
            now,
        )
        .await?;

        let subject = format!("capsules/{}/versions/{version_no}", doc.name);
        let ctx = anumate_events::EventContext {
            subject: &subject,
            ..Default::default()
        };
        anumate_events::append(
            &tx,
            &ev::CapsulePushed {
                tenant_id: actor.tenant.clone(),
                name: doc.name.clone(),
                version: version_no,
                content_hash: hash.to_string(),
                actor: actor.subject.clone(),
            },
            &doc.name,
            ctx.clone(),
        )
        .await?;
        if publish {
            anumate_events::append(
                &tx,
                &ev::CapsulePublished {
                    tenant_id: actor.tenant.clone(),
                    name: doc.name.clone(),
                    version: version_no,
                    content_hash: hash.to_string(),
                    actor: actor.subject.clone(),
                },
                &doc.name,
                ctx,
            )
            .await?;
        }
        tx.commit().await?;
        tracing::info!(tenant = %actor.tenant, capsule = %doc.name, version = version_no, %hash, "capsule version pushed");
        Ok(Pushed {
            version,
            created: true,
            capsule,
        })
    }

    /// Reads one version.
    pub async fn get(
        &self,
        actor: &Actor,
        name: &str,
        selector: VersionSelector,
    ) -> Result<(pb::Capsule, pb::CapsuleVersion)> {
        check_name(name)?;
        let tx = self.store.read(&actor.tenant).await?;
        let capsule = repo::visible_capsule(&tx, name).await?;
        let number = match selector {
            VersionSelector::Number(n) => n,
            VersionSelector::Latest => capsule.latest_version,
            VersionSelector::Published if capsule.published_version > 0 => {
                capsule.published_version
            }
            VersionSelector::Published => {
                return Err(Error::not_found(format!(
                    "capsule {name} has no published version (latest is {}; ask for \"latest\" or a number)",
                    capsule.latest_version
                )));
            }
        };
        let version = repo::get_version(&tx, name, number)
            .await?
            .ok_or_else(|| Error::not_found(format!("capsule {name} has no version {number}")))?;
        Ok((capsule, version))
    }

    /// Lists capsules by name.
    pub async fn list(
        &self,
        actor: &Actor,
        label_selector: &str,
        status: pb::VersionStatus,
        page: Option<&anumate_proto::common::v1::PageRequest>,
    ) -> Result<(Vec<pb::Capsule>, String)> {
        let labels = repo::parse_label_selector(label_selector)?;
        let (size, after) = repo::page_params(page)?;
        let tx = self.store.read(&actor.tenant).await?;
        repo::list_capsules(&tx, &labels, status, size, after.as_deref()).await
    }

    /// Lists a capsule's versions, newest first.
    pub async fn list_versions(
        &self,
        actor: &Actor,
        name: &str,
        page: Option<&anumate_proto::common::v1::PageRequest>,
    ) -> Result<(Vec<pb::CapsuleVersion>, String)> {
        check_name(name)?;
        let (size, after) = repo::page_params(page)?;
        let before =
            match after {
                Some(token) => Some(token.parse::<i64>().map_err(|_| {
                    Error::invalid_argument("page.page_token", "malformed page token")
                })?),
                None => None,
            };
        let tx = self.store.read(&actor.tenant).await?;
        repo::visible_capsule(&tx, name).await?;
        repo::list_versions(&tx, name, size, before).await
    }

    /// Diffs two versions (on the CPU pool, within [`RegistryConfig::diff_max_lines`]
    /// and [`RegistryConfig::diff_deadline_ms`]).
    pub async fn diff(
        &self,
        actor: &Actor,
        name: &str,
        from: i64,
        to: i64,
    ) -> Result<pb::DiffCapsuleVersionsResponse> {
        check_name(name)?;
        if from <= 0 || to <= 0 {
            return Err(Error::invalid_argument(
                "from_version",
                "both versions must be positive numbers",
            ));
        }
        let tx = self.store.read(&actor.tenant).await?;
        repo::visible_capsule(&tx, name).await?;
        let a = repo::get_version(&tx, name, from)
            .await?
            .ok_or_else(|| Error::not_found(format!("capsule {name} has no version {from}")))?;
        let b = repo::get_version(&tx, name, to)
            .await?
            .ok_or_else(|| Error::not_found(format!("capsule {name} has no version {to}")))?;
        drop(tx);
        let (name, limits) = (name.to_owned(), self.diff_limits);
        anumate_cpu::run(move || diff::diff(&name, &a, &b, limits)).await
    }

    /// Publishes or deprecates a version.
    pub async fn transition(
        &self,
        actor: &Actor,
        name: &str,
        number: i64,
        etag: &str,
        target: pb::VersionStatus,
    ) -> Result<(pb::Capsule, pb::CapsuleVersion)> {
        check_name(name)?;
        let tx = self.store.write(&actor.tenant).await?;
        let capsule = repo::lock_capsule(&tx, name)
            .await?
            .filter(|c| !c.deleted)
            .ok_or_else(|| not_found(name))?;
        check_etag(&capsule.proto, etag)?;
        let mut version = repo::get_version(&tx, name, number)
            .await?
            .ok_or_else(|| Error::not_found(format!("capsule {name} has no version {number}")))?;
        if version.status == target as i32 {
            return Ok((capsule.proto, version)); // no-op
        }
        if target == pb::VersionStatus::Published
            && version.status == pb::VersionStatus::Deprecated as i32
        {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "version {number} of {name} is deprecated and cannot be published again; push a new version"
                ),
            ));
        }
        let updated = self
            .set_status(&tx, actor, &capsule, &mut version, target)
            .await?;
        tx.commit().await?;
        Ok((updated, version))
    }

    async fn set_status(
        &self,
        tx: &anumate_store::TenantTx,
        actor: &Actor,
        capsule: &repo::CapsuleRow,
        version: &mut pb::CapsuleVersion,
        target: pb::VersionStatus,
    ) -> Result<pb::Capsule> {
        let now = anumate_store::now_micros();
        repo::set_version_status(tx, &capsule.proto.name, version.version, target, now).await?;
        version.status = target as i32;
        match target {
            pb::VersionStatus::Published => version.publish_time = Some(repo::timestamp(now)),
            _ => version.deprecate_time = Some(repo::timestamp(now)),
        }
        let updated = repo::touch_capsule(tx, &capsule.proto.name, now).await?;
        let name = capsule.proto.name.clone();
        let subject = format!("capsules/{name}/versions/{}", version.version);
        let ctx = anumate_events::EventContext {
            subject: &subject,
            ..Default::default()
        };
        match target {
            pb::VersionStatus::Published => {
                anumate_events::append(
                    tx,
                    &ev::CapsulePublished {
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
            _ => {
                anumate_events::append(
                    tx,
                    &ev::CapsuleDeprecated {
                        tenant_id: actor.tenant.clone(),
                        name: name.clone(),
                        version: version.version,
                        actor: actor.subject.clone(),
                    },
                    &name,
                    ctx,
                )
                .await?;
            }
        }
        Ok(updated)
    }

    /// Soft-deletes a capsule.
    pub async fn delete(&self, actor: &Actor, name: &str, etag: &str) -> Result<pb::Capsule> {
        check_name(name)?;
        let tx = self.store.write(&actor.tenant).await?;
        let capsule = repo::lock_capsule(&tx, name)
            .await?
            .filter(|c| !c.deleted)
            .ok_or_else(|| not_found(name))?;
        check_etag(&capsule.proto, etag)?;
        let now = anumate_store::now_micros();
        repo::soft_delete(&tx, name, now).await?;
        anumate_events::append(
            &tx,
            &ev::CapsuleDeleted {
                tenant_id: actor.tenant.clone(),
                name: name.to_string(),
                actor: actor.subject.clone(),
            },
            name,
            anumate_events::EventContext {
                subject: &format!("capsules/{name}"),
                ..Default::default()
            },
        )
        .await?;
        // The row as deleted: its new etag and update time.
        let deleted = repo::lock_capsule(&tx, name)
            .await?
            .map_or(capsule.proto, |c| c.proto);
        tx.commit().await?;
        Ok(deleted)
    }

    /// The public keys verifying version signatures.
    pub fn jwks(&self) -> anumate_crypto::Jwks {
        self.keys.jwks()
    }
}

/// Parses, validates and canonicalizes a document: the pure part of
/// [`Registry::validate`].
fn validate_document(
    source: &str,
    source_name: &str,
    limits: &Limits,
) -> Result<(anumate_capsule::Capsule, String, String)> {
    let capsule = anumate_capsule::parse(source, limits).map_err(|rejection| {
        let mut err = rejection.to_error();
        // Violations carry line:col; the message names the document they are in.
        if !source_name.is_empty() {
            err.message = format!("{source_name}: {}", err.message);
        }
        err
    })?;
    let (canonical, hash) = anumate_crypto::content_hash(&capsule.document);
    Ok((capsule, canonical, hash))
}

fn not_found(name: &str) -> Error {
    Error::not_found(format!("capsule {name} not found"))
}
