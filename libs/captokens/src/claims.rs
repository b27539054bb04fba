//! The JOSE header and the claims of a token.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a token allows: one tool, some actions, under constraints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capability {
    /// Tool name (`payments.refund`); must equal the tool being called.
    pub tool: String,
    /// Actions allowed on the tool (`POST`, `call`, …); at least one.
    pub actions: Vec<String>,
    /// Constraints on the call's arguments, keyed by the argument's JSON
    /// Pointer (RFC 6901, e.g. `/amount` or `/payee/iban`; `""` is the whole
    /// argument object). Every constraint must hold.
    #[serde(default)]
    pub constraints: BTreeMap<String, Constraint>,
}

impl Capability {
    /// A capability for `tool` and `actions`, without constraints.
    pub fn new(
        tool: impl Into<String>,
        actions: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Capability {
            tool: tool.into(),
            actions: actions.into_iter().map(Into::into).collect(),
            constraints: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) the constraint on the argument at `pointer`.
    #[must_use]
    pub fn constrain(mut self, pointer: impl Into<String>, constraint: Constraint) -> Self {
        self.constraints.insert(pointer.into(), constraint);
        self
    }
}

/// Limits on one argument. Every field that is set must hold; an argument a
/// constraint names must be present. Unknown constraint kinds make the token
/// malformed, so a verifier never silently ignores a limit it does not know.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The argument is a number no greater than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<serde_json::Number>,
    /// The argument is a number no less than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<serde_json::Number>,
    /// The argument is a string equal to one of these (`enum` is accepted as
    /// an alias when decoding).
    #[serde(default, alias = "enum", skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    /// The argument is a URL (or path) string starting with this prefix at a
    /// component boundary, without dot segments or encoded dots/slashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

impl Constraint {
    /// `max` only.
    pub fn max(max: impl Into<serde_json::Number>) -> Self {
        Constraint {
            max: Some(max.into()),
            ..Constraint::default()
        }
    }

    /// `min` only.
    pub fn min(min: impl Into<serde_json::Number>) -> Self {
        Constraint {
            min: Some(min.into()),
            ..Constraint::default()
        }
    }

    /// `min` and `max`.
    pub fn range(min: impl Into<serde_json::Number>, max: impl Into<serde_json::Number>) -> Self {
        Constraint {
            min: Some(min.into()),
            max: Some(max.into()),
            ..Constraint::default()
        }
    }

    /// `one_of` only.
    pub fn one_of(values: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Constraint {
            one_of: Some(values.into_iter().map(Into::into).collect()),
            ..Constraint::default()
        }
    }

    /// `prefix` only.
    pub fn prefix(prefix: impl Into<String>) -> Self {
        Constraint {
            prefix: Some(prefix.into()),
            ..Constraint::default()
        }
    }
}

/// The claims of a token (JSON names as in SPEC §8 and the proto).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// `iss`: the issuing service.
    pub iss: String,
    /// `sub`: the principal that started the run.
    pub sub: String,
    /// `aud`: the connector or tool the call is for.
    pub aud: String,
    /// `tenant`.
    pub tenant: String,
    /// `run`: run id.
    pub run: String,
    /// `step`: step id.
    pub step: String,
    /// `plan_hash` (`sha256:…`).
    pub plan_hash: String,
    /// `args_sha256`: `sha256:` + lowercase hex SHA-256 of the RFC 8785 JSON
    /// of the arguments.
    pub args_sha256: String,
    /// `cap`: what the token allows.
    pub cap: Capability,
    /// `iat`: issued at, seconds since the epoch.
    pub iat: i64,
    /// `nbf`: not before, seconds since the epoch.
    pub nbf: i64,
    /// `exp`: expires at, seconds since the epoch; `exp - iat` ≤ 300.
    pub exp: i64,
    /// `jti`: token id, a UUIDv7.
    pub jti: String,
    /// `single_use`: the `jti` may be consumed only once.
    pub single_use: bool,
}

/// The claims as the issuer writes them, borrowing from the request.
#[derive(Serialize)]
pub(crate) struct ClaimsRef<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    pub aud: &'a str,
    pub tenant: &'a str,
    pub run: &'a str,
    pub step: &'a str,
    pub plan_hash: &'a str,
    pub args_sha256: &'a str,
    pub cap: &'a Capability,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: &'a str,
    pub single_use: bool,
}

/// The JOSE header as written.
#[derive(Serialize)]
pub(crate) struct HeaderOut<'a> {
    pub alg: &'a str,
    pub typ: &'a str,
    pub kid: &'a str,
}

/// The JOSE header as read; borrows from the decoded bytes.
#[derive(Deserialize)]
pub(crate) struct Header<'a> {
    #[serde(borrow)]
    pub alg: Cow<'a, str>,
    #[serde(borrow, default)]
    pub typ: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub kid: Option<Cow<'a, str>>,
    /// Any `crit` makes the token malformed: we understand no extension.
    #[serde(default)]
    pub crit: Option<serde::de::IgnoredAny>,
}

/// Whether `s` is a digest in its one wire form, `sha256:` + 64 lowercase
/// hex digits (the only form a claim carries).
pub(crate) fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix(anumate_crypto::DIGEST_PREFIX)
        .is_some_and(|hex| {
            hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        })
}

/// Whether `s` is a JSON Pointer (RFC 6901): empty or starting with `/`.
pub(crate) fn is_json_pointer(s: &str) -> bool {
    s.is_empty() || s.starts_with('/')
}

impl Claims {
    /// Checks the shape rules that hold for every token this crate issues;
    /// a violation makes the token malformed.
    pub(crate) fn shape_error(&self) -> Option<String> {
        let lifetime = self.exp.saturating_sub(self.iat);
        if lifetime <= 0 || lifetime > crate::MAX_TTL_SECS {
            return Some(format!(
                "exp - iat is {lifetime} s, must be 1..={}",
                crate::MAX_TTL_SECS
            ));
        }
        if self.nbf > self.exp {
            return Some("nbf is after exp".into());
        }
        if self.jti.is_empty() {
            return Some("empty jti".into());
        }
        if !is_sha256_digest(&self.args_sha256) {
            return Some("args_sha256 is not `sha256:` and 64 lowercase hex digits".into());
        }
        if let Some(path) = self.cap.constraints.keys().find(|p| !is_json_pointer(p)) {
            return Some(format!("constraint key {path:?} is not a JSON Pointer"));
        }
        None
    }
}
