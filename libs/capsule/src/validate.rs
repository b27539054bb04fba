//! Validation of a loaded document against the Capsule schema (SPEC §2).
//!
//! Every check reports into one list and carries on, so a caller sees all
//! problems at once. The typed [`Capsule`] is built along the way with
//! placeholders where a field was invalid; it is only returned when the list
//! stays empty.

use std::collections::{BTreeMap, HashMap, HashSet};

use anumate_errors::{Violation, is_dns_label};
use regex::RegexBuilder;
use serde_json::Value;

use crate::expr::{self, Reference};
use crate::yaml::{Checks, Entry, Node, Pos, Yaml, get, index, join};
use crate::{
    API_VERSION, Backoff, Capsule, Compensation, InputSpec, InputType, KIND, Limits, Retry, Spec,
    Step, parse_duration,
};

struct V<'o> {
    out: &'o mut Vec<Violation>,
    /// How many more "did you mean" searches this document may cost.
    suggestions: usize,
}

/// Suggestions searched per document; keeps huge invalid documents cheap.
const SUGGESTION_BUDGET: usize = 64;

impl Checks for V<'_> {
    fn violations(&mut self) -> &mut Vec<Violation> {
        self.out
    }
}

impl V<'_> {
    fn suggest<'c>(
        &mut self,
        word: &str,
        candidates: impl Iterator<Item = &'c str>,
    ) -> Option<&'c str> {
        self.suggestions = self.suggestions.checked_sub(1)?;
        suggest(word, candidates)
    }

    /// Reports keys not in `allowed`, suggesting a close one.
    fn known_keys(&mut self, entries: &[Entry], path: &str, allowed: &[&str]) {
        for e in entries {
            if allowed.contains(&e.key.as_str()) {
                continue;
            }
            let msg = match self.suggest(&e.key, allowed.iter().copied()) {
                Some(s) => format!("unknown key \"{}\"; did you mean \"{s}\"?", e.key),
                None => format!(
                    "unknown key \"{}\"; expected one of: {}",
                    e.key,
                    allowed.join(", ")
                ),
            };
            self.err(join(path, &e.key), e.key_pos, msg);
        }
    }

    /// A sequence of unique strings each accepted by `valid`.
    fn name_list(
        &mut self,
        node: &Node,
        path: &str,
        what: &str,
        valid: fn(&str) -> bool,
        rule: &str,
    ) -> Option<Vec<String>> {
        let items = self.sequence(node, path)?;
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        let mut names = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = index(path, i);
            let Some(name) = self.string(item, &p) else {
                continue;
            };
            if !valid(name) {
                self.err(&p, item.pos, format!("invalid {what} \"{name}\": {rule}"));
            } else if let Some(first) = seen.get(name) {
                self.err(
                    &p,
                    item.pos,
                    format!(
                        "duplicate {what} \"{name}\" (first listed at line {})",
                        first.0
                    ),
                );
            } else {
                seen.insert(name, item.pos);
            }
            names.push(name.to_string());
        }
        Some(names)
    }
}

/// The closest candidate within a small edit distance, if any.
pub fn suggest<'c>(word: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    // Bounded work however large the document: suggestions are a courtesy.
    if word.len() > 64 {
        return None;
    }
    let candidates = candidates.take(256);
    let lower = word.to_lowercase();
    let budget = (word.chars().count() / 3).max(1);
    candidates
        .map(|c| (edit_distance(&lower, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= budget)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

/// Edit distance counting an adjacent transposition as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// A step id: a DNS label starting with a letter.
fn is_step_id(s: &str) -> bool {
    is_dns_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// `namespace.action` (two or more segments of `[a-z][a-z0-9_-]*`).
fn is_tool_name(s: &str) -> bool {
    let segments: Vec<&str> = s.split('.').collect();
    segments.len() >= 2
        && segments.iter().all(|seg| {
            let b = seg.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_lowercase()
                && b.iter().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-'
                })
        })
}

/// An identifier usable as `inputs.<name>`.
fn is_input_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Kubernetes-style label key: `[prefix/]name`, prefix a DNS subdomain.
fn is_label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns_label));
    let b = name.as_bytes();
    prefix_ok
        && !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

const MAX_LABEL_VALUE: usize = 256;

/// Validates the document, pushing every problem into `out`.
pub(crate) fn validate(root: &Node, limits: &Limits, out: &mut Vec<Violation>) -> Capsule {
    let mut v = V {
        out,
        suggestions: SUGGESTION_BUDGET,
    };
    let mut capsule = Capsule {
        name: String::new(),
        description: String::new(),
        labels: BTreeMap::new(),
        spec: Spec::default(),
        document: Value::Null,
    };
    let Yaml::Map(top) = &root.value else {
        v.err(
            "",
            root.pos,
            format!(
                "a capsule must be a YAML mapping, found {}",
                root.value.kind()
            ),
        );
        return capsule;
    };
    v.known_keys(top, "", &["apiVersion", "kind", "metadata", "spec"]);
    for (key, want) in [("apiVersion", API_VERSION), ("kind", KIND)] {
        if let Some(node) = v.required(top, root, "", key)
            && let Some(s) = v.string(node, key)
            && s != want
        {
            v.err(
                key,
                node.pos,
                format!("unsupported {key} \"{s}\"; expected \"{want}\""),
            );
        }
    }
    if let Some(meta) = v.required(top, root, "", "metadata") {
        metadata(&mut v, meta, &mut capsule);
    }
    if let Some(spec) = v.required(top, root, "", "spec") {
        capsule.spec = self::spec(&mut v, spec, limits);
    }
    capsule
}

fn metadata(v: &mut V<'_>, node: &Node, capsule: &mut Capsule) {
    let path = "metadata";
    let Some(entries) = v.mapping(node, path) else {
        return;
    };
    v.known_keys(entries, path, &["name", "description", "labels"]);
    if let Some(n) = v.required(entries, node, path, "name")
        && let Some(name) = v.string(n, "metadata.name")
    {
        if !is_dns_label(name) {
            v.err(
                    "metadata.name",
                    n.pos,
                    format!(
                        "invalid name \"{name}\": must be a DNS label (lowercase letters, digits \
                         and '-', starting and ending with a letter or digit, at most 63 characters)"
                    ),
                );
        }
        capsule.name = name.to_string();
    }
    if let Some(d) = get(entries, "description")
        && let Some(d) = v.string(d, "metadata.description")
    {
        capsule.description = d.to_string();
    }
    if let Some(labels) = get(entries, "labels") {
        let lpath = "metadata.labels";
        if let Some(items) = v.mapping(labels, lpath) {
            for e in items {
                let p = join(lpath, &e.key);
                if !is_label_key(&e.key) {
                    v.err(
                        &p,
                        e.key_pos,
                        format!(
                            "invalid label key \"{}\": expected [prefix/]name, name at most 63 \
                             of [A-Za-z0-9-_.] starting and ending alphanumeric",
                            e.key
                        ),
                    );
                }
                if let Some(value) = v.string(&e.value, &p) {
                    if value.chars().count() > MAX_LABEL_VALUE {
                        v.err(
                            &p,
                            e.value.pos,
                            format!("label value is longer than {MAX_LABEL_VALUE} characters"),
                        );
                    }
                    capsule.labels.insert(e.key.clone(), value.to_string());
                }
            }
        }
    }
}

fn spec(v: &mut V<'_>, node: &Node, limits: &Limits) -> Spec {
    let path = "spec";
    let mut spec = Spec::default();
    let Some(entries) = v.mapping(node, path) else {
        return spec;
    };
    v.known_keys(entries, path, &["inputs", "tools", "policies", "steps"]);
    if let Some(inputs) = get(entries, "inputs")
        && let Some(items) = v.mapping(inputs, "spec.inputs")
    {
        for e in items {
            let p = join("spec.inputs", &e.key);
            if !is_input_name(&e.key) {
                v.err(
                        &p,
                        e.key_pos,
                        format!(
                            "invalid input name \"{}\": expected an identifier ([A-Za-z_][A-Za-z0-9_]*)",
                            e.key
                        ),
                    );
            }
            if let Some(input) = input_spec(v, e, &p) {
                spec.inputs.insert(e.key.clone(), input);
            }
        }
    }
    let tools = v.required(entries, node, path, "tools").and_then(|t| {
        v.name_list(
            t,
            "spec.tools",
            "tool",
            is_tool_name,
            "expected a dotted name like `http.get` (lowercase segments)",
        )
    });
    spec.tools = tools.clone().unwrap_or_default();
    if let Some(p) = get(entries, "policies") {
        spec.policies = v
            .name_list(
                p,
                "spec.policies",
                "policy",
                is_dns_label,
                "expected a DNS label like `refund-limits`",
            )
            .unwrap_or_default();
    }
    // Inputs that exist by name, even if their schema has problems.
    let input_names: HashSet<&str> = get(entries, "inputs")
        .and_then(|n| match &n.value {
            Yaml::Map(items) => Some(items.iter().map(|e| e.key.as_str()).collect()),
            _ => None,
        })
        .unwrap_or_default();
    if let Some(steps) = v.required(entries, node, path, "steps") {
        spec.steps = self::steps(v, steps, tools.as_deref(), &input_names, limits);
    }
    spec
}

fn input_spec(v: &mut V<'_>, entry: &Entry, path: &str) -> Option<InputSpec> {
    let node = &entry.value;
    let entries = v.mapping(node, path)?;
    v.known_keys(
        entries,
        path,
        &[
            "type",
            "required",
            "enum",
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
            "pattern",
            "default",
            "description",
        ],
    );
    let ty_node = v.required(entries, node, path, "type");
    let ty = ty_node.and_then(|t| {
        let p = join(path, "type");
        let name = v.string(t, &p)?;
        let ty = InputType::from_name(name);
        if ty.is_none() {
            let names = ["string", "integer", "number", "boolean", "object", "array"];
            let hint = v
                .suggest(name, names.into_iter())
                .map(|s| format!("did you mean \"{s}\"? "))
                .unwrap_or_default();
            v.err(
                &p,
                t.pos,
                format!(
                    "unknown type \"{name}\"; {hint}expected one of: {}",
                    names.join(", ")
                ),
            );
        }
        ty
    });
    let mut spec = InputSpec {
        ty: ty.unwrap_or(InputType::String),
        required: false,
        enum_values: None,
        minimum: None,
        maximum: None,
        min_length: None,
        max_length: None,
        pattern: None,
        default: None,
        description: None,
        position: entry.key_pos,
    };
    let numeric = matches!(ty, Some(InputType::Integer | InputType::Number));
    let stringy = matches!(ty, Some(InputType::String));
    let only = |v: &mut V<'_>, key: &str, ok: bool, what: &str| {
        if let (Some(n), Some(t)) = (get(entries, key), ty)
            && !ok
        {
            v.err(
                join(path, key),
                n.pos,
                format!("`{key}` applies only to {what} inputs, not {}", t.name()),
            );
        }
    };
    only(v, "minimum", numeric, "integer and number");
    only(v, "maximum", numeric, "integer and number");
    only(v, "minLength", stringy, "string");
    only(v, "maxLength", stringy, "string");
    only(v, "pattern", stringy, "string");

    if let Some(n) = get(entries, "required") {
        spec.required = v.boolean(n, &join(path, "required")).unwrap_or(false);
    }
    if let Some(n) = get(entries, "description") {
        spec.description = v.string(n, &join(path, "description")).map(str::to_string);
    }
    if let Some(n) = get(entries, "minimum") {
        spec.minimum = v.number(n, &join(path, "minimum"));
    }
    if let Some(n) = get(entries, "maximum") {
        spec.maximum = v.number(n, &join(path, "maximum"));
        if let (Some(lo), Some(hi)) = (spec.minimum, spec.maximum)
            && lo > hi
        {
            v.err(join(path, "maximum"), n.pos, "maximum is less than minimum");
        }
    }
    if let Some(n) = get(entries, "minLength") {
        spec.min_length = v.unsigned(n, &join(path, "minLength"));
    }
    if let Some(n) = get(entries, "maxLength") {
        spec.max_length = v.unsigned(n, &join(path, "maxLength"));
        if let (Some(lo), Some(hi)) = (spec.min_length, spec.max_length)
            && lo > hi
        {
            v.err(
                join(path, "maxLength"),
                n.pos,
                "maxLength is less than minLength",
            );
        }
    }
    let mut regex = None;
    if let Some(n) = get(entries, "pattern") {
        let p = join(path, "pattern");
        if let Some(pattern) = v.string(n, &p) {
            match RegexBuilder::new(pattern).size_limit(1 << 20).build() {
                Ok(r) => regex = Some(r),
                Err(e) => v.err(&p, n.pos, format!("pattern does not compile: {e}")),
            }
            spec.pattern = Some(pattern.to_string());
        }
    }
    // A value of the declared type within the constraints, or why not.
    let check = |spec: &InputSpec, value: &Value| -> Option<String> {
        let t = ty?;
        if !t.matches(value) {
            return Some(format!("expected a value of type {}", t.name()));
        }
        if let Some(x) = value.as_f64() {
            if spec.minimum.is_some_and(|m| x < m) {
                return Some(format!("{x} is less than minimum"));
            }
            if spec.maximum.is_some_and(|m| x > m) {
                return Some(format!("{x} is greater than maximum"));
            }
        }
        if let Some(s) = value.as_str() {
            let len = s.chars().count() as u64;
            if spec.min_length.is_some_and(|m| len < m) {
                return Some("shorter than minLength".to_string());
            }
            if spec.max_length.is_some_and(|m| len > m) {
                return Some("longer than maxLength".to_string());
            }
            if regex.as_ref().is_some_and(|r| !r.is_match(s)) {
                return Some("does not match pattern".to_string());
            }
        }
        None
    };
    if let Some(n) = get(entries, "enum") {
        let p = join(path, "enum");
        if let Some(items) = v.sequence(n, &p) {
            if items.is_empty() {
                v.err(&p, n.pos, "enum must list at least one value");
            }
            let mut values: Vec<Value> = Vec::new();
            let mut seen = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                let value = item.to_json();
                if let Some(why) = check(&spec, &value) {
                    v.err(index(&p, i), item.pos, format!("enum value: {why}"));
                } else if !seen.insert(value.to_string()) {
                    v.err(index(&p, i), item.pos, "duplicate enum value");
                }
                values.push(value);
            }
            spec.enum_values = Some(values);
        }
    }
    if let Some(n) = get(entries, "default") {
        let value = n.to_json();
        let why = check(&spec, &value).or_else(|| {
            spec.enum_values
                .as_ref()
                .filter(|e| !e.contains(&value))
                .map(|_| "not one of the enum values".to_string())
        });
        if let Some(why) = why {
            v.err(
                join(path, "default"),
                n.pos,
                format!("invalid default: {why}"),
            );
        }
        spec.default = Some(value);
    }
    Some(spec)
}

/// A string in `if` or `with` to check for expression references.
struct ExprSite<'a> {
    text: &'a str,
    path: String,
    pos: Pos,
}

struct StepInfo<'a> {
    path: String,
    /// Valid `needs` entries: (target step index, entry path, entry position).
    needs: Vec<(usize, String, Pos)>,
    sites: Vec<ExprSite<'a>>,
}

fn steps(
    v: &mut V<'_>,
    node: &Node,
    tools: Option<&[String]>,
    input_names: &HashSet<&str>,
    limits: &Limits,
) -> Vec<Step> {
    let path = "spec.steps";
    let Some(items) = v.sequence(node, path) else {
        return Vec::new();
    };
    if items.is_empty() {
        v.err(path, node.pos, "a capsule needs at least one step");
        return Vec::new();
    }
    if items.len() > limits.max_steps {
        v.err(
            path,
            node.pos,
            format!("{} steps; the limit is {}", items.len(), limits.max_steps),
        );
        return Vec::new();
    }

    // Pass 1: ids, so `needs` and references can be resolved in any order.
    let mut ids: HashMap<String, (usize, Pos)> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let Yaml::Map(entries) = &item.value else {
            continue;
        };
        let Some(id_node) = get(entries, "id") else {
            continue;
        };
        let Yaml::Str(id) = &id_node.value else {
            continue;
        };
        let p = join(&index(path, i), "id");
        if !is_step_id(id) {
            v.err(
                &p,
                id_node.pos,
                format!(
                    "invalid step id \"{id}\": lowercase letters, digits and '-', starting with \
                     a letter, not ending with '-', at most 63 characters"
                ),
            );
        }
        match ids.get(id.as_str()) {
            Some((_, first)) => v.err(
                &p,
                id_node.pos,
                format!(
                    "duplicate step id \"{id}\" (first defined at line {})",
                    first.0
                ),
            ),
            None => {
                ids.insert(id.clone(), (i, id_node.pos));
            }
        }
    }

    // Pass 2: each step on its own.
    let mut steps = Vec::with_capacity(items.len());
    let mut infos = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let spath = index(path, i);
        let mut info = StepInfo {
            path: spath.clone(),
            needs: Vec::new(),
            sites: Vec::new(),
        };
        let mut step = Step {
            id: String::new(),
            tool: String::new(),
            needs: Vec::new(),
            condition: None,
            with: Value::Object(serde_json::Map::new()),
            timeout: None,
            retry: None,
            compensate: None,
            position: item.pos,
        };
        if let Some(entries) = v.mapping(item, &spath) {
            one_step(v, item, entries, &spath, tools, &ids, &mut step, &mut info);
        }
        steps.push(step);
        infos.push(info);
    }

    cycles(v, &steps, &infos);
    references(v, &steps, &infos, &ids, input_names);
    steps
}

#[allow(clippy::too_many_arguments)]
fn one_step<'a>(
    v: &mut V<'_>,
    item: &Node,
    entries: &'a [Entry],
    spath: &str,
    tools: Option<&[String]>,
    ids: &HashMap<String, (usize, Pos)>,
    step: &mut Step,
    info: &mut StepInfo<'a>,
) {
    v.known_keys(
        entries,
        spath,
        &[
            "id",
            "tool",
            "needs",
            "if",
            "with",
            "timeout",
            "retry",
            "compensate",
        ],
    );
    if let Some(n) = v.required(entries, item, spath, "id")
        && let Some(id) = v.string(n, &join(spath, "id"))
    {
        step.id = id.to_string();
    }
    if let Some(n) = v.required(entries, item, spath, "tool") {
        let p = join(spath, "tool");
        if let Some(tool) = v.string(n, &p) {
            if let Some(tools) = tools
                && !tools.iter().any(|t| t == tool)
            {
                let hint = v
                    .suggest(tool, tools.iter().map(String::as_str))
                    .map(|s| format!("; did you mean \"{s}\"?"))
                    .unwrap_or_default();
                v.err(
                    &p,
                    n.pos,
                    format!("tool \"{tool}\" is not in spec.tools{hint}"),
                );
            }
            step.tool = tool.to_string();
        }
    }
    if let Some(n) = get(entries, "needs") {
        let p = join(spath, "needs");
        if let Some(needs) = v.sequence(n, &p) {
            let mut seen = HashSet::new();
            for (j, need) in needs.iter().enumerate() {
                let np = index(&p, j);
                let Some(name) = v.string(need, &np) else {
                    continue;
                };
                step.needs.push(name.to_string());
                if !seen.insert(name) {
                    v.err(&np, need.pos, format!("\"{name}\" is listed twice"));
                    continue;
                }
                match ids.get(name) {
                    Some((target, _)) => info.needs.push((*target, np, need.pos)),
                    None => {
                        let hint = v
                            .suggest(name, ids.keys().map(String::as_str))
                            .map(|s| format!("; did you mean \"{s}\"?"))
                            .unwrap_or_default();
                        v.err(
                            &np,
                            need.pos,
                            format!("needs unknown step \"{name}\"{hint}"),
                        );
                    }
                }
            }
        }
    }
    if let Some(n) = get(entries, "if") {
        let p = join(spath, "if");
        if let Some(cond) = v.string(n, &p) {
            let trimmed = cond.trim();
            let single = match expr::find_expressions(trimmed) {
                Ok(found) => {
                    found.len() == 1 && found[0].start == 0 && found[0].end == trimmed.len()
                }
                // Reported with the other expression problems.
                Err(_) => true,
            };
            if !single {
                v.err(&p, n.pos, "`if` must be a single `${{ … }}` expression");
            }
            step.condition = Some(cond.to_string());
            info.sites.push(ExprSite {
                text: cond,
                path: p,
                pos: n.pos,
            });
        }
    }
    if let Some(n) = get(entries, "with") {
        let p = join(spath, "with");
        if v.mapping(n, &p).is_some() {
            step.with = n.to_json();
            collect_strings(n, &p, &mut info.sites);
        }
    }
    if let Some(n) = get(entries, "timeout") {
        step.timeout = duration(v, n, &join(spath, "timeout"));
    }
    if let Some(n) = get(entries, "retry") {
        step.retry = retry(v, n, &join(spath, "retry"));
    }
    if let Some(n) = get(entries, "compensate") {
        step.compensate = compensate(v, n, &join(spath, "compensate"), tools, &mut info.sites);
    }
}

fn compensate<'a>(
    v: &mut V<'_>,
    node: &'a Node,
    path: &str,
    tools: Option<&[String]>,
    sites: &mut Vec<ExprSite<'a>>,
) -> Option<Compensation> {
    let entries = v.mapping(node, path)?;
    v.known_keys(entries, path, &["tool", "with", "timeout"]);
    let mut c = Compensation {
        tool: String::new(),
        with: Value::Object(serde_json::Map::new()),
        timeout: None,
    };
    if let Some(n) = v.required(entries, node, path, "tool") {
        let p = join(path, "tool");
        if let Some(tool) = v.string(n, &p) {
            if let Some(tools) = tools
                && !tools.iter().any(|t| t == tool)
            {
                v.err(&p, n.pos, format!("tool \"{tool}\" is not in spec.tools"));
            }
            c.tool = tool.to_string();
        }
    }
    if let Some(n) = get(entries, "with") {
        let p = join(path, "with");
        if v.mapping(n, &p).is_some() {
            c.with = n.to_json();
            collect_strings(n, &p, sites);
        }
    }
    if let Some(n) = get(entries, "timeout") {
        c.timeout = duration(v, n, &join(path, "timeout"));
    }
    Some(c)
}

fn collect_strings<'a>(node: &'a Node, path: &str, out: &mut Vec<ExprSite<'a>>) {
    match &node.value {
        Yaml::Str(s) => out.push(ExprSite {
            text: s,
            path: path.to_string(),
            pos: node.pos,
        }),
        Yaml::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                collect_strings(item, &index(path, i), out);
            }
        }
        Yaml::Map(entries) => {
            for e in entries {
                collect_strings(&e.value, &join(path, &e.key), out);
            }
        }
        _ => {}
    }
}

fn duration(v: &mut V<'_>, node: &Node, path: &str) -> Option<std::time::Duration> {
    let Yaml::Str(s) = &node.value else {
        v.err(
            path,
            node.pos,
            format!(
                "expected a duration string like 10s, found {}",
                node.value.kind()
            ),
        );
        return None;
    };
    match parse_duration(s) {
        Ok(d) => Some(d),
        Err(msg) => {
            v.err(path, node.pos, msg);
            None
        }
    }
}

fn retry(v: &mut V<'_>, node: &Node, path: &str) -> Option<Retry> {
    let entries = v.mapping(node, path)?;
    v.known_keys(
        entries,
        path,
        &["max_attempts", "backoff", "initial", "max"],
    );
    let mut retry = Retry {
        max_attempts: 1,
        backoff: Backoff::Fixed,
        initial: None,
        max: None,
    };
    if let Some(n) = v.required(entries, node, path, "max_attempts") {
        let p = join(path, "max_attempts");
        match &n.value {
            Yaml::Number(x) if x.as_u64().is_some_and(|a| (1..=20).contains(&a)) => {
                retry.max_attempts = x.as_u64().and_then(|a| u32::try_from(a).ok()).unwrap_or(1);
            }
            _ => v.err(
                p,
                n.pos,
                format!(
                    "max_attempts must be an integer from 1 to 20, found {}",
                    match &n.value {
                        Yaml::Number(x) => x.to_string(),
                        other => other.kind().to_string(),
                    }
                ),
            ),
        }
    }
    if let Some(n) = get(entries, "backoff") {
        let p = join(path, "backoff");
        if let Some(b) = v.string(n, &p) {
            match b {
                "fixed" => retry.backoff = Backoff::Fixed,
                "exponential" => retry.backoff = Backoff::Exponential,
                other => {
                    let hint = v
                        .suggest(other, ["fixed", "exponential"].into_iter())
                        .map(|s| format!("did you mean \"{s}\"? "))
                        .unwrap_or_default();
                    v.err(
                        &p,
                        n.pos,
                        format!("unknown backoff \"{other}\"; {hint}expected fixed or exponential"),
                    );
                }
            }
        }
    }
    if let Some(n) = get(entries, "initial") {
        retry.initial = duration(v, n, &join(path, "initial"));
    }
    if let Some(n) = get(entries, "max") {
        retry.max = duration(v, n, &join(path, "max"));
        if let (Some(lo), Some(hi)) = (retry.initial, retry.max)
            && lo > hi
        {
            v.err(join(path, "max"), n.pos, "max is shorter than initial");
        }
    }
    Some(retry)
}

/// Reports each cycle in `needs` once, as `a -> b -> a`, at the entry closing it.
fn cycles(v: &mut V<'_>, steps: &[Step], infos: &[StepInfo<'_>]) {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    let mut marks = vec![Mark::New; infos.len()];
    for start in 0..infos.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Iterative DFS: (node, next edge to follow).
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::Active;
        while let Some(top) = stack.last_mut() {
            let node = top.0;
            let Some((target, npath, npos)) = infos[node].needs.get(top.1) else {
                marks[node] = Mark::Done;
                stack.pop();
                continue;
            };
            top.1 += 1;
            match marks[*target] {
                Mark::New => {
                    marks[*target] = Mark::Active;
                    stack.push((*target, 0));
                }
                Mark::Active => {
                    let from = stack.iter().position(|(n, _)| n == target).unwrap_or(0);
                    let mut names: Vec<&str> = stack[from..]
                        .iter()
                        .map(|(n, _)| steps[*n].id.as_str())
                        .collect();
                    names.push(steps[*target].id.as_str());
                    v.err(
                        npath,
                        *npos,
                        format!("needs form a cycle: {}", names.join(" -> ")),
                    );
                }
                Mark::Done => {}
            }
        }
    }
}

/// Steps reachable from `i` through `needs`.
fn upstream(i: usize, infos: &[StepInfo<'_>]) -> HashSet<usize> {
    let mut seen = HashSet::new();
    let mut todo: Vec<usize> = infos[i].needs.iter().map(|n| n.0).collect();
    while let Some(j) = todo.pop() {
        if seen.insert(j) {
            todo.extend(infos[j].needs.iter().map(|n| n.0));
        }
    }
    seen
}

fn references(
    v: &mut V<'_>,
    steps: &[Step],
    infos: &[StepInfo<'_>],
    ids: &HashMap<String, (usize, Pos)>,
    input_names: &HashSet<&str>,
) {
    for (i, info) in infos.iter().enumerate() {
        let mut ancestors: Option<HashSet<usize>> = None;
        // A compensation runs after its step succeeded: it may read the
        // step's own output.
        let comp_prefix = join(&info.path, "compensate");
        for site in &info.sites {
            let own_ok = site.path.starts_with(&comp_prefix);
            let found = match expr::find_expressions(site.text) {
                Ok(found) => found,
                Err(e) => {
                    v.err(&site.path, site.pos, e.to_string());
                    continue;
                }
            };
            for e in &found {
                let before = v.out.len();
                for reference in expr::references(e.body) {
                    match reference {
                        Reference::Input(name) => {
                            if !input_names.contains(name.as_str()) {
                                let hint = v
                                    .suggest(&name, input_names.iter().copied())
                                    .map(|s| format!("; did you mean \"{s}\"?"))
                                    .unwrap_or_default();
                                v.err(
                                    &site.path,
                                    site.pos,
                                    format!("unknown input \"{name}\" in expression{hint}"),
                                );
                            }
                        }
                        Reference::Step { id, .. } => match ids.get(&id) {
                            None => {
                                let hint = v
                                    .suggest(&id, ids.keys().map(String::as_str))
                                    .map(|s| format!("; did you mean \"{s}\"?"))
                                    .unwrap_or_default();
                                v.err(
                                    &site.path,
                                    site.pos,
                                    format!("unknown step \"{id}\" in expression{hint}"),
                                );
                            }
                            Some((j, _)) if *j == i && own_ok => {}
                            Some((j, _)) if *j == i => v.err(
                                &site.path,
                                site.pos,
                                format!("step \"{id}\" cannot reference its own output"),
                            ),
                            Some((j, _)) => {
                                let up = ancestors.get_or_insert_with(|| upstream(i, infos));
                                if !up.contains(j) {
                                    let me = steps[i].id.as_str();
                                    v.err(
                                        &site.path,
                                        site.pos,
                                        format!(
                                            "step \"{id}\" is not upstream of \"{me}\"; add it to \
                                         {}.needs (directly or through another step)",
                                            info.path
                                        ),
                                    );
                                }
                            }
                        },
                    }
                }
                // References are fine: the expression language itself checks
                // syntax, functions and visible types (the same checker the
                // compiler and the policy DSL use).
                if v.out.len() == before {
                    let up = ancestors.get_or_insert_with(|| upstream(i, infos));
                    let mut upstream_ids: Vec<&str> =
                        up.iter().map(|&j| steps[j].id.as_str()).collect();
                    if own_ok {
                        upstream_ids.push(steps[i].id.as_str());
                    }
                    let known: Vec<&str> = ids.keys().map(String::as_str).collect();
                    let inputs: Vec<&str> = input_names.iter().copied().collect();
                    let scope = anumate_policy::TemplateScope {
                        inputs: &inputs,
                        steps_upstream: &upstream_ids,
                        steps_known: &known,
                    };
                    for problem in anumate_policy::check_template_expr(e.body, &scope) {
                        let at = problem
                            .position
                            .map(|(l, c)| format!(" (at {l}:{c} of `{}`)", e.body))
                            .unwrap_or_default();
                        v.err(&site.path, site.pos, format!("{}{at}", problem.description));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        let keys = ["apiVersion", "kind", "metadata", "spec"];
        assert_eq!(suggest("metdata", keys.into_iter()), Some("metadata"));
        assert_eq!(suggest("apiversion", keys.into_iter()), Some("apiVersion"));
        assert_eq!(suggest("zzz", keys.into_iter()), None);
        assert_eq!(
            suggest("retyr", ["retry", "with"].into_iter()),
            Some("retry")
        );
    }

    #[test]
    fn name_rules() {
        assert!(is_dns_label("refund-small-orders"));
        assert!(!is_dns_label("Refund"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_step_id("fetch-order"));
        assert!(!is_step_id("1st"));
        assert!(is_tool_name("http.get"));
        assert!(is_tool_name("payments.refund_v2"));
        assert!(!is_tool_name("http"));
        assert!(!is_tool_name("http..get"));
        assert!(!is_tool_name("Http.get"));
        assert!(is_label_key("team"));
        assert!(is_label_key("app.kubernetes.io/name"));
        assert!(!is_label_key("bad key"));
        assert!(!is_label_key("/x"));
        assert!(is_input_name("order_id"));
        assert!(!is_input_name("order-id"));
    }
}
