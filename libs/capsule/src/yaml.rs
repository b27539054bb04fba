//! A small, safe YAML loader that keeps the position of every node.
//!
//! Built on `yaml-rust2`'s pull parser so limits are enforced while reading:
//! the loader stops at the first alias, anchor, second document, or when the
//! depth or node count exceeds [`Limits`], before any expansion can happen.
//! Scalars are resolved with the YAML 1.2 core schema.
//!
//! [`load_stream`] reads several `---` documents (tool files) with the same
//! limits, counted over the whole stream.

use std::collections::HashMap;

use anumate_errors::Violation;
use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::Limits;

/// A 1-based `(line, column)` position.
pub type Pos = (u32, u32);

/// A YAML node with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Where the node starts.
    pub pos: Pos,
    /// Its value.
    pub value: Yaml,
}

/// A mapping entry; keys are always strings.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Where the key starts.
    pub key_pos: Pos,
    /// The value.
    pub value: Node,
}

/// A resolved YAML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Yaml {
    /// `null`, `~` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer or a float representable in JSON.
    Number(Number),
    /// A string.
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, entries in document order.
    Map(Vec<Entry>),
}

impl Yaml {
    /// The type name used in messages (`a string`, `a mapping`, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Yaml::Null => "null",
            Yaml::Bool(_) => "a boolean",
            Yaml::Number(n) if n.is_f64() => "a number",
            Yaml::Number(_) => "an integer",
            Yaml::Str(_) => "a string",
            Yaml::Seq(_) => "a sequence",
            Yaml::Map(_) => "a mapping",
        }
    }
}

impl Node {
    /// The node as JSON: mappings become objects with keys inserted in sorted
    /// order, so two documents differing only in key order are equal.
    pub fn to_json(&self) -> Value {
        match &self.value {
            Yaml::Null => Value::Null,
            Yaml::Bool(b) => Value::Bool(*b),
            Yaml::Number(n) => Value::Number(n.clone()),
            Yaml::Str(s) => Value::String(s.clone()),
            Yaml::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Yaml::Map(entries) => {
                let mut sorted: Vec<&Entry> = entries.iter().collect();
                sorted.sort_by(|a, b| a.key.cmp(&b.key));
                let mut map = Map::new();
                for e in sorted {
                    map.entry(e.key.clone())
                        .or_insert_with(|| e.value.to_json());
                }
                Value::Object(map)
            }
        }
    }
}

/// The value of `key` in a mapping's entries.
pub fn get<'a>(entries: &'a [Entry], key: &str) -> Option<&'a Node> {
    entries.iter().find(|e| e.key == key).map(|e| &e.value)
}

/// Typed reads of a loaded node for a validator that collects
/// [`Violation`]s: each reports "expected …, found …" at the node's position
/// and returns `None` when the node has another type. Implement
/// [`Checks::violations`]; the rest comes with it.
pub trait Checks {
    /// Where violations go.
    fn violations(&mut self) -> &mut Vec<Violation>;

    /// Records a violation of `field` at `pos`.
    fn err(&mut self, field: impl Into<String>, pos: Pos, msg: impl Into<String>) {
        self.violations()
            .push(Violation::at(field, pos.0, pos.1, msg));
    }

    /// Records that `node` at `path` is not `want` ("a mapping").
    fn wrong_type(&mut self, node: &Node, path: &str, want: &str) {
        self.err(
            path,
            node.pos,
            format!("expected {want}, found {}", node.value.kind()),
        );
    }

    /// The entries of a mapping.
    fn mapping<'a>(&mut self, node: &'a Node, path: &str) -> Option<&'a [Entry]> {
        match &node.value {
            Yaml::Map(entries) => Some(entries),
            _ => {
                self.wrong_type(node, path, "a mapping");
                None
            }
        }
    }

    /// The items of a sequence.
    fn sequence<'a>(&mut self, node: &'a Node, path: &str) -> Option<&'a [Node]> {
        match &node.value {
            Yaml::Seq(items) => Some(items),
            _ => {
                self.wrong_type(node, path, "a sequence");
                None
            }
        }
    }

    /// A string.
    fn string<'a>(&mut self, node: &'a Node, path: &str) -> Option<&'a str> {
        match &node.value {
            Yaml::Str(s) => Some(s),
            _ => {
                self.wrong_type(node, path, "a string");
                None
            }
        }
    }

    /// A boolean.
    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Yaml::Bool(b) => Some(*b),
            _ => {
                self.wrong_type(node, path, "a boolean");
                None
            }
        }
    }

    /// A non-negative integer.
    fn unsigned(&mut self, node: &Node, path: &str) -> Option<u64> {
        match &node.value {
            Yaml::Number(n) if n.as_u64().is_some() => n.as_u64(),
            _ => {
                self.wrong_type(node, path, "a non-negative integer");
                None
            }
        }
    }

    /// The value of `key` in `entries`; reports it missing (at the parent's
    /// position) when absent.
    fn required<'a>(
        &mut self,
        entries: &'a [Entry],
        parent: &Node,
        path: &str,
        key: &str,
    ) -> Option<&'a Node> {
        let found = get(entries, key);
        if found.is_none() {
            self.err(
                join(path, key),
                parent.pos,
                format!("required key \"{key}\" is missing"),
            );
        }
        found
    }

    /// Any number.
    fn number(&mut self, node: &Node, path: &str) -> Option<f64> {
        match &node.value {
            Yaml::Number(n) => n.as_f64(),
            _ => {
                self.wrong_type(node, path, "a number");
                None
            }
        }
    }
}

/// Appends a mapping key to a document path (`spec` + `steps` = `spec.steps`).
pub fn join(path: &str, key: &str) -> String {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    } else {
        let quoted = serde_json::to_string(key).unwrap_or_default();
        format!("{path}[{quoted}]")
    }
}

/// Appends a sequence index to a document path.
pub fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn pos_of(m: &Marker) -> Pos {
    let line = u32::try_from(m.line()).unwrap_or(u32::MAX);
    let col = u32::try_from(m.col().saturating_add(1)).unwrap_or(u32::MAX);
    (line, col)
}

/// What went wrong while loading: either fatal (loading stopped) or a list of
/// problems next to a usable tree.
pub struct Loaded {
    /// The document's root node, absent when loading stopped.
    pub root: Option<Node>,
    /// Problems found while loading, paths relative to this document.
    pub violations: Vec<Violation>,
}

enum Frame {
    Seq {
        path: String,
        pos: Pos,
        items: Vec<Node>,
    },
    Map {
        path: String,
        pos: Pos,
        entries: Vec<Entry>,
        seen: HashMap<String, Pos>,
        /// `None`: expecting a key; `Some(None)`: the key was invalid, skip the value.
        pending: Option<Option<(String, Pos)>>,
    },
}

struct Loader<'l> {
    limits: &'l Limits,
    stack: Vec<Frame>,
    root: Option<Node>,
    nodes: usize,
    violations: Vec<Violation>,
    /// Documents already read ([`load_stream`] only).
    finished: Vec<Loaded>,
}

type Fatal = Violation;

impl Loader<'_> {
    /// Path of the node about to be added at the top of the stack.
    fn child_path(&self) -> String {
        match self.stack.last() {
            None => String::new(),
            Some(Frame::Seq { path, items, .. }) => index(path, items.len()),
            Some(Frame::Map { path, pending, .. }) => match pending {
                Some(Some((key, _))) => join(path, key),
                _ => path.clone(),
            },
        }
    }

    fn count_node(&mut self, pos: Pos) -> Result<(), Fatal> {
        self.nodes += 1;
        if self.nodes > self.limits.max_nodes {
            return Err(Violation::at(
                self.child_path(),
                pos.0,
                pos.1,
                format!(
                    "document has more than {} nodes (the limit)",
                    self.limits.max_nodes
                ),
            ));
        }
        Ok(())
    }

    fn no_anchor(&self, anchor: usize, pos: Pos) -> Result<(), Fatal> {
        if anchor != 0 {
            return Err(Violation::at(
                self.child_path(),
                pos.0,
                pos.1,
                "YAML anchors (`&name`) are not allowed in a capsule: with aliases they allow \
                 exponential expansion (billion laughs)",
            ));
        }
        Ok(())
    }

    fn push_node(&mut self, node: Node, raw_key: Option<&str>) {
        let Some(top) = self.stack.last_mut() else {
            if self.root.is_none() {
                self.root = Some(node);
            }
            return;
        };
        match top {
            Frame::Seq { items, .. } => items.push(node),
            Frame::Map {
                path,
                entries,
                seen,
                pending,
                ..
            } => match pending.take() {
                None => match raw_key {
                    Some(key) => *pending = Some(Some((key.to_string(), node.pos))),
                    None => {
                        self.violations.push(Violation::at(
                            path.clone(),
                            node.pos.0,
                            node.pos.1,
                            "mapping keys must be scalars",
                        ));
                        *pending = Some(None);
                    }
                },
                Some(None) => {}
                Some(Some((key, key_pos))) => {
                    if let Some(first) = seen.get(&key) {
                        self.violations.push(Violation::at(
                            join(path, &key),
                            key_pos.0,
                            key_pos.1,
                            format!(
                                "duplicate key \"{key}\" (first defined at line {}, column {})",
                                first.0, first.1
                            ),
                        ));
                    } else {
                        seen.insert(key.clone(), key_pos);
                        entries.push(Entry {
                            key,
                            key_pos,
                            value: node,
                        });
                    }
                }
            },
        }
    }

    fn start(&mut self, map: bool, anchor: usize, tag: Option<Tag>, pos: Pos) -> Result<(), Fatal> {
        self.no_anchor(anchor, pos)?;
        self.count_node(pos)?;
        let path = self.child_path();
        if self.stack.len() >= self.limits.max_depth {
            return Err(Violation::at(
                path,
                pos.0,
                pos.1,
                format!(
                    "document nests deeper than {} levels (the limit)",
                    self.limits.max_depth
                ),
            ));
        }
        if let Some(tag) = tag {
            self.violations.push(Violation::at(
                path.clone(),
                pos.0,
                pos.1,
                format!(
                    "YAML tag `{}` is not allowed on a collection",
                    tag_name(&tag)
                ),
            ));
        }
        self.stack.push(if map {
            Frame::Map {
                path,
                pos,
                entries: Vec::new(),
                seen: HashMap::new(),
                pending: None,
            }
        } else {
            Frame::Seq {
                path,
                pos,
                items: Vec::new(),
            }
        });
        Ok(())
    }

    fn end(&mut self) {
        let node = match self.stack.pop() {
            Some(Frame::Seq { pos, items, .. }) => {
                // Block collections are reported by the parser after their first
                // child; the node starts at whichever comes first.
                let pos = items.first().map_or(pos, |n| pos.min(n.pos));
                Node {
                    pos,
                    value: Yaml::Seq(items),
                }
            }
            Some(Frame::Map {
                pos, entries, seen, ..
            }) => {
                let first_key = seen.values().min().copied();
                let pos = first_key.map_or(pos, |k| pos.min(k));
                Node {
                    pos,
                    value: Yaml::Map(entries),
                }
            }
            None => return,
        };
        self.push_node(node, None);
    }

    fn scalar(
        &mut self,
        raw: String,
        style: TScalarStyle,
        anchor: usize,
        tag: Option<Tag>,
        pos: Pos,
    ) -> Result<(), Fatal> {
        self.no_anchor(anchor, pos)?;
        self.count_node(pos)?;
        let expecting_key = matches!(self.stack.last(), Some(Frame::Map { pending: None, .. }));
        let value = match resolve(&raw, style, tag.as_ref()) {
            Ok(v) => v,
            Err(msg) => {
                let path = if expecting_key {
                    match self.stack.last() {
                        Some(Frame::Map { path, .. }) => join(path, &raw),
                        _ => self.child_path(),
                    }
                } else {
                    self.child_path()
                };
                self.violations.push(Violation::at(path, pos.0, pos.1, msg));
                Yaml::Str(raw.clone())
            }
        };
        let node = Node { pos, value };
        self.push_node(node, Some(&raw));
        Ok(())
    }
}

fn tag_name(tag: &Tag) -> String {
    if tag.handle == "tag:yaml.org,2002:" {
        format!("!!{}", tag.suffix)
    } else {
        format!("{}{}", tag.handle, tag.suffix)
    }
}

/// Resolves a scalar with the YAML 1.2 core schema; quoted scalars are strings.
fn resolve(raw: &str, style: TScalarStyle, tag: Option<&Tag>) -> Result<Yaml, String> {
    let core_tag = match tag {
        None => None,
        Some(t) if t.handle == "tag:yaml.org,2002:" => match t.suffix.as_str() {
            s @ ("str" | "int" | "float" | "bool" | "null") => Some(s),
            _ => {
                return Err(format!(
                    "YAML tag `{}` is not allowed; only core scalar tags (!!str, !!int, \
                     !!float, !!bool, !!null) are",
                    tag_name(t)
                ));
            }
        },
        Some(t) => {
            return Err(format!(
                "YAML tag `{}` is not allowed; only core scalar tags (!!str, !!int, !!float, \
                 !!bool, !!null) are",
                tag_name(t)
            ));
        }
    };
    let plain = matches!(style, TScalarStyle::Plain);
    let value = match core_tag {
        Some("str") => return Ok(Yaml::Str(raw.to_string())),
        None if !plain => return Ok(Yaml::Str(raw.to_string())),
        _ => resolve_plain(raw)?,
    };
    let ok = match core_tag {
        None => true,
        Some("int") => matches!(&value, Yaml::Number(n) if !n.is_f64()),
        Some("float") => matches!(value, Yaml::Number(_)),
        Some("bool") => matches!(value, Yaml::Bool(_)),
        Some("null") => matches!(value, Yaml::Null),
        Some(_) => false,
    };
    if ok {
        Ok(value)
    } else {
        Err(format!(
            "`{raw}` is not a valid !!{}",
            core_tag.unwrap_or_default()
        ))
    }
}

fn resolve_plain(raw: &str) -> Result<Yaml, String> {
    match raw {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(Yaml::Null),
        "true" | "True" | "TRUE" => return Ok(Yaml::Bool(true)),
        "false" | "False" | "FALSE" => return Ok(Yaml::Bool(false)),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => {
            return Err(format!("`{raw}` cannot be represented in JSON"));
        }
        _ => {}
    }
    if let Some(n) = parse_int(raw) {
        return n.map(Yaml::Number);
    }
    if is_float(raw) {
        return match raw.parse::<f64>().ok().and_then(Number::from_f64) {
            Some(n) => Ok(Yaml::Number(n)),
            None => Err(format!("`{raw}` cannot be represented in JSON")),
        };
    }
    Ok(Yaml::Str(raw.to_string()))
}

/// `None`: not an integer; `Some(Err)`: an integer out of range.
fn parse_int(raw: &str) -> Option<Result<Number, String>> {
    let (digits, radix, neg) = if let Some(h) = raw.strip_prefix("0x") {
        (h, 16, false)
    } else if let Some(o) = raw.strip_prefix("0o") {
        (o, 8, false)
    } else if let Some(d) = raw.strip_prefix('-') {
        (d, 10, true)
    } else {
        (raw.strip_prefix('+').unwrap_or(raw), 10, false)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let out_of_range = || Err(format!("integer `{raw}` is out of range"));
    let Ok(magnitude) = u64::from_str_radix(digits, radix) else {
        return Some(out_of_range());
    };
    if neg {
        let Some(v) = 0i64.checked_sub_unsigned(magnitude) else {
            return Some(out_of_range());
        };
        Some(Ok(Number::from(v)))
    } else {
        Some(Ok(Number::from(magnitude)))
    }
}

/// YAML 1.2 core float: `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`.
fn is_float(raw: &str) -> bool {
    let b = raw.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'-' | b'+')) {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = i - s;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
            i += 1;
        }
        let s = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == s {
            return false;
        }
    }
    i == b.len()
}

/// Loads one YAML document. Fatal problems (syntax errors, aliases, anchors,
/// several documents, limits) stop loading and return a single violation.
pub fn load(source: &str, limits: &Limits) -> Loaded {
    let mut loader = Loader::new(limits);
    match run(&mut loader, source, false) {
        Ok(()) => Loaded {
            root: loader.root,
            violations: loader.violations,
        },
        Err(fatal) => Loaded {
            root: None,
            violations: vec![fatal],
        },
    }
}

/// Loads every document of a `---` separated stream, in order (an empty
/// document is a [`Yaml::Null`] root). A fatal problem (syntax, aliases,
/// anchors, limits over the whole stream) stops loading: it is the one
/// violation returned.
pub fn load_stream(source: &str, limits: &Limits) -> Result<Vec<Loaded>, Violation> {
    let mut loader = Loader::new(limits);
    run(&mut loader, source, true)?;
    Ok(loader.finished)
}

impl<'l> Loader<'l> {
    fn new(limits: &'l Limits) -> Self {
        Loader {
            limits,
            stack: Vec::new(),
            root: None,
            nodes: 0,
            violations: Vec::new(),
            finished: Vec::new(),
        }
    }
}

fn run(loader: &mut Loader<'_>, source: &str, stream: bool) -> Result<(), Fatal> {
    let mut parser = Parser::new_from_str(source);
    let mut documents = 0usize;
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(ev) => ev,
            Err(e) => {
                let (line, col) = pos_of(e.marker());
                // The parser's stack is no reliable guide to the intended path.
                return Err(Violation::at(
                    "",
                    line.max(1),
                    col,
                    format!("invalid YAML: {}", e.info()),
                ));
            }
        };
        let pos = pos_of(&mark);
        match event {
            Event::StreamEnd => return Ok(()),
            Event::StreamStart | Event::Nothing => {}
            Event::DocumentEnd => {
                if stream {
                    loader.finished.push(Loaded {
                        root: loader.root.take(),
                        violations: std::mem::take(&mut loader.violations),
                    });
                }
            }
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 && !stream {
                    return Err(Violation::at(
                        "",
                        pos.0,
                        pos.1,
                        "a capsule is a single YAML document; multi-document streams (`---`) \
                         are not allowed",
                    ));
                }
            }
            Event::Alias(_) => {
                return Err(Violation::at(
                    loader.child_path(),
                    pos.0,
                    pos.1,
                    "YAML aliases (`*name`) are not allowed in a capsule: they allow \
                     exponential expansion (billion laughs)",
                ));
            }
            Event::Scalar(raw, style, anchor, tag) => {
                loader.scalar(raw, style, anchor, tag, pos)?
            }
            Event::SequenceStart(anchor, tag) => loader.start(false, anchor, tag, pos)?,
            Event::MappingStart(anchor, tag) => loader.start(true, anchor, tag, pos)?,
            Event::SequenceEnd | Event::MappingEnd => loader.end(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(raw: &str) -> Yaml {
        resolve(raw, TScalarStyle::Plain, None).unwrap_or(Yaml::Null)
    }

    #[test]
    fn core_schema_scalars() {
        assert_eq!(scalar("true"), Yaml::Bool(true));
        assert_eq!(scalar("10"), Yaml::Number(10.into()));
        assert_eq!(scalar("-10"), Yaml::Number((-10).into()));
        assert_eq!(scalar("0x1f"), Yaml::Number(31.into()));
        assert!(matches!(scalar("1.5"), Yaml::Number(n) if n.as_f64() == Some(1.5)));
        assert!(matches!(scalar("1e3"), Yaml::Number(n) if n.is_f64()));
        assert_eq!(scalar("~"), Yaml::Null);
        assert_eq!(scalar("yes"), Yaml::Str("yes".into()));
        assert_eq!(scalar("1.2.3"), Yaml::Str("1.2.3".into()));
        assert_eq!(scalar("10s"), Yaml::Str("10s".into()));
        assert_eq!(
            resolve("10", TScalarStyle::DoubleQuoted, None),
            Ok(Yaml::Str("10".into()))
        );
        assert!(resolve_plain("99999999999999999999").is_err());
        assert!(resolve_plain(".nan").is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(join("", "spec"), "spec");
        assert_eq!(join("spec", "steps"), "spec.steps");
        assert_eq!(index("spec.steps", 1), "spec.steps[1]");
        assert_eq!(
            join("metadata.labels", "app.kubernetes.io/name"),
            "metadata.labels[\"app.kubernetes.io/name\"]"
        );
    }
}
