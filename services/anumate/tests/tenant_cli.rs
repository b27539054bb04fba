#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate tenant settings` as a user runs it against `anumate dev`: the
//! defaults, a change by the admin (the mask built from the keys), `-o json`,
//! a stale etag, bad keys and values refused precisely with nothing changed,
//! and a non-admin who may read but not change.

use std::path::Path;

mod common;
use common::{cli, start_dev};

#[track_caller]
fn ok(dir: &Path, args: &[&str]) -> String {
    cli(dir, args).ok().stdout
}

#[test]
fn settings_are_shown_changed_and_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _dev = start_dev(d);

    let out = ok(d, &["tenant", "settings"]);
    for line in [
        "require_preflight        true",
        "preflight_citation_ttl   1h",
        "approval_default_expiry  1d",
        "idempotency_retention    1d",
        "run_retention            30d",
        "etag                     r0",
        "updated                  -",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }

    let out = ok(
        d,
        &[
            "tenant",
            "settings",
            "set",
            "require_preflight=false",
            "preflight_citation_ttl=30m",
            "--etag",
            "r0",
        ],
    );
    assert!(out.contains("require_preflight        false"), "{out}");
    assert!(out.contains("preflight_citation_ttl   30m"), "{out}");
    assert!(out.contains("run_retention            30d"), "{out}");
    assert!(out.contains("etag                     r1"), "{out}");

    let json = cli(d, &["tenant", "settings", "-o", "json"]).ok().json();
    assert_eq!(json["requirePreflight"], false, "{json}");
    assert_eq!(json["preflightCitationTtl"], "1800s", "{json}");
    assert_eq!(json["runRetention"], "2592000s", "{json}");
    assert_eq!(json["etag"], "r1", "{json}");

    // A stale etag.
    let out = cli(
        d,
        &[
            "tenant",
            "settings",
            "set",
            "run_retention=7d",
            "--etag",
            "r0",
        ],
    )
    .failed();
    assert!(out.stderr.contains("ETAG_MISMATCH"), "{out:#?}");
    assert!(out.stderr.contains("etag is r1"), "{out:#?}");

    // Out of bounds, and a key that is no setting: the server names them.
    let out = cli(
        d,
        &["tenant", "settings", "set", "preflight_citation_ttl=8d"],
    )
    .failed();
    assert!(
        out.stderr
            .contains("settings.preflight_citation_ttl: must be from 1m to 7d, got 691200s"),
        "{out:#?}"
    );
    let out = cli(
        d,
        &[
            "tenant",
            "settings",
            "set",
            "colour=blue",
            "run_retention=2d",
        ],
    )
    .failed();
    assert!(out.stderr.contains("INVALID_ARGUMENT"), "{out:#?}");
    assert!(out.stderr.contains("\"colour\""), "{out:#?}");
    // Values this CLI parses are refused before any call.
    let out = cli(d, &["tenant", "settings", "set", "run_retention=soon"]).failed();
    assert!(
        out.stderr
            .contains("run_retention: \"soon\" is not a duration"),
        "{out:#?}"
    );
    let out = cli(d, &["tenant", "settings", "set"]).failed();
    assert!(out.stderr.contains("KEY=VALUE"), "{out:#?}");

    // An auditor reads but may not change.
    let token = cli(d, &["auth", "dev-token", "--roles", "auditor"])
        .ok()
        .stdout;
    let token = token.trim();
    let out = ok(d, &["tenant", "settings", "--token", token]);
    assert!(out.contains("etag                     r1"), "{out}");
    let out = cli(
        d,
        &[
            "tenant",
            "settings",
            "set",
            "require_preflight=true",
            "--token",
            token,
        ],
    )
    .failed();
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:#?}");

    // Nothing of the refused changes was written.
    let json = cli(d, &["tenant", "settings", "-o", "json"]).ok().json();
    assert_eq!(json["requirePreflight"], false, "{json}");
    assert_eq!(json["runRetention"], "2592000s", "{json}");
    assert_eq!(json["etag"], "r1", "{json}");
}
