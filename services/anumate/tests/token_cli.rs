#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate token mint|verify|revoke|jwks` against a live CapTokensService
//! (SQLite, behind the real auth layer, over a loopback socket), offline
//! verification with the JWKS, and the admin HTTP listener of `anumate dev`
//! (health, readiness, JWKS, Prometheus metrics) over a real socket.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_anumate");

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn plan_hash() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

struct Server {
    url: String,
    token: String,
    operator_token: String,
    handle: tokio::task::JoinHandle<()>,
    _db: anumate_testing::TestDb,
    _keys: tempfile::TempDir,
    _dev: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

async fn serve() -> Server {
    use anumate_auth::{AuthLayer, AuthzTable, Role};
    let (db, store) = anumate_testing::migrated_store(
        anumate_testing::Backend::Sqlite,
        &anumate_captokens_service::migrations(),
    )
    .await;
    let keys = tempfile::tempdir().unwrap();
    let cfg = anumate_captokens_service::CapTokensConfig::default();
    let ring = anumate_captokens_service::load_keys(&cfg, keys.path()).unwrap();
    let tokens =
        anumate_captokens_service::CapTokens::new(store, std::sync::Arc::new(ring), &cfg).unwrap();
    let auth = anumate_testing::DevAuth::new();
    let mint = |subject: &str, role: Role| {
        auth.issuer
            .mint("acme", subject, &[role], Duration::from_secs(600))
            .unwrap()
    };
    let token = mint("user:olivia", Role::Admin);
    let operator_token = mint("user:oscar", Role::Operator);
    let layer = anumate_captokens_service::PUBLIC_PATHS.iter().fold(
        AuthLayer::new(auth.authenticator, AuthzTable::platform().unwrap()),
        |l, p| l.allow_unauthenticated(*p),
    );
    let (addr, handle) = anumate_testing::serve_with_layer(
        anumate_testing::bind().await,
        layer,
        tonic::service::Routes::new(
            anumate_captokens_service::CapTokensGrpc::new(tokens).into_server(),
        ),
    );
    Server {
        url: format!("http://{addr}"),
        token,
        operator_token,
        handle,
        _db: db,
        _keys: keys,
        _dev: auth.dir,
    }
}

/// Runs the binary in `dir` against `server` (off the async runtime), with
/// `stdin` piped in when given.
async fn remote(server: &Server, dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let (dir, url, token) = (dir.to_path_buf(), server.url.clone(), server.token.clone());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(&dir);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ANUMATE_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ANUMATE_SERVER", url)
            .env("ANUMATE_TOKEN", token)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run anumate");
        let mut pipe = child.stdin.take().unwrap();
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).unwrap();
        }
        drop(pipe);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_verify_online_and_offline_revoke() {
    let server = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = plan_hash();
    let call = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--audience",
            "conn:payments",
            "--tool",
            "payments.refund",
            "--run",
            "run-1",
            "--step",
            "refund",
            "--plan-hash",
            &plan,
            "--action",
            "call",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| {
        let server = &server;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            remote(server, d, &refs, None).await
        }
    };
    let with = |head: &[&str], tail: Vec<String>| -> Vec<String> {
        head.iter().map(|s| s.to_string()).chain(tail).collect()
    };

    // Operators may not mint (issue #9): only admins and the orchestrator.
    let operator = Server {
        url: server.url.clone(),
        token: server.operator_token.clone(),
        operator_token: String::new(),
        handle: tokio::spawn(async {}),
        _db: anumate_testing::TestDb::sqlite(),
        _keys: tempfile::tempdir().unwrap(),
        _dev: tempfile::tempdir().unwrap(),
    };
    let args = with(&["token", "mint"], call(&["--args", "{}"]));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = remote(&operator, d, &refs, None).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("error[PERMISSION_DENIED]"),
        "{}",
        text(&out.stderr)
    );

    // Mint: the compact JWS alone on stdout, a summary on stderr.
    let out = run(with(
        &["token", "mint", "--single-use"],
        call(&[
            "--args",
            r#"{"amount": 1200, "currency": "INR"}"#,
            "--constraints",
            r#"{"/amount": {"max": 5000}}"#,
        ]),
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    let summary = text(&out.stderr);
    assert!(
        summary.contains("for payments.refund on conn:payments (tenant acme)")
            && summary.contains("single-use"),
        "{summary}"
    );

    // Online: valid with the same arguments (dry check, nothing consumed).
    let ok_args = r#"{"currency": "INR", "amount": 1200}"#;
    let out = run(with(
        &["token", "verify", &token],
        call(&["--args", ok_args]),
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("VERDICT_VALID: token "),
        "{}",
        text(&out.stdout)
    );

    // A call above the constraint: exit 1 and the precise verdict.
    let out = run(with(
        &["token", "verify", &token],
        call(&["--args", r#"{"currency": "INR", "amount": 9000}"#]),
    ))
    .await;
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("VERDICT_CONSTRAINT_VIOLATED:") && stdout.contains("/amount"),
        "{stdout}"
    );

    // Another audience.
    let mut other = call(&["--args", ok_args]);
    other[1] = "conn:email".into();
    let out = run(with(&["token", "verify", &token], other)).await;
    assert!(!out.status.success());
    assert!(text(&out.stdout).starts_with("VERDICT_WRONG_AUDIENCE:"));

    // Offline with the JWKS from `token jwks` (GetJwks needs no credential).
    let out = run(vec!["token".into(), "jwks".into()]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let jwks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
    std::fs::write(d.join("jwks.json"), &out.stdout).unwrap();
    let offline = |tok: &str, tenant: &str| {
        with(
            &[
                "token",
                "verify",
                tok,
                "--jwks",
                "jwks.json",
                "--tenant",
                tenant,
            ],
            call(&["--args", ok_args]),
        )
    };
    let out = run(offline(&token, "acme")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("VERDICT_VALID"));
    let out = run(offline(&token, "globex")).await;
    assert!(!out.status.success());
    assert!(text(&out.stdout).starts_with("VERDICT_WRONG_TENANT:"));
    // A flipped signature byte.
    let (head, sig) = token.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{head}.{flipped}{}", &sig[1..]);
    let mut args = offline(&tampered, "acme");
    args.extend(["-o".into(), "json".into()]);
    let out = run(args).await;
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "VERDICT_BAD_SIGNATURE");
    assert_eq!(v["offline"], true);
    // Offline without a tenant and no dev.json: a precise local error.
    let out = run(with(
        &["token", "verify", &token, "--jwks", "jwks.json"],
        call(&["--args", ok_args]),
    ))
    .await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("pass --tenant"));
    // A verification names the call's arguments (issue #9: without them the
    // token was VALID): refused locally, online and offline.
    for extra in [&[][..], &["--jwks", "jwks.json", "--tenant", "acme"][..]] {
        let mut args = vec!["token", "verify", &token];
        args.extend_from_slice(extra);
        let out = run(with(&args, call(&[]))).await;
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("pass the call's arguments"),
            "{}",
            text(&out.stderr)
        );
    }

    // Consume through stdin, then the replay is refused.
    let refs = with(
        &["token", "verify", "-", "--consume", "-o", "json"],
        call(&["--args", ok_args]),
    );
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    let out = remote(&server, d, &refs, Some(&format!("{token}\n"))).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "VERDICT_VALID");
    assert_eq!(v["consumed"], true);
    let out = remote(&server, d, &refs, Some(&token)).await;
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"], "VERDICT_REPLAYED");

    // Bad input: a TTL above 300 s is refused with its field and code, a
    // malformed --args never leaves the CLI, and the server keeps serving.
    let out = run(with(
        &["token", "mint", "--ttl", "301"],
        call(&["--args-sha256", &"0".repeat(64)]),
    ))
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("error[INVALID_ARGUMENT]"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains("ttl"), "{}", text(&out.stderr));
    let out = run(with(&["token", "mint"], call(&["--args", "{nope"]))).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--args is not JSON"));

    // Mint (JSON output) and revoke by jti; the token is then REVOKED.
    let out = run(with(
        &["token", "mint", "-o", "json"],
        call(&["--args", ok_args]),
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let second = v["token"].as_str().unwrap().to_owned();
    let jti = v["claims"]["jti"].as_str().unwrap().to_owned();
    assert_eq!(v["claims"]["subject"], "user:olivia");
    let out = run(vec![
        "token".into(),
        "revoke".into(),
        "--jti".into(),
        jti.clone(),
        "--reason".into(),
        "operator stop".into(),
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&jti), "{}", text(&out.stdout));
    let out = run(with(
        &["token", "verify", &second],
        call(&["--args", ok_args]),
    ))
    .await;
    assert!(!out.status.success());
    assert!(text(&out.stdout).starts_with("VERDICT_REVOKED:"));
    // Revoking again is a no-op; an unknown token is NOT_FOUND.
    let out = run(vec!["token".into(), "revoke".into(), "--jti".into(), jti]).await;
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("nothing revoked"));
    let out = run(vec![
        "token".into(),
        "revoke".into(),
        "--jti".into(),
        "no-such-jti".into(),
    ])
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("error[NOT_FOUND]"),
        "{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The admin listener of `anumate dev`.
// ---------------------------------------------------------------------------

/// `GET path` over HTTP/1.1; the status code and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

#[test]
fn admin_listener_serves_health_jwks_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir.path());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ANUMATE_") {
            cmd.env_remove(key);
        }
    }
    let mut child = cmd
        .args(["dev", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut admin = None;
    while admin.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("dev prints its admin address");
        if let Some(rest) = line.trim().strip_prefix("admin:") {
            admin = rest.split_whitespace().next().map(str::to_owned);
        }
    }
    let admin = admin.unwrap();
    let addr = admin.strip_prefix("http://").unwrap().to_owned();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(".anumate/dev.json")).unwrap())
            .unwrap();
    assert_eq!(state["admin"], admin.as_str());

    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http_get(&addr, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(http_get(&addr, "/nope").0, 404);

    // The JWKS equals what the CLI gets over gRPC, for tokens and receipts.
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .args(args)
            .env_remove("ANUMATE_SERVER")
            .env_remove("ANUMATE_TOKEN")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (status, body) = http_get(&addr, "/.well-known/jwks.json");
    assert_eq!(status, 200);
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks, cli(&["token", "jwks"]));
    let (status, body) = http_get(&addr, "/.well-known/receipts-jwks.json");
    assert_eq!(status, 200);
    let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks, cli(&["receipt", "jwks"]));

    // The gRPC calls above (and a refused one) are counted by method and code.
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["token", "revoke", "--jti", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    for needle in [
        r#"anumate_grpc_requests_total{service="anumate.captokens.v1.CapTokensService",method="GetJwks",code="OK"} 1"#,
        r#"anumate_grpc_requests_total{service="anumate.receipts.v1.ReceiptsService",method="GetSigningKeys",code="OK"} 1"#,
        r#"anumate_grpc_requests_total{service="anumate.captokens.v1.CapTokensService",method="RevokeToken",code="NotFound"} 1"#,
        "# TYPE anumate_grpc_request_duration_seconds histogram",
    ] {
        assert!(metrics.contains(needle), "{needle} not in:\n{metrics}");
    }

    // SIGTERM: the process stops and takes the admin listener with it.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "dev did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::net::TcpStream::connect(&addr).is_err());
}
