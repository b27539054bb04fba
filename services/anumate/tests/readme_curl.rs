#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The README's golden path over REST, run as written: the `sh` block after
//! the `<!-- curl walkthrough` marker is one bash script (`set -e -o
//! pipefail`, so any command that fails stops it) run in a temporary
//! directory holding a copy of `examples/`, against a real `anumate dev`
//! started there, with this build's `anumate` first on `PATH`. Nothing in
//! the block is substituted. Then what the reader was told is checked: the
//! preflight said WARN, the run's own approval was refused with
//! `SELF_APPROVAL`, the watch came as Server-Sent Events with ids and ended
//! with the run, the run SUCCEEDED, and alice and bob approved.

mod common;

use std::time::Duration;

use common::{cli, copy_dir, examples, read_in as read, readme, run_bash, start_dev};

const MARKER: &str = "<!-- curl walkthrough";

/// The text of the `sh` block following the marker.
fn block(readme: &str) -> &str {
    let start = readme
        .find(MARKER)
        .expect("README.md has no `<!-- curl walkthrough` marker");
    let rest = &readme[start..];
    let open = rest
        .find("```sh\n")
        .expect("no ```sh block after the marker")
        + "```sh\n".len();
    let body = &rest[open..];
    let close = body.find("\n```").expect("the curl block is not closed");
    &body[..=close]
}

#[test]
fn curl_block_is_the_golden_path() {
    let text = readme();
    let sh = block(&text);
    for route in [
        "/v1/tools:push",
        "/v1/policies:push",
        "/v1/capsules:push",
        "/v1/plans:compile",
        "/v1/preflights",
        "/v1/runs",
        ":watch",
        "text/event-stream",
        ":approve",
        "/v1/receipts:export",
    ] {
        assert!(sh.contains(route), "the curl block lacks {route}:\n{sh}");
    }
    // The block is the shell's, not this test's: no placeholders to fill.
    assert!(!sh.contains('…'), "{sh}");
}

#[test]
fn readme_curl_golden_path_runs_as_written() {
    let text = readme();
    let sh = block(&text);
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples(), &dir.path().join("examples"));
    let _dev = start_dev(dir.path());

    std::fs::write(
        dir.path().join("curl.sh"),
        format!("set -eu -o pipefail\nset -x\n{sh}"),
    )
    .unwrap();
    let Some(status) = run_bash(dir.path(), "curl", Duration::from_secs(120)) else {
        panic!(
            "the curl walkthrough did not finish in 120 s:\n{}\n{}\n--- watch.sse\n{}",
            read(dir.path(), "curl.out"),
            read(dir.path(), "curl.err"),
            read(dir.path(), "watch.sse")
        );
    };
    let out = read(dir.path(), "curl.out");
    let err = read(dir.path(), "curl.err");
    assert!(
        status.success(),
        "the curl walkthrough failed ({status}):\n--- stdout\n{out}\n--- stderr\n{err}\n--- dev.log\n{}",
        read(dir.path(), "dev.log")
    );

    // The preflight's verdict, as the comment says.
    assert!(out.contains("PREFLIGHT_VERDICT_WARN"), "{out}");
    // The starter's own approval: a Status naming SELF_APPROVAL.
    assert!(out.contains("\"SELF_APPROVAL\""), "{out}");
    // Alice's approval leaves it pending (1 of 2), bob's approves it.
    let pending = out.find("APPROVAL_STATE_PENDING").expect("alice's answer");
    let approved = out.find("APPROVAL_STATE_APPROVED").expect("bob's answer");
    assert!(pending < approved, "{out}");
    // The last line: the run's state.
    assert_eq!(out.lines().last(), Some("RUN_STATE_SUCCEEDED"), "{out}");

    // The watch came as SSE: ids increasing, a result per change, the
    // approval wait and the end of the run in it.
    let sse = read(dir.path(), "watch.sse");
    let ids: Vec<i64> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(ids.len() >= 3, "{sse}");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(
        sse.matches("event: result\n").count(),
        ids.len(),
        "every result has its id:\n{sse}"
    );
    assert!(sse.contains("STEP_STATE_WAITING_APPROVAL"), "{sse}");
    assert!(sse.contains("RUN_STATE_SUCCEEDED"), "{sse}");
    assert!(
        out.lines().any(|l| l.trim() == ids.len().to_string()),
        "grep -c printed the number of ids:\n{out}"
    );

    // The receipts export: raw NDJSON, a signed receipt per line, the
    // approvals' decisions and the run's steps among them.
    let receipts = read(dir.path(), "receipts.ndjson");
    let kinds: Vec<String> = receipts
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(
                v["signature"].as_str().is_some_and(|s| !s.is_empty()),
                "{l}"
            );
            v["kind"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(
        kinds.iter().any(|k| k == "RECEIPT_KIND_APPROVAL_DECISION"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k == "RECEIPT_KIND_STEP_EXECUTION"),
        "{kinds:?}"
    );

    // What the platform holds: one run, succeeded, approved by alice and bob.
    let runs = cli(dir.path(), &["run", "list", "-o", "json"]).ok().json();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["state"], "RUN_STATE_SUCCEEDED");
    let run_id = runs[0]["runId"].as_str().unwrap();
    let approvals = cli(
        dir.path(),
        &["approval", "list", "--run", run_id, "-o", "json"],
    )
    .ok()
    .json();
    let approval = &approvals["approvals"][0];
    assert_eq!(approval["state"], "APPROVAL_STATE_APPROVED", "{approval:#}");
    let text = approval.to_string();
    assert!(
        text.contains("user:alice") && text.contains("user:bob"),
        "{approval:#}"
    );
}
