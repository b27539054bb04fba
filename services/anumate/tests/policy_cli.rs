#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate policy test` runs offline: no server, no data directory.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{BIN, Run, Served, run};

fn example() -> PathBuf {
    common::examples().join("refund.policy")
}

/// The binary in an empty directory with no `ANUMATE_…` variables and no server.
fn offline(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = common::anumate(dir);
    cmd.env("ANUMATE_SERVER", "http://127.0.0.1:9"); // nothing listens there
    cmd.args(args);
    run(cmd)
}

#[test]
fn passing_tests_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = example();
    let stdout = offline(dir.path(), &["policy", "test", file.to_str().unwrap()])
        .ok()
        .stdout;
    assert!(
        stdout.contains("✓ refund-limits/big refund waits for a lead"),
        "{stdout}"
    );
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");
}

#[test]
fn failing_test_exits_non_zero_with_a_diff() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(example())
        .unwrap()
        .replace("expect require_approval", "expect allow");
    let file = dir.path().join("failing.policy");
    std::fs::write(&file, src).unwrap();
    let stdout = offline(dir.path(), &["policy", "test", "failing.policy"])
        .failed()
        .stdout;
    assert!(
        stdout.contains("✗ refund-limits/big refund waits for a lead (failing.policy:14:3)"),
        "{stdout}"
    );
    assert!(stdout.contains("- expected: allow"), "{stdout}");
    assert!(stdout.contains("+ actual:   require_approval"), "{stdout}");
    assert!(stdout.contains("refund-limits/large-refund"), "{stdout}");
    assert!(stdout.contains("0 passed, 1 failed"), "{stdout}");

    // The same as JSON.
    let v = offline(
        dir.path(),
        &["policy", "test", "failing.policy", "-o", "json"],
    )
    .failed()
    .json();
    assert_eq!(v["failed"], 1);
    assert_eq!(v["results"][0]["expected"], "allow");
    assert_eq!(v["results"][0]["actual"]["effect"], "require_approval");
}

#[test]
fn compile_errors_are_caret_rendered() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(example())
        .unwrap()
        .replace("args.currency", "argz.currency");
    std::fs::write(dir.path().join("bad.policy"), src).unwrap();
    let stderr = offline(dir.path(), &["policy", "test", "bad.policy"])
        .failed()
        .stderr;
    assert!(
        stderr.contains("bad.policy:4:40: unknown field `argz`"),
        "{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("argz.currency != \"INR\""))
        .unwrap();
    assert_eq!(lines[at + 1].find('^'), lines[at].find("argz"), "{stderr}");
    assert!(stderr.contains("does not compile"), "{stderr}");
}

#[test]
fn missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = offline(dir.path(), &["policy", "test", "nope.policy"]).failed();
    assert!(out.stderr.contains("cannot read nope.policy"), "{out:#?}");
}

// ---------------------------------------------------------------------------
// Against a server: a PolicyService on SQLite behind the real auth layer.
// ---------------------------------------------------------------------------

async fn serve() -> Served {
    let (db, store) = anumate_testing::migrated_store(
        anumate_testing::Backend::Sqlite,
        &anumate_policy_service::migrations(),
    )
    .await;
    let policies = anumate_policy_service::Policies::new(
        store,
        &anumate_policy_service::PolicyConfig::default(),
    );
    let auth = anumate_testing::DevAuth::new();
    let token = auth
        .issuer
        .mint(
            "dev",
            "user:dev",
            &[anumate_auth::Role::Admin],
            std::time::Duration::from_secs(600),
        )
        .unwrap();
    let (addr, handle) = anumate_testing::serve(
        auth.authenticator,
        tonic::service::Routes::new(
            anumate_policy_service::PolicyGrpc::new(policies).into_server(),
        ),
    )
    .await;
    Served {
        url: format!("http://{addr}"),
        token,
        handle,
        keep: vec![Box::new(db), Box::new(auth.dir)],
    }
}

const LIMITS: &str = r#"policy "refund-limits" {
  description: "Limits on automated refunds"
  rule "only-inr" priority 100 {
    when tool == "payments.refund" and args.currency != "INR"
    then deny(reason: "only INR refunds are automated")
  }
  rule "large-refund" {
    when tool == "payments.refund"
     and args.amount > 500000
     and not (principal.roles contains "finance-lead")
    then require_approval(approvers: ["group:finance-leads"], quorum: 1,
                          reason: "refund above 5,000 INR")
  }
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_eval_list_get_against_a_server() {
    let server = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("limits.policy"), LIMITS).unwrap();
    std::fs::write(
        d.join("input.json"),
        r#"{"tool": "payments.refund", "args": {"amount": 900000, "currency": "INR",
            "customer": {"email": "jane@example.com"}}, "principal": {"roles": ["operator"]}}"#,
    )
    .unwrap();

    let stdout = server
        .cli(d, &["policy", "push", "limits.policy", "--publish"])
        .await
        .ok()
        .stdout;
    assert!(
        stdout.contains("pushed refund-limits version 1 (published) sha256:"),
        "{stdout}"
    );
    // `policy eval --input …`
    let eval = async |args: &[&str]| {
        let args = [&["policy", "eval", "--input"][..], args].concat();
        server.cli(d, &args).await
    };

    // Stored policy: every matched rule with its source line, effect, obligations.
    let stdout = eval(&["input.json", "--policy", "refund-limits"])
        .await
        .ok()
        .stdout;
    for expected in [
        "effect: require_approval",
        "refund-limits/large-refund [require_approval] priority 0 at refund-limits@1:7:3",
        "   7 |   rule \"large-refund\" {",
        "require_approval stage-1: 1 of [group:finance-leads]",
        "policies: refund-limits@1",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in:\n{stdout}");
    }

    // Ad-hoc source, JSON output; the example file's PII policy adds redactions.
    let example = example();
    let source = example.to_str().unwrap();
    let v = eval(&["input.json", "--source", source, "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(v["decision"]["effect"], "EFFECT_REQUIRE_APPROVAL");
    assert_eq!(v["decision"]["matchedRules"].as_array().unwrap().len(), 2);
    assert_eq!(
        v["decision"]["obligations"]["redactions"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Malformed input: the error names the input file and the position.
    std::fs::write(d.join("bad.json"), "{\n  \"tool\": }").unwrap();
    let stderr = eval(&["bad.json", "--policy", "refund-limits"])
        .await
        .failed()
        .stderr;
    assert!(
        stderr.contains("error[INVALID_ARGUMENT]: bad.json: input_json"),
        "{stderr}"
    );
    assert!(stderr.contains("2:11:"), "{stderr}");

    // Unknown policy.
    let out = eval(&["input.json", "--policy", "nope@3"]).await.failed();
    assert!(out.stderr.contains("error[POLICY_NOT_FOUND]"), "{out:#?}");

    let stdout = server.cli(d, &["policy", "list"]).await.ok().stdout;
    assert!(stdout.contains("refund-limits"), "{stdout}");
    let stdout = server
        .cli(d, &["policy", "get", "refund-limits"])
        .await
        .ok()
        .stdout;
    assert!(stdout.contains("version:      1 (published)"), "{stdout}");
    assert!(
        stdout.contains("large-refund (line 7, priority 0, require_approval)"),
        "{stdout}"
    );
    let out = server
        .cli(d, &["policy", "get", "refund-limits", "--source"])
        .await;
    assert_eq!(out.stdout, LIMITS);

    // Syntax errors from the server are positioned in the pushed file.
    std::fs::write(
        d.join("broken.policy"),
        LIMITS.replace("then deny(", "then deny(("),
    )
    .unwrap();
    let stderr = server
        .cli(d, &["policy", "push", "broken.policy"])
        .await
        .failed()
        .stderr;
    assert!(stderr.contains("error[INVALID_DOCUMENT]"), "{stderr}");
    assert!(stderr.contains("broken.policy:5:"), "{stderr}");
}

/// `anumate … | head`: a reader that goes away early ends the command quietly
/// (status 141, as after SIGPIPE), with no panic message on stderr.
#[test]
fn closed_stdout_is_not_a_panic() {
    let mut child = Command::new(BIN)
        .args(["policy", "test", "-o", "json"])
        .arg(example())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the command writes anything.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

/// Issue 9: 3,000 nested parentheses (or a `given` nested as deep) made
/// `anumate policy test` abort with a stack overflow; it is a diagnostic now.
#[test]
fn deep_nesting_is_a_diagnostic_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(example()).unwrap();
    let cond = r#"tool == "payments.refund" and args.currency != "INR""#;
    let deep_when = src.replacen(
        cond,
        &format!("{}{cond}{}", "(".repeat(3000), ")".repeat(3000)),
        1,
    );
    let given = "args: {amount: 900000, currency: \"INR\"}";
    let deep_given = src.replacen(
        given,
        &format!("args: {{deep: {}1{}}}", "[".repeat(3000), "]".repeat(3000)),
        1,
    );
    for (name, text_, at) in [
        ("deep.policy", deep_when, "deep.policy:4:73:"),
        ("given.policy", deep_given, "given.policy:15:"),
    ] {
        assert_ne!(text_, src);
        std::fs::write(dir.path().join(name), text_).unwrap();
        let out = offline(dir.path(), &["policy", "test", name]);
        let stderr = &out.stderr;
        // An exit code, not a signal: the process did not abort.
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(at), "{stderr}");
        assert!(stderr.contains("nesting deeper than 64"), "{stderr}");
        assert!(stderr.contains("does not compile"), "{stderr}");
    }
}
