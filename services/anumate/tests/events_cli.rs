#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate events tail` against `anumate dev` without Kafka: events a push
//! writes to the outbox reach the tail through the events service (history
//! first, then live), and bad flags get precise errors.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{anumate, cli, examples, start_dev};

#[test]
fn events_tail_follows_a_push_without_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let src = examples().join("refund.capsule.yaml");
    std::fs::copy(&src, dir.path().join("refund.capsule.yaml")).unwrap();
    let _dev = start_dev(dir.path());

    // A live tail started before the push (JSON lines on stdout).
    let mut live = anumate(dir.path())
        .args([
            "events",
            "tail",
            "--type",
            "dev.anumate.capsule.*",
            "-o",
            "json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tail");
    let stdout = live.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // Give the tail time to subscribe before anything is committed.
    std::thread::sleep(Duration::from_millis(500));

    cli(
        dir.path(),
        &["capsule", "push", "refund.capsule.yaml", "--publish"],
    )
    .ok();

    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("live event");
    let second = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("live event");
    let _ = live.kill();
    let _ = live.wait();
    assert_eq!(first["type"], "dev.anumate.capsule.pushed.v1");
    assert_eq!(second["type"], "dev.anumate.capsule.published.v1");
    assert_eq!(second["topic"], "anumate.capsules");
    assert_eq!(second["tenantId"], "dev");

    // History, human-readable, then exit.
    let stdout = cli(
        dir.path(),
        &["events", "tail", "--since", "all", "--no-follow"],
    )
    .ok()
    .stdout;
    let pushed = stdout.find("dev.anumate.capsule.pushed.v1").expect(&stdout);
    let published = stdout
        .find("dev.anumate.capsule.published.v1")
        .expect(&stdout);
    assert!(pushed < published, "{stdout}");
    assert!(
        stdout.contains("\"name\":\"refund-small-orders\""),
        "{stdout}"
    );

    // Resume after the first event: only the second.
    let seq = first["sequence"].as_str().map_or_else(
        || first["sequence"].as_i64().unwrap().to_string(),
        str::to_string,
    );
    let out = cli(
        dir.path(),
        &[
            "events",
            "tail",
            "--after",
            &seq,
            "--no-follow",
            "-o",
            "json",
        ],
    );
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["id"], second["id"]);

    // Bad input: precise errors.
    for (args, expected) in [
        (
            &["events", "tail", "--since", "someday"][..],
            &["--since"][..],
        ),
        (
            &["events", "tail", "--type", "not a type", "--no-follow"],
            &["INVALID_ARGUMENT", "filter.types[0]"],
        ),
        // Replay needs Kafka, which `dev` here does not have.
        (
            &[
                "events",
                "replay",
                "--topic",
                "anumate.capsules",
                "--from",
                "0",
            ],
            &["FAILED_PRECONDITION"],
        ),
    ] {
        let out = cli(dir.path(), args).failed();
        for text in expected {
            assert!(out.stderr.contains(text), "{text:?}: {out:#?}");
        }
    }
}
