//! Capsules and their versions as versioned documents ([`anumate_documents`]
//! over [`anumate_store::versioned`]): the tables, the mapping of their rows
//! to the contract's messages, a new version (signed) and the events of each
//! change; and label selectors.

use std::collections::BTreeMap;
use std::sync::Arc;

use anumate_crypto::KeyRing;
use anumate_documents::{
    DeletionEvent, Draft, NewVersion, VersionEvent, VersionedKind, wire_version,
};
use anumate_errors::{Error, Reason, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::registry::v1 as pb;
use anumate_proto::timestamp_from_micros as timestamp;
use anumate_store::versioned::{DocumentRow, Schema, Status};
use anumate_store::{Migration, Value};
use sea_orm::FromQueryResult;

const REGISTRY_DDL: &str = "CREATE TABLE capsules (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        labels TEXT NOT NULL,
        latest_version BIGINT NOT NULL,
        published_version BIGINT NOT NULL,
        revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        deleted_at BIGINT,
        PRIMARY KEY (tenant_id, name)
      );
      CREATE TABLE capsule_versions (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('draft', 'published', 'deprecated')),
        source_yaml TEXT NOT NULL,
        canonical_json TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        signature TEXT NOT NULL,
        kid TEXT NOT NULL,
        description TEXT NOT NULL,
        labels TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        published_at BIGINT,
        deprecated_at BIGINT,
        PRIMARY KEY (tenant_id, name, version),
        FOREIGN KEY (tenant_id, name) REFERENCES capsules (tenant_id, name)
      );
      CREATE INDEX capsule_versions_hash ON capsule_versions (tenant_id, name, content_hash);
      CREATE TABLE capsule_labels (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (tenant_id, name, key),
        FOREIGN KEY (tenant_id, name) REFERENCES capsules (tenant_id, name)
      );
      CREATE INDEX capsule_labels_kv ON capsule_labels (tenant_id, key, value)";

/// Registry tables: capsules, then the tool catalogue.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        id: "registry_0001_capsules",
        // The same SQL works on both backends.
        postgres: REGISTRY_DDL,
        sqlite: REGISTRY_DDL,
        tenant_tables: &["capsules", "capsule_versions", "capsule_labels"],
    },
    crate::tools::MIGRATION,
    crate::settings::MIGRATION,
];

/// Capsules as a kind of versioned document; versions are signed with the
/// ring's active key.
#[derive(Clone)]
pub struct Capsules {
    keys: Arc<KeyRing>,
}

impl Capsules {
    /// Capsules signed with `keys`.
    pub fn new(keys: Arc<KeyRing>) -> Capsules {
        Capsules { keys }
    }
}

/// The stored status of a contract status; `None` for unspecified (any, in
/// filters).
pub fn stored_status(s: pb::VersionStatus) -> Option<Status> {
    match s {
        pb::VersionStatus::Unspecified => None,
        pb::VersionStatus::Draft => Some(Status::Draft),
        pb::VersionStatus::Published => Some(Status::Published),
        pb::VersionStatus::Deprecated => Some(Status::Deprecated),
    }
}

/// A stored status as the contract's (capsules and tools share the enum).
pub(crate) fn status_proto(s: Status) -> pb::VersionStatus {
    match s {
        Status::Published => pb::VersionStatus::Published,
        Status::Deprecated => pb::VersionStatus::Deprecated,
        Status::Draft => pb::VersionStatus::Draft,
    }
}

/// A stored capsule version.
#[derive(FromQueryResult)]
pub struct VersionRow {
    name: String,
    version: i64,
    status: String,
    source_yaml: String,
    canonical_json: String,
    content_hash: String,
    signature: String,
    kid: String,
    description: String,
    labels: String,
    created_by: String,
    created_at: i64,
    published_at: Option<i64>,
    deprecated_at: Option<i64>,
}

impl From<VersionRow> for pb::CapsuleVersion {
    fn from(r: VersionRow) -> Self {
        pb::CapsuleVersion {
            name: r.name,
            version: wire_version(r.version),
            status: status_proto(Status::from_name(&r.status)) as i32,
            source_yaml: r.source_yaml,
            canonical_json: r.canonical_json,
            content_hash: r.content_hash,
            signature: r.signature,
            kid: r.kid,
            description: r.description,
            labels: serde_json::from_str(&r.labels).unwrap_or_default(),
            created_by: r.created_by,
            create_time: Some(timestamp(r.created_at)),
            publish_time: r.published_at.map(timestamp),
            deprecate_time: r.deprecated_at.map(timestamp),
        }
    }
}

impl VersionedKind for Capsules {
    type Document = pb::Capsule;
    type Version = pb::CapsuleVersion;
    type Row = VersionRow;
    type Pushed = ev::CapsulePushed;
    type Published = ev::CapsulePublished;
    type Deprecated = ev::CapsuleDeprecated;
    type Deleted = ev::CapsuleDeleted;

    const SCHEMA: Schema = Schema {
        kind: "capsule",
        documents: "capsules",
        versions: "capsule_versions",
        labels: Some("capsule_labels"),
        version_columns: "name, version, status, source_yaml, canonical_json, content_hash, signature, kid, \
             description, labels, created_by, created_at, published_at, deprecated_at",
        version_meta_columns: "name, version, status, '' AS source_yaml, '' AS canonical_json, content_hash, \
             signature, kid, description, labels, created_by, created_at, published_at, deprecated_at",
    };
    const COLLECTION: &'static str = "capsules";
    const NOT_FOUND: Reason = Reason::CapsuleNotFound;
    const VERSION_NOT_FOUND: Reason = Reason::CapsuleVersionNotFound;

    fn document(d: &DocumentRow) -> pb::Capsule {
        pb::Capsule {
            name: d.name.clone(),
            description: d.description.clone(),
            labels: d.label_map(),
            latest_version: wire_version(d.latest_version),
            published_version: wire_version(d.published_version),
            etag: d.etag(),
            create_time: Some(timestamp(d.created_at)),
            update_time: Some(timestamp(d.updated_at)),
        }
    }

    fn new_version(&self, draft: &Draft<'_>, new: &NewVersion<'_>) -> pb::CapsuleVersion {
        let key = self.keys.active();
        pb::CapsuleVersion {
            name: draft.name.to_owned(),
            version: new.number,
            status: status_proto(new.status) as i32,
            source_yaml: draft.source.to_owned(),
            canonical_json: draft.canonical_json.to_owned(),
            content_hash: draft.content_hash.to_owned(),
            signature: key.sign_b64url(draft.canonical_json.as_bytes()),
            kid: key.kid().to_owned(),
            description: draft.description.to_owned(),
            labels: draft.labels.clone().into_iter().collect(),
            created_by: new.created_by.to_owned(),
            create_time: Some(timestamp(new.now)),
            publish_time: (new.status == Status::Published).then(|| timestamp(new.now)),
            deprecate_time: None,
        }
    }

    fn version_columns(v: &pb::CapsuleVersion) -> Vec<(&'static str, Value)> {
        let labels: BTreeMap<_, _> = v.labels.iter().collect();
        let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
        vec![
            ("source_yaml", v.source_yaml.as_str().into()),
            ("signature", v.signature.as_str().into()),
            ("kid", v.kid.as_str().into()),
            ("labels", labels.into()),
        ]
    }

    fn record_status(v: &mut pb::CapsuleVersion, status: Status, now: i64) {
        v.status = status_proto(status) as i32;
        match status {
            Status::Published => v.publish_time = Some(timestamp(now)),
            _ => v.deprecate_time = Some(timestamp(now)),
        }
    }

    fn pushed(e: &VersionEvent<'_>) -> ev::CapsulePushed {
        ev::CapsulePushed {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            content_hash: e.content_hash.to_owned(),
            actor: e.actor.to_owned(),
        }
    }

    fn published(e: &VersionEvent<'_>) -> ev::CapsulePublished {
        ev::CapsulePublished {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            content_hash: e.content_hash.to_owned(),
            actor: e.actor.to_owned(),
        }
    }

    fn deprecated(e: &VersionEvent<'_>) -> ev::CapsuleDeprecated {
        ev::CapsuleDeprecated {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            actor: e.actor.to_owned(),
        }
    }

    fn deleted(e: &DeletionEvent<'_>) -> ev::CapsuleDeleted {
        ev::CapsuleDeleted {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            actor: e.actor.to_owned(),
        }
    }
}

/// Parses `k=v,k2=v2`.
pub fn parse_label_selector(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(Error::invalid_argument(
                "label_selector",
                format!("{part:?} is not key=value"),
            ));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(Error::invalid_argument(
                "label_selector",
                format!("{part:?} has an empty key"),
            ));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}
