//! The Tool document (SPEC §13): what a tool name a capsule lists binds to.
//!
//! ```yaml
//! apiVersion: anumate.dev/v1
//! kind: Tool
//! metadata: {name: payments.transfer, description: Move money}
//! spec:
//!   connector: http                 # http | mock | mcp:<server>
//!   side_effect: write              # read | write | destructive
//!   idempotent: true
//!   input:  {type: object, required: [amount], properties: {amount: {type: integer}}}
//!   output: {type: object}
//!   cost: {micros: 2000, currency: USD}
//!   typical_duration: 300ms
//!   http: {method: POST, url: "https://pay.example/v1/transfers", allowed_hosts: [pay.example],
//!          headers: {Authorization: "Bearer ${{ secrets.PAY_TOKEN }}"}, body: "${{ args }}"}
//!   mock: {output: {transfer_id: tr_1}, latency: 50ms, fail: {times: 2, code: UNAVAILABLE}}
//! ```
//!
//! [`parse`] reads a file of one or more `---` separated documents and
//! returns every tool, or rejects the whole file with every problem found,
//! each a [`Violation`] with the document path (`spec.http.url`) and the
//! 1-based line and column in the file. [`Tool`] is also serde: its JSON
//! form is the canonical form ([`ParsedTool::canonical_json`], RFC 8785),
//! so a stored version reads back with `serde_json::from_str::<Tool>`.
//!
//! Rules beyond the shape: `metadata.name` is a tool name
//! (`namespace.action`, [`is_tool_name`]); `input` and `output` are JSON
//! Schemas that compile; the section of the connector in use (`http`,
//! `mock`, `mcp`) is present; `${{ secrets.NAME }}` appears only in
//! `spec.http.url`, `spec.http.headers` and `spec.http.body`, the only
//! places the connector hub resolves it (so a secret never reaches a plan).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anumate_capsule::yaml;
use anumate_errors::{Error, ErrorCode, Violation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod validate;

/// The only supported `apiVersion`.
pub const API_VERSION: &str = "anumate.dev/v1";
/// The only supported `kind`.
pub const KIND: &str = "Tool";
/// Longest tool name.
pub const MAX_NAME_LEN: usize = 128;

/// The tools every deployment knows without a tenant declaring them (the
/// compiler holds their declarations); a tenant's tool of the same name
/// replaces one for that tenant.
pub const BUILTIN_TOOLS: &[&str] = &[
    "email.send",
    "http.get",
    "http.post",
    "mock.echo",
    "payments.refund",
];

/// Whether `name` is a built-in tool.
pub fn is_builtin(name: &str) -> bool {
    BUILTIN_TOOLS.contains(&name)
}

/// Bounds on what a tool file may contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted file, in bytes (checked before parsing).
    pub max_file_bytes: usize,
    /// Most tool documents in one file.
    pub max_tools: usize,
    /// Deepest nesting of mappings and sequences.
    pub max_depth: usize,
    /// Most YAML nodes in the whole file.
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file_bytes: 1024 * 1024,
            max_tools: 256,
            max_depth: 64,
            max_nodes: 100_000,
        }
    }
}

/// Why a tool file was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The source is larger than [`Limits::max_file_bytes`]; it was not parsed.
    #[error("tool file is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Size of the source in bytes.
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The file is malformed or invalid; every problem found, in file order.
    #[error("tool file has {} problem(s)", .0.len())]
    Invalid(Vec<Violation>),
}

impl Rejection {
    /// The product error: `PAYLOAD_TOO_LARGE` or `INVALID_DOCUMENT` with the violations.
    pub fn to_error(&self) -> Error {
        match self {
            Rejection::TooLarge { .. } => Error::new(ErrorCode::PayloadTooLarge, self.to_string()),
            Rejection::Invalid(violations) => {
                Error::new(ErrorCode::InvalidDocument, self.to_string())
                    .with_violations(violations.clone())
            }
        }
    }
}

impl From<Rejection> for Error {
    fn from(r: Rejection) -> Self {
        r.to_error()
    }
}

/// A Tool document, typed. Its JSON serialization is the canonical form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    /// Always [`API_VERSION`].
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Always [`KIND`].
    pub kind: String,
    /// Name, description, labels.
    pub metadata: Metadata,
    /// The declaration.
    pub spec: ToolSpec,
}

/// `metadata` of a tool.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Tool name as capsules list it (`payments.transfer`).
    pub name: String,
    /// What the tool does; empty when absent.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `spec` of a tool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// Which connector executes a call.
    pub connector: Connector,
    /// What a call does to the world.
    pub side_effect: SideEffect,
    /// Whether the tool honours the idempotency key the hub sends.
    #[serde(default)]
    pub idempotent: bool,
    /// JSON Schema of the arguments (an object schema); `{type: object}` when absent.
    #[serde(default = "any_object")]
    pub input: Value,
    /// JSON Schema of the output; `{type: object}` when absent.
    #[serde(default = "any_object")]
    pub output: Value,
    /// Declared cost of one call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
    /// Declared typical duration of one call.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_text::option"
    )]
    pub typical_duration: Option<Duration>,
    /// The `http` connector's call; present when `connector` is `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// The `mock` connector's answers; present when `connector` is `mock`
    /// (and allowed besides another connector, for tests and demos).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockSpec>,
    /// The MCP tool called; present when `connector` is `mcp:<server>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpSpec>,
}

fn any_object() -> Value {
    serde_json::json!({"type": "object"})
}

/// The connector that executes a tool's calls.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Connector {
    /// An HTTP request built from [`HttpSpec`].
    Http,
    /// Answers from [`MockSpec`]; records every effect.
    Mock,
    /// A tool of the MCP server declared under this name in the hub's configuration.
    Mcp(String),
}

impl Connector {
    /// Parses `http`, `mock` or `mcp:<server>` (server: a DNS label).
    pub fn parse(s: &str) -> Option<Connector> {
        match s {
            "http" => Some(Connector::Http),
            "mock" => Some(Connector::Mock),
            _ => s
                .strip_prefix("mcp:")
                .filter(|server| anumate_errors::is_dns_label(server))
                .map(|server| Connector::Mcp(server.to_owned())),
        }
    }

    /// As written: `http`, `mock`, `mcp:<server>`.
    pub fn as_string(&self) -> String {
        match self {
            Connector::Http => "http".into(),
            Connector::Mock => "mock".into(),
            Connector::Mcp(server) => format!("mcp:{server}"),
        }
    }
}

impl Serialize for Connector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_string())
    }
}

impl<'de> Deserialize<'de> for Connector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Connector::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{s:?} is not a connector (http, mock or mcp:<server>)"
            ))
        })
    }
}

/// What a call does to the world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideEffect {
    /// Reads only; safe to repeat.
    Read,
    /// Changes something.
    Write,
    /// Changes something in a way that cannot be undone (money, deletion).
    Destructive,
}

impl SideEffect {
    /// Parses `read`, `write` or `destructive`.
    pub fn parse(s: &str) -> Option<SideEffect> {
        Some(match s {
            "read" => SideEffect::Read,
            "write" => SideEffect::Write,
            "destructive" => SideEffect::Destructive,
            _ => return None,
        })
    }

    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            SideEffect::Read => "read",
            SideEffect::Write => "write",
            SideEffect::Destructive => "destructive",
        }
    }
}

/// Declared cost of one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cost {
    /// Millionths of `currency`.
    pub micros: i64,
    /// ISO 4217 code (three capital letters).
    pub currency: String,
}

/// How the `http` connector calls the tool. `url`, header values and `body`
/// are templates over `args` (`${{ args.order_id }}`) and may reference
/// `${{ secrets.NAME }}`, which only the hub resolves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// `GET`, `POST`, `PUT`, `PATCH`, `DELETE` or `HEAD`.
    pub method: String,
    /// `http://` or `https://` URL template.
    pub url: String,
    /// Hosts a call (and any redirect) may reach; when not declared, the
    /// URL's own host (a URL whose host is templated must declare them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Header templates by header name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Body template: any JSON value whose strings may hold expressions
    /// (`"${{ args }}"` sends the arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Per-call timeout; the hub's default when absent.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_text::option"
    )]
    pub timeout: Option<Duration>,
    /// Largest response body read; the hub's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_bytes: Option<u64>,
    /// Allows private, loopback and link-local targets (off by default: SSRF guard).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_private: bool,
}

/// How the `mock` connector answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockSpec {
    /// The output: a static JSON value, or a string that is one `${{ … }}`
    /// expression over `args` (strings inside values may hold expressions too).
    #[serde(default)]
    pub output: Value,
    /// Simulated latency of each call.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "duration_text::option"
    )]
    pub latency: Option<Duration>,
    /// Scripted failures: the first `times` deliveries of each key fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<MockFail>,
}

/// Scripted failures of a mock tool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockFail {
    /// How many calls fail before one succeeds, 1..=1000.
    pub times: u32,
    /// The gRPC code name they fail with ([`MOCK_FAIL_CODES`]).
    pub code: String,
}

/// Codes a mock may fail with (gRPC code names).
pub const MOCK_FAIL_CODES: &[&str] = &[
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The MCP tool an `mcp:<server>` tool calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpSpec {
    /// The server, as in the connector (`mcp:<server>`); filled from it when omitted.
    pub server: String,
    /// The tool's name on that server (`tools/call` name).
    pub tool: String,
}

/// One valid tool of a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedTool {
    /// The typed document.
    pub tool: Tool,
    /// This document's own text in the file (without the `---` line).
    pub source: String,
    /// RFC 8785 JSON of [`Tool`]'s serialization: defaults filled in, so two
    /// documents meaning the same tool have the same form.
    pub canonical_json: String,
    /// `sha256:<hex>` of `canonical_json`.
    pub content_hash: String,
    /// 1-based line and column where the document starts in the file.
    pub position: (u32, u32),
}

impl Tool {
    /// The tool's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The canonical JSON and its `sha256:` hash.
    pub fn content_hash(&self) -> (String, String) {
        let value = serde_json::to_value(self).unwrap_or(Value::Null);
        anumate_crypto::content_hash(&value)
    }

    /// A stored canonical form read back.
    pub fn from_canonical_json(json: &str) -> Result<Tool, Error> {
        serde_json::from_str(json)
            .map_err(|e| Error::internal(format!("stored tool does not read back: {e}")))
    }
}

/// `namespace.action`: two or more dot-separated segments of
/// `[a-z][a-z0-9_-]*`, at most [`MAX_NAME_LEN`] characters (the names
/// capsules may list in `spec.tools`).
pub fn is_tool_name(s: &str) -> bool {
    s.len() <= MAX_NAME_LEN && s.split('.').count() >= 2 && s.split('.').all(is_segment)
}

fn is_segment(seg: &str) -> bool {
    let b = seg.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Checks a tool name as a request field, `INVALID_ARGUMENT` naming `field`.
pub fn check_tool_name(field: &str, name: &str) -> Result<(), Error> {
    if is_tool_name(name) {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            field,
            format!(
                "{name:?} is not a tool name: two or more dot-separated segments of lowercase \
                 letters, digits, '_' and '-', each starting with a letter (e.g. payments.refund), \
                 at most {MAX_NAME_LEN} characters"
            ),
        ))
    }
}

/// Parses and validates every tool of a `---` separated file, reporting
/// every problem of every document at once; nothing is returned unless all
/// are valid. Empty documents (a trailing `---`) are skipped.
pub fn parse(source: &str, limits: &Limits) -> Result<Vec<ParsedTool>, Rejection> {
    if source.len() > limits.max_file_bytes {
        return Err(Rejection::TooLarge {
            size: source.len(),
            limit: limits.max_file_bytes,
        });
    }
    let yaml_limits = anumate_capsule::Limits {
        max_document_bytes: limits.max_file_bytes,
        max_depth: limits.max_depth,
        max_nodes: limits.max_nodes,
        ..anumate_capsule::Limits::default()
    };
    let loaded =
        yaml::load_stream(source, &yaml_limits).map_err(|v| Rejection::Invalid(vec![v]))?;
    let mut violations = Vec::new();
    let mut tools = Vec::new();
    let mut seen: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    let texts = document_texts(source);
    for doc in loaded {
        violations.extend(doc.violations);
        let Some(root) = doc.root else { continue };
        if root.value == yaml::Yaml::Null {
            continue;
        }
        if tools.len() >= limits.max_tools {
            violations.push(Violation::at(
                "",
                root.pos.0,
                root.pos.1,
                format!(
                    "a file holds at most {} tools (the limit)",
                    limits.max_tools
                ),
            ));
            break;
        }
        let before = violations.len();
        let tool = validate::validate(&root, &mut violations);
        if violations.len() > before {
            continue;
        }
        let Some(tool) = tool else { continue };
        if let Some(first) = seen.get(tool.name()) {
            violations.push(Violation::at(
                "metadata.name",
                root.pos.0,
                root.pos.1,
                format!(
                    "tool \"{}\" is declared twice in this file (first at line {})",
                    tool.name(),
                    first.0
                ),
            ));
            continue;
        }
        seen.insert(tool.name().to_owned(), root.pos);
        let (canonical_json, content_hash) = tool.content_hash();
        tools.push(ParsedTool {
            source: text_at(&texts, root.pos.0),
            tool,
            canonical_json,
            content_hash,
            position: root.pos,
        });
    }
    if tools.is_empty() && violations.is_empty() {
        violations.push(Violation::at("", 1, 1, "file holds no tool document"));
    }
    if violations.is_empty() {
        Ok(tools)
    } else {
        violations.sort_by_key(|v| v.position.unwrap_or((u32::MAX, u32::MAX)));
        Err(Rejection::Invalid(violations))
    }
}

/// The documents' texts with the 1-based line each starts on. A `---` at
/// column 0 always starts a YAML document, so splitting lines there agrees
/// with the parser.
fn document_texts(source: &str) -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = vec![(1, String::new())];
    for (i, line) in source.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let line_no = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if bare == "---" || bare.starts_with("--- ") {
            let rest = bare.strip_prefix("---").unwrap_or_default().trim_start();
            out.push((line_no, String::new()));
            if !rest.is_empty()
                && let Some(last) = out.last_mut()
            {
                last.1.push_str(rest);
                last.1.push('\n');
            }
        } else if bare == "..." {
            continue;
        } else if let Some(last) = out.last_mut() {
            last.1.push_str(line);
        }
    }
    out
}

/// The text of the document holding `line`.
fn text_at(texts: &[(u32, String)], line: u32) -> String {
    texts
        .iter()
        .rev()
        .find(|(start, _)| *start <= line)
        .map(|(_, text)| text.clone())
        .unwrap_or_default()
}

/// Durations as the documents write them (`300ms`, `10s`, `1m30s`).
pub mod duration_text {
    use std::time::Duration;

    /// The shortest exact form: `1h`, `5m`, `10s` or `300ms`.
    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if ms > 0 && ms.is_multiple_of(3_600_000) {
            format!("{}h", ms / 3_600_000)
        } else if ms > 0 && ms.is_multiple_of(60_000) {
            format!("{}m", ms / 60_000)
        } else if ms > 0 && ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    /// Serde for `Option<Duration>` as that text.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes the shortest form.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_str(&super::format(*d)),
                None => s.serialize_none(),
            }
        }

        /// Reads any form [`anumate_capsule::parse_duration`] accepts.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s: Option<String> = Option::deserialize(d)?;
            s.map(|s| anumate_capsule::parse_duration(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert!(is_tool_name("payments.transfer"));
        assert!(is_tool_name("http.get"));
        assert!(is_tool_name("a.b-c_2.d"));
        for bad in ["http", "http..get", "Http.get", ".a", "a.", "a.1b", ""] {
            assert!(!is_tool_name(bad), "{bad}");
        }
        assert!(!is_tool_name(&format!("a.{}", "b".repeat(MAX_NAME_LEN))));
    }

    #[test]
    fn connectors_parse_and_print() {
        assert_eq!(Connector::parse("http"), Some(Connector::Http));
        assert_eq!(Connector::parse("mock"), Some(Connector::Mock));
        assert_eq!(
            Connector::parse("mcp:github"),
            Some(Connector::Mcp("github".into()))
        );
        for bad in ["mcp:", "mcp:Git Hub", "grpc", "HTTP"] {
            assert_eq!(Connector::parse(bad), None, "{bad}");
        }
        assert_eq!(Connector::Mcp("gh".into()).as_string(), "mcp:gh");
    }

    #[test]
    fn durations_print_shortest() {
        assert_eq!(duration_text::format(Duration::from_millis(300)), "300ms");
        assert_eq!(duration_text::format(Duration::from_secs(10)), "10s");
        assert_eq!(duration_text::format(Duration::from_secs(90)), "90s");
        assert_eq!(duration_text::format(Duration::from_secs(120)), "2m");
        assert_eq!(duration_text::format(Duration::from_secs(3600)), "1h");
    }

    #[test]
    fn documents_split_on_their_markers() {
        let texts = document_texts("a: 1\n---\nb: 2\n--- \nc: 3\n");
        assert_eq!(text_at(&texts, 1), "a: 1\n");
        assert_eq!(text_at(&texts, 3), "b: 2\n");
        assert_eq!(text_at(&texts, 5), "c: 3\n");
    }
}
