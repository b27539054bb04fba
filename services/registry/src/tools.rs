//! The tenant's tool catalogue (SPEC §13): Tool documents as a kind of
//! versioned document ([`anumate_documents`]), pushed several per file in
//! one transaction and current as soon as pushed.

use std::collections::BTreeMap;

use anumate_documents::{
    Actor, DeletionEvent, Documents, Draft, NewVersion, VersionEvent, VersionSelector,
    VersionedKind, wire_version,
};
use anumate_errors::{Error, Reason, Result};
use anumate_proto::events::v1 as ev;
use anumate_proto::registry::v1 as pb;
use anumate_proto::timestamp_from_micros as timestamp;
use anumate_store::versioned::{DocumentRow, Schema, Status};
use anumate_store::{Migration, Store, Value};
use sea_orm::FromQueryResult;

use crate::repo::status_proto;

const TOOLS_DDL: &str = "CREATE TABLE tools (
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
      CREATE TABLE tool_versions (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version BIGINT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('draft', 'published', 'deprecated')),
        source_yaml TEXT NOT NULL,
        canonical_json TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        connector TEXT NOT NULL,
        side_effect TEXT NOT NULL,
        description TEXT NOT NULL,
        labels TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        published_at BIGINT,
        deprecated_at BIGINT,
        PRIMARY KEY (tenant_id, name, version),
        FOREIGN KEY (tenant_id, name) REFERENCES tools (tenant_id, name)
      );
      CREATE INDEX tool_versions_hash ON tool_versions (tenant_id, name, content_hash);
      CREATE TABLE tool_labels (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (tenant_id, name, key),
        FOREIGN KEY (tenant_id, name) REFERENCES tools (tenant_id, name)
      );
      CREATE INDEX tool_labels_kv ON tool_labels (tenant_id, key, value)";

/// The tool catalogue's tables (row-level security like the capsules').
pub const MIGRATION: Migration = Migration {
    id: "registry_0002_tools",
    // The same SQL works on both backends.
    postgres: TOOLS_DDL,
    sqlite: TOOLS_DDL,
    tenant_tables: &["tools", "tool_versions", "tool_labels"],
};

/// Tools as a kind of versioned document. Every version is published when
/// pushed; "published" is what the contract calls current.
#[derive(Clone, Copy, Default)]
pub struct Tools;

/// A stored tool version.
#[derive(FromQueryResult)]
pub struct ToolVersionRow {
    name: String,
    version: i64,
    status: String,
    source_yaml: String,
    canonical_json: String,
    content_hash: String,
    connector: String,
    side_effect: String,
    description: String,
    labels: String,
    created_by: String,
    created_at: i64,
    deprecated_at: Option<i64>,
}

impl From<ToolVersionRow> for pb::ToolVersion {
    fn from(r: ToolVersionRow) -> Self {
        pb::ToolVersion {
            name: r.name,
            version: wire_version(r.version),
            status: status_proto(Status::from_name(&r.status)) as i32,
            source_yaml: r.source_yaml,
            canonical_json: r.canonical_json,
            content_hash: r.content_hash,
            connector: r.connector,
            side_effect: r.side_effect,
            description: r.description,
            labels: serde_json::from_str(&r.labels).unwrap_or_default(),
            created_by: r.created_by,
            create_time: Some(timestamp(r.created_at)),
            deprecate_time: r.deprecated_at.map(timestamp),
        }
    }
}

impl VersionedKind for Tools {
    type Document = pb::Tool;
    type Version = pb::ToolVersion;
    type Row = ToolVersionRow;
    type Pushed = ev::ToolPushed;
    type Published = ev::ToolPublished;
    type Deprecated = ev::ToolDeprecated;
    // Tools are not deleted (no RPC does it: deprecating every version
    // retires a tool and keeps its name usable), so this is never built.
    type Deleted = ev::ToolDeprecated;

    const SCHEMA: Schema = Schema {
        kind: "tool",
        documents: "tools",
        versions: "tool_versions",
        labels: Some("tool_labels"),
        version_columns: "name, version, status, source_yaml, canonical_json, content_hash, connector, \
             side_effect, description, labels, created_by, created_at, published_at, deprecated_at",
        version_meta_columns: "name, version, status, '' AS source_yaml, '' AS canonical_json, \
             content_hash, connector, side_effect, description, labels, created_by, created_at, \
             published_at, deprecated_at",
    };
    const COLLECTION: &'static str = "tools";
    const NOT_FOUND: Reason = Reason::ToolNotFound;
    const VERSION_NOT_FOUND: Reason = Reason::ToolVersionNotFound;

    fn check_name(name: &str) -> Result<()> {
        anumate_tools::check_tool_name("name", name)
    }

    fn document(d: &DocumentRow) -> pb::Tool {
        pb::Tool {
            name: d.name.clone(),
            description: d.description.clone(),
            labels: d.label_map(),
            latest_version: wire_version(d.latest_version),
            current_version: wire_version(d.published_version),
            etag: d.etag(),
            create_time: Some(timestamp(d.created_at)),
            update_time: Some(timestamp(d.updated_at)),
        }
    }

    fn new_version(&self, draft: &Draft<'_>, new: &NewVersion<'_>) -> pb::ToolVersion {
        // The canonical form was just made from the typed tool; it reads back.
        let (connector, side_effect) =
            anumate_tools::Tool::from_canonical_json(draft.canonical_json)
                .map(|t| {
                    (
                        t.spec.connector.as_string(),
                        t.spec.side_effect.as_str().to_owned(),
                    )
                })
                .unwrap_or_default();
        pb::ToolVersion {
            name: draft.name.to_owned(),
            version: new.number,
            status: status_proto(new.status) as i32,
            source_yaml: draft.source.to_owned(),
            canonical_json: draft.canonical_json.to_owned(),
            content_hash: draft.content_hash.to_owned(),
            connector,
            side_effect,
            description: draft.description.to_owned(),
            labels: draft.labels.clone().into_iter().collect(),
            created_by: new.created_by.to_owned(),
            create_time: Some(timestamp(new.now)),
            deprecate_time: None,
        }
    }

    fn version_columns(v: &pb::ToolVersion) -> Vec<(&'static str, Value)> {
        let labels: BTreeMap<_, _> = v.labels.iter().collect();
        let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
        vec![
            ("source_yaml", v.source_yaml.as_str().into()),
            ("connector", v.connector.as_str().into()),
            ("side_effect", v.side_effect.as_str().into()),
            ("labels", labels.into()),
        ]
    }

    fn record_status(v: &mut pb::ToolVersion, status: Status, now: i64) {
        v.status = status_proto(status) as i32;
        if status == Status::Deprecated {
            v.deprecate_time = Some(timestamp(now));
        }
    }

    fn pushed(e: &VersionEvent<'_>) -> ev::ToolPushed {
        ev::ToolPushed {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            content_hash: e.content_hash.to_owned(),
            actor: e.actor.to_owned(),
        }
    }

    fn published(e: &VersionEvent<'_>) -> ev::ToolPublished {
        ev::ToolPublished {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            content_hash: e.content_hash.to_owned(),
            actor: e.actor.to_owned(),
        }
    }

    fn deprecated(e: &VersionEvent<'_>) -> ev::ToolDeprecated {
        ev::ToolDeprecated {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: e.version,
            actor: e.actor.to_owned(),
        }
    }

    fn deleted(e: &DeletionEvent<'_>) -> ev::ToolDeprecated {
        ev::ToolDeprecated {
            tenant_id: e.tenant_id.to_owned(),
            name: e.name.to_owned(),
            version: 0,
            actor: e.actor.to_owned(),
        }
    }
}

/// The tenant's tool catalogue.
#[derive(Clone)]
pub struct ToolCatalogue {
    documents: Documents<Tools>,
    limits: anumate_tools::Limits,
}

/// Result of pushing one tool.
pub type PushedTool = anumate_documents::Pushed<Tools>;

impl ToolCatalogue {
    /// The catalogue in `store`, taking files of at most `max_file_bytes`.
    pub fn new(store: Store, max_file_bytes: usize) -> ToolCatalogue {
        ToolCatalogue {
            documents: Documents::new(store, Tools),
            limits: anumate_tools::Limits {
                max_file_bytes,
                ..anumate_tools::Limits::default()
            },
        }
    }

    /// The tools' lifecycle: list versions, deprecate.
    pub fn documents(&self) -> &Documents<Tools> {
        &self.documents
    }

    /// The file limits in force.
    pub fn limits(&self) -> &anumate_tools::Limits {
        &self.limits
    }

    /// Parses a file (on the CPU pool) and stores every tool in it, all or none.
    pub async fn push(
        &self,
        actor: &Actor,
        source: &str,
        source_name: &str,
    ) -> Result<Vec<PushedTool>> {
        let parsed = if source.len() > self.limits.max_file_bytes {
            // Refused by its length alone; not worth copying to the pool.
            parse_file(source, source_name, &self.limits)?
        } else {
            let (source, source_name) = (source.to_owned(), source_name.to_owned());
            let limits = self.limits.clone();
            anumate_cpu::run(move || parse_file(&source, &source_name, &limits)).await?
        };
        let drafts: Vec<Draft<'_>> = parsed
            .iter()
            .map(|t| Draft {
                name: t.tool.name(),
                source: &t.source,
                canonical_json: &t.canonical_json,
                content_hash: &t.content_hash,
                description: &t.tool.metadata.description,
                labels: &t.tool.metadata.labels,
            })
            .collect();
        self.documents.push_all(actor, &drafts, true).await
    }

    /// Reads one version: `""`/`"current"` (the highest not deprecated),
    /// `"latest"` or a number.
    pub async fn get(
        &self,
        actor: &Actor,
        name: &str,
        version: &str,
    ) -> Result<(pb::Tool, pb::ToolVersion)> {
        let selector = match version {
            "" | "current" => VersionSelector::Published,
            "published" => {
                return Err(Error::invalid_argument(
                    "version",
                    "\"published\" is not a tool version: ask for \"current\", \"latest\" or a number",
                ));
            }
            other => VersionSelector::parse(other)?,
        };
        self.documents
            .get(actor, name, selector)
            .await
            .map_err(|e| current_missing(e, name))
    }

    /// Lists tools by name.
    pub async fn list(
        &self,
        actor: &Actor,
        label_selector: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<pb::Tool>, String)> {
        let labels = crate::repo::parse_label_selector(label_selector)?;
        self.documents
            .list(actor, &labels, None, page_size, page_token)
            .await
    }

    /// The names among `names` that neither the tenant's catalogue (a
    /// current version) nor the built-ins declare, sorted.
    pub async fn undeclared(&self, actor: &Actor, names: &[String]) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for name in names {
            if anumate_tools::is_builtin(name) || !anumate_tools::is_tool_name(name) {
                continue;
            }
            match self
                .documents
                .get(actor, name, VersionSelector::Published)
                .await
            {
                Ok(_) => {}
                Err(e)
                    if matches!(e.reason, Reason::ToolNotFound | Reason::ToolVersionNotFound) =>
                {
                    out.push(name.clone())
                }
                Err(e) => return Err(e),
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The lifecycle says "published"; tools say "current".
fn current_missing(mut e: Error, name: &str) -> Error {
    if e.reason == Reason::ToolVersionNotFound && e.message.contains("no published version") {
        e.message =
            format!("every version of tool {name} is deprecated; ask for \"latest\" or a number");
    }
    e
}

/// Parses a tool file; the error message names the file.
fn parse_file(
    source: &str,
    source_name: &str,
    limits: &anumate_tools::Limits,
) -> Result<Vec<anumate_tools::ParsedTool>> {
    anumate_tools::parse(source, limits).map_err(|rejection| {
        let mut err = rejection.to_error();
        if !source_name.is_empty() {
            err.message = format!("{source_name}: {}", err.message);
        }
        err
    })
}
