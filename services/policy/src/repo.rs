//! Policies and their versions as versioned documents ([`anumate_documents`]
//! over [`anumate_store::versioned`]): the tables, the mapping of their rows
//! to the contract's messages and the events of each change; and the
//! decision log. Every query also filters on the transaction's tenant; on
//! PostgreSQL row-level security enforces it again.

use anumate_documents::{
    DeletionEvent, Documents, Draft, NewVersion, VersionEvent, VersionedKind, wire_version,
};
use anumate_errors::{Reason, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::policy::v1 as pb;
use anumate_proto::timestamp_from_micros as timestamp;
use anumate_store::versioned::{DocumentRow, Schema, Status};
use anumate_store::{Migration, TenantTx, Value};
use sea_orm::FromQueryResult;

const POLICY_DDL: &str = "CREATE TABLE policies (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        latest_version BIGINT NOT NULL,
        published_version BIGINT NOT NULL,
        revision BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        deleted_at BIGINT,
        PRIMARY KEY (tenant_id, name)
      );
      CREATE TABLE policy_versions (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('draft', 'published', 'deprecated')),
        source TEXT NOT NULL,
        canonical_json TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        description TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        published_at BIGINT,
        deprecated_at BIGINT,
        PRIMARY KEY (tenant_id, name, version),
        FOREIGN KEY (tenant_id, name) REFERENCES policies (tenant_id, name)
      );
      CREATE INDEX policy_versions_hash ON policy_versions (tenant_id, name, content_hash);
      CREATE TABLE policy_decisions (
        tenant_id TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        principal TEXT NOT NULL,
        effect TEXT NOT NULL,
        policy_set_hash TEXT NOT NULL,
        policies TEXT NOT NULL,
        input_json TEXT NOT NULL,
        decision_json TEXT NOT NULL,
        fuel_used BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, id)
      );
      CREATE INDEX policy_decisions_time ON policy_decisions (tenant_id, created_at)";

/// Policy tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
    id: "policy_0001_policies",
    // The same SQL works on both backends.
    postgres: POLICY_DDL,
    sqlite: POLICY_DDL,
    tenant_tables: &["policies", "policy_versions", "policy_decisions"],
}];

/// Policies as a kind of versioned document.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyKind;

/// The stored status of a contract status; `None` for unspecified (any, in
/// filters).
pub fn stored_status(s: pb::PolicyVersionStatus) -> Option<Status> {
    match s {
        pb::PolicyVersionStatus::Unspecified => None,
        pb::PolicyVersionStatus::Draft => Some(Status::Draft),
        pb::PolicyVersionStatus::Published => Some(Status::Published),
        pb::PolicyVersionStatus::Deprecated => Some(Status::Deprecated),
    }
}

fn status_proto(s: Status) -> pb::PolicyVersionStatus {
    match s {
        Status::Published => pb::PolicyVersionStatus::Published,
        Status::Deprecated => pb::PolicyVersionStatus::Deprecated,
        Status::Draft => pb::PolicyVersionStatus::Draft,
    }
}

/// A stored policy version.
#[derive(FromQueryResult)]
pub struct VersionRow {
    name: String,
    version: i64,
    status: String,
    source: String,
    canonical_json: String,
    content_hash: String,
    description: String,
    created_by: String,
    created_at: i64,
    published_at: Option<i64>,
    deprecated_at: Option<i64>,
}

impl From<VersionRow> for pb::PolicyVersion {
    fn from(r: VersionRow) -> Self {
        pb::PolicyVersion {
            name: r.name,
            version: wire_version(r.version),
            status: status_proto(Status::from_name(&r.status)) as i32,
            source: r.source,
            canonical_json: r.canonical_json,
            content_hash: r.content_hash,
            description: r.description,
            rules: Vec::new(),
            test_count: 0,
            created_by: r.created_by,
            create_time: Some(timestamp(r.created_at)),
            publish_time: r.published_at.map(timestamp),
            deprecate_time: r.deprecated_at.map(timestamp),
        }
    }
}

impl VersionedKind for PolicyKind {
    type Document = pb::Policy;
    type Version = pb::PolicyVersion;
    type Row = VersionRow;
    type Pushed = ev::PolicyPushed;
    type Published = ev::PolicyPublished;
    type Deprecated = ev::PolicyDeprecated;
    type Deleted = ev::PolicyDeleted;

    const SCHEMA: Schema = Schema {
        kind: "policy",
        documents: "policies",
        versions: "policy_versions",
        labels: None,
        version_columns: "name, version, status, source, canonical_json, content_hash, \
             description, created_by, created_at, published_at, deprecated_at",
        version_meta_columns: "name, version, status, '' AS source, '' AS canonical_json, content_hash, \
             description, created_by, created_at, published_at, deprecated_at",
    };
    const COLLECTION: &'static str = "policies";
    const NOT_FOUND: Reason = Reason::PolicyNotFound;
    const VERSION_NOT_FOUND: Reason = Reason::PolicyVersionNotFound;

    fn document(d: &DocumentRow) -> pb::Policy {
        pb::Policy {
            name: d.name.clone(),
            description: d.description.clone(),
            latest_version: wire_version(d.latest_version),
            published_version: wire_version(d.published_version),
            etag: d.etag(),
            create_time: Some(timestamp(d.created_at)),
            update_time: Some(timestamp(d.updated_at)),
        }
    }

    /// The version without its rules and test count: the service attaches
    /// those from the compiled policy.
    fn new_version(&self, draft: &Draft<'_>, new: &NewVersion<'_>) -> pb::PolicyVersion {
        pb::PolicyVersion {
            name: draft.name.to_owned(),
            version: new.number,
            status: status_proto(new.status) as i32,
            source: draft.source.to_owned(),
            canonical_json: draft.canonical_json.to_owned(),
            content_hash: draft.content_hash.to_owned(),
            description: draft.description.to_owned(),
            rules: Vec::new(),
            test_count: 0,
            created_by: new.created_by.to_owned(),
            create_time: Some(timestamp(new.now)),
            publish_time: (new.status == Status::Published).then(|| timestamp(new.now)),
            deprecate_time: None,
        }
    }

    fn version_columns(v: &pb::PolicyVersion) -> Vec<(&'static str, Value)> {
        vec![("source", v.source.as_str().into())]
    }

    fn record_status(v: &mut pb::PolicyVersion, status: Status, now: i64) {
        v.status = status_proto(status) as i32;
        match status {
            Status::Published => v.publish_time = Some(timestamp(now)),
            _ => v.deprecate_time = Some(timestamp(now)),
        }
    }

    fn pushed(e: &VersionEvent<'_>) -> ev::PolicyPushed {
        ev::PolicyPushed {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            content_hash: e.content_hash.to_owned(),
            actor: e.actor.to_owned(),
        }
    }

    fn published(e: &VersionEvent<'_>) -> ev::PolicyPublished {
        ev::PolicyPublished {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            content_hash: e.content_hash.to_owned(),
            actor: e.actor.to_owned(),
        }
    }

    fn deprecated(e: &VersionEvent<'_>) -> ev::PolicyDeprecated {
        ev::PolicyDeprecated {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            content_hash: e.content_hash.to_owned(),
            actor: e.actor.to_owned(),
        }
    }

    fn deleted(e: &DeletionEvent<'_>) -> ev::PolicyDeleted {
        ev::PolicyDeleted {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            actor: e.actor.to_owned(),
        }
    }
}

/// A policy that exists and is not deleted, or `NOT_FOUND` (`POLICY_NOT_FOUND`).
pub async fn visible_policy(tx: &TenantTx, name: &str) -> Result<pb::Policy> {
    Documents::<PolicyKind>::visible(tx, name).await
}

/// One version, with its source, or `NOT_FOUND` (`POLICY_VERSION_NOT_FOUND`).
pub async fn get_version(tx: &TenantTx, name: &str, version: i32) -> Result<pb::PolicyVersion> {
    Documents::<PolicyKind>::version(tx, name, version).await
}

/// Whether a policy of this name was ever pushed (deleted ones included).
pub async fn ever_pushed(tx: &TenantTx, name: &str) -> Result<bool> {
    Ok(PolicyKind::SCHEMA.any_document(tx, name).await?.is_some())
}

/// The oldest version with this content hash, if any (exact content stays
/// resolvable after deprecation or deletion).
pub async fn find_by_hash(
    tx: &TenantTx,
    name: &str,
    hash: &str,
) -> Result<Option<pb::PolicyVersion>> {
    Documents::<PolicyKind>::find_by_hash(tx, name, hash).await
}

/// One decision log row, already redacted.
pub struct DecisionRow<'a> {
    pub id: &'a str,
    pub principal: &'a str,
    pub effect: &'a str,
    pub policy_set_hash: &'a str,
    pub policies: &'a str,
    pub input_json: &'a str,
    pub decision_json: &'a str,
    pub fuel_used: i64,
}

/// Appends a decision log row.
pub async fn insert_decision(tx: &TenantTx, d: &DecisionRow<'_>, now: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO policy_decisions (tenant_id, id, created_at, principal, effect, policy_set_hash, \
           policies, input_json, decision_json, fuel_used) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        vec![
            tx.tenant_id().into(),
            d.id.into(),
            now.into(),
            d.principal.into(),
            d.effect.into(),
            d.policy_set_hash.into(),
            d.policies.into(),
            d.input_json.into(),
            d.decision_json.into(),
            d.fuel_used.into(),
        ],
    )
    .await?;
    Ok(())
}

/// Deletes the tenant's decision log rows created before `cutoff`; returns
/// how many.
pub async fn purge_decisions(tx: &TenantTx, cutoff: i64) -> Result<u64> {
    Ok(tx
        .execute(
            "DELETE FROM policy_decisions WHERE tenant_id = $1 AND created_at < $2",
            vec![tx.tenant_id().into(), cutoff.into()],
        )
        .await?)
}
