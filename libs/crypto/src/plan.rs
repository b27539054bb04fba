//! The hashes that bind a plan (ARCHITECTURE: "the plan hash binds
//! everything"): one implementation for the compiler that sets them, the
//! policy service that reports the set it evaluated, and the preflight and
//! orchestrator that check them.
//!
//! Both work on proto3 JSON (what `serde` gives for the generated messages)
//! so this crate needs no dependency on the contracts.

use anumate_errors::Error;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::content_hash;

/// Top-level `ExecutablePlan` fields (proto3 JSON names) that are not
/// executable content: the hash itself, the estimate and provenance.
pub const PLAN_NON_EXECUTABLE_FIELDS: [&str; 5] = [
    "planHash",
    "estimate",
    "compilerVersion",
    "createdBy",
    "createTime",
];

/// The executable content of a plan: its proto3 JSON (defaults omitted)
/// without [`PLAN_NON_EXECUTABLE_FIELDS`].
///
/// # Errors
/// When `plan` does not serialize to a JSON object (not an `ExecutablePlan`).
pub fn plan_executable_content<T: Serialize + ?Sized>(plan: &T) -> Result<Value, Error> {
    let mut content: Map<String, Value> = match serde_json::to_value(plan) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return Err(Error::internal("a plan serializes to a JSON object")),
        Err(e) => return Err(Error::internal(e)),
    };
    for field in PLAN_NON_EXECUTABLE_FIELDS {
        content.remove(field);
    }
    Ok(Value::Object(content))
}

/// `sha256:` + hex SHA-256 of the RFC 8785 form of
/// [`plan_executable_content`] (SPEC: `plan_hash`).
///
/// # Errors
/// As [`plan_executable_content`].
pub fn plan_hash<T: Serialize + ?Sized>(plan: &T) -> Result<String, Error> {
    Ok(content_hash(&plan_executable_content(plan)?).1)
}

/// `sha256:` over the JCS array of `{content_hash, name}` of the policies a
/// decision or a plan is governed by, sorted by name (then hash), so the
/// order they were named in does not matter.
pub fn policy_set_hash<'a>(policies: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut items: Vec<(&str, &str)> = policies.into_iter().collect();
    items.sort_unstable();
    let items: Vec<Value> = items
        .into_iter()
        .map(|(name, hash)| json!({"content_hash": hash, "name": name}))
        .collect();
    content_hash(&Value::Array(items)).1
}
