#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate serve all` runs the REST gateway next to the services (it used to
//! need `serve all gateway`); naming only services leaves it out.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{anumate, http_get};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_key(path: &Path) {
    let key = anumate_crypto::KeyPair::generate().unwrap();
    std::fs::write(path, key.to_pkcs8_pem()).unwrap();
}

/// Starts `anumate serve <names…>` with keys and a SQLite store in `dir`;
/// returns the process and its start-up lines (up to the first blank wait).
fn serve(dir: &Path, names: &[&str]) -> (Killed, Vec<String>) {
    for k in ["registry", "receipts", "tokens"] {
        write_key(&dir.join(format!("{k}.pem")));
    }
    let config = dir.join("serve.toml");
    let k = |name: &str| dir.join(format!("{name}.pem")).display().to_string();
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = {store:?}\n\n[admin]\nlisten = \"off\"\n\n\
             [keys]\nregistry_key_files = [{reg:?}]\nreceipts_key_files = [{rec:?}]\n\n\
             [captokens]\nkey_files = [{tok:?}]\n",
            store = format!("sqlite://{}", dir.join("serve.db").display()),
            reg = k("registry"),
            rec = k("receipts"),
            tok = k("tokens"),
        ),
    )
    .unwrap();
    let mut cmd = anumate(dir);
    cmd.arg("serve")
        .args(names)
        .args(["--listen", "127.0.0.1:0", "--migrate", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap());
    let mut child = cmd.spawn().expect("anumate serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let child = Killed(child);
    let mut lines = Vec::new();
    // The serving line comes first; the gateway's, if any, right after it.
    let mut wait = Duration::from_secs(60);
    while let Ok(line) = rx.recv_timeout(wait) {
        if line.contains(" on http://") {
            wait = Duration::from_secs(2);
        }
        lines.push(line);
    }
    assert!(
        lines.iter().any(|l| l.contains(" on http://")),
        "anumate serve did not start: {lines:?}\n{}",
        std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
    );
    (child, lines)
}

#[test]
fn serve_all_runs_the_gateway_and_named_services_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (_all, lines) = serve(dir.path(), &["all"]);
    let rest = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("rest:"))
        .unwrap_or_else(|| panic!("no rest: line from serve all: {lines:?}"));
    let addr = rest
        .trim()
        .strip_prefix("http://")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{rest}"))
        .to_owned();
    let (status, body) = http_get(&addr, "/openapi.json");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"openapi\":\"3.1.0\""), "{body}");
    let (status, _) = http_get(&addr, "/docs");
    assert_eq!(status, 200);
    // Through the gateway to the services: no token, a Status saying so.
    let (status, body) = http_get(&addr, "/v1/capsules");
    assert_eq!(status, 401, "{body}");

    let other = tempfile::tempdir().unwrap();
    let (_registry, lines) = serve(other.path(), &["registry"]);
    assert!(
        !lines.iter().any(|l| l.trim().starts_with("rest:")),
        "{lines:?}"
    );
}
