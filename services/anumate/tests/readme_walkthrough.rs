#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The README's golden-path walkthrough, run as written: every command of
//! the `sh` block after the `<!-- walkthrough … -->` marker goes through
//! bash, in order, in one shell (so `RUN=$(…)` carries to later commands),
//! against a real `anumate dev` in a temporary directory holding a copy of
//! `examples/`. Nothing in a command is substituted: `anumate` is this
//! build's binary, found first on `PATH`. A command must exit 0, or the code
//! its trailing comment names (`# WARN, exit 2: …`). Then what the reader was
//! told happened is checked: one run, SUCCEEDED; the transfer acted once; two
//! approvals by alice and bob; every receipt of the run verified.

mod common;

use std::time::Duration;

use common::{cli, copy_dir, examples, read_in as read, readme, run_bash, start_dev};
use serde_json::Value;

const MARKER: &str = "<!-- walkthrough";

/// One command of the walkthrough and the exit code it must end with.
#[derive(Debug, PartialEq)]
struct Step {
    command: String,
    exit: i32,
}

/// The commands of the `sh` block following the walkthrough marker: lines
/// continued with `\` joined, blank lines and comment-only lines dropped.
fn walkthrough(readme: &str) -> Vec<Step> {
    let start = readme
        .find(MARKER)
        .expect("README.md has no `<!-- walkthrough` marker");
    let rest = &readme[start..];
    let open = rest
        .find("```sh\n")
        .expect("no ```sh block after the marker")
        + "```sh\n".len();
    let body = &rest[open..];
    let close = body
        .find("\n```")
        .expect("the walkthrough block is not closed");
    let mut steps = Vec::new();
    let mut pending = String::new();
    for line in body[..close].lines() {
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(line);
        let command = std::mem::take(&mut pending).trim().to_owned();
        if command.is_empty() || command.starts_with('#') {
            continue;
        }
        let exit = expected_exit(&command);
        steps.push(Step { command, exit });
    }
    steps
}

/// `exit N` in a command's trailing comment (` # …`), else 0.
fn expected_exit(command: &str) -> i32 {
    let Some(at) = command.find(" # ") else {
        return 0;
    };
    let comment = &command[at..];
    comment
        .split_once("exit ")
        .and_then(|(_, n)| {
            n.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok())
        })
        .unwrap_or(0)
}

/// A bash script running `steps` in one shell, stopping at the first one
/// that does not end as its comment says; at the end it prints the run id.
fn script(steps: &[Step]) -> String {
    let mut s = String::from("set -u\n");
    for (i, step) in steps.iter().enumerate() {
        let n = i + 1;
        let quoted = step.command.replace('\'', r"'\''");
        s.push_str(&format!("printf '\\n@@ %s\\n' '{quoted}'\n"));
        // The command on a line of its own: its trailing comment must not
        // swallow the check.
        s.push_str(&step.command);
        s.push('\n');
        s.push_str(&format!(
            "rc=$?; if [ \"$rc\" -ne {exit} ]; then echo \"walkthrough step {n} exited $rc, expected {exit}: {escaped}\" >&2; exit 100; fi\n",
            exit = step.exit,
            escaped = quoted.replace('"', "\\\"").replace('$', "\\$").replace('`', "\\`"),
        ));
    }
    s.push_str("printf '\\n@@RUN=%s\\n' \"$RUN\"\n");
    s
}

#[test]
fn walkthrough_is_parsed_as_written() {
    let steps = walkthrough(readme().as_str());
    assert!(steps.len() >= 15, "{steps:#?}");
    let find = |prefix: &str| {
        steps
            .iter()
            .find(|s| s.command.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in the walkthrough: {steps:#?}"))
    };
    // The story the issue tells, in the README's words.
    assert_eq!(
        find("anumate preflight transfer --inputs examples/transfer.inputs.json ").exit,
        2
    );
    assert_eq!(
        find("anumate tool push examples/transfer.tools.yaml").exit,
        0
    );
    find("anumate policy push examples/transfer.policy");
    find("anumate capsule push examples/transfer.capsule.yaml");
    find("RUN=$(anumate run start transfer");
    find("anumate receipt verify");
    find("anumate connector calls --run $RUN");
    assert_eq!(expected_exit("a # WARN, exit 2: b"), 2);
    assert_eq!(expected_exit("a --exit 3"), 0);
    assert_eq!(
        walkthrough("x\n<!-- walkthrough -->\n```sh\na \\\n  b   # c\n\n# d\ne\n```\n"),
        vec![
            Step {
                command: "a   b   # c".into(),
                exit: 0
            },
            Step {
                command: "e".into(),
                exit: 0
            }
        ]
    );
}

#[test]
fn readme_walkthrough_runs_as_written() {
    let steps = walkthrough(readme().as_str());
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&examples(), &dir.path().join("examples"));
    let _dev = start_dev(dir.path());

    std::fs::write(dir.path().join("walkthrough.sh"), script(&steps)).unwrap();
    let Some(status) = run_bash(dir.path(), "walkthrough", Duration::from_secs(180)) else {
        panic!(
            "the walkthrough did not finish in 180 s:\n{}\n{}",
            read(dir.path(), "walkthrough.out"),
            read(dir.path(), "walkthrough.err")
        );
    };
    let out = read(dir.path(), "walkthrough.out");
    let err = read(dir.path(), "walkthrough.err");
    assert!(
        status.success(),
        "the walkthrough failed ({status}):\n--- stdout\n{out}\n--- stderr\n{err}\n--- dev.log (tail)\n{}",
        tail(&read(dir.path(), "dev.log"), 40)
    );
    let run_id = out
        .lines()
        .find_map(|l| l.strip_prefix("@@RUN="))
        .expect("the run id")
        .to_owned();
    assert!(!run_id.is_empty(), "{out}");

    // One run, and it succeeded.
    let runs = cli(dir.path(), &["run", "list", "-o", "json"]).ok().json();
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["runId"], run_id.as_str());
    assert_eq!(runs[0]["state"], "RUN_STATE_SUCCEEDED");

    // The transfer acted once through the hub, with the run's key.
    let calls = cli(
        dir.path(),
        &["connector", "calls", "--run", &run_id, "-o", "json"],
    )
    .ok()
    .json();
    let calls = calls["calls"].as_array().cloned().unwrap_or_default();
    let transfers: Vec<&Value> = calls
        .iter()
        .filter(|c| c["tool"] == "payments.transfer")
        .collect();
    assert_eq!(transfers.len(), 1, "{calls:#?}");
    assert!(
        out.contains("payments.transfer"),
        "connector calls showed no transfer:\n{out}"
    );

    // Two approvals by alice and bob, and the starter's refused.
    assert!(err.contains("error[SELF_APPROVAL]"), "{err}");
    let approvals = cli(
        dir.path(),
        &["approval", "list", "--run", &run_id, "-o", "json"],
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

    // Every receipt of the run was fetched with its proof and verified.
    let ids: Vec<String> = cli(dir.path(), &["receipt", "list", "--run", &run_id, "-q"])
        .ok()
        .stdout
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(ids.len() >= 3, "{ids:?}");
    for id in &ids {
        assert!(
            dir.path().join(format!("receipt-{id}.json")).exists(),
            "no bundle for receipt {id}"
        );
        assert!(
            out.contains(&format!("ok: receipt {id} ")),
            "receipt {id} not verified:\n{out}"
        );
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
