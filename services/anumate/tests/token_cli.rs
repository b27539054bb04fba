#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `anumate token mint|verify|revoke|jwks` against a live captokens service
//! (`CapTokensService` and `CapabilityTokensInternal`; SQLite, behind the
//! real auth layer, over a loopback socket), offline
//! verification with the JWKS, and the admin HTTP listener of `anumate dev`
//! (health, readiness, JWKS, Prometheus metrics) over a real socket.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{BIN, Served, cli, dev_state, http_get, remote};

fn plan_hash() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

/// The service, as its admin, and an operator's token for it.
async fn serve() -> (Served, String) {
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
            anumate_captokens_service::CapTokensGrpc::new(tokens.clone()).into_server(),
        )
        .add_service(anumate_captokens_service::CapTokensGrpc::new(tokens).into_internal_server()),
    );
    let served = Served {
        url: format!("http://{addr}"),
        token,
        handle,
        keep: vec![Box::new(db), Box::new(keys), Box::new(auth.dir)],
    };
    (served, operator_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_verify_online_and_offline_revoke() {
    let (server, operator_token) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = plan_hash();
    // `token <head…>` naming the refund call on `audience`, then `tail`.
    let args = |head: &[&str], audience: &str, tail: &[&str]| -> Vec<String> {
        let call = [
            "--audience",
            audience,
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
        ];
        ["token"]
            .iter()
            .chain(head)
            .chain(&call)
            .chain(tail)
            .map(|s| s.to_string())
            .collect()
    };
    let run = async |args: Vec<String>| server.cli(d, &args).await;
    const PAYMENTS: &str = "conn:payments";
    let ok_args = r#"{"currency": "INR", "amount": 1200}"#;

    // Operators may not mint (issue #9): only admins and the orchestrator.
    let mint = args(&["mint"], PAYMENTS, &["--args", "{}"]);
    let out = remote(&server.url, &operator_token, d, &mint, None)
        .await
        .failed();
    assert!(out.stderr.contains("error[PERMISSION_DENIED]"), "{out:#?}");

    // Mint: the compact JWS alone on stdout, a summary on stderr.
    let out = run(args(
        &["mint", "--single-use"],
        PAYMENTS,
        &[
            "--args",
            r#"{"amount": 1200, "currency": "INR"}"#,
            "--constraints",
            r#"{"/amount": {"max": 5000}}"#,
        ],
    ))
    .await
    .ok();
    let token = out.stdout.trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");
    assert!(
        out.stderr
            .contains("for payments.refund on conn:payments (tenant acme)")
            && out.stderr.contains("single-use"),
        "{}",
        out.stderr
    );

    // Online: valid with the same arguments (dry check, nothing consumed);
    // a call above the constraint (exit 1 and the precise verdict); another
    // audience.
    for (audience, call_args, valid, verdict, mentions) in [
        (PAYMENTS, ok_args, true, "TOKEN_VERDICT_VALID: token ", ""),
        (
            PAYMENTS,
            r#"{"currency": "INR", "amount": 9000}"#,
            false,
            "TOKEN_VERDICT_CONSTRAINT_VIOLATED:",
            "/amount",
        ),
        (
            "conn:email",
            ok_args,
            false,
            "TOKEN_VERDICT_WRONG_AUDIENCE:",
            "",
        ),
    ] {
        let out = run(args(&["verify", &token], audience, &["--args", call_args])).await;
        assert_eq!(out.status.success(), valid, "{out:#?}");
        assert!(
            out.stdout.starts_with(verdict) && out.stdout.contains(mentions),
            "{out:#?}"
        );
    }

    // Offline with the JWKS from `token jwks` (GetJwks needs no credential).
    let out = server.cli(d, &["token", "jwks"]).await.ok();
    assert_eq!(out.json()["keys"][0]["alg"], "ES256");
    std::fs::write(d.join("jwks.json"), &out.stdout).unwrap();
    let offline = |tok: &str, tenant: &str, tail: &[&str]| {
        let head = ["verify", tok, "--jwks", "jwks.json", "--tenant", tenant];
        args(&head, PAYMENTS, &[&["--args", ok_args][..], tail].concat())
    };
    let out = run(offline(&token, "acme", &[])).await.ok();
    assert!(out.stdout.contains("TOKEN_VERDICT_VALID"), "{out:#?}");
    let out = run(offline(&token, "globex", &[])).await.failed();
    assert!(
        out.stdout.starts_with("TOKEN_VERDICT_WRONG_TENANT:"),
        "{out:#?}"
    );
    // A flipped signature byte.
    let (head, sig) = token.rsplit_once('.').unwrap();
    let flipped = if sig.starts_with('A') { 'B' } else { 'A' };
    let tampered = format!("{head}.{flipped}{}", &sig[1..]);
    let v = run(offline(&tampered, "acme", &["-o", "json"]))
        .await
        .failed()
        .json();
    assert_eq!(v["verdict"], "TOKEN_VERDICT_BAD_SIGNATURE");
    assert_eq!(v["offline"], true);
    // Offline without a tenant and no dev.json: a precise local error.
    let head = ["verify", &token, "--jwks", "jwks.json"];
    let out = run(args(&head, PAYMENTS, &["--args", ok_args]))
        .await
        .failed();
    assert!(out.stderr.contains("pass --tenant"), "{out:#?}");
    // A verification names the call's arguments (issue #9: without them the
    // token was VALID): refused locally, online and offline.
    for extra in [&[][..], &["--jwks", "jwks.json", "--tenant", "acme"][..]] {
        let head = [&["verify", &token][..], extra].concat();
        let out = run(args(&head, PAYMENTS, &[])).await.failed();
        assert!(out.stderr.contains("pass the call's arguments"), "{out:#?}");
    }

    // Consume through stdin, then the replay is refused.
    let consume = args(
        &["verify", "-", "--consume", "-o", "json"],
        PAYMENTS,
        &["--args", ok_args],
    );
    let stdin = format!("{token}\n");
    let v = remote(&server.url, &server.token, d, &consume, Some(&stdin))
        .await
        .ok()
        .json();
    assert_eq!(v["verdict"], "TOKEN_VERDICT_VALID");
    assert_eq!(v["consumed"], true);
    let v = remote(&server.url, &server.token, d, &consume, Some(&token))
        .await
        .failed()
        .json();
    assert_eq!(v["verdict"], "TOKEN_VERDICT_REPLAYED");

    // Bad input: a TTL above 300 s is refused with its field and code, a
    // malformed --args never leaves the CLI, and the server keeps serving.
    let sha = "0".repeat(64);
    let out = run(args(
        &["mint", "--ttl", "301"],
        PAYMENTS,
        &["--args-sha256", &sha],
    ))
    .await
    .failed();
    assert!(out.stderr.contains("error[INVALID_ARGUMENT]"), "{out:#?}");
    assert!(out.stderr.contains("ttl"), "{out:#?}");
    let out = run(args(&["mint"], PAYMENTS, &["--args", "{nope"]))
        .await
        .failed();
    assert!(out.stderr.contains("--args is not JSON"), "{out:#?}");

    // Mint (JSON output) and revoke by jti; the token is then REVOKED.
    let v = run(args(
        &["mint", "-o", "json"],
        PAYMENTS,
        &["--args", ok_args],
    ))
    .await
    .ok()
    .json();
    let second = v["token"].as_str().unwrap().to_owned();
    let jti = v["claims"]["jti"].as_str().unwrap().to_owned();
    assert_eq!(v["claims"]["subject"], "user:olivia");
    let revoke = [
        "token",
        "revoke",
        "--jti",
        &jti,
        "--reason",
        "operator stop",
    ];
    let out = server.cli(d, &revoke).await.ok();
    assert!(out.stdout.contains(&jti), "{out:#?}");
    let out = run(args(&["verify", &second], PAYMENTS, &["--args", ok_args]))
        .await
        .failed();
    assert!(out.stdout.starts_with("TOKEN_VERDICT_REVOKED:"), "{out:#?}");
    // Revoking again is a no-op; an unknown token is NOT_FOUND.
    let out = server
        .cli(d, &["token", "revoke", "--jti", &jti])
        .await
        .ok();
    assert!(out.stdout.contains("nothing revoked"), "{out:#?}");
    let out = server
        .cli(d, &["token", "revoke", "--jti", "no-such-jti"])
        .await
        .failed();
    assert!(out.stderr.contains("error[TOKEN_NOT_FOUND]"), "{out:#?}");
}

// ---------------------------------------------------------------------------
// The admin listener of `anumate dev`.
// ---------------------------------------------------------------------------

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
    assert_eq!(dev_state(dir.path())["admin"], admin.as_str());

    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(http_get(&addr, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(http_get(&addr, "/nope").0, 404);

    // The JWKS equals what the CLI gets over gRPC, for tokens and receipts.
    for (path, command) in [
        ("/.well-known/jwks.json", "token"),
        ("/.well-known/receipts-jwks.json", "receipt"),
    ] {
        let (status, body) = http_get(&addr, path);
        assert_eq!(status, 200);
        let jwks: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(jwks, cli(dir.path(), &[command, "jwks"]).ok().json());
    }

    // The gRPC calls above (and a refused one) are counted by method and code.
    cli(dir.path(), &["token", "revoke", "--jti", "nope"]).failed();
    let (status, metrics) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    for needle in [
        r#"anumate_grpc_requests_total{service="anumate.captokens.v1.CapTokensService",method="GetJwks",code="OK"} 1"#,
        r#"anumate_grpc_requests_total{service="anumate.receipts.v1.ReceiptsService",method="GetReceiptSigningKeys",code="OK"} 1"#,
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
