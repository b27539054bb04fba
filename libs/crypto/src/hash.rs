//! SHA-256 and RFC 8785 JSON Canonicalization Scheme.

use std::fmt::Write as _;

use anumate_errors::Error;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha256(data))
}

/// The RFC 8785 (JCS) form of `value`.
///
/// A `serde_json::Value` always has finite numbers and string keys, so this
/// never fails today; the `Result` keeps room for stricter input checks.
pub fn canonical_json(value: &Value) -> Result<String, Error> {
    let mut out = String::with_capacity(128);
    write_value(&mut out, value);
    Ok(out)
}

/// The JCS form of `value` and its digest as `sha256:<hex>`.
pub fn content_hash(value: &Value) -> (String, String) {
    let mut canonical = String::with_capacity(128);
    write_value(&mut canonical, value);
    let digest = format!("sha256:{}", sha256_hex(canonical.as_bytes()));
    (canonical, digest)
}

// Written by hand rather than through `serde_json_canonicalizer` so that it is
// infallible for `Value`; the tests cross-check both against RFC 8785 vectors.
fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // RFC 8785 §3.2.3: members sorted by the UTF-16 code units of their names.
            let mut members: Vec<(Vec<u16>, &String, &Value)> = map
                .iter()
                .map(|(k, v)| (k.encode_utf16().collect(), k, v))
                .collect();
            members.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (_, k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// Numbers are IEEE-754 doubles serialized as ECMAScript `Number.prototype.toString`.
fn write_number(out: &mut String, n: &serde_json::Number) {
    match n.as_f64() {
        Some(f) if f.is_finite() => {
            let mut buf = ryu_js::Buffer::new();
            out.push_str(buf.format_finite(f));
        }
        // Unreachable without serde_json's arbitrary_precision feature.
        _ => out.push_str(&n.to_string()),
    }
}

/// Strings are escaped as ECMAScript `JSON.stringify` does (RFC 8785 §3.2.2.2).
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0C}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The one digest format on the wire: `sha256:` and 64 lowercase hex digits.
pub const DIGEST_PREFIX: &str = "sha256:";

/// Parses a SHA-256 digest as a request carries it and returns its one wire
/// form, `sha256:<hex>`. Accepted: `sha256:<hex>`, and for path segments —
/// where a `:` collides with the `:verb` of HTTP templates — `sha256-<hex>`
/// and the bare 64 hex digits. Upper-case hex is refused (the format is
/// lower case everywhere, so a digest compares as a string).
///
/// # Errors
/// `INVALID_ARGUMENT` naming `field` when `text` is none of these forms.
pub fn parse_digest(field: &str, text: &str) -> Result<String, Error> {
    let hex = text
        .strip_prefix(DIGEST_PREFIX)
        .or_else(|| text.strip_prefix("sha256-"))
        .unwrap_or(text);
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(format!("{DIGEST_PREFIX}{hex}"))
    } else {
        Err(Error::invalid_argument(
            field,
            format!(
                "{text:?} is not a SHA-256 digest (`sha256:` or `sha256-` and 64 lower-case hex digits)"
            ),
        ))
    }
}

/// `sha256:<hex>` of `data`: the wire form of a digest.
pub fn digest(data: &[u8]) -> String {
    format!("{DIGEST_PREFIX}{}", sha256_hex(data))
}
