#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate plan …` as a user runs it: `anumate dev` on port 0 in a fresh
//! directory, policies and the example capsule pushed with the CLI, then
//! compile (fresh, then cached), get and list, in human and JSON output.

use std::path::Path;

use serde_json::Value;

mod common;
use common::{cli, examples, start_dev, start_dev_env};

/// Stdout of `anumate <args>` in `dir`, which must succeed.
#[track_caller]
fn ok(dir: &Path, args: &[&str]) -> String {
    cli(dir, args).ok().stdout
}

/// Pushes the refund capsule and compiles it before its policies exist:
/// `NOT_FOUND`, whose stderr is returned.
#[track_caller]
fn compile_without_policies(d: &Path) -> String {
    ok(d, &["capsule", "push", "refund.capsule.yaml", "--publish"]);
    let r = cli(d, &["plan", "compile", "refund-small-orders"]).failed();
    assert!(r.stderr.contains("error[POLICY_NOT_FOUND]"), "{}", r.stderr);
    r.stderr
}

/// Pushes and publishes the capsule's two policies.
#[track_caller]
fn push_policies(d: &Path) {
    ok(d, &["policy", "push", "limits.policy", "--publish"]);
    ok(d, &["policy", "push", "pii.policy", "--publish"]);
}

/// A directory with the refund capsule and its two policies, one a file.
fn refund_example() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let examples = examples();
    std::fs::copy(
        examples.join("refund.capsule.yaml"),
        d.join("refund.capsule.yaml"),
    )
    .unwrap();
    let policies = std::fs::read_to_string(examples.join("refund.policy")).unwrap();
    let split = policies.find("policy \"pii-masking\"").unwrap();
    std::fs::write(d.join("limits.policy"), &policies[..split]).unwrap();
    std::fs::write(d.join("pii.policy"), &policies[split..]).unwrap();
    dir
}

/// In one process the compiler reads the registry and the policy service
/// in-process, not through a socket: addresses configured for them where
/// nothing listens are not used, and compiling works.
#[test]
fn dev_compiles_without_calling_its_own_services_over_tcp() {
    let dir = refund_example();
    let d = dir.path();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}");
    let _dev = start_dev_env(
        d,
        &[
            ("ANUMATE_COMPILER__REGISTRY_URL", &dead),
            ("ANUMATE_COMPILER__POLICY_URL", &dead),
        ],
    );
    // A policy the capsule names that does not exist: the in-process policy
    // service's NOT_FOUND, with the same words as over gRPC.
    let stderr = compile_without_policies(d);
    assert!(!stderr.contains("unavailable"), "{stderr}");
    push_policies(d);
    let out = ok(d, &["plan", "compile", "refund-small-orders"]);
    assert!(out.starts_with("compiled: sha256:"), "{out}");
}

#[test]
fn compile_get_and_list_plans_against_anumate_dev() {
    let dir = refund_example();
    let d = dir.path();

    let _dev = start_dev(d);

    // Before the policies exist the capsule does not compile, and says why.
    let stderr = compile_without_policies(d);
    assert!(stderr.contains("policy"), "{stderr}");
    push_policies(d);

    let out = ok(d, &["plan", "compile", "refund-small-orders"]);
    let first = out.lines().next().unwrap();
    assert!(first.starts_with("compiled: sha256:"), "{out}");
    let hash = first.trim_start_matches("compiled: ").to_string();
    assert!(
        out.contains("policies:     pii-masking@1, refund-limits@1"),
        "{out}"
    );
    assert!(out.contains("level 1:"), "{out}");
    assert!(out.contains("refund [payments.refund]"), "{out}");
    assert!(
        out.contains(
            "refund conditional: stage-1: 1 of [group:finance-leads] (refund-limits/large-refund)"
        ),
        "{out}"
    );

    // Again: the stored plan, said so, same hash.
    let again = ok(
        d,
        &[
            "plan",
            "compile",
            "refund-small-orders",
            "--version",
            "1",
            "-o",
            "json",
        ],
    );
    let v: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(v["cacheHit"], true);
    assert_eq!(v["plan"]["planHash"], hash.as_str());

    let got = ok(d, &["plan", "get", &hash]);
    assert!(got.starts_with(&format!("plan:         {hash}")), "{got}");
    let got: Value = serde_json::from_str(&ok(d, &["plan", "get", &hash, "-o", "json"])).unwrap();
    assert_eq!(got["plan"]["steps"].as_array().unwrap().len(), 3);
    // Versions are int32: a JSON number, not a string.
    assert_eq!(got["plan"]["capsuleVersion"], 1);
    // The colon-free forms a URL path carries name the same plan.
    let hex = hash.trim_start_matches("sha256:");
    for other in [format!("sha256-{hex}"), hex.to_string()] {
        let got = ok(d, &["plan", "get", &other]);
        assert!(got.starts_with(&format!("plan:         {hash}")), "{got}");
    }

    let list = ok(d, &["plan", "list"]);
    assert!(
        list.starts_with(&format!("{hash}  refund-small-orders@1")),
        "{list}"
    );

    // Bad input: a precise error, non-zero exit.
    let r = cli(d, &["plan", "get", "sha256:abc"]).failed();
    assert!(r.stderr.contains("error[INVALID_ARGUMENT]"), "{}", r.stderr);
    assert!(r.stderr.contains("plan_hash"), "{}", r.stderr);
    let r = cli(d, &["plan", "compile", "no-such-capsule"]).failed();
    assert!(
        r.stderr
            .contains("error[CAPSULE_NOT_FOUND]: capsule no-such-capsule"),
        "{}",
        r.stderr
    );
}
