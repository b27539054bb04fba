//! Validation of one loaded document against the Tool schema.
//!
//! Every check reports into one list and carries on, so a caller sees all
//! problems at once; the typed [`Tool`] is only returned when nothing was
//! reported for it.

use std::collections::BTreeMap;
use std::time::Duration;

use anumate_capsule::expr::{ExprError, find_expressions};
use anumate_capsule::yaml::{Checks, Entry, Node, Pos, Yaml, get, index, join};
use anumate_errors::Violation;
use serde_json::Value;

use crate::{
    API_VERSION, Connector, Cost, HttpSpec, KIND, MOCK_FAIL_CODES, McpSpec, Metadata, MockFail,
    MockSpec, SideEffect, Tool, ToolSpec, is_tool_name,
};

const TOP: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const METADATA: &[&str] = &["name", "description", "labels"];
const SPEC: &[&str] = &[
    "connector",
    "side_effect",
    "idempotent",
    "input",
    "output",
    "cost",
    "typical_duration",
    "http",
    "mock",
    "mcp",
];
const COST: &[&str] = &["micros", "currency"];
const HTTP: &[&str] = &[
    "method",
    "url",
    "allowed_hosts",
    "headers",
    "body",
    "timeout",
    "max_response_bytes",
    "allow_private",
];
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"];
const MOCK: &[&str] = &["output", "latency", "fail"];
const FAIL: &[&str] = &["times", "code"];
const MCP: &[&str] = &["server", "tool"];
/// Most scripted failures of a mock tool.
const MAX_FAIL_TIMES: u64 = 1000;

struct V<'o> {
    out: &'o mut Vec<Violation>,
}

impl Checks for V<'_> {
    fn violations(&mut self) -> &mut Vec<Violation> {
        self.out
    }
}

impl V<'_> {
    fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let s = self.string(node, path)?;
        match anumate_capsule::parse_duration(s) {
            Ok(d) => Some(d),
            Err(msg) => {
                self.err(path, node.pos, msg);
                None
            }
        }
    }

    /// Reports keys not in `allowed`, suggesting a close one.
    fn known_keys(&mut self, entries: &[Entry], path: &str, allowed: &[&str]) {
        for e in entries {
            if allowed.contains(&e.key.as_str()) {
                continue;
            }
            let msg = match anumate_capsule::suggest(&e.key, allowed.iter().copied()) {
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

    /// A mapping of strings to strings.
    fn string_map(&mut self, node: &Node, path: &str) -> Option<BTreeMap<String, String>> {
        let entries = self.mapping(node, path)?;
        let mut out = BTreeMap::new();
        for e in entries {
            if let Some(v) = self.string(&e.value, &join(path, &e.key)) {
                out.insert(e.key.clone(), v.to_owned());
            }
        }
        Some(out)
    }
}

/// Validates one document; `None` when it has problems (all reported).
pub(crate) fn validate(root: &Node, out: &mut Vec<Violation>) -> Option<Tool> {
    let before = out.len();
    let mut v = V { out };
    let top = v.mapping(root, "")?;
    v.known_keys(top, "", TOP);
    if let Some(n) = v.required(top, root, "", "apiVersion")
        && let Some(s) = v.string(n, "apiVersion")
        && s != API_VERSION
    {
        v.err(
            "apiVersion",
            n.pos,
            format!("apiVersion must be \"{API_VERSION}\", found \"{s}\""),
        );
    }
    if let Some(n) = v.required(top, root, "", "kind")
        && let Some(s) = v.string(n, "kind")
        && s != KIND
    {
        v.err(
            "kind",
            n.pos,
            format!("kind must be \"{KIND}\" in a tool file, found \"{s}\""),
        );
    }
    let metadata = v
        .required(top, root, "", "metadata")
        .and_then(|n| metadata(&mut v, n));
    let spec = v
        .required(top, root, "", "spec")
        .and_then(|n| spec(&mut v, n));
    expressions(&mut v, root, "");
    if v.out.len() > before {
        return None;
    }
    Some(Tool {
        api_version: API_VERSION.into(),
        kind: KIND.into(),
        metadata: metadata?,
        spec: spec?,
    })
}

fn metadata(v: &mut V<'_>, node: &Node) -> Option<Metadata> {
    let entries = v.mapping(node, "metadata")?;
    v.known_keys(entries, "metadata", METADATA);
    let mut m = Metadata::default();
    if let Some(n) = v.required(entries, node, "metadata", "name")
        && let Some(name) = v.string(n, "metadata.name")
    {
        if !is_tool_name(name) {
            v.err(
                "metadata.name",
                n.pos,
                format!(
                    "invalid tool name \"{name}\": two or more dot-separated segments of \
                     lowercase letters, digits, '_' and '-', each starting with a letter \
                     (e.g. payments.refund), at most {} characters",
                    crate::MAX_NAME_LEN
                ),
            );
        }
        m.name = name.to_owned();
    }
    if let Some(n) = get(entries, "description") {
        m.description = v.string(n, "metadata.description")?.to_owned();
    }
    if let Some(n) = get(entries, "labels") {
        m.labels = v.string_map(n, "metadata.labels")?;
    }
    Some(m)
}

fn spec(v: &mut V<'_>, node: &Node) -> Option<ToolSpec> {
    let path = "spec";
    let entries = v.mapping(node, path)?;
    v.known_keys(entries, path, SPEC);
    let connector = v.required(entries, node, path, "connector").and_then(|n| {
        let s = v.string(n, "spec.connector")?;
        let c = Connector::parse(s);
        if c.is_none() {
            v.err(
                "spec.connector",
                n.pos,
                format!("unknown connector \"{s}\": expected http, mock or mcp:<server>"),
            );
        }
        c
    });
    let side_effect = v
        .required(entries, node, path, "side_effect")
        .and_then(|n| {
            let s = v.string(n, "spec.side_effect")?;
            let e = SideEffect::parse(s);
            if e.is_none() {
                v.err(
                    "spec.side_effect",
                    n.pos,
                    format!("unknown side_effect \"{s}\": expected read, write or destructive"),
                );
            }
            e
        });
    let idempotent = match get(entries, "idempotent") {
        Some(n) => v.boolean(n, "spec.idempotent"),
        None => Some(false),
    };
    let input = schema(v, get(entries, "input"), "spec.input", true);
    let output = schema(v, get(entries, "output"), "spec.output", false);
    let cost = get(entries, "cost").map(|n| cost(v, n));
    let typical_duration =
        get(entries, "typical_duration").map(|n| v.duration(n, "spec.typical_duration"));
    let http = get(entries, "http").map(|n| http(v, n));
    let mock = get(entries, "mock").map(|n| mock(v, n));
    let mcp = get(entries, "mcp").map(|n| mcp(v, n, connector.as_ref()));

    // The connector in use needs its section.
    if let Some(c) = &connector {
        let (key, present) = match c {
            Connector::Http => ("http", http.is_some()),
            Connector::Mock => ("mock", mock.is_some()),
            Connector::Mcp(_) => ("mcp", mcp.is_some()),
        };
        if !present {
            v.err(
                join(path, key),
                node.pos,
                format!("connector {} needs a \"{key}\" section", c.as_string()),
            );
        }
    }
    Some(ToolSpec {
        connector: connector?,
        side_effect: side_effect?,
        idempotent: idempotent?,
        input: input?,
        output: output?,
        cost: cost.transpose_opt()?,
        typical_duration: typical_duration.transpose_opt()?,
        http: http.transpose_opt()?,
        mock: mock.transpose_opt()?,
        mcp: mcp.transpose_opt()?,
    })
}

/// `Option<Option<T>>` of an optional section: `None` absent, `Some(None)`
/// invalid (already reported), `Some(Some(t))` valid.
trait TransposeOpt<T> {
    /// `Some(None)` when absent, `None` when invalid, `Some(Some(t))` when valid.
    fn transpose_opt(self) -> Option<Option<T>>;
}

impl<T> TransposeOpt<T> for Option<Option<T>> {
    fn transpose_opt(self) -> Option<Option<T>> {
        match self {
            None => Some(None),
            Some(None) => None,
            Some(Some(t)) => Some(Some(t)),
        }
    }
}

/// A JSON Schema: a mapping that compiles. The input schema describes the
/// arguments, an object.
fn schema(v: &mut V<'_>, node: Option<&Node>, path: &str, input: bool) -> Option<Value> {
    let Some(node) = node else {
        return Some(crate::any_object());
    };
    v.mapping(node, path)?;
    let value = node.to_json();
    if input
        && let Some(ty) = value.get("type")
        && ty != "object"
    {
        v.err(
            join(path, "type"),
            position_of(node, "/type"),
            format!("the input schema describes the arguments, an object; found type {ty}"),
        );
        return None;
    }
    if let Err(e) = jsonschema::meta::validate(&value) {
        let pointer = e.instance_path().to_string();
        v.err(
            format!("{path}{}", pointer_path(&pointer)),
            position_of(node, &pointer),
            format!("not a valid JSON Schema: {e}"),
        );
        return None;
    }
    if let Err(e) = jsonschema::validator_for(&value) {
        let pointer = e.instance_path().to_string();
        v.err(
            format!("{path}{}", pointer_path(&pointer)),
            position_of(node, &pointer),
            format!("JSON Schema does not compile: {e}"),
        );
        return None;
    }
    Some(value)
}

/// A JSON Pointer (`/properties/a/0`) as a document path suffix (`.properties.a[0]`).
fn pointer_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        match seg.parse::<usize>() {
            Ok(i) => out = index(&out, i),
            Err(_) => {
                out = if out.is_empty() {
                    format!(".{}", join("", &seg))
                } else {
                    join(&out, &seg)
                }
            }
        }
    }
    out
}

/// The position of the node a JSON Pointer names under `node` (the deepest
/// one found).
fn position_of(node: &Node, pointer: &str) -> Pos {
    let mut at = node;
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        let next = match &at.value {
            Yaml::Map(entries) => entries.iter().find(|e| e.key == seg).map(|e| &e.value),
            Yaml::Seq(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(n) => at = n,
            None => break,
        }
    }
    at.pos
}

fn cost(v: &mut V<'_>, node: &Node) -> Option<Cost> {
    let path = "spec.cost";
    let entries = v.mapping(node, path)?;
    v.known_keys(entries, path, COST);
    let micros = v
        .required(entries, node, path, "micros")
        .and_then(|n| v.unsigned(n, "spec.cost.micros"))
        .and_then(|m| i64::try_from(m).ok());
    let currency = v.required(entries, node, path, "currency").and_then(|n| {
        let s = v.string(n, "spec.cost.currency")?;
        if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) {
            Some(s.to_owned())
        } else {
            v.err(
                "spec.cost.currency",
                n.pos,
                format!(
                    "\"{s}\" is not an ISO 4217 currency code (three capital letters, e.g. USD)"
                ),
            );
            None
        }
    });
    Some(Cost {
        micros: micros?,
        currency: currency?,
    })
}

fn http(v: &mut V<'_>, node: &Node) -> Option<HttpSpec> {
    let path = "spec.http";
    let entries = v.mapping(node, path)?;
    v.known_keys(entries, path, HTTP);
    let method = v.required(entries, node, path, "method").and_then(|n| {
        let s = v.string(n, "spec.http.method")?;
        if METHODS.contains(&s) {
            Some(s.to_owned())
        } else {
            v.err(
                "spec.http.method",
                n.pos,
                format!(
                    "unknown method \"{s}\": expected one of {}",
                    METHODS.join(", ")
                ),
            );
            None
        }
    });
    let url = v
        .required(entries, node, path, "url")
        .and_then(|n| Some((n, v.string(n, "spec.http.url")?)));
    let mut allowed_hosts = Vec::new();
    let mut hosts_ok = true;
    if let Some(n) = get(entries, "allowed_hosts") {
        match &n.value {
            Yaml::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = index("spec.http.allowed_hosts", i);
                    match v.string(item, &p) {
                        Some(h) if is_host(h) => allowed_hosts.push(h.to_owned()),
                        Some(h) => {
                            hosts_ok = false;
                            v.err(
                                p,
                                item.pos,
                                format!("\"{h}\" is not a host name (lowercase, no scheme, port or path; e.g. pay.example)"),
                            );
                        }
                        None => hosts_ok = false,
                    }
                }
            }
            _ => {
                hosts_ok = false;
                v.wrong_type(n, "spec.http.allowed_hosts", "a sequence");
            }
        }
    }
    let url = url.and_then(|(n, url)| {
        let Some(host) = url_host(url) else {
            v.err(
                "spec.http.url",
                n.pos,
                format!("\"{url}\" is not an http:// or https:// URL with a host"),
            );
            return None;
        };
        if host.contains("${{") {
            if allowed_hosts.is_empty() && hosts_ok {
                v.err(
                    "spec.http.url",
                    n.pos,
                    "the URL's host is a template: declare the hosts it may reach in allowed_hosts",
                );
                return None;
            }
        } else if allowed_hosts.is_empty() {
            allowed_hosts.push(host.to_ascii_lowercase());
        } else if !allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            v.err(
                "spec.http.url",
                n.pos,
                format!("the URL's host \"{host}\" is not in allowed_hosts"),
            );
            return None;
        }
        Some(url.to_owned())
    });
    let headers = match get(entries, "headers") {
        Some(n) => v.string_map(n, "spec.http.headers").and_then(|h| {
            let bad: Vec<&String> = h.keys().filter(|k| !is_header_name(k)).collect();
            if bad.is_empty() {
                Some(h)
            } else {
                for k in bad {
                    let pos = position_of(n, &format!("/{k}"));
                    v.err(
                        join("spec.http.headers", k),
                        pos,
                        format!("\"{k}\" is not an HTTP header name"),
                    );
                }
                None
            }
        }),
        None => Some(BTreeMap::new()),
    };
    let body = get(entries, "body").map(Node::to_json);
    let timeout = get(entries, "timeout").map(|n| v.duration(n, "spec.http.timeout"));
    let max_response_bytes = get(entries, "max_response_bytes").map(|n| {
        let b = v.unsigned(n, "spec.http.max_response_bytes")?;
        if b == 0 {
            v.err("spec.http.max_response_bytes", n.pos, "must be at least 1");
            return None;
        }
        Some(b)
    });
    let allow_private = match get(entries, "allow_private") {
        Some(n) => v.boolean(n, "spec.http.allow_private"),
        None => Some(false),
    };
    if !hosts_ok {
        return None;
    }
    Some(HttpSpec {
        method: method?,
        url: url?,
        allowed_hosts,
        headers: headers?,
        body,
        timeout: timeout.transpose_opt()?,
        max_response_bytes: max_response_bytes.transpose_opt()?,
        allow_private: allow_private?,
    })
}

/// The host of an `http(s)://` URL (possibly a template), if it has one.
fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    // A templated host keeps its `${{ … }}` whole.
    let end = if rest.starts_with("${{") {
        rest.find("}}").map_or(rest.len(), |i| i + 2)
    } else {
        rest.find(['/', '?', '#']).unwrap_or(rest.len())
    };
    let authority = &rest[..end];
    let host = if authority.starts_with("${{") {
        authority
    } else {
        let no_user = authority.rsplit('@').next().unwrap_or(authority);
        match no_user.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => no_user.split(':').next().unwrap_or_default(),
        }
    };
    (!host.is_empty()).then_some(host)
}

/// A host name or IP literal as `allowed_hosts` lists it.
fn is_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':')
        })
}

/// An RFC 9110 token.
fn is_header_name(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn mock(v: &mut V<'_>, node: &Node) -> Option<MockSpec> {
    let path = "spec.mock";
    let entries = v.mapping(node, path)?;
    v.known_keys(entries, path, MOCK);
    let output = get(entries, "output").map_or(Value::Null, Node::to_json);
    let latency = get(entries, "latency").map(|n| v.duration(n, "spec.mock.latency"));
    let fail = get(entries, "fail").map(|n| {
        let p = "spec.mock.fail";
        let f = v.mapping(n, p)?;
        v.known_keys(f, p, FAIL);
        let times = v.required(f, n, p, "times").and_then(|t| {
            let times = v.unsigned(t, "spec.mock.fail.times")?;
            if (1..=MAX_FAIL_TIMES).contains(&times) {
                u32::try_from(times).ok()
            } else {
                v.err(
                    "spec.mock.fail.times",
                    t.pos,
                    format!("must be between 1 and {MAX_FAIL_TIMES}"),
                );
                None
            }
        });
        let code = v.required(f, n, p, "code").and_then(|c| {
            let s = v.string(c, "spec.mock.fail.code")?;
            if MOCK_FAIL_CODES.contains(&s) {
                Some(s.to_owned())
            } else {
                let msg = match anumate_capsule::suggest(s, MOCK_FAIL_CODES.iter().copied()) {
                    Some(m) => format!("unknown code \"{s}\"; did you mean \"{m}\"?"),
                    None => format!(
                        "unknown code \"{s}\": expected a gRPC code name such as UNAVAILABLE"
                    ),
                };
                v.err("spec.mock.fail.code", c.pos, msg);
                None
            }
        });
        Some(MockFail {
            times: times?,
            code: code?,
        })
    });
    Some(MockSpec {
        output,
        latency: latency.transpose_opt()?,
        fail: fail.transpose_opt()?,
    })
}

fn mcp(v: &mut V<'_>, node: &Node, connector: Option<&Connector>) -> Option<McpSpec> {
    let path = "spec.mcp";
    let entries = v.mapping(node, path)?;
    v.known_keys(entries, path, MCP);
    let of_connector = match connector {
        Some(Connector::Mcp(server)) => Some(server.as_str()),
        _ => None,
    };
    let server = match get(entries, "server") {
        Some(n) => {
            let s = v.string(n, "spec.mcp.server")?;
            if !anumate_errors::is_dns_label(s) {
                v.err(
                    "spec.mcp.server",
                    n.pos,
                    format!("\"{s}\" is not a server name (a DNS label)"),
                );
                return None;
            }
            if of_connector.is_some_and(|c| c != s) {
                v.err(
                    "spec.mcp.server",
                    n.pos,
                    format!(
                        "server \"{s}\" differs from the connector's (mcp:{})",
                        of_connector.unwrap_or_default()
                    ),
                );
                return None;
            }
            s.to_owned()
        }
        None => match of_connector {
            Some(s) => s.to_owned(),
            None => {
                v.err(
                    "spec.mcp.server",
                    node.pos,
                    "required key \"server\" is missing (the connector is not mcp:<server>)",
                );
                return None;
            }
        },
    };
    let tool = v
        .required(entries, node, path, "tool")
        .and_then(|n| v.string(n, "spec.mcp.tool"))
        .and_then(|t| {
            if t.is_empty() {
                v.err("spec.mcp.tool", node.pos, "must not be empty");
                None
            } else {
                Some(t.to_owned())
            }
        });
    Some(McpSpec {
        server,
        tool: tool?,
    })
}

/// Where `${{ … }}` may appear and what it may say: every expression is
/// well formed; `secrets.NAME` only in the http URL, headers and body.
fn expressions(v: &mut V<'_>, node: &Node, path: &str) {
    match &node.value {
        Yaml::Str(s) => string_expressions(v, s, node.pos, path),
        Yaml::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                expressions(v, item, &index(path, i));
            }
        }
        Yaml::Map(entries) => {
            for e in entries {
                expressions(v, &e.value, &join(path, &e.key));
            }
        }
        Yaml::Null | Yaml::Bool(_) | Yaml::Number(_) => {}
    }
}

/// The paths where the hub resolves secrets.
fn secrets_allowed(path: &str) -> bool {
    path == "spec.http.url"
        || path.starts_with("spec.http.headers.")
        || path.starts_with("spec.http.headers[")
        || path == "spec.http.body"
        || path.starts_with("spec.http.body.")
        || path.starts_with("spec.http.body[")
}

/// Where expressions are templates over `args` the connector evaluates.
fn templated(path: &str) -> bool {
    path.starts_with("spec.http.")
        || path == "spec.mock.output"
        || path.starts_with("spec.mock.output.")
        || path.starts_with("spec.mock.output[")
}

fn string_expressions(v: &mut V<'_>, s: &str, pos: Pos, path: &str) {
    if !s.contains("${{") {
        return;
    }
    let found = match find_expressions(s) {
        Ok(found) => found,
        Err(e @ (ExprError::Unterminated { .. } | ExprError::Empty { .. })) => {
            if templated(path) {
                v.err(path, pos, e.to_string());
            }
            return;
        }
    };
    for expr in found {
        let mentions_secrets = expr
            .body
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .any(|w| w == "secrets");
        if mentions_secrets {
            if !secrets_allowed(path) {
                v.err(
                    path,
                    pos,
                    "secrets may only be referenced in spec.http.url, spec.http.headers and \
                     spec.http.body (the connector hub resolves them there; anywhere else they \
                     would reach plans and logs)",
                );
                continue;
            }
            let name = expr.body.strip_prefix("secrets.").unwrap_or_default();
            let valid = !name.is_empty()
                && name.as_bytes()[0].is_ascii_alphabetic()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                v.err(
                    path,
                    pos,
                    format!(
                        "`${{{{ {} }}}}`: a secret is referenced alone, as `${{{{ secrets.NAME }}}}` \
                         (NAME: letters, digits and '_')",
                        expr.body
                    ),
                );
            }
            continue;
        }
        if templated(path)
            && let Err(e) = anumate_policy::parse_expr(expr.body)
        {
            let detail = e
                .diagnostics
                .first()
                .map(|d| d.message.clone())
                .unwrap_or_else(|| e.to_string());
            v.err(
                path,
                pos,
                format!("invalid expression `{}`: {detail}", expr.body),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("https://pay.example/v1/x"), Some("pay.example"));
        assert_eq!(url_host("http://pay.example:8080"), Some("pay.example"));
        assert_eq!(url_host("http://u:p@h.example/x"), Some("h.example"));
        assert_eq!(url_host("http://[::1]:80/"), Some("::1"));
        assert_eq!(
            url_host("https://${{ args.host }}/x"),
            Some("${{ args.host }}")
        );
        assert_eq!(url_host("ftp://x"), None);
        assert_eq!(url_host("https:///x"), None);
    }

    #[test]
    fn pointers_become_paths() {
        assert_eq!(pointer_path(""), "");
        assert_eq!(pointer_path("/type"), ".type");
        assert_eq!(pointer_path("/properties/a/type"), ".properties.a.type");
        assert_eq!(pointer_path("/required/0"), ".required[0]");
    }

    #[test]
    fn secret_places() {
        assert!(secrets_allowed("spec.http.url"));
        assert!(secrets_allowed("spec.http.headers.Authorization"));
        assert!(secrets_allowed("spec.http.body.token"));
        assert!(!secrets_allowed("spec.mock.output"));
        assert!(!secrets_allowed("metadata.description"));
        assert!(!secrets_allowed("spec.http.method"));
    }
}
