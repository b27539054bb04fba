#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate policy test` runs offline: no server, no data directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_anumate");

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/refund.policy")
}

/// The binary in an empty directory with no `ANUMATE_…` variables and no server.
fn anumate(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ANUMATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ANUMATE_SERVER", "http://127.0.0.1:9"); // nothing listens there
    cmd.args(args).output().expect("run anumate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn passing_tests_exit_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = example();
    let out = anumate(dir.path(), &["policy", "test", file.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
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
    let out = anumate(dir.path(), &["policy", "test", "failing.policy"]);
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("✗ refund-limits/big refund waits for a lead (failing.policy:14:3)"),
        "{stdout}"
    );
    assert!(stdout.contains("- expected: allow"), "{stdout}");
    assert!(stdout.contains("+ actual:   require_approval"), "{stdout}");
    assert!(stdout.contains("refund-limits/large-refund"), "{stdout}");
    assert!(stdout.contains("0 passed, 1 failed"), "{stdout}");

    // The same as JSON.
    let out = anumate(
        dir.path(),
        &["policy", "test", "failing.policy", "-o", "json"],
    );
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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
    let out = anumate(dir.path(), &["policy", "test", "bad.policy"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
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
    let out = anumate(dir.path(), &["policy", "test", "nope.policy"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot read nope.policy"));
}
