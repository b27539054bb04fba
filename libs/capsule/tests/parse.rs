//! Parsing and validation of capsule documents: exact paths and positions.

use std::time::Duration;

use anumate_capsule::{Backoff, Capsule, InputType, Limits, Rejection, parse};
use anumate_errors::Violation;

const EXAMPLE: &str = include_str!("../../../examples/refund.capsule.yaml");

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn violations(source: &str) -> Vec<Violation> {
    match parse(source, &Limits::default()) {
        Err(Rejection::Invalid(v)) => v,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// Asserts exactly these violations (field, line, column, part of the description).
fn assert_violations(source: &str, want: &[(&str, u32, u32, &str)]) {
    let got = violations(source);
    let shown: Vec<String> = got
        .iter()
        .map(|v| format!("{} @ {:?}: {}", v.field, v.position, v.description))
        .collect();
    assert_eq!(got.len(), want.len(), "got:\n{}", shown.join("\n"));
    for (v, (field, line, col, text)) in got.iter().zip(want) {
        assert_eq!(
            (v.field.as_str(), v.position),
            (*field, Some((*line, *col))),
            "got:\n{}",
            shown.join("\n")
        );
        assert!(
            v.description.contains(text),
            "{:?} does not contain {text:?}",
            v.description
        );
    }
}

/// Expected violations: field, line, column, part of the description.
type Expected = &'static [(&'static str, u32, u32, &'static str)];
/// A named table case: name, source (or steps), expected violations.
type Case = (&'static str, &'static str, Expected);

/// A valid header (lines 1–9) followed by `steps`, which starts on line 10.
fn with_steps(steps: &str) -> String {
    format!(
        "apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: t
spec:
  inputs:
    order_id: {{type: string, required: true}}
  tools: [http.get, email.send]
  steps:
{steps}"
    )
}

#[test]
fn the_spec_example_is_valid() {
    let capsule: Capsule = parse(EXAMPLE, &Limits::default()).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(capsule.name, "refund-small-orders");
    assert_eq!(
        capsule.labels.get("team").map(String::as_str),
        Some("payments")
    );
    assert_eq!(
        capsule.spec.tools,
        ["http.get", "payments.refund", "email.send"]
    );
    assert_eq!(capsule.spec.policies, ["refund-limits", "pii-masking"]);
    let amount = &capsule.spec.inputs["amount_paise"];
    assert_eq!(amount.ty, InputType::Integer);
    assert!(amount.required);
    assert_eq!(amount.minimum, Some(1.0));
    assert_eq!(amount.position, (10, 5));
    let steps = &capsule.spec.steps;
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[0].id, "fetch-order");
    assert_eq!(steps[0].position, (14, 7));
    assert_eq!(steps[0].timeout, Some(Duration::from_secs(10)));
    let retry = steps[0].retry.clone().unwrap_or_else(|| panic!("retry"));
    assert_eq!(retry.max_attempts, 3);
    assert_eq!(retry.backoff, Backoff::Exponential);
    assert_eq!(retry.initial, Some(Duration::from_secs(1)));
    assert_eq!(steps[1].needs, ["fetch-order"]);
    assert_eq!(
        steps[1].condition.as_deref(),
        Some("${{ steps.fetch-order.output.status == 'paid' }}")
    );
    assert_eq!(steps[2].with["template"], "refund-done");
    assert_eq!(capsule.document["spec"]["retry"], serde_json::Value::Null);
    assert_eq!(
        capsule.document["spec"]["steps"][0]["retry"]["max_attempts"],
        3
    );
    assert!(capsule.document["spec"]["steps"][0]["retry"]["max_attempts"].is_u64());
}

#[test]
fn document_ignores_key_order_and_types_scalars() {
    let a = "apiVersion: anumate.dev/v1\nkind: Capsule\nmetadata: {name: x, labels: {b: '1', a: \"2\"}}\nspec:\n  tools: [a.b]\n  steps: [{id: s, tool: a.b, with: {n: 10, f: 1.5, t: true, z: null, q: '10'}}]\n";
    let b = "spec:\n  steps: [{with: {q: '10', z: ~, t: true, f: 1.5, n: 10}, tool: a.b, id: s}]\n  tools: [a.b]\nmetadata: {labels: {a: \"2\", b: '1'}, name: x}\nkind: Capsule\napiVersion: anumate.dev/v1\n";
    let pa = parse(a, &Limits::default()).unwrap_or_else(|e| panic!("{e:?}"));
    let pb = parse(b, &Limits::default()).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(pa.document, pb.document);
    assert_eq!(
        serde_json::to_string(&pa.document).ok(),
        serde_json::to_string(&pb.document).ok()
    );
    let with = &pa.spec.steps[0].with;
    assert_eq!(
        with,
        &serde_json::json!({"n": 10, "f": 1.5, "t": true, "z": null, "q": "10"})
    );
    assert!(with["n"].is_u64());
}

#[test]
fn malformed_yaml_is_one_violation_at_the_error() {
    let got = violations(&fixture("malformed.yaml"));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].field.as_str(), got[0].position), ("", Some((7, 8))));
    assert!(got[0].description.starts_with("invalid YAML"), "{got:?}");
}

#[test]
fn duplicate_keys_are_reported_at_the_second_key() {
    assert_violations(
        &fixture("duplicate-keys.yaml"),
        &[
            (
                "metadata.name",
                5,
                3,
                "duplicate key \"name\" (first defined at line 4, column 3)",
            ),
            (
                "spec.steps[0].tool",
                11,
                7,
                "duplicate key \"tool\" (first defined at line 10",
            ),
        ],
    );
}

#[test]
fn aliases_and_anchors_are_rejected() {
    assert_violations(
        &fixture("billion-laughs.yaml"),
        &[("spec.steps[0].with.a", 11, 15, "billion laughs")],
    );
}

#[test]
fn cyclic_needs_report_the_cycle_path() {
    assert_violations(
        &fixture("cycle.yaml"),
        &[(
            "spec.steps[1].needs[0]",
            13,
            15,
            "needs form a cycle: a -> c -> b -> a",
        )],
    );
}

#[test]
fn five_problems_are_all_reported() {
    assert_violations(
        &fixture("five-problems.yaml"),
        &[
            (
                "apiVersion",
                1,
                13,
                "unsupported apiVersion \"anumate.dev/v2\"",
            ),
            ("metadata.name", 4, 9, "DNS label"),
            (
                "spec.steps[0].tool",
                11,
                13,
                "tool \"http.post\" is not in spec.tools; did you mean \"http.get\"?",
            ),
            ("spec.steps[1].with.to", 15, 18, "unknown input \"email\""),
            (
                "spec.steps[1].retyr",
                16,
                7,
                "unknown key \"retyr\"; did you mean \"retry\"?",
            ),
        ],
    );
}

#[test]
fn step_problems() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("unknown key with suggestion",
         "    - id: a\n      tool: http.get\n      timout: 10s\n",
         &[("spec.steps[0].timout", 12, 7, "unknown key \"timout\"; did you mean \"timeout\"?")]),
        ("unknown key without suggestion",
         "    - id: a\n      tool: http.get\n      colour: red\n",
         &[("spec.steps[0].colour", 12, 7, "expected one of: id, tool, needs, if, with, timeout, retry")]),
        ("tool outside tools",
         "    - id: a\n      tool: payments.refund\n",
         &[("spec.steps[0].tool", 11, 13, "tool \"payments.refund\" is not in spec.tools")]),
        ("missing id and tool",
         "    - needs: []\n",
         &[("spec.steps[0].id", 10, 7, "required key \"id\" is missing"),
           ("spec.steps[0].tool", 10, 7, "required key \"tool\" is missing")]),
        ("needs a missing step",
         "    - id: a\n      tool: http.get\n    - id: b\n      tool: http.get\n      needs: [a, nope]\n",
         &[("spec.steps[1].needs[1]", 14, 18, "needs unknown step \"nope\"")]),
        ("self need is a cycle",
         "    - id: a\n      tool: http.get\n      needs: [a]\n",
         &[("spec.steps[0].needs[0]", 12, 15, "needs form a cycle: a -> a")]),
        ("duplicate step ids",
         "    - id: a\n      tool: http.get\n    - id: a\n      tool: http.get\n",
         &[("spec.steps[1].id", 12, 11, "duplicate step id \"a\" (first defined at line 10)")]),
        ("bad step id",
         "    - id: Fetch_Order\n      tool: http.get\n",
         &[("spec.steps[0].id", 10, 11, "invalid step id \"Fetch_Order\"")]),
        ("unknown input in expression",
         "    - id: a\n      tool: http.get\n      with: {url: \"x/${{ inputs.orderid }}\"}\n",
         &[("spec.steps[0].with.url", 12, 19, "unknown input \"orderid\" in expression; did you mean \"order_id\"?")]),
        ("unknown input nested deep in with",
         "    - id: a\n      tool: http.get\n      with:\n        body:\n          items: [ok, \"${{ inputs.nope }}\"]\n",
         &[("spec.steps[0].with.body.items[1]", 14, 23, "unknown input \"nope\"")]),
        ("unknown step in expression",
         "    - id: a\n      tool: http.get\n      if: ${{ steps.ghost.output.ok }}\n",
         &[("spec.steps[0].if", 12, 11, "unknown step \"ghost\" in expression")]),
        ("step that is not upstream",
         "    - id: a\n      tool: http.get\n    - id: b\n      tool: http.get\n      with: {x: \"${{ steps.a.output.x }}\"}\n",
         &[("spec.steps[1].with.x", 14, 17, "step \"a\" is not upstream of \"b\"")]),
        ("downstream step referenced",
         "    - id: a\n      tool: http.get\n      with: {x: \"${{ steps.b.output }}\"}\n    - id: b\n      tool: http.get\n      needs: [a]\n",
         &[("spec.steps[0].with.x", 12, 17, "step \"b\" is not upstream of \"a\"")]),
        ("own output",
         "    - id: a\n      tool: http.get\n      with: {x: \"${{ steps.a.output }}\"}\n",
         &[("spec.steps[0].with.x", 12, 17, "cannot reference its own output")]),
        ("unterminated expression",
         "    - id: a\n      tool: http.get\n      with: {x: \"${{ inputs.order_id \"}\n",
         &[("spec.steps[0].with.x", 12, 17, "unterminated `${{`")]),
        ("quoted names in expressions are not references",
         "    - id: a\n      tool: http.get\n      if: \"${{ 'inputs.nope' == \\\"steps.b\\\" }}\"\n",
         &[]),
        ("unknown function in expression (checked by the expression language)",
         "    - id: a\n      tool: http.get\n      with: {x: \"${{ frobnicate(inputs.order_id) }}\"}\n",
         &[("spec.steps[0].with.x", 12, 17, "frobnicate")]),
        ("syntax error in expression (checked by the expression language)",
         "    - id: a\n      tool: http.get\n      if: \"${{ inputs.order_id == }}\"\n",
         &[("spec.steps[0].if", 12, 11, "of `inputs.order_id ==`")]),
        ("if must be an expression",
         "    - id: a\n      tool: http.get\n      if: inputs.order_id\n",
         &[("spec.steps[0].if", 12, 11, "`if` must be a single `${{ … }}` expression")]),
        ("if must be a string",
         "    - id: a\n      tool: http.get\n      if: true\n",
         &[("spec.steps[0].if", 12, 11, "expected a string, found a boolean")]),
        ("with must be a mapping",
         "    - id: a\n      tool: http.get\n      with: [1]\n",
         &[("spec.steps[0].with", 12, 13, "expected a mapping, found a sequence")]),
        ("retry out of range and unknown backoff",
         "    - id: a\n      tool: http.get\n      retry: {max_attempts: 21, backoff: exponentail, initial: 5s, max: 1s}\n",
         &[("spec.steps[0].retry.max_attempts", 12, 29, "max_attempts must be an integer from 1 to 20, found 21"),
           ("spec.steps[0].retry.backoff", 12, 42, "did you mean \"exponential\"?"),
           ("spec.steps[0].retry.max", 12, 73, "max is shorter than initial")]),
    ];
    for (name, steps, want) in cases {
        let source = with_steps(steps);
        if want.is_empty() {
            if let Err(e) = parse(&source, &Limits::default()) {
                panic!("{name}: {e:?}");
            }
            continue;
        }
        let result = std::panic::catch_unwind(|| assert_violations(&source, want));
        assert!(result.is_ok(), "case {name:?} failed");
    }
}

#[test]
fn bad_durations() {
    let cases: &[(&str, &str)] = &[
        ("0s", "must be positive"),
        ("25h", "longer than 24h"),
        (
            "10",
            "expected a duration string like 10s, found an integer",
        ),
        ("1d", "invalid duration \"1d\""),
        ("'-5s'", "invalid duration \"-5s\""),
        ("1.5s", "invalid duration \"1.5s\""),
    ];
    for (timeout, text) in cases {
        let source = with_steps(&format!(
            "    - id: a\n      tool: http.get\n      timeout: {timeout}\n"
        ));
        assert_violations(&source, &[("spec.steps[0].timeout", 12, 16, text)]);
    }
}

#[test]
fn top_level_problems() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("not a mapping", "- a\n- b\n", &[("", 1, 1, "must be a YAML mapping, found a sequence")]),
        ("empty", "# nothing\n", &[("", 1, 1, "document is empty")]),
        ("missing everything", "foo: 1\n", &[
            ("foo", 1, 1, "unknown key \"foo\""),
            ("apiVersion", 1, 1, "required key \"apiVersion\" is missing"),
            ("kind", 1, 1, "required key \"kind\""),
            ("metadata", 1, 1, "required key \"metadata\""),
            ("spec", 1, 1, "required key \"spec\""),
        ]),
        ("kind and metadata",
         "apiVersion: anumate.dev/v1\nkind: Workflow\nmetdata: {name: x}\nspec: {tools: [], steps: []}\n",
         &[
            ("metadata", 1, 1, "required key \"metadata\" is missing"),
            ("kind", 2, 7, "unsupported kind \"Workflow\"; expected \"Capsule\""),
            ("metdata", 3, 1, "did you mean \"metadata\"?"),
            ("spec.steps", 4, 26, "at least one step"),
         ]),
        ("multi document", "a: 1\n---\nb: 2\n", &[("", 2, 1, "multi-document")]),
        ("anchor on a scalar", "a: &x 1\n", &[("a", 1, 7, "anchors")]),
        ("unterminated flow mapping", "a: {b: 1\n", &[("", 2, 1, "invalid YAML")]),
    ];
    for (name, source, want) in cases {
        let result = std::panic::catch_unwind(|| assert_violations(source, want));
        assert!(result.is_ok(), "case {name:?} failed");
    }
}

#[test]
fn tags_other_than_core_scalars_are_rejected() {
    let source = EXAMPLE.replace(
        "name: refund-small-orders",
        "name: !custom refund-small-orders",
    );
    assert_violations(
        &source,
        &[("metadata.name", 4, 17, "YAML tag `!custom` is not allowed")],
    );
    let source = EXAMPLE.replace("labels: {team: payments}", "labels: {team: !!int payments}");
    assert_violations(
        &source,
        &[(
            "metadata.labels.team",
            6,
            24,
            "`payments` is not a valid !!int",
        )],
    );
    let source = EXAMPLE.replace("labels: {team: payments}", "labels: {team: !!str 10}");
    let capsule = parse(&source, &Limits::default()).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(capsule.labels["team"], "10");
}

#[test]
fn metadata_and_inputs_problems() {
    let source = EXAMPLE
        .replace(
            "labels: {team: payments}",
            "labels: {team: 10, \"bad key\": x}",
        )
        .replace(
            "{type: integer, required: true, minimum: 1}",
            "{type: integr, required: yes, minLength: 1}",
        )
        .replace(
            "pattern: \"^ord_[a-z0-9]+$\"",
            "pattern: \"^ord_[\", default: 7",
        )
        .replace("tools: [http.get,", "tools: [http.get, http.get, Bad,");
    assert_violations(
        &source,
        &[
            (
                "metadata.labels.team",
                6,
                18,
                "expected a string, found an integer",
            ),
            (
                "metadata.labels[\"bad key\"]",
                6,
                22,
                "invalid label key \"bad key\"",
            ),
            (
                "spec.inputs.order_id.pattern",
                9,
                59,
                "pattern does not compile",
            ),
            (
                "spec.inputs.order_id.default",
                9,
                78,
                "invalid default: expected a value of type string",
            ),
            (
                "spec.inputs.amount_paise.type",
                10,
                26,
                "unknown type \"integr\"; did you mean \"integer\"?",
            ),
            (
                "spec.inputs.amount_paise.required",
                10,
                44,
                "expected a boolean, found a string",
            ),
            (
                "spec.tools[1]",
                11,
                21,
                "duplicate tool \"http.get\" (first listed at line 11)",
            ),
            ("spec.tools[2]", 11, 31, "invalid tool \"Bad\""),
        ],
    );
}

#[test]
fn input_defaults_and_enums_are_checked() {
    let source = EXAMPLE.replace(
        "{type: integer, required: true, minimum: 1}",
        "{type: integer, minimum: 1, maximum: 10, default: 11, enum: [1, 2, 2.5]}",
    );
    assert_violations(
        &source,
        &[
            (
                "spec.inputs.amount_paise.default",
                10,
                69,
                "invalid default: 11 is greater than maximum",
            ),
            (
                "spec.inputs.amount_paise.enum[2]",
                10,
                86,
                "enum value: expected a value of type integer",
            ),
        ],
    );
}

#[test]
fn oversized_documents_are_rejected_before_parsing() {
    let limits = Limits {
        max_document_bytes: 100,
        ..Limits::default()
    };
    let source = "a: [".repeat(1000);
    assert_eq!(
        parse(&source, &limits),
        Err(Rejection::TooLarge {
            size: 4000,
            limit: 100
        })
    );
    let err = anumate_errors::Error::from(Rejection::TooLarge {
        size: 4000,
        limit: 100,
    });
    assert_eq!(err.code, anumate_errors::ErrorCode::PayloadTooLarge);
}

#[test]
fn depth_node_and_step_limits() {
    let deep = format!("a: {}1{}\n", "[".repeat(100), "]".repeat(100));
    assert_violations(
        &deep,
        &[(
            "a[0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0][0]",
            1,
            67,
            "deeper than 64 levels",
        )],
    );
    let limits = Limits {
        max_nodes: 50,
        ..Limits::default()
    };
    let wide = format!("a: [{}]\n", vec!["1"; 100].join(", "));
    match parse(&wide, &limits) {
        Err(Rejection::Invalid(v)) => {
            assert_eq!(v.len(), 1);
            assert!(v[0].description.contains("more than 50 nodes"), "{v:?}");
        }
        other => panic!("{other:?}"),
    }
    let limits = Limits {
        max_steps: 2,
        ..Limits::default()
    };
    let source = with_steps(&"    - {id: a, tool: http.get}\n".repeat(3));
    match parse(&source, &limits) {
        Err(Rejection::Invalid(v)) => assert_eq!(
            v,
            vec![Violation::at(
                "spec.steps",
                10,
                5,
                "3 steps; the limit is 2"
            )]
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rejection_maps_to_invalid_document() {
    let err = anumate_errors::Error::from(Rejection::Invalid(violations("foo: 1\n")));
    assert_eq!(err.code, anumate_errors::ErrorCode::InvalidDocument);
    assert_eq!(err.violations.len(), 5);
}

/// Issue 9: a `${{ }}` expression nested thousands of levels deep aborted the
/// registry (stack overflow in the expression parser); it is a violation at
/// the expression now, and the rest of the document is still checked.
#[test]
fn deeply_nested_expressions_are_violations_not_crashes() {
    let deep = format!("{}inputs.order_id{}", "(".repeat(3000), ")".repeat(3000));
    let doc = EXAMPLE.replace(
        "if: \"${{ steps.fetch-order.output.status == 'paid' }}\"",
        &format!("if: \"${{{{ {deep} }}}}\""),
    );
    assert_ne!(doc, EXAMPLE);
    let got = std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(move || violations(&doc))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].field, "spec.steps[1].if");
    assert!(
        got[0].description.contains("nesting deeper than 64"),
        "{:?}",
        got[0].description
    );
}

/// YAML nesting is bounded before anything deep is built, for flow and
/// block collections alike: 100,000 levels is one violation.
#[test]
fn yaml_nesting_far_past_the_limit_is_one_violation() {
    let n = 100_000;
    let flow_seq = format!("a: {}1{}\n", "[".repeat(n), "]".repeat(n));
    let flow_map = format!("a: {}1{}\n", "{b: ".repeat(n), "}".repeat(n));
    // Block nesting needs growing indentation: 1,000 levels (~0.5 MB).
    let block: String = (0..1000)
        .map(|i| format!("{}k:\n", " ".repeat(i)))
        .collect();
    for doc in [flow_seq, flow_map, block] {
        let got = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || parse(&doc, &Limits::default()))
            .unwrap()
            .join()
            .unwrap();
        match got {
            Err(Rejection::Invalid(v)) => {
                // Ours, or yaml-rust2's own bound on flow nesting (256),
                // which its scanner can reach first while reading ahead.
                assert_eq!(v.len(), 1, "{v:?}");
                let d = &v[0].description;
                assert!(
                    d.contains("deeper than 64") || d.contains("recursion limit exceeded"),
                    "{d}"
                );
            }
            other => panic!("expected a depth violation, got {other:?}"),
        }
    }
}
