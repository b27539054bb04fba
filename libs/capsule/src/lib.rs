//! The Capsule document (SPEC §2): YAML parsing with positions, and validation.
//!
//! [`parse`] turns capsule YAML into a typed [`Capsule`] plus the whole
//! document as JSON, or rejects it with every problem found, each a
//! [`Violation`] naming the document path (`spec.steps[1].tool`) and the
//! 1-based line and column of the offending node. Root-level problems (YAML
//! syntax, several documents) use the empty path `""`.
//!
//! The YAML subset is deliberately safe: one document, no anchors or aliases,
//! only core scalar tags, and size, depth and node limits ([`Limits`]).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anumate_errors::{Error, ErrorCode, Violation};

mod duration;
pub mod expr;
mod validate;
pub mod yaml;

pub use duration::{MAX_DURATION, parse_duration};
pub use validate::suggest;

/// The only supported `apiVersion`.
pub const API_VERSION: &str = "anumate.dev/v1";
/// The only supported `kind`.
pub const KIND: &str = "Capsule";

/// Bounds on what a capsule document may contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted source, in bytes (checked before parsing).
    pub max_document_bytes: usize,
    /// Most steps in `spec.steps`.
    pub max_steps: usize,
    /// Deepest nesting of mappings and sequences.
    pub max_depth: usize,
    /// Most YAML nodes (scalars, mappings and sequences) in the document.
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_document_bytes: 1024 * 1024,
            max_steps: 1000,
            max_depth: 64,
            max_nodes: 100_000,
        }
    }
}

/// Why a document was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The source is larger than [`Limits::max_document_bytes`]; it was not parsed.
    #[error("capsule document is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Size of the source in bytes.
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The document is malformed or invalid; every problem found, in document order.
    #[error("capsule document has {} problem(s)", .0.len())]
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

/// A valid capsule.
#[derive(Debug, Clone, PartialEq)]
pub struct Capsule {
    /// `metadata.name`, a DNS label.
    pub name: String,
    /// `metadata.description`, empty when absent.
    pub description: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// The typed `spec`.
    pub spec: Spec,
    /// The whole document as JSON (object keys sorted), for canonicalization and hashing.
    pub document: serde_json::Value,
}

/// The typed `spec` of a capsule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    /// Declared inputs by name.
    pub inputs: BTreeMap<String, InputSpec>,
    /// The tool allow-list, in document order.
    pub tools: Vec<String>,
    /// Policy names, in document order.
    pub policies: Vec<String>,
    /// Steps, in document order.
    pub steps: Vec<Step>,
}

/// The JSON type of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputType {
    /// `string`.
    String,
    /// `integer`.
    Integer,
    /// `number`.
    Number,
    /// `boolean`.
    Boolean,
    /// `object`.
    Object,
    /// `array`.
    Array,
}

impl InputType {
    /// Parses the schema name (`string`, `integer`, …).
    pub fn from_name(name: &str) -> Option<InputType> {
        Some(match name {
            "string" => InputType::String,
            "integer" => InputType::Integer,
            "number" => InputType::Number,
            "boolean" => InputType::Boolean,
            "object" => InputType::Object,
            "array" => InputType::Array,
            _ => return None,
        })
    }

    /// The schema name.
    pub fn name(self) -> &'static str {
        match self {
            InputType::String => "string",
            InputType::Integer => "integer",
            InputType::Number => "number",
            InputType::Boolean => "boolean",
            InputType::Object => "object",
            InputType::Array => "array",
        }
    }

    /// Whether a JSON value has this type (`integer` values are also `number`s).
    pub fn matches(self, value: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match (self, value) {
            (InputType::String, V::String(_)) => true,
            (InputType::Integer, V::Number(n)) => !n.is_f64(),
            (InputType::Number, V::Number(_)) => true,
            (InputType::Boolean, V::Bool(_)) => true,
            (InputType::Object, V::Object(_)) => true,
            (InputType::Array, V::Array(_)) => true,
            _ => false,
        }
    }
}

/// One input's schema: a small JSON-Schema subset.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// `type`.
    pub ty: InputType,
    /// `required` (default false).
    pub required: bool,
    /// `enum`: the allowed values.
    pub enum_values: Option<Vec<serde_json::Value>>,
    /// `minimum` (integer and number inputs).
    pub minimum: Option<f64>,
    /// `maximum` (integer and number inputs).
    pub maximum: Option<f64>,
    /// `minLength` in characters (string inputs).
    pub min_length: Option<u64>,
    /// `maxLength` in characters (string inputs).
    pub max_length: Option<u64>,
    /// `pattern`, a regular expression that compiles (string inputs).
    pub pattern: Option<String>,
    /// `default`, of the input's type and within its constraints.
    pub default: Option<serde_json::Value>,
    /// `description`.
    pub description: Option<String>,
    /// Position of the input's name.
    pub position: (u32, u32),
}

/// How retries wait between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backoff {
    /// The same delay every time (the default).
    Fixed,
    /// Doubling delays, capped by `max`.
    Exponential,
}

/// A step's retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Total attempts, 1..=20.
    pub max_attempts: u32,
    /// `backoff`, `fixed` when absent.
    pub backoff: Backoff,
    /// `initial` delay.
    pub initial: Option<Duration>,
    /// `max` delay.
    pub max: Option<Duration>,
}

/// A step's `compensate`: the call that undoes it, run on cooperative
/// cancel after the step succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Compensation {
    /// The tool called; always listed in `spec.tools`.
    pub tool: String,
    /// `with`: its arguments; expressions may also read the step's own
    /// output (`steps.<id>.output`).
    pub with: serde_json::Value,
    /// `timeout`.
    pub timeout: Option<Duration>,
}

/// One step of a capsule.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Unique id: lowercase letters, digits and hyphens.
    pub id: String,
    /// The tool called; always listed in `spec.tools`.
    pub tool: String,
    /// Ids of the steps this one runs after.
    pub needs: Vec<String>,
    /// The `if` expression, a single `${{ … }}`.
    pub condition: Option<String>,
    /// `with`: the tool's arguments (a JSON object; empty when absent).
    pub with: serde_json::Value,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `retry`.
    pub retry: Option<Retry>,
    /// `compensate`: what undoes the step when its run is cancelled.
    pub compensate: Option<Compensation>,
    /// 1-based line and column of the step.
    pub position: (u32, u32),
}

/// Parses and validates a capsule document, reporting every problem at once.
pub fn parse(source: &str, limits: &Limits) -> Result<Capsule, Rejection> {
    if source.len() > limits.max_document_bytes {
        return Err(Rejection::TooLarge {
            size: source.len(),
            limit: limits.max_document_bytes,
        });
    }
    let loaded = yaml::load(source, limits);
    let mut violations = loaded.violations;
    let Some(root) = loaded.root else {
        if violations.is_empty() {
            violations.push(Violation::at("", 1, 1, "document is empty"));
        }
        return Err(Rejection::Invalid(violations));
    };
    let capsule = validate::validate(&root, limits, &mut violations);
    if violations.is_empty() {
        Ok(Capsule {
            document: root.to_json(),
            ..capsule
        })
    } else {
        // Stable: problems at the same place keep the order they were found in.
        violations.sort_by_key(|v| v.position.unwrap_or((u32::MAX, u32::MAX)));
        Err(Rejection::Invalid(violations))
    }
}
