//! The tool catalogue: what each tool name a capsule may list binds to
//! (connector, side-effect class, schemas, declared cost and duration).
//!
//! The compiler carries the operator-wide defaults: a small built-in
//! catalogue ([`builtin`]) that `[[compiler.tools]]` entries extend or
//! override. Each compile overlays the tenant's own tools (the registry's
//! tool catalogue, [`tenant_binding`], [`Catalogue::overlay`]): a tenant's
//! tool replaces a default of the same name and binds its version number
//! and content hash. Bindings enter the plan (and so its hash): changing a
//! tool's declaration changes the plans compiled against it.

use std::collections::BTreeMap;
use std::time::Duration;

use anumate_errors::{Error, Reason, Result};
use anumate_proto::compiler::v1 as pb;
use anumate_proto::registry::v1 as rpb;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One tool's declaration, as written in configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// Tool name as capsules use it (`payments.refund`).
    pub tool: String,
    /// Connector that executes it (`http`, `mock`, `mcp:<server>`).
    pub connector: String,
    /// Version of this declaration.
    #[serde(default = "default_version")]
    pub version: String,
    /// `read`, `write` or `destructive`.
    pub side_effect: String,
    /// Whether the connector honours idempotency keys for this tool.
    #[serde(default)]
    pub idempotent: bool,
    /// JSON Schema of the arguments (an object schema).
    #[serde(default = "any_object")]
    pub input_schema: Value,
    /// JSON Schema of the output.
    #[serde(default = "any_object")]
    pub output_schema: Value,
    /// Cost of one call in millionths of `currency`; 0 when undeclared.
    #[serde(default)]
    pub cost_micros: i64,
    /// ISO 4217 currency of `cost_micros`.
    #[serde(default)]
    pub currency: String,
    /// Typical duration of one call in milliseconds; 0 when undeclared.
    #[serde(default)]
    pub typical_duration_ms: u64,
}

fn default_version() -> String {
    "1".into()
}

fn any_object() -> Value {
    json!({"type": "object"})
}

/// The resolved catalogue: bindings by tool name.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    bindings: BTreeMap<String, pb::ToolBinding>,
    /// `sha256:` over the JCS of every binding: part of the compile-cache key.
    fingerprint: String,
}

fn side_effect(name: &str) -> Option<pb::SideEffect> {
    Some(match name {
        "read" => pb::SideEffect::Read,
        "write" => pb::SideEffect::Write,
        "destructive" => pb::SideEffect::Destructive,
        _ => return None,
    })
}

fn to_struct(field: &str, tool: &str, v: &Value) -> Result<pbjson_types::Struct> {
    serde_json::from_value(v.clone()).map_err(|e| {
        Error::invalid_argument(
            &format!("compiler.tools[{tool}].{field}"),
            format!("must be a JSON object: {e}"),
        )
    })
}

/// Converts a configuration entry into a binding.
pub fn binding(spec: &ToolSpec) -> Result<pb::ToolBinding> {
    let effect = side_effect(&spec.side_effect).ok_or_else(|| {
        Error::invalid_argument(
            &format!("compiler.tools[{}].side_effect", spec.tool),
            format!("{:?} is not read, write or destructive", spec.side_effect),
        )
    })?;
    if spec.tool.is_empty() || spec.connector.is_empty() {
        return Err(Error::invalid_argument(
            "compiler.tools",
            "every tool needs a `tool` name and a `connector`",
        ));
    }
    let ms = spec.typical_duration_ms;
    Ok(pb::ToolBinding {
        tool: spec.tool.clone(),
        connector: spec.connector.clone(),
        tool_version: spec.version.clone(),
        side_effect: effect as i32,
        idempotent: spec.idempotent,
        input_schema: Some(to_struct("input_schema", &spec.tool, &spec.input_schema)?),
        output_schema: Some(to_struct("output_schema", &spec.tool, &spec.output_schema)?),
        cost_micros: spec.cost_micros,
        currency: spec.currency.clone(),
        typical_duration: (ms > 0).then(|| pbjson_types::Duration {
            seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
        }),
        // A built-in's whole declaration is in the binding.
        tool_hash: String::new(),
    })
}

/// The binding of a version of a tenant's tool: its declaration, its
/// version number and its content hash (the connector's own section, and
/// any secret reference in it, stays out of the plan).
pub fn tenant_binding(version: &rpb::ToolVersion) -> Result<pb::ToolBinding> {
    let tool = anumate_tools::Tool::from_canonical_json(&version.canonical_json)?;
    let spec = &tool.spec;
    let effect = match spec.side_effect {
        anumate_tools::SideEffect::Read => pb::SideEffect::Read,
        anumate_tools::SideEffect::Write => pb::SideEffect::Write,
        anumate_tools::SideEffect::Destructive => pb::SideEffect::Destructive,
    };
    let (cost_micros, currency) = spec
        .cost
        .as_ref()
        .map_or((0, String::new()), |c| (c.micros, c.currency.clone()));
    Ok(pb::ToolBinding {
        tool: tool.metadata.name.clone(),
        connector: spec.connector.as_string(),
        tool_version: version.version.to_string(),
        side_effect: effect as i32,
        idempotent: spec.idempotent,
        input_schema: Some(to_struct("input", &tool.metadata.name, &spec.input)?),
        output_schema: Some(to_struct("output", &tool.metadata.name, &spec.output)?),
        cost_micros,
        currency,
        typical_duration: spec.typical_duration.map(|d| pbjson_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }),
        tool_hash: version.content_hash.clone(),
    })
}

/// `sha256:` over the JCS of every binding.
fn fingerprint<'a>(bindings: impl Iterator<Item = &'a pb::ToolBinding>) -> String {
    let all: Vec<Value> = bindings
        .map(|b| serde_json::to_value(b).unwrap_or(Value::Null))
        .collect();
    anumate_crypto::content_hash(&Value::Array(all)).1
}

impl Catalogue {
    /// The built-in tools plus `extra` (which override built-ins of the same name).
    pub fn new(extra: &[ToolSpec]) -> Result<Catalogue> {
        let mut bindings = BTreeMap::new();
        for spec in builtin().iter().chain(extra) {
            bindings.insert(spec.tool.clone(), binding(spec)?);
        }
        let fingerprint = fingerprint(bindings.values());
        Ok(Catalogue {
            bindings,
            fingerprint,
        })
    }

    /// This catalogue with a tenant's tools, each replacing the default of
    /// its name.
    pub fn overlay(&self, tenant: Vec<pb::ToolBinding>) -> Catalogue {
        let mut bindings = self.bindings.clone();
        for b in tenant {
            bindings.insert(b.tool.clone(), b);
        }
        let fingerprint = fingerprint(bindings.values());
        Catalogue {
            bindings,
            fingerprint,
        }
    }

    /// The binding of `tool`, if declared.
    pub fn get(&self, tool: &str) -> Option<&pb::ToolBinding> {
        self.bindings.get(tool)
    }

    /// Hash of every binding.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Bindings of `tools`, sorted by tool, or `TOOL_NOT_DECLARED` naming every
    /// unknown one.
    pub fn resolve(&self, tools: &[String]) -> Result<Vec<pb::ToolBinding>> {
        let mut sorted: Vec<&String> = tools.iter().collect();
        sorted.sort();
        sorted.dedup();
        let unknown: Vec<&str> = sorted
            .iter()
            .filter(|t| !self.bindings.contains_key(t.as_str()))
            .map(|t| t.as_str())
            .collect();
        if !unknown.is_empty() {
            return Err(Error::because(
                Reason::ToolNotDeclared,
                format!(
                    "no tool binding for {} in the tenant's tools or the built-ins (declare it \
                     with `anumate tool push`; known: {})",
                    unknown.join(", "),
                    self.bindings.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
            .with_metadata("tools", unknown.join(",")));
        }
        Ok(sorted
            .into_iter()
            .filter_map(|t| self.bindings.get(t).cloned())
            .collect())
    }
}

#[allow(clippy::too_many_arguments)]
fn spec(
    tool: &str,
    connector: &str,
    side_effect: &str,
    idempotent: bool,
    input_schema: Value,
    output_schema: Value,
    cost: (i64, &str),
    typical_duration_ms: u64,
) -> ToolSpec {
    ToolSpec {
        tool: tool.into(),
        connector: connector.into(),
        version: "1".into(),
        side_effect: side_effect.into(),
        idempotent,
        input_schema,
        output_schema,
        cost_micros: cost.0,
        currency: cost.1.into(),
        typical_duration_ms,
    }
}

/// The tools every deployment knows.
pub fn builtin() -> Vec<ToolSpec> {
    let http_out = json!({"type": "object", "properties": {
        "status": {"type": "integer"}, "headers": {"type": "object"}, "body": {}}});
    vec![
        spec(
            "http.get",
            "http",
            "read",
            true,
            json!({"type": "object", "required": ["url"], "additionalProperties": false,
                   "properties": {"url": {"type": "string"}, "headers": {"type": "object"}}}),
            http_out.clone(),
            (0, ""),
            300,
        ),
        spec(
            "http.post",
            "http",
            "write",
            false,
            json!({"type": "object", "required": ["url"], "additionalProperties": false,
                   "properties": {"url": {"type": "string"}, "headers": {"type": "object"}, "body": {}}}),
            http_out,
            (0, ""),
            500,
        ),
        spec(
            "payments.refund",
            "http",
            "destructive",
            true,
            json!({"type": "object", "required": ["order_id", "amount"], "additionalProperties": false,
                   "properties": {"order_id": {"type": "string"}, "amount": {"type": "integer"},
                                  "currency": {"type": "string"}, "reason": {"type": "string"}}}),
            json!({"type": "object", "properties": {
                "refund_id": {"type": "string"}, "status": {"type": "string"}}}),
            (2_000, "USD"),
            1_500,
        ),
        spec(
            "email.send",
            "http",
            "write",
            true,
            json!({"type": "object", "required": ["to"], "additionalProperties": false,
                   "properties": {"to": {"type": "string"}, "subject": {"type": "string"},
                                  "body": {"type": "string"}, "template": {"type": "string"}}}),
            json!({"type": "object", "properties": {"message_id": {"type": "string"}}}),
            (1_000, "USD"),
            800,
        ),
        spec(
            "mock.echo",
            "mock",
            "read",
            true,
            json!({"type": "object"}),
            json!({"type": "object"}),
            (0, ""),
            10,
        ),
    ]
}

/// `Duration` from a proto duration (negative counts as zero).
pub fn duration_of(d: Option<&pbjson_types::Duration>) -> Option<Duration> {
    d.map(|d| {
        Duration::from_secs(u64::try_from(d.seconds).unwrap_or(0))
            + Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_ins_are_the_ones_the_registry_knows() {
        let mut names: Vec<String> = builtin().into_iter().map(|s| s.tool).collect();
        names.sort();
        assert_eq!(names, anumate_tools::BUILTIN_TOOLS);
    }
}
