//! The Capsule Registry service (SPEC §2): versioned, signed Capsule documents
//! per tenant, and the tenant's tool catalogue (SPEC §13, [`tools`]).
//!
//! [`Registry`] holds the domain logic and knows nothing of gRPC; [`grpc`]
//! adapts it to the generated `RegistryService` trait (authentication happens
//! in the `anumate_auth::AuthLayer` around it; handlers only check roles).
#![forbid(unsafe_code)]

mod diff;
pub mod grpc;
mod module;
mod repo;
pub mod settings;
mod settings_grpc;
pub mod tools;
mod tools_grpc;

use std::sync::Arc;
use std::time::Duration;

use anumate_capsule::Limits;
use anumate_crypto::KeyRing;
use anumate_documents::{Documents, Draft};
use anumate_errors::{Error, Result};
use anumate_proto::registry::v1 as pb;
use anumate_store::{Migration, Store};
use serde::{Deserialize, Serialize};

pub use anumate_documents::{Actor, VersionSelector};
pub use grpc::RegistryGrpc;
pub use module::module;
pub use repo::{Capsules, MIGRATIONS as REPO_MIGRATIONS};
pub use settings::TenantSettingsStore;
pub use settings_grpc::TenantSettingsGrpc;
pub use tools::{ToolCatalogue, Tools};
pub use tools_grpc::ToolsGrpc;

/// Every migration the registry needs, the outbox's included.
pub fn migrations() -> Vec<Migration> {
    anumate_events::with_outbox(repo::MIGRATIONS)
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

/// The registry.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    keys: Arc<KeyRing>,
    documents: Documents<Capsules>,
    tools: ToolCatalogue,
    limits: Limits,
    diff_limits: diff::DiffLimits,
}

/// Result of a push.
pub type Pushed = anumate_documents::Pushed<Capsules>;

impl Registry {
    /// A registry over `store`, signing with the ring's active key.
    pub fn new(store: Store, keys: Arc<KeyRing>, cfg: &RegistryConfig) -> Registry {
        let limits = Limits {
            max_document_bytes: cfg.max_document_bytes,
            max_steps: cfg.max_steps,
            ..Limits::default()
        };
        Registry {
            documents: Documents::new(store.clone(), Capsules::new(keys.clone())),
            tools: ToolCatalogue::new(store.clone(), cfg.max_document_bytes),
            store,
            keys,
            limits,
            diff_limits: diff::DiffLimits {
                max_lines: cfg.diff_max_lines,
                deadline: Duration::from_millis(cfg.diff_deadline_ms),
            },
        }
    }

    /// The capsules' lifecycle: list versions, publish, deprecate, delete.
    pub fn documents(&self) -> &Documents<Capsules> {
        &self.documents
    }

    /// The tenant's tool catalogue.
    pub fn tools(&self) -> &ToolCatalogue {
        &self.tools
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

    /// Stores a new version (or returns the identical existing one), with
    /// warnings about what would stop it compiling: tools in `spec.tools`
    /// that neither the tenant's catalogue nor the built-ins declare.
    pub async fn push(
        &self,
        actor: &Actor,
        source: &str,
        source_name: &str,
        etag: &str,
        publish: bool,
    ) -> Result<(Pushed, Vec<String>)> {
        let (capsule, canonical, hash) = self.validate(source, source_name).await?;
        let draft = Draft {
            name: &capsule.name,
            source,
            canonical_json: &canonical,
            content_hash: &hash,
            description: &capsule.description,
            labels: &capsule.labels,
        };
        let pushed = self.documents.push(actor, &draft, etag, publish).await?;
        let undeclared = self.tools.undeclared(actor, &capsule.spec.tools).await?;
        let warnings = undeclared
            .iter()
            .map(|tool| {
                format!(
                    "tool {tool} is not in the tenant's catalogue nor built in: the capsule \
                     compiles only once it is declared (`anumate tool push`) or the operator \
                     adds it to [[compiler.tools]]"
                )
            })
            .collect();
        Ok((pushed, warnings))
    }

    /// Reads one version (the in-process client's call).
    pub async fn get(
        &self,
        actor: &Actor,
        name: &str,
        selector: VersionSelector,
    ) -> Result<(pb::Capsule, pb::CapsuleVersion)> {
        self.documents.get(actor, name, selector).await
    }

    /// Lists capsules by name.
    pub async fn list(
        &self,
        actor: &Actor,
        label_selector: &str,
        status: pb::VersionStatus,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<pb::Capsule>, String)> {
        let labels = repo::parse_label_selector(label_selector)?;
        let status = repo::stored_status(status);
        self.documents
            .list(actor, &labels, status, page_size, page_token)
            .await
    }

    /// Diffs two versions (on the CPU pool, within [`RegistryConfig::diff_max_lines`]
    /// and [`RegistryConfig::diff_deadline_ms`]).
    pub async fn diff(
        &self,
        actor: &Actor,
        name: &str,
        from: i32,
        to: i32,
    ) -> Result<pb::DiffCapsuleVersionsResponse> {
        anumate_errors::check_dns_label("name", name)?;
        if from <= 0 || to <= 0 {
            return Err(Error::invalid_argument(
                "from_version",
                "both versions must be positive numbers",
            ));
        }
        let tx = self.store.read(&actor.tenant).await?;
        Documents::<Capsules>::visible(&tx, name).await?;
        let a = Documents::<Capsules>::version(&tx, name, from).await?;
        let b = Documents::<Capsules>::version(&tx, name, to).await?;
        drop(tx);
        let (name, limits) = (name.to_owned(), self.diff_limits);
        anumate_cpu::run(move || diff::diff(&name, &a, &b, limits)).await
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
