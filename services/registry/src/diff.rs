//! Differences between two capsule versions: a unified text diff of the sources
//! and the changed leaves of the canonical documents.
//!
//! Line matching (Myers) costs O(lines × differences): two unrelated 1 MiB
//! sources took minutes. It is bounded twice: sources longer than
//! [`DiffLimits::max_lines`] are refused before any work, and matching stops at
//! [`DiffLimits::deadline`], after which the remaining ranges are reported as
//! removed and added lines (still a correct diff, flagged approximate).

use std::time::{Duration, Instant};

use anumate_errors::{Error, Reason, Result};
use anumate_proto::registry::v1 as pb;
use serde_json::Value;

/// Bounds on one diff.
#[derive(Debug, Clone, Copy)]
pub struct DiffLimits {
    /// Most source lines per version.
    pub max_lines: usize,
    /// Time allowed for line matching.
    pub deadline: Duration,
}

/// Builds the diff response, or refuses sources longer than the line limit.
pub fn diff(
    name: &str,
    from: &pb::CapsuleVersion,
    to: &pb::CapsuleVersion,
    limits: DiffLimits,
) -> Result<pb::DiffCapsuleVersionsResponse> {
    let from_lines = line_count(&from.source_yaml);
    let to_lines = line_count(&to.source_yaml);
    if from_lines.max(to_lines) > limits.max_lines {
        return Err(Error::because(
            Reason::DiffTooLarge,
            format!(
                "capsule {name} versions {} and {} have {from_lines} and {to_lines} source lines; \
                 diffs are limited to {} lines per version",
                from.version, to.version, limits.max_lines
            ),
        )
        .with_metadata("limit", "diff_max_lines")
        .with_metadata("max_lines", limits.max_lines.to_string())
        .with_metadata("from_lines", from_lines.to_string())
        .with_metadata("to_lines", to_lines.to_string()));
    }
    let deadline = Instant::now() + limits.deadline;
    let text = similar::TextDiff::configure()
        .algorithm(similar::Algorithm::Myers)
        .deadline(deadline)
        .diff_lines(&from.source_yaml, &to.source_yaml);
    // Past the deadline, the matching may have given up on some ranges.
    let approximate = Instant::now() > deadline;
    let unified = text
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
    Ok(pb::DiffCapsuleVersionsResponse {
        unified_diff: unified,
        changes,
        from_content_hash: from.content_hash.clone(),
        to_content_hash: to.content_hash.clone(),
        unified_diff_approximate: approximate,
    })
}

/// Lines as the diff counts them (a last line without `\n` counts).
fn line_count(s: &str) -> usize {
    s.lines().count()
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
        (Some(x), Some(y)) => out.push(change(path, pb::DiffChangeKind::Changed, Some(x), Some(y))),
        (None, Some(y)) => out.push(change(path, pb::DiffChangeKind::Added, None, Some(y))),
        (Some(x), None) => out.push(change(path, pb::DiffChangeKind::Removed, Some(x), None)),
        (None, None) => {}
    }
}

fn change(
    path: &str,
    kind: pb::DiffChangeKind,
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
    use anumate_errors::ErrorCode;

    const LIMITS: DiffLimits = DiffLimits {
        max_lines: 100,
        deadline: Duration::from_secs(5),
    };

    fn version(n: i32, yaml: &str, json: &str) -> pb::CapsuleVersion {
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
        let d = diff("n", &a, &b, LIMITS).unwrap();
        let got: Vec<(String, i32)> = d.changes.iter().map(|c| (c.path.clone(), c.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("/a".to_string(), pb::DiffChangeKind::Changed as i32),
                ("/b/1".to_string(), pb::DiffChangeKind::Removed as i32),
                ("/c~1d".to_string(), pb::DiffChangeKind::Removed as i32),
                ("/e".to_string(), pb::DiffChangeKind::Added as i32),
            ]
        );
        assert!(d.unified_diff.contains("--- n@1"));
        assert!(d.unified_diff.contains("-a: 1"));
        assert!(d.unified_diff.contains("+a: 2"));
        assert!(!d.unified_diff_approximate);
    }

    #[test]
    fn refuses_sources_over_the_line_limit() {
        let long = "x: 1\n".repeat(101);
        let a = version(1, "x: 1\n", "{}");
        let b = version(2, &long, "{}");
        let err = diff("n", &a, &b, LIMITS).unwrap_err();
        assert_eq!(err.code, ErrorCode::FailedPrecondition);
        assert_eq!(err.reason, Reason::DiffTooLarge);
        assert!(
            err.message.contains("1 and 101 source lines"),
            "{}",
            err.message
        );
        assert!(err.metadata.contains(&("to_lines".into(), "101".into())));
    }

    #[test]
    fn the_deadline_cuts_matching_short_but_the_diff_stays_correct() {
        let a: String = (0..20_000).map(|i| format!("a{i}\n")).collect();
        let b: String = (0..20_000).map(|i| format!("b{i}\n")).collect();
        let limits = DiffLimits {
            max_lines: 50_000,
            deadline: Duration::from_millis(1),
        };
        let started = Instant::now();
        let d = diff("n", &version(1, &a, "{}"), &version(2, &b, "{}"), limits).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(d.unified_diff_approximate);
        let removed = d
            .unified_diff
            .lines()
            .filter(|l| l.starts_with("-a"))
            .count();
        let added = d
            .unified_diff
            .lines()
            .filter(|l| l.starts_with("+b"))
            .count();
        assert_eq!((removed, added), (20_000, 20_000));
    }
}
