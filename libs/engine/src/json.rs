//! Protobuf `Struct`/`Value` ↔ JSON with sorted keys, so that nothing the
//! engine computes depends on a `HashMap`'s iteration order.

use pbjson_types::value::Kind;
use serde_json::{Map, Number, Value};

/// Deepest nesting accepted from the wire.
pub const MAX_DEPTH: usize = 64;

/// Why a protobuf value has no JSON form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// A `Value` without a kind.
    #[error("a value has no kind")]
    NoKind,
    /// NaN or an infinity.
    #[error("a number is not finite")]
    NotFinite,
    /// More than [`MAX_DEPTH`] levels.
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// A `Struct` as a JSON object with keys in sorted order.
pub fn struct_json(s: &pbjson_types::Struct) -> Result<Value, JsonError> {
    fields_json(&s.fields, 1)
}

fn fields_json(
    fields: &std::collections::HashMap<String, pbjson_types::Value>,
    depth: usize,
) -> Result<Value, JsonError> {
    let mut keys: Vec<&String> = fields.keys().collect();
    keys.sort();
    let mut map = Map::with_capacity(keys.len());
    for k in keys {
        if let Some(v) = fields.get(k) {
            map.insert(k.clone(), value_json(v, depth + 1)?);
        }
    }
    Ok(Value::Object(map))
}

/// A protobuf `Value` as JSON. Integral doubles within ±2^53 become integers.
pub fn value_json(v: &pbjson_types::Value, depth: usize) -> Result<Value, JsonError> {
    if depth > MAX_DEPTH {
        return Err(JsonError::TooDeep);
    }
    Ok(match &v.kind {
        None => return Err(JsonError::NoKind),
        Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::NumberValue(n)) => number(*n)?,
        Some(Kind::StructValue(s)) => fields_json(&s.fields, depth)?,
        Some(Kind::ListValue(l)) => Value::Array(
            l.values
                .iter()
                .map(|x| value_json(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn number(n: f64) -> Result<Value, JsonError> {
    if !n.is_finite() {
        return Err(JsonError::NotFinite);
    }
    if n.fract() == 0.0 && n.abs() <= 9_007_199_254_740_992.0 {
        // Exact: |n| ≤ 2^53 and integral.
        #[allow(clippy::cast_possible_truncation)]
        return Ok(Value::from(n as i64));
    }
    Number::from_f64(n)
        .map(Value::Number)
        .ok_or(JsonError::NotFinite)
}

/// JSON as a protobuf `Value` (integers beyond 2^53 lose precision, as on the
/// wire; callers that need them exact carry JSON text).
pub fn to_value(v: &Value) -> pbjson_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(pbjson_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(to_struct(v)),
    };
    pbjson_types::Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct`; anything else is an empty struct.
pub fn to_struct(v: &Value) -> pbjson_types::Struct {
    let mut out = pbjson_types::Struct::default();
    if let Value::Object(m) = v {
        for (k, x) in m {
            out.fields.insert(k.clone(), to_value(x));
        }
    }
    out
}

/// `v` with every object's keys sorted (recursively).
pub fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::with_capacity(m.len());
            for k in keys {
                if let Some(x) = m.get(k) {
                    out.insert(k.clone(), sorted(x));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// `sha256:<hex>` of the RFC 8785 form of `v`.
pub fn digest(v: &Value) -> String {
    anumate_crypto::content_hash(v).1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn structs_round_trip_with_sorted_keys_and_integers() {
        let v = json!({"b": 1, "a": [true, null, "x", 2.5, {"z": 1, "y": 2}]});
        let back = struct_json(&to_struct(&v)).unwrap_or_default();
        assert_eq!(back, sorted(&v));
        let keys: Vec<&String> = back
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(back["b"], json!(1));
    }

    #[test]
    fn values_without_kind_are_refused() {
        assert_eq!(
            value_json(&pbjson_types::Value { kind: None }, 1),
            Err(JsonError::NoKind)
        );
    }
}
