#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The CLI against a server with `[tls]` (issue 18): `anumate dev` with mTLS
//! on its listener (a certificate for 127.0.0.1 and a client CA), and the
//! CLI's `--tls-ca`, `--tls-cert`, `--tls-key` (or `ANUMATE_TLS_CA`, …):
//! with a certificate of the CA the commands work, over the `https://`
//! address `dev.json` holds; without one, or with one of another
//! CA, or with a flag missing or a file that is not a certificate, the CLI
//! fails with an error that says why.

mod common;

use std::path::{Path, PathBuf};

use common::{Ca, Run, anumate, ca, dev_state, run, start_dev_env};
use rcgen::{CertificateParams, DnType, KeyPair};

/// `<dir>/<name>.crt` and `.key`, signed by `ca`, for 127.0.0.1.
fn certify(dir: &Path, ca: &Ca, name: &str) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let (crt, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (crt, k)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `anumate <args>` in `dir` with the environment `env`.
fn cli_env(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = anumate(dir);
    cmd.envs(env.iter().copied()).args(args);
    run(cmd)
}

#[test]
fn the_cli_presents_a_client_certificate_to_a_tls_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let mesh = ca("anumate CLI test CA");
    let ca_file = certs.join("ca.crt");
    std::fs::write(&ca_file, &mesh.pem).unwrap();
    let (server_crt, server_key) = certify(&certs, &mesh, "server");
    let (crt, key) = certify(&certs, &mesh, "operator");
    let rogue = ca("rogue CA");
    let (rogue_crt, rogue_key) = certify(&certs, &rogue, "rogue");

    let _dev = start_dev_env(
        d,
        &[
            ("ANUMATE_TLS__CERT", s(&server_crt)),
            ("ANUMATE_TLS__KEY", s(&server_key)),
            ("ANUMATE_TLS__CLIENT_CA", s(&ca_file)),
        ],
    );
    // `anumate dev` with `[tls]` says its listener is TLS.
    let https = dev_state(d)["server"].as_str().unwrap().to_owned();
    assert!(https.starts_with("https://"), "{https}");
    let plain = https.replace("https://", "http://");

    // With the flags: over an explicit https:// address, and over dev.json's.
    let flags = [
        "--tls-ca",
        s(&ca_file),
        "--tls-cert",
        s(&crt),
        "--tls-key",
        s(&key),
    ];
    let tools = common::examples().join("transfer.tools.yaml");
    let mut args = vec!["tool", "push", s(&tools), "--server", &https];
    args.extend(flags);
    let pushed = cli_env(d, &[], &args).ok();
    assert!(pushed.stdout.contains("payments.transfer"), "{pushed:#?}");
    let mut args = vec!["tool", "list", "-o", "json"];
    args.extend(flags);
    let listed = cli_env(d, &[], &args).ok();
    assert!(listed.stdout.contains("payments.transfer"), "{listed:#?}");
    // The same from the environment.
    let env = [
        ("ANUMATE_SERVER", https.as_str()),
        ("ANUMATE_TLS_CA", s(&ca_file)),
        ("ANUMATE_TLS_CERT", s(&crt)),
        ("ANUMATE_TLS_KEY", s(&key)),
    ];
    let listed = cli_env(d, &env, &["tool", "list"]).ok();
    assert!(listed.stdout.contains("payments.transfer"), "{listed:#?}");

    // An https:// server without the flags: told what to pass.
    let bare = cli_env(d, &[], &["tool", "list", "--server", &https]).failed();
    assert!(
        bare.stderr
            .contains("is TLS: pass --tls-ca, and --tls-cert and --tls-key when it asks"),
        "{bare:#?}"
    );
    // Plain HTTP/2 to the TLS listener: refused.
    let refused = cli_env(d, &[], &["tool", "list", "--server", &plain]).failed();
    assert!(
        !refused.stdout.contains("payments.transfer"),
        "{refused:#?}"
    );
    assert!(
        refused
            .stderr
            .contains("the connection to the server failed: transport error"),
        "{refused:#?}"
    );

    // A certificate of another CA: the server refuses the handshake, and
    // the CLI says so.
    let rogue_env = [
        ("ANUMATE_SERVER", https.as_str()),
        ("ANUMATE_TLS_CA", s(&ca_file)),
        ("ANUMATE_TLS_CERT", s(&rogue_crt)),
        ("ANUMATE_TLS_KEY", s(&rogue_key)),
    ];
    let refused = cli_env(d, &rogue_env, &["tool", "list"]).failed();
    assert!(
        refused
            .stderr
            .contains("refused this client's TLS certificate: received fatal alert: UnknownCA"),
        "the reason is the TLS refusal: {refused:#?}"
    );
    // The server's CA not trusted: the CLI refuses the server.
    let untrusted = [
        ("ANUMATE_SERVER", https.as_str()),
        ("ANUMATE_TLS_CA", s(&rogue_crt)),
        ("ANUMATE_TLS_CERT", s(&crt)),
        ("ANUMATE_TLS_KEY", s(&key)),
    ];
    let refused = cli_env(d, &untrusted, &["tool", "list"]).failed();
    assert!(
        refused.stderr.contains("over TLS") && refused.stderr.contains("certificate"),
        "{refused:#?}"
    );

    // Bad flags: precise local errors, exit code 1... before connecting.
    let missing = cli_env(
        d,
        &[],
        &[
            "tool",
            "list",
            "--server",
            &https,
            "--tls-ca",
            s(&ca_file),
            "--tls-cert",
            s(&crt),
        ],
    )
    .failed();
    assert!(
        missing
            .stderr
            .contains("--tls-cert and --tls-key together; missing: --tls-key"),
        "{missing:#?}"
    );
    // The CA alone to this server, which asks for a client certificate:
    // refused, never answered.
    let no_cert = cli_env(
        d,
        &[],
        &["tool", "list", "--server", &https, "--tls-ca", s(&ca_file)],
    )
    .failed();
    assert!(
        !no_cert.stdout.contains("payments.transfer"),
        "{no_cert:#?}"
    );
    let not_pem = cli_env(
        d,
        &[],
        &[
            "tool",
            "list",
            "--server",
            &https,
            "--tls-ca",
            s(&ca_file),
            "--tls-cert",
            s(&key),
            "--tls-key",
            s(&key),
        ],
    )
    .failed();
    assert!(
        not_pem
            .stderr
            .contains("--tls-cert: holds no PEM certificate"),
        "{not_pem:#?}"
    );
    let absent = certs.join("absent.crt");
    let gone = cli_env(
        d,
        &[],
        &[
            "tool",
            "list",
            "--server",
            &https,
            "--tls-ca",
            s(&absent),
            "--tls-cert",
            s(&crt),
            "--tls-key",
            s(&key),
        ],
    )
    .failed();
    assert!(
        gone.stderr.contains("--tls-ca: cannot read") && gone.stderr.contains("absent.crt"),
        "{gone:#?}"
    );
}

/// A server with `[tls]` but no `client_ca` (TLS without the "m"): the CLI
/// needs only `--tls-ca`, and still refuses a server its CA did not sign.
#[test]
fn the_cli_speaks_tls_with_only_a_ca_to_a_server_without_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = d.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let server_ca = ca("anumate server CA");
    let ca_file = certs.join("ca.crt");
    std::fs::write(&ca_file, &server_ca.pem).unwrap();
    let (server_crt, server_key) = certify(&certs, &server_ca, "server");
    let rogue = ca("rogue CA");
    let rogue_file = certs.join("rogue.crt");
    std::fs::write(&rogue_file, &rogue.pem).unwrap();

    let _dev = start_dev_env(
        d,
        &[
            ("ANUMATE_TLS__CERT", s(&server_crt)),
            ("ANUMATE_TLS__KEY", s(&server_key)),
            // What it trusts calling others; no `client_ca`.
            ("ANUMATE_TLS__CA", s(&ca_file)),
        ],
    );
    let https = dev_state(d)["server"].as_str().unwrap().to_owned();
    assert!(https.starts_with("https://"), "{https}");

    // dev.json's https:// address, and the same server named http://.
    let tools = common::examples().join("transfer.tools.yaml");
    let pushed = cli_env(
        d,
        &[],
        &["tool", "push", s(&tools), "--tls-ca", s(&ca_file)],
    )
    .ok();
    assert!(pushed.stdout.contains("payments.transfer"), "{pushed:#?}");
    let plain = https.replace("https://", "http://");
    let listed = cli_env(
        d,
        &[("ANUMATE_TLS_CA", s(&ca_file))],
        &["tool", "list", "--server", &plain],
    )
    .ok();
    assert!(listed.stdout.contains("payments.transfer"), "{listed:#?}");

    // Another CA: the CLI does not trust the server, and says so.
    let untrusted = cli_env(d, &[], &["tool", "list", "--tls-ca", s(&rogue_file)]).failed();
    assert!(
        untrusted.stderr.contains("over TLS") && untrusted.stderr.contains("certificate"),
        "{untrusted:#?}"
    );
    // A file that holds no certificate: said before connecting.
    let not_pem = cli_env(d, &[], &["tool", "list", "--tls-ca", s(&server_key)]).failed();
    assert!(
        not_pem.stderr.contains("--tls-ca") && not_pem.stderr.contains("holds no PEM certificate"),
        "{not_pem:#?}"
    );
}
