//! Differences between two capsule versions: a unified text diff of the sources
//! and the changed leaves of the canonical documents.

use anumate_proto::registry::v1 as pb;
use serde_json::Value;

/// Builds the diff response.
pub fn diff(
    name: &str,
    from: &pb::CapsuleVersion,
    to: &pb::CapsuleVersion,
) -> pb::DiffCapsuleVersionsResponse {
    let unified = similar::TextDiff::from_lines(&from.source_yaml, &to.source_yaml)
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("{name}@{}", from.version),
            &format!("{name}@{}", to.version),
        )
        .to_string();
    let a: Value = serde_json::from_str(&from.canonical_json).unwrap_or(Value::Null);
    let b: Value = serde_json::from_str(&to.canonical_json).unwrap_or(Value::Null);
    let mut changes = Vec::new();
    walk("", Some(&a), Some(&b), &mut changes);
    pb::DiffCapsuleVersionsResponse {
        unified_diff: unified,
        changes,
        from_content_hash: from.content_hash.clone(),
        to_content_hash: to.content_hash.clone(),
    }
}

fn pointer_escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn walk(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<pb::FieldChange>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                walk(
                    &format!("{path}/{}", pointer_escape(k)),
                    x.get(k),
                    y.get(k),
                    out,
                );
            }
        }
        (Some(Value::Array(x)), Some(Value::Array(y))) => {
            for i in 0..x.len().max(y.len()) {
                walk(&format!("{path}/{i}"), x.get(i), y.get(i), out);
            }
        }
        (Some(x), Some(y)) if x == y => {}
        (Some(x), Some(y)) => out.push(change(path, pb::ChangeKind::Changed, Some(x), Some(y))),
        (None, Some(y)) => out.push(change(path, pb::ChangeKind::Added, None, Some(y))),
        (Some(x), None) => out.push(change(path, pb::ChangeKind::Removed, Some(x), None)),
        (None, None) => {}
    }
}

fn change(
    path: &str,
    kind: pb::ChangeKind,
    from: Option<&Value>,
    to: Option<&Value>,
) -> pb::FieldChange {
    pb::FieldChange {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        kind: kind as i32,
        from_json: from.map(Value::to_string).unwrap_or_default(),
        to_json: to.map(Value::to_string).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: i64, yaml: &str, json: &str) -> pb::CapsuleVersion {
        pb::CapsuleVersion {
            version: n,
            source_yaml: yaml.into(),
            canonical_json: json.into(),
            ..Default::default()
        }
    }

    #[test]
    fn reports_added_removed_and_changed_leaves() {
        let a = version(1, "a: 1\nb: [1, 2]\n", r#"{"a":1,"b":[1,2],"c/d":true}"#);
        let b = version(2, "a: 2\nb: [1]\n", r#"{"a":2,"b":[1],"e":"x"}"#);
        let d = diff("n", &a, &b);
        let got: Vec<(String, i32)> = d.changes.iter().map(|c| (c.path.clone(), c.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("/a".to_string(), pb::ChangeKind::Changed as i32),
                ("/b/1".to_string(), pb::ChangeKind::Removed as i32),
                ("/c~1d".to_string(), pb::ChangeKind::Removed as i32),
                ("/e".to_string(), pb::ChangeKind::Added as i32),
            ]
        );
        assert!(d.unified_diff.contains("--- n@1"));
        assert!(d.unified_diff.contains("-a: 1"));
        assert!(d.unified_diff.contains("+a: 2"));
    }
}
