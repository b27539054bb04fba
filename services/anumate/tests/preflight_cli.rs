#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate preflight …` as a user runs it: `anumate dev` in a fresh
//! directory, the refund policies pushed with the CLI and a capsule whose
//! order comes from the HTTP body, then preflights that PASS, WARN and FAIL
//! (exit codes 0, 2, 1), in human and JSON output, and bad input.

use std::path::Path;

mod common;
use common::{cli, examples, start_dev};

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: refund-body
spec:
  inputs:
    order_id:     {type: string, required: true, pattern: "^ord_[a-z0-9]+$"}
    amount_paise: {type: integer, required: true, minimum: 1}
  tools: [http.get, payments.refund, email.send]
  policies: [refund-limits, pii-masking]
  steps:
    - id: fetch-order
      tool: http.get
      with: {url: "https://orders.example/v1/orders/${{ inputs.order_id }}"}
    - id: refund
      tool: payments.refund
      needs: [fetch-order]
      if: "${{ steps.fetch-order.output.body.status == 'paid' }}"
      with: {order_id: "${{ inputs.order_id }}", amount: "${{ inputs.amount_paise }}", currency: CUR}
    - id: notify
      tool: email.send
      needs: [refund]
      with: {to: "${{ steps.fetch-order.output.body.email }}", template: refund-done}
"#;

fn code(r: &common::Run) -> Option<i32> {
    r.status.code()
}

fn setup(d: &Path) {
    let policies = std::fs::read_to_string(examples().join("refund.policy")).unwrap();
    let split = policies.find("policy \"pii-masking\"").unwrap();
    std::fs::write(d.join("limits.policy"), &policies[..split]).unwrap();
    std::fs::write(d.join("pii.policy"), &policies[split..]).unwrap();
    std::fs::write(d.join("inr.yaml"), CAPSULE.replace("CUR", "INR")).unwrap();
    std::fs::write(
        d.join("usd.yaml"),
        CAPSULE
            .replace("CUR", "USD")
            .replace("refund-body", "refund-usd"),
    )
    .unwrap();
    std::fs::write(
        d.join("small.json"),
        r#"{"order_id": "ord_1", "amount_paise": 1000}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("big.json"),
        r#"{"order_id": "ord_1", "amount_paise": 900000}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("bad.json"),
        r#"{"order_id": "ORD", "amount_paise": 0}"#,
    )
    .unwrap();
    std::fs::write(
        d.join("paid.json"),
        r#"[{"step_id": "fetch-order", "output": {"status": 200, "body": {"status": "paid", "email": "asha@example.com"}}}]"#,
    )
    .unwrap();
    for args in [
        ["policy", "push", "limits.policy", "--publish"],
        ["policy", "push", "pii.policy", "--publish"],
        ["capsule", "push", "inr.yaml", "--publish"],
        ["capsule", "push", "usd.yaml", "--publish"],
    ] {
        cli(d, &args).ok();
    }
}

#[test]
fn preflight_prints_the_report_and_exits_with_the_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _dev = start_dev(d);
    setup(d);

    // PASS: the generated order is not paid, the refund is skipped.
    let r = cli(d, &["preflight", "refund-body", "--inputs", "small.json"]);
    assert_eq!(code(&r), Some(0), "{r:#?}");
    assert!(r.stdout.contains(": PASS"), "{}", r.stdout);
    assert!(r.stdout.contains("STEP"), "{}", r.stdout);
    assert!(r.stdout.contains("skipped (if)"), "{}", r.stdout);
    assert!(r.stdout.contains("skipped (upstream)"), "{}", r.stdout);
    assert!(r.stdout.contains("citable:  until"), "{}", r.stdout);

    // WARN: with the order paid, the big refund waits for a finance lead.
    let r = cli(
        d,
        &[
            "preflight",
            "refund-body",
            "--inputs",
            "big.json",
            "--fixtures",
            "paid.json",
            "--seed",
            "7",
        ],
    );
    assert_eq!(code(&r), Some(2), "{r:#?}");
    assert!(r.stdout.contains(": WARN"), "{}", r.stdout);
    assert!(r.stdout.contains("waits for approval"), "{}", r.stdout);
    assert!(
        r.stdout.contains("refund: 1 of [group:finance-leads]"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("APPROVAL_REQUIRED"), "{}", r.stdout);
    // Matched rules say where they are: policy version and line.
    assert!(
        r.stdout.contains("refund-limits/large-refund@1:7"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("no (made with fixtures)"), "{}", r.stdout);

    // FAIL: USD refunds are denied; by plan hash, as JSON.
    let r = cli(
        d,
        &[
            "preflight",
            "refund-usd",
            "--inputs",
            "small.json",
            "--fixtures",
            "paid.json",
            "-o",
            "json",
        ],
    );
    assert_eq!(code(&r), Some(1), "{r:#?}");
    let report = &r.json()["report"];
    assert_eq!(report["verdict"], "PREFLIGHT_VERDICT_FAIL");
    assert_eq!(report["steps"][1]["outcome"], "STEP_OUTCOME_DENIED");
    let hash = report["planHash"].as_str().unwrap().to_string();
    let r = cli(
        d,
        &[
            "preflight",
            &hash,
            "--inputs",
            "small.json",
            "--fixtures",
            "paid.json",
        ],
    );
    assert_eq!(code(&r), Some(1), "{r:#?}");
    assert!(
        r.stdout.contains("DENIED") && r.stdout.contains("POLICY_DENIED"),
        "{}",
        r.stdout
    );

    // Bad inputs: the reason and one line per field, exit 1.
    let r = cli(d, &["preflight", "refund-body", "--inputs", "bad.json"]);
    assert_eq!(code(&r), Some(1), "{r:#?}");
    assert!(
        r.stderr.contains("error[PREFLIGHT_INPUTS_INVALID]"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("inputs.amount_paise: must be ≥ 1"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("inputs.order_id: must match"),
        "{}",
        r.stderr
    );
    let r = cli(d, &["preflight", &hash, "--version", "1"]);
    assert_eq!(code(&r), Some(1), "{r:#?}");
    assert!(r.stderr.contains("--version"), "{}", r.stderr);
}
