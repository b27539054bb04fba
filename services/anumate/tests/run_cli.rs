#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate run …` against `anumate dev`: start (a capsule, compiled first,
//! or a plan hash; `-q`, `--watch`, `-o json`), get, list, watch (exit 0
//! only for SUCCEEDED, `--until`), pause, resume, cancel, kill, retry of a
//! failed step; and bad input: no preflight cited, an unknown plan or
//! capsule, inputs the plan's schema refuses, a control call on a finished
//! run, a stale etag. Each refusal names its reason, exits non-zero and
//! leaves no run behind.

mod common;

use std::path::Path;

use common::{Run, cli, start_dev};
use serde_json::Value;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: demo.echo}
spec:
  connector: mock
  side_effect: read
  idempotent: true
  input: {type: object, required: [msg], properties: {msg: {type: string}}}
  mock: {output: {said: \"${{ args.msg }}\"}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: demo.gated}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, properties: {msg: {type: string}}}
  mock: {output: {done: true}}
---
apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: demo.flaky}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  input: {type: object, properties: {msg: {type: string}}}
  mock: {output: {done: true}, fail: {times: 1, code: FAILED_PRECONDITION}}
";

const POLICY: &str = r#"policy "demo-guard" {
  rule "gated-needs-alice" {
    when tool == "demo.gated"
    then require_approval(approvers: ["user:alice"], quorum: 1, reason: "gated")
  }
}
"#;

fn capsule(name: &str, tool: &str) -> String {
    format!(
        "apiVersion: anumate.dev/v1
kind: Capsule
metadata: {{name: {name}}}
spec:
  inputs:
    msg: {{type: string, required: true}}
  tools: [{tool}]
  policies: [demo-guard]
  steps:
    - id: only
      tool: {tool}
      with: {{msg: \"${{{{ inputs.msg }}}}\"}}
      retry: {{max_attempts: 1}}
"
    )
}

/// Pushes the tools, the policy and three capsules (`echo`, `gated`,
/// `flaky`), writes `in.json` and `bad.json`.
fn seed(d: &Path) {
    std::fs::write(d.join("tools.yaml"), TOOLS).unwrap();
    std::fs::write(d.join("demo.policy"), POLICY).unwrap();
    cli(d, &["tool", "push", "tools.yaml"]).ok();
    cli(d, &["policy", "push", "demo.policy", "--publish"]).ok();
    for (name, tool) in [
        ("echo", "demo.echo"),
        ("gated", "demo.gated"),
        ("flaky", "demo.flaky"),
    ] {
        let file = format!("{name}.capsule.yaml");
        std::fs::write(d.join(&file), capsule(name, tool)).unwrap();
        cli(d, &["capsule", "push", &file, "--publish"]).ok();
    }
    std::fs::write(d.join("in.json"), r#"{"msg": "hello"}"#).unwrap();
    std::fs::write(d.join("bad.json"), r#"{"msg": 42}"#).unwrap();
}

/// The reason in `error[REASON]` of a failed command.
#[track_caller]
fn reason(out: &Run) -> String {
    assert!(!out.status.success(), "should have failed: {out:#?}");
    let at = out
        .stderr
        .find("error[")
        .unwrap_or_else(|| panic!("no error[…] on stderr: {out:#?}"));
    let rest = &out.stderr[at + "error[".len()..];
    rest[..rest.find(']').unwrap()].to_owned()
}

fn get(d: &Path, id: &str) -> Value {
    cli(d, &["run", "get", id, "-o", "json"]).ok().json()["run"].clone()
}

fn state(d: &Path, id: &str) -> String {
    get(d, id)["state"].as_str().unwrap().to_owned()
}

fn start_q(d: &Path, target: &str) -> String {
    let out = cli(d, &["run", "start", target, "--inputs", "in.json", "-q"]).ok();
    let id = out.stdout.trim().to_owned();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{out:#?}"
    );
    id
}

fn count_runs(d: &Path) -> usize {
    cli(d, &["run", "list", "-o", "json", "--limit", "500"])
        .ok()
        .json()["runs"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn run_commands_against_anumate_dev() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _dev = start_dev(d);
    seed(d);

    // The tenant demands a preflight by default: refused, no run.
    let out = cli(d, &["run", "start", "echo", "--inputs", "in.json"]);
    assert_eq!(reason(&out), "PREFLIGHT_REQUIRED", "{out:#?}");
    assert_eq!(count_runs(d), 0);
    // Cited, it starts: the preflight's id from `preflight -q`.
    let pf = cli(d, &["preflight", "echo", "--inputs", "in.json", "-q"]).ok();
    let pf = pf.stdout.trim().to_owned();
    let out = cli(
        d,
        &[
            "run",
            "start",
            "echo",
            "--inputs",
            "in.json",
            "--preflight",
            &pf,
            "--watch",
        ],
    )
    .ok();
    assert!(out.stdout.contains("SUCCEEDED"), "{out:#?}");
    assert_eq!(count_runs(d), 1);
    // The rest without preflights.
    cli(
        d,
        &[
            "tenant",
            "settings",
            "set",
            "require_preflight=false",
            "--etag",
            "r0",
        ],
    )
    .ok();

    // start -o json: the run; get, list, watch of a finished run.
    let started = cli(
        d,
        &[
            "run",
            "start",
            "echo",
            "--inputs",
            "in.json",
            "--idempotency-key",
            "k-echo",
            "-l",
            "team=demo",
            "-o",
            "json",
        ],
    )
    .ok()
    .json();
    assert_eq!(started["created"], true, "{started:#}");
    let echo = started["run"]["runId"].as_str().unwrap().to_owned();
    let watched = cli(d, &["run", "watch", &echo]).ok();
    assert!(watched.stdout.contains("SUCCEEDED"), "{watched:#?}");
    let run = get(d, &echo);
    assert_eq!(run["state"], "RUN_STATE_SUCCEEDED", "{run:#}");
    assert_eq!(run["steps"][0]["stepId"], "only");
    assert_eq!(run["labels"]["team"], "demo", "{run:#}");
    let human = cli(d, &["run", "get", &echo]).ok();
    assert!(
        human.stdout.contains(&echo) && human.stdout.contains("SUCCEEDED"),
        "{human:#?}"
    );
    // The same key: the same run, not a new one.
    let again = cli(
        d,
        &[
            "run",
            "start",
            "echo",
            "--inputs",
            "in.json",
            "--idempotency-key",
            "k-echo",
            "-l",
            "team=demo",
            "-o",
            "json",
        ],
    )
    .ok()
    .json();
    assert_eq!(again["run"]["runId"], echo.as_str());
    assert_ne!(again["created"], true);
    // By plan hash too.
    let plan = run["planHash"].as_str().unwrap().to_owned();
    let by_plan = start_q(d, &plan);
    let watched = cli(d, &["run", "watch", &by_plan, "-o", "json"]).ok();
    assert!(watched.stdout.lines().count() > 0, "{watched:#?}");
    let listed = cli(d, &["run", "list", "-l", "team=demo", "-o", "json"])
        .ok()
        .json();
    let ids: Vec<&str> = listed["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["runId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![echo.as_str()]);
    let human = cli(d, &["run", "list", "--state", "succeeded"]).ok();
    assert!(
        human.stdout.contains(&echo) && human.stdout.contains(&by_plan),
        "{human:#?}"
    );

    // A gated run waits: pause, resume, cancel; then a control call on the
    // finished run and a stale etag are refused.
    let gated = start_q(d, "gated");
    cli(d, &["run", "watch", &gated, "--until", "waiting-approval"]).ok();
    assert_eq!(state(d, &gated), "RUN_STATE_WAITING_APPROVAL");
    let etag = get(d, &gated)["etag"].as_str().unwrap().to_owned();
    cli(d, &["run", "pause", &gated, "--reason", "lunch"]).ok();
    assert_eq!(state(d, &gated), "RUN_STATE_PAUSED");
    let out = cli(d, &["run", "resume", &gated, "--etag", &etag]);
    assert_eq!(reason(&out), "ETAG_MISMATCH", "{out:#?}");
    assert_eq!(state(d, &gated), "RUN_STATE_PAUSED");
    cli(d, &["run", "resume", &gated]).ok();
    assert_eq!(state(d, &gated), "RUN_STATE_WAITING_APPROVAL");
    cli(d, &["run", "cancel", &gated, "--reason", "not needed"]).ok();
    // Cancelling is cooperative: the watch follows it to its end.
    let out = cli(d, &["run", "watch", &gated]);
    assert_eq!(out.status.code(), Some(1), "{out:#?}");
    assert_eq!(state(d, &gated), "RUN_STATE_CANCELLED");
    let out = cli(d, &["run", "pause", &gated]);
    assert!(!out.status.success(), "{out:#?}");
    assert!(reason(&out).starts_with("RUN_"), "{out:#?}");
    assert_eq!(state(d, &gated), "RUN_STATE_CANCELLED");

    // Kill: at once.
    let killed = start_q(d, "gated");
    cli(d, &["run", "watch", &killed, "--until", "waiting-approval"]).ok();
    let out = cli(
        d,
        &[
            "run",
            "kill",
            &killed,
            "--reason",
            "wrong account",
            "-o",
            "json",
        ],
    )
    .ok();
    let after = out.json();
    assert_eq!(after["run"]["state"], "RUN_STATE_CANCELLED", "{after:#}");
    assert_eq!(cli(d, &["run", "watch", &killed]).status.code(), Some(1));

    // A step that fails (not retryable, one attempt): the run fails at once
    // and watch exits 1; the failed run's step cannot be retried (the run has
    // ended), nor a step that has not failed.
    let flaky = start_q(d, "flaky");
    let out = cli(d, &["run", "watch", &flaky]);
    assert_eq!(out.status.code(), Some(1), "{out:#?}");
    let run = get(d, &flaky);
    assert_eq!(run["state"], "RUN_STATE_FAILED", "{run:#}");
    assert_eq!(run["steps"][0]["state"], "STEP_STATE_FAILED", "{run:#}");
    let out = cli(d, &["run", "retry", &flaky, "only"]);
    assert_eq!(reason(&out), "RUN_TERMINAL", "{out:#?}");
    let waiting = start_q(d, "gated");
    cli(
        d,
        &["run", "watch", &waiting, "--until", "waiting-approval"],
    )
    .ok();
    let out = cli(d, &["run", "retry", &waiting, "only"]);
    assert_eq!(reason(&out), "STEP_NOT_RESOLVABLE", "{out:#?}");
    let out = cli(d, &["run", "retry", &waiting, "nope"]);
    assert_eq!(reason(&out), "STEP_NOT_FOUND", "{out:#?}");
    assert_eq!(state(d, &waiting), "RUN_STATE_WAITING_APPROVAL");
    // The failed call was delivered once and did not act.
    let calls = cli(d, &["connector", "calls", "--run", &flaky, "-o", "json"])
        .ok()
        .json();
    let calls = calls["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0]["deliveries"], 1, "{calls:#?}");
    let history = cli(d, &["run", "history", &flaky]).ok();
    assert!(history.stdout.contains("only"), "{history:#?}");
}

#[test]
fn bad_input_is_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _dev = start_dev(d);
    seed(d);
    cli(
        d,
        &[
            "tenant",
            "settings",
            "set",
            "require_preflight=false",
            "--etag",
            "r0",
        ],
    )
    .ok();

    // An unknown plan.
    let unknown = format!("sha256:{}", "ab".repeat(32));
    let out = cli(d, &["run", "start", &unknown, "--inputs", "in.json"]);
    assert_eq!(reason(&out), "PLAN_NOT_FOUND", "{out:#?}");
    // An unknown capsule.
    let out = cli(d, &["run", "start", "nope", "--inputs", "in.json"]);
    assert_eq!(reason(&out), "CAPSULE_NOT_FOUND", "{out:#?}");
    // Inputs the schema refuses: the field and what is wrong named.
    let out = cli(d, &["run", "start", "echo", "--inputs", "bad.json"]);
    assert_eq!(reason(&out), "INVALID_ARGUMENT", "{out:#?}");
    assert!(
        out.stderr.contains("inputs.msg: must be of type string"),
        "{out:#?}"
    );
    // A required input missing.
    std::fs::write(d.join("empty.json"), "{}").unwrap();
    let out = cli(d, &["run", "start", "echo", "--inputs", "empty.json"]);
    assert_eq!(reason(&out), "INVALID_ARGUMENT", "{out:#?}");
    assert!(out.stderr.contains("inputs.msg"), "{out:#?}");
    // Inputs that are not a JSON object: refused before any call.
    std::fs::write(d.join("list.json"), "[1, 2]").unwrap();
    let out = cli(d, &["run", "start", "echo", "--inputs", "list.json"]).failed();
    assert!(out.stderr.contains("list.json"), "{out:#?}");
    // An unknown preflight cited.
    let out = cli(
        d,
        &[
            "run",
            "start",
            "echo",
            "--inputs",
            "in.json",
            "--preflight",
            "01a00000-0000-7000-8000-000000000000",
        ],
    );
    assert!(reason(&out).contains("PREFLIGHT"), "{out:#?}");
    // An unknown run.
    let out = cli(d, &["run", "get", "01a00000-0000-7000-8000-000000000000"]);
    assert_eq!(reason(&out), "RUN_NOT_FOUND", "{out:#?}");
    let out = cli(
        d,
        &["run", "cancel", "01a00000-0000-7000-8000-000000000000"],
    );
    assert_eq!(reason(&out), "RUN_NOT_FOUND", "{out:#?}");
    // Nothing half-written; the server still serves.
    assert_eq!(count_runs(d), 0);
    let id = start_q(d, "echo");
    cli(d, &["run", "watch", &id]).ok();
}
