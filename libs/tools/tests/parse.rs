//! Tool files as an author writes them: what is accepted, and the exact
//! problems (path, line, column) of what is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anumate_errors::{ErrorCode, Violation};
use anumate_tools::{Connector, Limits, ParsedTool, Rejection, SideEffect, Tool, parse};

fn ok(src: &str) -> Vec<ParsedTool> {
    match parse(src, &Limits::default()) {
        Ok(t) => t,
        Err(e) => panic!("rejected: {e:?}"),
    }
}

fn problems(src: &str) -> Vec<Violation> {
    match parse(src, &Limits::default()) {
        Err(Rejection::Invalid(v)) => v,
        other => panic!("expected problems, got {other:?}"),
    }
}

/// `(path, line, col)` of each problem, and whether any message contains `needle`.
fn at(v: &[Violation]) -> Vec<(String, u32, u32)> {
    v.iter()
        .map(|v| {
            let (l, c) = v.position.unwrap_or((0, 0));
            (v.field.clone(), l, c)
        })
        .collect()
}

fn says(v: &[Violation], needle: &str) -> bool {
    v.iter().any(|v| v.description.contains(needle))
}

const MOCK: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: mock.thing}
spec:
  connector: mock
  side_effect: read
  mock: {output: {ok: true}}
";

#[test]
fn the_example_file_parses_with_every_field() {
    let src = include_str!("../../../examples/tools.yaml");
    let tools = ok(src);
    assert_eq!(tools.len(), 2);
    let t = &tools[0].tool;
    assert_eq!(t.name(), "payments.transfer");
    assert_eq!(t.spec.connector, Connector::Http);
    assert_eq!(t.spec.side_effect, SideEffect::Write);
    assert!(t.spec.idempotent);
    assert_eq!(t.spec.cost.as_ref().map(|c| c.micros), Some(2000));
    assert_eq!(t.spec.typical_duration, Some(Duration::from_millis(300)));
    let http = t.spec.http.as_ref().unwrap();
    assert_eq!(http.method, "POST");
    assert_eq!(http.allowed_hosts, vec!["pay.example"]);
    assert_eq!(
        http.headers.get("Authorization").map(String::as_str),
        Some("Bearer ${{ secrets.PAY_TOKEN }}")
    );
    assert_eq!(http.timeout, Some(Duration::from_secs(10)));
    assert_eq!(
        t.spec.mock.as_ref().unwrap().latency,
        Some(Duration::from_millis(50))
    );
    // Each tool keeps its own document's text, and where it starts.
    assert!(tools[0].source.contains("payments.transfer"));
    assert!(!tools[0].source.contains("orders.lookup"));
    assert!(tools[1].source.starts_with("apiVersion"));
    assert_eq!(tools[1].tool.name(), "orders.lookup");
    assert!(tools[1].position.0 > 20);
}

#[test]
fn the_canonical_form_reads_back_and_ignores_layout() {
    let a = ok(MOCK).remove(0);
    let b = ok("# a comment\n---\nkind: Tool\napiVersion: anumate.dev/v1\nspec:\n  mock:\n    output:\n      ok: true\n  side_effect: read\n  connector: mock\n  idempotent: false\nmetadata:\n  name: mock.thing\n").remove(0);
    assert_eq!(a.content_hash, b.content_hash);
    assert!(a.content_hash.starts_with("sha256:"));
    let back = Tool::from_canonical_json(&a.canonical_json).unwrap();
    assert_eq!(back, a.tool);
    // Defaults are explicit in the canonical form.
    assert!(
        a.canonical_json.contains(r#""input":{"type":"object"}"#),
        "{}",
        a.canonical_json
    );

    let changed = ok(&MOCK.replace("ok: true", "ok: false")).remove(0);
    assert_ne!(changed.content_hash, a.content_hash);
}

#[test]
fn durations_are_canonical_whatever_their_spelling() {
    let a = ok(&MOCK.replace("mock: {output: {ok: true}}", "mock: {latency: 60s}")).remove(0);
    let b = ok(&MOCK.replace("mock: {output: {ok: true}}", "mock: {latency: 1m}")).remove(0);
    assert_eq!(a.content_hash, b.content_hash);
}

#[test]
fn a_trailing_separator_is_not_a_document() {
    assert_eq!(ok(&format!("---\n{MOCK}---\n")).len(), 1);
}

#[test]
fn problems_in_several_documents_are_all_reported_with_file_positions() {
    let src = format!(
        "{MOCK}---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {{name: Bad}}
spec:
  conector: http
  side_effect: sometimes
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {{name: pay.out}}
spec:
  connector: http
  side_effect: write
  input: {{type: object, properties: {{a: {{type: strin}}}}}}
"
    );
    let v = problems(&src);
    let got = at(&v);
    assert!(got.contains(&("metadata.name".into(), 11, 18)), "{got:?}");
    assert!(got.contains(&("spec.conector".into(), 13, 3)), "{got:?}");
    assert!(says(&v, "did you mean \"connector\""), "{v:?}");
    assert!(
        got.contains(&("spec.side_effect".into(), 14, 16)),
        "{got:?}"
    );
    assert!(says(&v, "required key \"connector\" is missing"), "{v:?}");
    // A JSON Schema that does not compile is pointed at the offending node.
    assert!(
        got.contains(&("spec.input.properties.a.type".into(), 22, 48)),
        "{got:?}"
    );
    assert!(says(&v, "not a valid JSON Schema"), "{v:?}");
    // The connector in use needs its section.
    assert!(says(&v, "connector http needs a \"http\" section"), "{v:?}");
    // In file order.
    let lines: Vec<u32> = got.iter().map(|g| g.1).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

#[test]
fn a_schema_with_a_bad_pattern_does_not_compile() {
    let src = MOCK.replace(
        "side_effect: read\n",
        "side_effect: read\n  input:\n    type: object\n    properties:\n      a: {type: string, pattern: \"(\"}\n",
    );
    let v = problems(&src);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].field.starts_with("spec.input"), "{v:?}");
    assert_eq!(v[0].position.map(|p| p.0), Some(10), "{v:?}");
}

#[test]
fn an_input_schema_describes_an_object() {
    let v = problems(&MOCK.replace(
        "side_effect: read\n",
        "side_effect: read\n  input: {type: string}\n",
    ));
    assert_eq!(at(&v), vec![("spec.input.type".into(), 7, 17)]);
}

#[test]
fn secrets_are_refused_outside_the_http_request() {
    let src = MOCK.replace(
        "mock: {output: {ok: true}}",
        "mock: {output: {token: \"${{ secrets.PAY_TOKEN }}\"}}",
    );
    let v = problems(&src);
    assert_eq!(at(&v), vec![("spec.mock.output.token".into(), 7, 26)]);
    assert!(says(&v, "secrets may only be referenced"), "{v:?}");

    let src = format!(
        "{}  http: {{method: GET, url: \"https://a.example/${{{{ secrets.A }}}}\"}}\n",
        MOCK.replace(
            "metadata: {name: mock.thing}",
            "metadata: {name: mock.thing, description: \"${{ secrets.B }}\"}"
        )
    );
    let v = problems(&src);
    assert_eq!(
        at(&v),
        vec![("metadata.description".into(), 3, 43)],
        "{v:?}"
    );

    let v = problems(&format!(
        "{MOCK}  http: {{method: GET, url: \"https://a.example/\", headers: {{X: \"${{{{ secrets.a.b }}}}\"}}}}\n"
    ));
    assert!(says(&v, "a secret is referenced alone"), "{v:?}");
}

#[test]
fn http_sections_are_checked() {
    let http = |body: &str| {
        format!(
            "apiVersion: anumate.dev/v1\nkind: Tool\nmetadata: {{name: h.t}}\nspec:\n  connector: http\n  side_effect: read\n  http: {body}\n"
        )
    };
    let t = ok(&http(
        "{method: GET, url: \"https://api.example:8443/x?q=${{ args.q }}\"}",
    ))
    .remove(0);
    assert_eq!(t.tool.spec.http.unwrap().allowed_hosts, vec!["api.example"]);

    let v = problems(&http("{method: FETCH, url: \"ftp://x\"}"));
    assert!(says(&v, "unknown method \"FETCH\""), "{v:?}");
    assert!(says(&v, "is not an http:// or https:// URL"), "{v:?}");

    let v = problems(&http(
        "{method: GET, url: \"https://evil.example/\", allowed_hosts: [good.example]}",
    ));
    assert!(
        says(&v, "\"evil.example\" is not in allowed_hosts"),
        "{v:?}"
    );

    let v = problems(&http("{method: GET, url: \"https://${{ args.host }}/\"}"));
    assert!(says(&v, "declare the hosts"), "{v:?}");

    let v = problems(&http(
        "{method: GET, url: \"https://a.example/${{ args.( }}\"}",
    ));
    assert!(says(&v, "invalid expression"), "{v:?}");

    let v = problems(&http(
        "{method: GET, url: \"https://a.example/\", timeout: soon, max_response_bytes: 0}",
    ));
    assert_eq!(v.len(), 2, "{v:?}");
}

#[test]
fn mock_and_mcp_sections_are_checked() {
    let v = problems(&MOCK.replace(
        "{output: {ok: true}}",
        "{fail: {times: 0, code: UNAVALABLE}}",
    ));
    assert!(says(&v, "between 1 and 1000"), "{v:?}");
    assert!(says(&v, "did you mean \"UNAVAILABLE\""), "{v:?}");

    let mcp = MOCK
        .replace("connector: mock", "connector: mcp:github")
        .replace("mock: {output: {ok: true}}", "mcp: {tool: create_issue}");
    let t = ok(&mcp).remove(0);
    assert_eq!(t.tool.spec.connector, Connector::Mcp("github".into()));
    assert_eq!(t.tool.spec.mcp.unwrap().server, "github");

    let v = problems(&mcp.replace(
        "{tool: create_issue}",
        "{server: gitlab, tool: create_issue}",
    ));
    assert!(says(&v, "differs from the connector's"), "{v:?}");
}

#[test]
fn the_same_tool_twice_in_a_file_is_refused() {
    let v = problems(&format!("{MOCK}---\n{MOCK}"));
    assert_eq!(at(&v), vec![("metadata.name".into(), 9, 1)]);
    assert!(says(&v, "declared twice"), "{v:?}");
}

#[test]
fn another_kind_or_an_empty_file_is_refused() {
    let v = problems(&MOCK.replace("kind: Tool", "kind: Capsule"));
    assert_eq!(at(&v), vec![("kind".into(), 2, 7)]);
    let v = problems("# nothing\n");
    assert!(says(&v, "no tool document"), "{v:?}");
}

#[test]
fn yaml_errors_and_limits() {
    let v = problems("a: [1\n");
    assert!(v[0].description.starts_with("invalid YAML"), "{v:?}");
    let v = problems("a: &x 1\nb: *x\n");
    assert!(says(&v, "anchors"), "{v:?}");

    let big = "#".repeat(100);
    let limits = Limits {
        max_file_bytes: 10,
        ..Limits::default()
    };
    let e = parse(&big, &limits).unwrap_err();
    assert_eq!(e.to_error().code, ErrorCode::PayloadTooLarge);

    let limits = Limits {
        max_tools: 1,
        ..Limits::default()
    };
    let two = format!("{MOCK}---\n{}", MOCK.replace("mock.thing", "mock.other"));
    let Err(Rejection::Invalid(v)) = parse(&two, &limits) else {
        panic!("expected the tool limit")
    };
    assert!(says(&v, "at most 1 tools"), "{v:?}");
}

#[test]
fn rejections_are_invalid_document_errors_with_violations() {
    let e = parse(&MOCK.replace("read", "maybe"), &Limits::default()).unwrap_err();
    let e = e.to_error();
    assert_eq!(e.code, ErrorCode::InvalidDocument);
    assert_eq!(e.violations.len(), 1);
}
