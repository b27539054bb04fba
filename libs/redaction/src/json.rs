//! Recursive JSON redaction with field paths.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use crate::{RedactionError, RedactionReport, Redactor};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    AnyKey,
    Index(usize),
    AnyIndex,
}

/// A parsed field path: `customer.email`, `items[*].card`, `*.ssn`, `rows[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    source: String,
    segs: Vec<Seg>,
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for FieldPath {
    type Err = RedactionError;

    fn from_str(path: &str) -> Result<Self, Self::Err> {
        let err = |reason| RedactionError::InvalidFieldPath {
            path: path.to_owned(),
            reason,
        };
        if path.trim().is_empty() {
            return Err(err("empty path"));
        }
        let mut segs = Vec::new();
        for (i, part) in path.split('.').enumerate() {
            let (name, mut rest) = match part.find('[') {
                Some(b) => part.split_at(b),
                None => (part, ""),
            };
            match name {
                "" if rest.is_empty() => return Err(err("empty segment")),
                "" if i > 0 => return Err(err("index without a key (write `a[*]`, not `a.[*]`)")),
                "" => {}
                "*" => segs.push(Seg::AnyKey),
                n if n.contains(['*', ']']) => return Err(err("`*` must be a whole segment")),
                n => segs.push(Seg::Key(n.to_owned())),
            }
            while !rest.is_empty() {
                let close = rest.find(']').ok_or_else(|| err("unclosed `[`"))?;
                let inner = &rest[1..close];
                let quoted = inner.len() >= 2
                    && ((inner.starts_with('\'') && inner.ends_with('\''))
                        || (inner.starts_with('"') && inner.ends_with('"')));
                segs.push(match inner {
                    "*" => Seg::AnyIndex,
                    // `a['odd key']`: a key that is not a plain name.
                    q if quoted => Seg::Key(q[1..q.len() - 1].to_owned()),
                    n => Seg::Index(
                        n.parse()
                            .map_err(|_| err("index must be `*` or a number"))?,
                    ),
                });
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return Err(err("text after `]`"));
                }
            }
        }
        Ok(FieldPath {
            source: path.to_owned(),
            segs,
        })
    }
}

impl FieldPath {
    /// Whether this path names the concrete `path` (as
    /// [`RedactionReport::paths`] writes them: `a.b[2].c`): `*` stands for
    /// any key, `[*]` for any index. The policy service attributes a
    /// redaction to the field that asked for it with this.
    pub fn matches(&self, path: &str) -> bool {
        let Ok(concrete) = path.parse::<FieldPath>() else {
            return false;
        };
        self.segs.len() == concrete.segs.len()
            && self
                .segs
                .iter()
                .zip(&concrete.segs)
                .all(|(p, c)| match (p, c) {
                    (Seg::AnyKey, Seg::Key(_)) | (Seg::AnyIndex, Seg::Index(_)) => true,
                    (p, c) => p == c,
                })
    }
}

/// Progress of one field path: (path index, segments matched so far).
type State = (usize, usize);

enum Step<'k> {
    Key(&'k str),
    Index(usize),
}

/// Advances the active states over one step; returns the new states and
/// whether some path is now complete.
fn advance(paths: &[FieldPath], active: &[State], step: &Step<'_>) -> (Vec<State>, bool) {
    let mut next = Vec::new();
    let mut done = false;
    for &(p, pos) in active {
        let segs = &paths[p].segs;
        let ok = match (&segs[pos], step) {
            (Seg::Key(k), Step::Key(s)) => k == s,
            (Seg::AnyKey, Step::Key(_)) => true,
            (Seg::Index(i), Step::Index(j)) => i == j,
            (Seg::AnyIndex, Step::Index(_)) => true,
            _ => false,
        };
        if ok {
            if pos + 1 == segs.len() {
                done = true;
            } else {
                next.push((p, pos + 1));
            }
        }
    }
    (next, done)
}

pub(crate) fn redact(r: &Redactor, value: &mut Value, report: &mut RedactionReport) {
    let active: Vec<State> = (0..r.paths.len()).map(|p| (p, 0)).collect();
    walk(r, value, &active, report);
    for p in &mut report.paths {
        if p.starts_with('.') {
            p.remove(0);
        }
    }
}

/// Prefixes the paths recorded since `from` with one step. Relative paths
/// carry their own leading separator (`.key` or `[i]`) so keys that start
/// with `[` stay unambiguous; the root's leading `.` is dropped at the end.
fn prefix(report: &mut RedactionReport, from: usize, step: &Step<'_>) {
    for p in &mut report.paths[from..] {
        let head = match step {
            Step::Key(k) => format!(".{k}"),
            Step::Index(i) => format!("[{i}]"),
        };
        p.insert_str(0, &head);
    }
}

fn walk(r: &Redactor, value: &mut Value, active: &[State], report: &mut RedactionReport) {
    match value {
        Value::String(s) => {
            let counts = &mut report.counts;
            if let Cow::Owned(new) = r.redact_counting(s, |d| *counts.entry(d).or_insert(0) += 1) {
                *s = new;
                report.paths.push(String::new());
            }
        }
        Value::Number(n) => {
            let big = n
                .as_u64()
                .map(|u| u >= 1_000_000)
                .or_else(|| n.as_i64().map(|i| i <= -1_000_000));
            if big == Some(true) {
                let text = n.to_string();
                let counts = &mut report.counts;
                if let Cow::Owned(new) =
                    r.redact_counting(&text, |d| *counts.entry(d).or_insert(0) += 1)
                {
                    *value = Value::String(new);
                    report.paths.push(String::new());
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk_child(r, item, active, &Step::Index(i), report);
            }
        }
        Value::Object(map) => {
            redact_keys(r, map, report);
            for (k, child) in map.iter_mut() {
                walk_child(r, child, active, &Step::Key(k), report);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// One element or member reached by `step`: replaced whole when a field path
/// ends there, walked otherwise; the paths it reports are prefixed with `step`.
fn walk_child(
    r: &Redactor,
    child: &mut Value,
    active: &[State],
    step: &Step<'_>,
    report: &mut RedactionReport,
) {
    let from = report.paths.len();
    let (next, done) = if active.is_empty() {
        (Vec::new(), false)
    } else {
        advance(&r.paths, active, step)
    };
    if done {
        replace_field(r, child, report);
    } else {
        walk(r, child, &next, report);
    }
    prefix(report, from, step);
}

fn replace_field(r: &Redactor, value: &mut Value, report: &mut RedactionReport) {
    *value = Value::String(r.field_label.clone());
    report.fields += 1;
    report.paths.push(String::new());
}

/// Rewrites keys that contain PII, keeping entry order.
fn redact_keys(r: &Redactor, map: &mut Map<String, Value>, report: &mut RedactionReport) {
    let mut renames = Vec::new();
    for k in map.keys() {
        let counts = &mut report.counts;
        if let Cow::Owned(new) = r.redact_counting(k, |d| *counts.entry(d).or_insert(0) += 1) {
            renames.push((k.clone(), new));
        }
    }
    if renames.is_empty() {
        return;
    }
    let kept: Vec<String> = map
        .keys()
        .filter(|k| !renames.iter().any(|(from, _)| from == *k))
        .cloned()
        .collect();
    let old = std::mem::take(map);
    for (k, v) in old {
        let key = match renames.iter().position(|(from, _)| *from == k) {
            Some(i) => {
                let base = renames[i].1.clone();
                let mut key = base.clone();
                let mut n = 2;
                while map.contains_key(&key) || kept.contains(&key) {
                    key = format!("{base}#{n}");
                    n += 1;
                }
                report.paths.push(format!(".{key}"));
                key
            }
            None => k,
        };
        map.insert(key, v);
    }
}
