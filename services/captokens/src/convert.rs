//! Conversions between the proto messages and `anumate-captokens` types.

use std::collections::BTreeMap;

use anumate_captokens::{Capability, Claims, Constraint};
use anumate_errors::{Error, Result};
use anumate_proto::captokens::v1 as pb;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pbjson_types::value::Kind;
use serde_json::Value;

use crate::repo::AuditRow;

/// Deepest nesting accepted in a `Struct`.
const MAX_DEPTH: usize = 64;

/// Seconds since the epoch as a timestamp.
pub use anumate_proto::timestamp_from_secs as timestamp;

use anumate_proto::{TimestampError, timestamp_from_micros as timestamp_micros};

/// A timestamp as Unix microseconds; `field` names it in errors.
pub fn micros(t: &pbjson_types::Timestamp, field: &str) -> Result<i64> {
    anumate_proto::micros_from_timestamp(t).map_err(|e| {
        let description = match e {
            TimestampError::Nanos => "nanos out of range",
            TimestampError::Range => "out of range",
        };
        Error::invalid_argument(field, description)
    })
}

/// A protobuf `Struct` as JSON; `field` names it in errors. Values without a
/// kind and non-finite numbers are invalid.
pub fn struct_json(s: &pbjson_types::Struct, field: &str) -> Result<Value> {
    let mut map = serde_json::Map::new();
    for (k, v) in &s.fields {
        map.insert(k.clone(), value_json(v, field, 1)?);
    }
    Ok(Value::Object(map))
}

fn value_json(v: &pbjson_types::Value, field: &str, depth: usize) -> Result<Value> {
    if depth > MAX_DEPTH {
        return Err(Error::invalid_argument(field, "nested too deeply"));
    }
    Ok(match &v.kind {
        None => return Err(Error::invalid_argument(field, "a value has no kind")),
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => {
            if !n.is_finite() {
                return Err(Error::invalid_argument(field, "a number is not finite"));
            }
            // Integral values within the exact range of a double stay integers.
            if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n)
                    .map(Value::Number)
                    .ok_or_else(|| Error::invalid_argument(field, "a number is not finite"))?
            }
        }
        Some(Kind::StructValue(s)) => {
            let mut map = serde_json::Map::new();
            for (k, v) in &s.fields {
                map.insert(k.clone(), value_json(v, field, depth + 1)?);
            }
            Value::Object(map)
        }
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .iter()
                .map(|v| value_json(v, field, depth + 1))
                .collect::<Result<_>>()?,
        ),
    })
}

/// The call's arguments of a verify request.
pub fn args(s: &pbjson_types::Struct) -> Result<Value> {
    struct_json(s, "args")
}

/// A request's capability.
pub fn capability(cap: Option<&pb::Capability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| Error::invalid_argument("capability", "required"))?;
    let constraints: BTreeMap<String, Constraint> = match &cap.constraints {
        None => BTreeMap::new(),
        Some(s) => {
            let json = struct_json(s, "capability.constraints")?;
            serde_json::from_value(json)
                .map_err(|e| Error::invalid_argument("capability.constraints", e.to_string()))?
        }
    };
    Ok(Capability {
        tool: cap.tool.clone(),
        actions: cap.actions.clone(),
        constraints,
    })
}

fn capability_proto(cap: &Capability) -> pb::Capability {
    let constraints = serde_json::to_value(&cap.constraints)
        .ok()
        .and_then(|v| serde_json::from_value::<pbjson_types::Struct>(v).ok());
    pb::Capability {
        tool: cap.tool.clone(),
        actions: cap.actions.clone(),
        constraints,
    }
}

/// Claims as the proto message.
pub fn claims(c: &Claims, kid: &str) -> pb::TokenClaims {
    pb::TokenClaims {
        issuer: c.iss.clone(),
        subject: c.sub.clone(),
        audience: c.aud.clone(),
        tenant_id: c.tenant.clone(),
        run_id: c.run.clone(),
        step_id: c.step.clone(),
        plan_hash: c.plan_hash.clone(),
        args_sha256: c.args_sha256.clone(),
        capability: Some(capability_proto(&c.cap)),
        issue_time: Some(timestamp(c.iat)),
        not_before_time: Some(timestamp(c.nbf)),
        expire_time: Some(timestamp(c.exp)),
        jti: c.jti.clone(),
        single_use: c.single_use,
        kid: kid.to_owned(),
    }
}

fn segment<T: serde::de::DeserializeOwned>(token: &str, index: usize) -> Option<T> {
    let part = token.split('.').nth(index)?;
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The claims of a token, decoded without any check (to learn its audience
/// and tool before verifying it).
pub fn peek_claims(token: &str) -> Option<Claims> {
    segment(token, 1)
}

/// The header `kid` of a token, decoded without any check.
pub fn peek_kid(token: &str) -> Option<String> {
    let header: Value = segment(token, 0)?;
    header.get("kid")?.as_str().map(str::to_owned)
}

/// A stored audit row as the proto entry.
pub fn audit_entry(r: AuditRow) -> pb::TokenAuditEntry {
    pb::TokenAuditEntry {
        audit_id: r.audit_id,
        kind: r.kind,
        jti: r.jti,
        run_id: r.run,
        step_id: r.step,
        plan_hash: r.plan_hash,
        audience: r.audience,
        tool: r.tool,
        actor: r.actor,
        verdict: r.verdict,
        reason: r.reason,
        refreshed_from_jti: r.refreshed_from_jti,
        time: Some(timestamp_micros(r.created_at)),
    }
}
