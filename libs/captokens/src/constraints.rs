//! Checking a call's arguments against a capability's constraints.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Number, Value};

use crate::claims::Constraint;
use crate::verify::CapabilityFailure;

/// Checks every constraint against `args`; the first violation is returned.
pub(crate) fn check(
    constraints: &BTreeMap<String, Constraint>,
    args: &Value,
) -> Result<(), CapabilityFailure> {
    for (path, constraint) in constraints {
        let Some(value) = args.pointer(path) else {
            return Err(CapabilityFailure::MissingArgument { path: path.clone() });
        };
        let violated = |constraint: &'static str, detail: String| CapabilityFailure::Constraint {
            path: path.clone(),
            constraint,
            detail,
        };
        if let Some(max) = &constraint.max {
            match value {
                Value::Number(n) if compare(n, max) != Some(Ordering::Greater) => {}
                Value::Number(n) => return Err(violated("max", format!("{n} is above {max}"))),
                other => return Err(violated("max", format!("{} is not a number", kind(other)))),
            }
        }
        if let Some(min) = &constraint.min {
            match value {
                Value::Number(n) if compare(n, min) != Some(Ordering::Less) => {}
                Value::Number(n) => return Err(violated("min", format!("{n} is below {min}"))),
                other => return Err(violated("min", format!("{} is not a number", kind(other)))),
            }
        }
        if let Some(allowed) = &constraint.one_of {
            match value {
                Value::String(s) if allowed.iter().any(|a| a == s) => {}
                Value::String(s) => {
                    return Err(violated(
                        "one_of",
                        format!("{s:?} is not one of {allowed:?}"),
                    ));
                }
                other => {
                    return Err(violated(
                        "one_of",
                        format!("{} is not a string", kind(other)),
                    ));
                }
            }
        }
        if let Some(prefix) = &constraint.prefix {
            match value {
                Value::String(s) => {
                    if let Err(why) = check_prefix(s, prefix) {
                        return Err(violated("prefix", format!("{s:?} {why} {prefix:?}")));
                    }
                }
                other => {
                    return Err(violated(
                        "prefix",
                        format!("{} is not a string", kind(other)),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Compares two JSON numbers exactly when both are integers, else as doubles.
fn compare(a: &Number, b: &Number) -> Option<Ordering> {
    fn int(n: &Number) -> Option<i128> {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    }
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// A string prefix check hardened for URLs: the prefix must end at a
/// component boundary (so `https://a.example` does not admit
/// `https://a.example.evil` or `https://a.example@evil`), and the value may
/// not contain dot segments, backslashes, encoded dots or slashes, or control
/// characters that could walk out of the prefix once a server normalises it.
fn check_prefix(value: &str, prefix: &str) -> Result<(), &'static str> {
    let Some(rest) = value.strip_prefix(prefix) else {
        return Err("does not start with");
    };
    let at_boundary = rest.is_empty()
        || prefix.ends_with(['/', '?', '#', '&', '='])
        || rest.starts_with(['/', '?', '#']);
    if !at_boundary {
        return Err("continues past the last component of");
    }
    if value.contains('\\') || value.chars().any(char::is_control) {
        return Err("has a backslash or control character, not allowed with");
    }
    let lower = value.to_ascii_lowercase();
    if lower.contains("%2e") || lower.contains("%2f") || lower.contains("%5c") {
        return Err("has an encoded dot or slash, not allowed with");
    }
    let path = value.split(['?', '#']).next().unwrap_or(value);
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("has a dot segment, not allowed with");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_prefix;

    #[test]
    fn prefix_boundaries() {
        let p = "https://orders.example/api/";
        assert!(check_prefix("https://orders.example/api/refunds/7", p).is_ok());
        assert!(check_prefix("https://orders.example/api/", p).is_ok());
        assert!(check_prefix("https://orders.example/admin", p).is_err());
        assert!(check_prefix("https://orders.example/api/../admin", p).is_err());
        assert!(check_prefix("https://orders.example/api/%2e%2e/admin", p).is_err());
        assert!(check_prefix("https://orders.example/api/..\\admin", p).is_err());
        let host = "https://orders.example";
        assert!(check_prefix("https://orders.example", host).is_ok());
        assert!(check_prefix("https://orders.example/x?y=1", host).is_ok());
        assert!(check_prefix("https://orders.example.evil/x", host).is_err());
        assert!(check_prefix("https://orders.example@evil/x", host).is_err());
        assert!(check_prefix("https://orders.example:8443/x", host).is_err());
    }
}
