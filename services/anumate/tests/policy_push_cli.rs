#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate policy push FILE` of a file with several policies (the README's
//! `examples/refund.policy` holds two) against `anumate dev`: all stored and
//! published at once, again unchanged, a broken block refusing the whole
//! file with its `file:line:col`.

use std::path::Path;

mod common;
use common::{cli, examples, start_dev};

#[track_caller]
fn ok(dir: &Path, args: &[&str]) -> String {
    cli(dir, args).ok().stdout
}

#[test]
fn a_file_of_several_policies_is_pushed_all_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let example = std::fs::read_to_string(examples().join("refund.policy")).unwrap();
    std::fs::write(d.join("refund.policy"), &example).unwrap();
    let _dev = start_dev(d);

    let out = ok(d, &["policy", "push", "refund.policy", "--publish"]);
    assert!(
        out.contains("pushed refund-limits version 1 (published) sha256:"),
        "{out}"
    );
    assert!(
        out.contains("pushed pii-masking version 1 (published) sha256:"),
        "{out}"
    );
    let out = ok(d, &["policy", "push", "refund.policy"]);
    assert!(
        out.contains("unchanged: identical to refund-limits version 1"),
        "{out}"
    );
    assert!(
        out.contains("unchanged: identical to pii-masking version 1"),
        "{out}"
    );
    let json = cli(d, &["policy", "push", "refund.policy", "-o", "json"])
        .ok()
        .json();
    assert_eq!(json["policies"].as_array().unwrap().len(), 2, "{json}");

    // Each policy's stored source is its own block.
    let source = ok(d, &["policy", "get", "pii-masking", "--source"]);
    assert!(source.starts_with("policy \"pii-masking\" {"), "{source}");
    assert!(!source.contains("refund-limits"), "{source}");

    // A broken second block: the whole file refused, positioned in the file.
    let broken = example.replace("when true", "when tru(");
    std::fs::write(d.join("broken.policy"), &broken).unwrap();
    let out = cli(d, &["policy", "push", "broken.policy"]).failed();
    assert!(out.stderr.contains("error[INVALID_DOCUMENT]"), "{out:#?}");
    let line = broken
        .lines()
        .position(|l| l.contains("when tru("))
        .unwrap()
        + 1;
    assert!(
        out.stderr.contains(&format!("broken.policy:{line}:"))
            || out.stderr.contains(&format!("broken.policy:{}:", line + 1)),
        "{out:#?}"
    );
    let changed = example.replace("only INR", "only rupee");
    std::fs::write(
        d.join("changed.policy"),
        changed.replace("when true", "when tru("),
    )
    .unwrap();
    cli(d, &["policy", "push", "changed.policy"]).failed();
    let out = ok(d, &["policy", "versions", "refund-limits"]);
    assert!(
        !out.contains("   2 "),
        "nothing of a refused file stored:\n{out}"
    );

    // A conditional push (etag) takes one block only.
    let out = cli(d, &["policy", "push", "refund.policy", "--etag", "r1"]).failed();
    assert!(
        out.stderr.contains("exactly one `policy` block"),
        "{out:#?}"
    );
}
