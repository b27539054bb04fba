#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate tool …` as a user runs it: `anumate dev` on port 0 in a fresh
//! directory, the example tools file pushed, read, listed and deprecated; a
//! bad file refused with `file:line:col`; a capsule using a tenant tool
//! warned about until the tool is pushed, then compiled against it.

use std::path::Path;

mod common;
use common::{cli, examples, start_dev};

#[track_caller]
fn ok(dir: &Path, args: &[&str]) -> String {
    cli(dir, args).ok().stdout
}

#[test]
fn tools_are_pushed_read_listed_and_deprecated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let examples = examples();
    std::fs::copy(examples.join("tools.yaml"), d.join("tools.yaml")).unwrap();
    let _dev = start_dev(d);

    let out = ok(d, &["tool", "push", "tools.yaml"]);
    assert!(
        out.contains("pushed payments.transfer version 1 (http, write) sha256:"),
        "{out}"
    );
    assert!(
        out.contains("pushed orders.lookup version 1 (mock, read)"),
        "{out}"
    );
    let out = ok(d, &["tool", "push", "tools.yaml"]);
    assert!(
        out.contains("unchanged: identical to payments.transfer version 1"),
        "{out}"
    );

    let out = ok(d, &["tool", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{out}");
    assert!(lines[1].starts_with("orders.lookup"), "{out}");
    assert!(lines[2].starts_with("payments.transfer"), "{out}");

    let out = ok(d, &["tool", "get", "payments.transfer"]);
    assert!(out.contains("version:      1 (current)"), "{out}");
    assert!(out.contains("connector:    http"), "{out}");
    assert!(out.contains("Bearer ${{ secrets.PAY_TOKEN }}"), "{out}");
    let json = cli(d, &["tool", "get", "payments.transfer", "-o", "json"])
        .ok()
        .json();
    assert_eq!(json["version"]["sideEffect"], "write");
    assert!(
        json["version"]["contentHash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    // A second version of one tool, then back to the first.
    let changed = std::fs::read_to_string(d.join("tools.yaml"))
        .unwrap()
        .replace("latency: 20ms", "latency: 40ms");
    std::fs::write(d.join("tools.yaml"), changed).unwrap();
    let out = ok(d, &["tool", "push", "tools.yaml"]);
    assert!(out.contains("pushed orders.lookup version 2"), "{out}");
    let out = ok(d, &["tool", "versions", "orders.lookup"]);
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert!(rows[0].trim_start().starts_with("2  current"), "{out}");
    assert!(rows[1].trim_start().starts_with("1  superseded"), "{out}");
    let out = ok(d, &["tool", "deprecate", "orders.lookup", "2"]);
    assert!(
        out.contains("deprecated orders.lookup version 2; current is now version 1"),
        "{out}"
    );
    let out = ok(
        d,
        &["tool", "get", "orders.lookup", "--version", "2", "--source"],
    );
    assert!(out.contains("latency: 40ms"), "{out}");
    assert!(out.starts_with("apiVersion"), "{out}");

    let r = cli(d, &["tool", "get", "no.such"]).failed();
    assert!(r.stderr.contains("error[TOOL_NOT_FOUND]"), "{}", r.stderr);
}

#[test]
fn a_bad_file_is_refused_with_its_positions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("bad.yaml"),
        "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: crm.note}
spec:
  connector: mock
  side_effect: write
  mock: {output: {}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: crm.bad}
spec:
  conector: mock
  side_effect: write
  input: {type: object, properties: {a: {type: strin}}}
",
    )
    .unwrap();
    // Offline first: the same problems, no server needed.
    let r = cli(d, &["tool", "validate", "bad.yaml"]).failed();
    assert!(
        r.stderr.contains("bad.yaml:13:3: unknown key \"conector\""),
        "{}",
        r.stderr
    );
    let examples = examples();
    let r = cli(
        d,
        &[
            "tool",
            "validate",
            examples.join("tools.yaml").to_str().unwrap(),
        ],
    )
    .ok();
    assert!(
        r.stdout
            .contains("ok payments.transfer (http, write) sha256:"),
        "{}",
        r.stdout
    );

    let _dev = start_dev(d);
    let r = cli(d, &["tool", "push", "bad.yaml"]).failed();
    assert!(r.stderr.contains("error[INVALID_DOCUMENT]"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("bad.yaml:13:3: unknown key \"conector\"; did you mean \"connector\"?"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("bad.yaml:15:48: not a valid JSON Schema"),
        "{}",
        r.stderr
    );
    // All or nothing: the valid first document was not stored.
    let out = ok(d, &["tool", "list"]);
    assert!(out.starts_with("no tools"), "{out}");
}

#[test]
fn a_capsule_is_warned_about_then_compiled_against_a_tenant_tool() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let examples = examples();
    std::fs::copy(examples.join("tools.yaml"), d.join("tools.yaml")).unwrap();
    let capsule = std::fs::read_to_string(examples.join("refund.capsule.yaml"))
        .unwrap()
        .replace("tools: [http.get,", "tools: [orders.lookup,")
        .replace("tool: http.get", "tool: orders.lookup")
        .replace(
            "with: {url: \"https://orders.example/v1/orders/${{ inputs.order_id }}\"}",
            "with: {order_id: \"${{ inputs.order_id }}\"}",
        );
    std::fs::write(d.join("capsule.yaml"), capsule).unwrap();
    let policies = std::fs::read_to_string(examples.join("refund.policy")).unwrap();
    let split = policies.find("policy \"pii-masking\"").unwrap();
    std::fs::write(d.join("limits.policy"), &policies[..split]).unwrap();
    std::fs::write(d.join("pii.policy"), &policies[split..]).unwrap();
    let _dev = start_dev(d);
    ok(d, &["policy", "push", "limits.policy", "--publish"]);
    ok(d, &["policy", "push", "pii.policy", "--publish"]);

    let r = cli(d, &["capsule", "push", "capsule.yaml", "--publish"]).ok();
    assert!(
        r.stderr
            .contains("warning: tool orders.lookup is not in the tenant's catalogue"),
        "{}",
        r.stderr
    );
    let r = cli(d, &["plan", "compile", "refund-small-orders"]).failed();
    assert!(
        r.stderr.contains("error[TOOL_NOT_DECLARED]"),
        "{}",
        r.stderr
    );

    ok(d, &["tool", "push", "tools.yaml"]);
    let hash = cli(d, &["tool", "get", "orders.lookup", "-o", "json"])
        .ok()
        .json()["version"]["contentHash"]
        .as_str()
        .unwrap()
        .to_owned();
    let plan = cli(d, &["plan", "compile", "refund-small-orders", "-o", "json"])
        .ok()
        .json();
    let bindings = plan["plan"]["toolBindings"].as_array().unwrap();
    let lookup = bindings
        .iter()
        .find(|b| b["tool"] == "orders.lookup")
        .unwrap();
    assert_eq!(lookup["toolVersion"], "1");
    assert_eq!(lookup["toolHash"], hash.as_str());
}
