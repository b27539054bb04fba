#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate auth dev-token` for other users and groups, and `anumate
//! approval …` against `anumate dev` played by several people: an admin
//! opens an approval, approvers decide it by their own tokens (by name, by
//! group, by delegation), the requester and outsiders are refused with their
//! reasons, and `approval watch` follows the changes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use anumate_auth::{AuthConfig, Authenticator, DevIssuer, Role};
use serde_json::Value;

mod common;
use common::{Run, anumate, cli, run, start_dev};

/// `anumate auth dev-token …` in `dir`: the token alone on stdout.
fn dev_token(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, &[&["auth", "dev-token"], args].concat()).ok();
    let token = out.stdout.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{out:#?}");
    token
}

#[tokio::test]
async fn dev_tokens_name_any_user_roles_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = cli(
        d,
        &[
            "auth",
            "dev-token",
            "--tenant",
            "acme",
            "--subject",
            "user:alice",
            "--roles",
            "approver",
            "--roles",
            "auditor",
            "--groups",
            "controllers,finance",
            "--groups",
            "group:ops",
        ],
    )
    .ok();
    assert_eq!(
        out.stderr.trim(),
        "token for user:alice in tenant acme: roles approver, auditor; groups controllers, finance, ops",
        "{out:#?}"
    );
    // Verified as any service verifies it, with the key `anumate dev` uses.
    let issuer = DevIssuer::load_or_create(&d.join(".anumate/keys")).unwrap();
    let auth = Authenticator::new(AuthConfig::default())
        .unwrap()
        .with_static_issuer(issuer.issuer(), issuer.jwks());
    let alice = auth.authenticate(out.stdout.trim()).await.unwrap();
    assert_eq!(alice.subject, "user:alice");
    assert_eq!(alice.tenant_id, "acme");
    assert_eq!(alice.roles, vec![Role::Approver, Role::Auditor]);
    assert_eq!(alice.groups, vec!["controllers", "finance", "ops"]);
    assert!(alice.matches("group:ops"));

    // Without --groups: none; the defaults are the dev admin.
    let plain = auth.authenticate(&dev_token(d, &[])).await.unwrap();
    assert_eq!(plain.subject, "user:dev");
    assert_eq!(plain.roles, vec![Role::Admin]);
    assert!(plain.groups.is_empty());

    // A group name no verifier would take, or an unknown role: refused, nothing printed.
    let out = cli(d, &["auth", "dev-token", "--groups", "Ops Team"]).failed();
    assert!(out.stdout.is_empty(), "{out:#?}");
    assert!(
        out.stderr.contains("\"Ops Team\"") && out.stderr.contains("--groups"),
        "{out:#?}"
    );
    let out = cli(d, &["auth", "dev-token", "--roles", "approver,boss"]).failed();
    assert!(out.stdout.is_empty(), "{out:#?}");
    assert!(out.stderr.contains("unknown role \"boss\""), "{out:#?}");
}

/// `anumate approval <args>` in `dir` with `token` (the dev admin's when `None`).
fn approval(dir: &Path, token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = anumate(dir);
    cmd.arg("approval").args(args);
    if let Some(token) = token {
        cmd.env("ANUMATE_TOKEN", token);
    }
    run(cmd)
}

/// Opens an approval as the dev admin; its id.
fn request(dir: &Path, args: &[&str]) -> String {
    let out = approval(dir, None, &[&["request", "-o", "json"], args].concat()).ok();
    let id = out.json()["approval"]["approvalId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!id.is_empty(), "{out:#?}");
    id
}

#[test]
fn approvals_decided_by_their_approvers_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _dev = start_dev(d);
    let token = |subject: &str, groups: &str| {
        let mut args = vec!["--subject", subject, "--roles", "approver"];
        if !groups.is_empty() {
            args.extend(["--groups", groups]);
        }
        dev_token(d, &args)
    };
    let alice = token("user:alice", "");
    let carol = token("user:carol", "controllers");
    let dave = token("user:dave", "");
    let bob = token("user:bob", "auditors");
    let oscar = token("user:oscar", "controllers");

    // A follower started before anything happens.
    let mut watch = anumate(d)
        .args(["approval", "watch", "--run", "run-1", "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch");
    let (tx, rx) = mpsc::channel::<Value>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    // Give the follower time to subscribe ("from now on" is fixed then);
    // the decisions it must see come seconds later still.
    std::thread::sleep(Duration::from_millis(1000));

    // 2 of (alice, any controller), opened by the dev admin, oscar excluded.
    let id = request(
        d,
        &[
            "--run",
            "run-1",
            "--step",
            "refund",
            "--tool",
            "payments.refund",
            "--args",
            r#"{"amount": 1200, "currency": "INR"}"#,
            "--approvers",
            "user:alice,group:controllers",
            "--quorum",
            "2",
            "--exclude",
            "user:oscar",
            "--reason",
            "refunds above 1000 need two approvers",
        ],
    );

    // Who sees it as theirs.
    let mine = |token: &str| {
        approval(d, Some(token), &["list", "--mine", "-o", "json"])
            .ok()
            .json()["approvals"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|a| a["approvalId"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    assert_eq!(mine(&alice), vec![id.clone()]);
    assert_eq!(mine(&carol), vec![id.clone()]);
    assert!(mine(&bob).is_empty());
    let table = approval(d, None, &["list", "--pending"]).ok().stdout;
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains(&id) && table.contains("payments.refund") && table.contains("1/1 0/2"),
        "{table}"
    );

    // Refusals by reason, nothing recorded.
    let out = approval(d, Some(&bob), &["approve", &id]).failed();
    assert!(out.stderr.contains("error[NOT_AN_APPROVER]"), "{out:#?}");
    // Separation of duties: whoever opened it (the dev admin here), and
    // oscar, excluded though he is a controller.
    let out = approval(d, None, &["approve", &id]).failed();
    assert!(out.stderr.contains("error[SELF_APPROVAL]"), "{out:#?}");
    let out = approval(d, Some(&oscar), &["approve", &id]).failed();
    assert!(out.stderr.contains("error[SELF_APPROVAL]"), "{out:#?}");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let out = approval(d, Some(&alice), &["approve", &id, "--args-sha256", &wrong]).failed();
    assert!(
        out.stderr.contains("error[APPROVAL_ARGS_MISMATCH]"),
        "{out:#?}"
    );
    let out = approval(d, Some(&alice), &["reject", &id]).failed();
    assert!(out.stderr.contains("--comment"), "{out:#?}");

    // alice approves what she was shown; a retry is the same single vote.
    let out = approval(d, Some(&alice), &["approve", &id, "--comment", "ok"]).ok();
    assert!(
        out.stderr.contains("payments.refund") && out.stderr.contains("\"amount\""),
        "what is approved is shown first: {out:#?}"
    );
    assert_eq!(
        out.stdout.trim(),
        format!("{id}: pending, stage 1/1: 1 of 2 approvals")
    );
    let again = approval(d, Some(&alice), &["approve", &id, "--comment", "ok"]).ok();
    assert_eq!(again.stdout, out.stdout);

    // carol (a controller) hands her place to dave, who approves: granted.
    let out = approval(
        d,
        Some(&carol),
        &[
            "delegate",
            &id,
            "--to",
            "user:dave",
            "--comment",
            "on leave",
        ],
    )
    .ok();
    assert!(out.stdout.contains("1 of 2"), "{out:#?}");
    let out = approval(d, Some(&carol), &["approve", &id]).failed();
    assert!(out.stderr.contains("error[NOT_AN_APPROVER]"), "{out:#?}");
    let out = approval(d, Some(&dave), &["approve", &id]).ok();
    assert_eq!(out.stdout.trim(), format!("{id}: approved"));
    let out = approval(d, Some(&alice), &["reject", &id, "--comment", "late"]).failed();
    assert!(
        out.stderr.contains("error[APPROVAL_ALREADY_DECIDED]"),
        "{out:#?}"
    );

    // The record: what it was for and who did what.
    let shown = approval(d, Some(&bob), &["get", &id]).ok().stdout;
    for needle in [
        "state:      approved",
        "tool:       payments.refund",
        "requester:  user:dev",
        "excluded:   user:oscar",
        "refunds above 1000 need two approvers",
        "user:alice",
        "delegate stage 1 to user:dave  \"on leave\"",
        "user:dave",
    ] {
        assert!(shown.contains(needle), "{needle:?} in:\n{shown}");
    }
    let json = approval(d, None, &["get", &id, "-o", "json"]).ok().json();
    assert_eq!(json["state"], "APPROVAL_STATE_APPROVED");
    assert_eq!(json["decisions"].as_array().unwrap().len(), 3);

    // A rejection, found by state.
    let second = approval(
        d,
        None,
        &[
            "request",
            "-q",
            "--run",
            "run-2",
            "--step",
            "refund",
            "--tool",
            "payments.refund",
            "--approvers",
            "group:controllers",
        ],
    )
    .ok()
    .stdout
    .trim()
    .to_owned();
    assert_eq!(second.len(), 36, "only the id: {second}");
    let out = approval(
        d,
        Some(&carol),
        &["reject", &second, "--comment", "not this one"],
    )
    .ok();
    assert_eq!(out.stdout.trim(), format!("{second}: rejected"));
    let rejected = approval(d, None, &["list", "--state", "rejected"])
        .ok()
        .stdout;
    assert!(
        rejected.contains(&second) && !rejected.contains(&id),
        "{rejected}"
    );
    let run_1 = approval(d, None, &["list", "--run", "run-1", "-o", "json"])
        .ok()
        .json();
    assert_eq!(run_1["approvals"].as_array().unwrap().len(), 1);

    // Unknown: its reason.
    let out = approval(d, None, &["get", "00000000-0000-4000-8000-000000000000"]).failed();
    assert!(out.stderr.contains("error[APPROVAL_NOT_FOUND]"), "{out:#?}");

    // The follower saw run-1's changes, the delegation then the grant.
    let mut types = Vec::new();
    while let Ok(change) = rx.recv_timeout(Duration::from_secs(10)) {
        assert_eq!(change["approval"]["approvalId"], id.as_str());
        let t = change["eventType"].as_str().unwrap().to_owned();
        let done = t.contains("granted");
        types.push(t);
        if done {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        types.contains(&"dev.anumate.approval.delegated.v1".to_owned()),
        "{types:?}"
    );
    assert_eq!(
        types.last().map(String::as_str),
        Some("dev.anumate.approval.granted.v1"),
        "{types:?}"
    );
}
