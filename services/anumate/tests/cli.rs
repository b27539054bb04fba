#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `anumate` binary driven as a user drives it: `anumate dev` in a fresh
//! directory and CLI commands next to it, `anumate serve` on PostgreSQL with a
//! configured issuer, `anumate migrate`, and generated gRPC clients over a real
//! socket (health, reflection, registry, an unimplemented service).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anumate_auth::{BearerToken, DevIssuer};
use anumate_proto::registry::v1 as pb;
use anumate_store::testing::TestDb;
use pb::registry_service_client::RegistryServiceClient;
use serde_json::{Value, json};
use tempfile::TempDir;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_anumate");
const CAPSULE: &str = "refund-small-orders";
const REFUND: &str = "examples/refund.capsule.yaml";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A command of the binary with none of the caller's `ANUMATE_…` variables
/// (they are configuration, and would leak into what a test means to check).
fn anumate(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ANUMATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// What a finished command printed.
#[derive(Debug)]
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert!(self.status.success(), "command failed: {self:#?}");
        self
    }

    fn failed(self) -> Run {
        assert!(
            !self.status.success(),
            "command should have failed: {self:#?}"
        );
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

fn run(mut cmd: Command) -> Run {
    let out = cmd.stdin(Stdio::null()).output().expect("run anumate");
    Run {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `anumate <args>` run in `dir`.
fn cli(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = anumate(dir);
    cmd.args(args);
    run(cmd)
}

/// A fresh directory holding a copy of the repository's `examples/`.
fn workdir() -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let dst = dir.path().join("examples");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).expect("examples/") {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// A running server process; stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Option<Child>,
    /// `http://127.0.0.1:port`.
    url: String,
    /// Where its stderr (the logs) goes.
    log: PathBuf,
}

impl Server {
    /// Starts `cmd` (stdout piped, stderr to `log`) and waits for the line
    /// `… on http://…` that says it is serving.
    fn start(mut cmd: Command, log: PathBuf) -> Server {
        let err = std::fs::File::create(&log).expect("log file");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("start anumate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        // Reads (and after the serving line, drains) stdout so the server never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        let mut server = Server {
            child: Some(child),
            url: String::new(),
            log,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(i) = line.find(" on http://") {
                        assert!(line.starts_with("anumate "), "{line}");
                        server.url = line[i + 4..].trim().to_string();
                        return server;
                    }
                    seen.push(line);
                }
                Err(_) => panic!(
                    "server did not report serving; stdout: {seen:#?}\nstderr:\n{}",
                    server.logs()
                ),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A channel to the server (connected, not yet used).
    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit.
    fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.terminate(Duration::from_secs(5)).is_none()
            && let Some(mut child) = self.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `anumate dev --listen 127.0.0.1:0` in a fresh directory with `examples/`.
struct Dev {
    server: Server,
    dir: TempDir,
}

impl Dev {
    fn start() -> Dev {
        let dir = workdir();
        let mut cmd = anumate(dir.path());
        cmd.args(["dev", "--listen", "127.0.0.1:0"]);
        let server = Server::start(cmd, dir.path().join("dev.log"));
        Dev { server, dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `anumate <args>` from the directory the server was started in.
    fn cli(&self, args: &[&str]) -> Run {
        cli(self.path(), args)
    }

    /// The admin token from `.anumate/dev.json`.
    fn token(&self) -> String {
        let state: Value = serde_json::from_slice(
            &std::fs::read(self.path().join(".anumate/dev.json")).expect("dev.json"),
        )
        .expect("dev.json is JSON");
        state["token"].as_str().expect("token").to_string()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

// ---------------------------------------------------------------------------
// anumate dev + the capsule commands
// ---------------------------------------------------------------------------

#[test]
fn dev_and_capsule_commands_from_the_same_directory() {
    let dev = Dev::start();
    assert!(dev.server.url.starts_with("http://127.0.0.1:"));
    let state: Value =
        serde_json::from_slice(&std::fs::read(dev.path().join(".anumate/dev.json")).unwrap())
            .unwrap();
    assert_eq!(state["server"], dev.server.url.as_str());
    assert_eq!(state["pid"], dev.server.pid());
    assert!(dev.path().join(".anumate/anumate.db").exists());

    // push, then the same content again
    let out = dev.cli(&["capsule", "push", REFUND]).ok();
    assert!(
        out.stdout
            .contains(&format!("pushed {CAPSULE} version 1 (draft) sha256:")),
        "{out:#?}"
    );
    let out = dev.cli(&["capsule", "push", REFUND]).ok();
    assert!(
        out.stdout
            .contains(&format!("unchanged: identical to {CAPSULE} version 1")),
        "{out:#?}"
    );
    let pushed = dev
        .cli(&["capsule", "push", REFUND, "-o", "json"])
        .ok()
        .json();
    // proto3 JSON leaves out fields with default values: `created: false`
    assert_eq!(pushed.get("created"), None, "{pushed}");
    assert_eq!(pushed["version"]["version"], "1", "int64 is a JSON string");
    let hash = pushed["version"]["contentHash"]
        .as_str()
        .expect("contentHash");
    assert!(hash.starts_with("sha256:"), "{hash}");

    // list
    let out = dev.cli(&["capsule", "list"]).ok();
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(CAPSULE))
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert_eq!(
        row.split_whitespace().take(3).collect::<Vec<_>>(),
        [CAPSULE, "1", "-"]
    );
    let list = dev.cli(&["capsule", "list", "-o", "json"]).ok().json();
    assert_eq!(list["capsules"][0]["name"], CAPSULE);
    assert_eq!(list["capsules"][0]["latestVersion"], "1");

    // get: nothing published yet, so only by `latest`
    let out = dev
        .cli(&["capsule", "get", CAPSULE, "--version", "latest"])
        .ok();
    assert!(out.stdout.contains("version:      1 (draft)"), "{out:#?}");
    assert!(out.stdout.contains(hash), "{out:#?}");
    let out = dev.cli(&["capsule", "get", CAPSULE]).failed();
    assert!(out.stderr.starts_with("error["), "{out:#?}");

    // publish, get the published version
    let out = dev.cli(&["capsule", "publish", CAPSULE, "1"]).ok();
    assert!(
        out.stdout
            .contains(&format!("published {CAPSULE} version 1")),
        "{out:#?}"
    );
    let out = dev.cli(&["capsule", "get", CAPSULE]).ok();
    assert!(
        out.stdout.contains("version:      1 (published)"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("published:    "), "{out:#?}");
    let got = dev
        .cli(&["capsule", "get", CAPSULE, "-o", "json"])
        .ok()
        .json();
    assert_eq!(got["version"]["status"], "VERSION_STATUS_PUBLISHED");
    assert_eq!(got["version"]["contentHash"], hash);
    assert_eq!(got["version"]["createdBy"], "user:dev");
    assert_eq!(got["capsule"]["publishedVersion"], "1");
    let source = dev
        .cli(&["capsule", "get", CAPSULE, "--source"])
        .ok()
        .stdout;
    assert_eq!(
        source,
        std::fs::read_to_string(dev.path().join(REFUND)).unwrap()
    );

    // a changed document is version 2; versions and diff
    let file = dev.path().join(REFUND);
    let changed = std::fs::read_to_string(&file).unwrap().replace(
        "description: Refund an order",
        "description: Refunds an order",
    );
    std::fs::write(&file, changed).unwrap();
    let out = dev.cli(&["capsule", "push", REFUND]).ok();
    assert!(
        out.stdout.contains(&format!("pushed {CAPSULE} version 2")),
        "{out:#?}"
    );
    let out = dev.cli(&["capsule", "versions", CAPSULE]).ok();
    let rows: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(2).collect())
        .collect();
    assert_eq!(rows, [["2", "draft"], ["1", "published"]], "{out:#?}");
    let versions = dev
        .cli(&["capsule", "versions", CAPSULE, "-o", "json"])
        .ok()
        .json();
    assert_eq!(versions["versions"].as_array().unwrap().len(), 2);
    assert_eq!(versions["versions"][0]["status"], "VERSION_STATUS_DRAFT");

    let out = dev.cli(&["capsule", "diff", CAPSULE, "1", "2"]).ok();
    assert!(
        out.stdout
            .contains("-  description: Refund an order below a threshold"),
        "{out:#?}"
    );
    assert!(
        out.stdout
            .contains("+  description: Refunds an order below a threshold"),
        "{out:#?}"
    );
    assert!(out.stdout.contains("~ /metadata/description:"), "{out:#?}");
    let diff = dev
        .cli(&["capsule", "diff", CAPSULE, "1", "2", "-o", "json"])
        .ok()
        .json();
    assert_eq!(diff["changes"][0]["path"], "/metadata/description");
    assert_eq!(diff["fromContentHash"], hash);

    // deprecate, delete
    let out = dev.cli(&["capsule", "deprecate", CAPSULE, "1"]).ok();
    assert!(
        out.stdout
            .contains(&format!("deprecated {CAPSULE} version 1")),
        "{out:#?}"
    );
    let versions = dev
        .cli(&["capsule", "versions", CAPSULE, "-o", "json"])
        .ok()
        .json();
    assert_eq!(
        versions["versions"][1]["status"],
        "VERSION_STATUS_DEPRECATED"
    );
    let out = dev.cli(&["capsule", "delete", CAPSULE]).ok();
    assert_eq!(out.stdout.trim(), format!("deleted {CAPSULE}"));
    let out = dev.cli(&["capsule", "list"]).ok();
    assert_eq!(out.stdout.trim(), "no capsules");
    let out = dev
        .cli(&["capsule", "get", CAPSULE, "--version", "latest"])
        .failed();
    assert!(out.stderr.contains("error[NOT_FOUND]"), "{out:#?}");
}

#[test]
fn connection_from_elsewhere_documents_and_tokens() {
    let dev = Dev::start();
    let token = dev.token();
    let elsewhere = workdir();

    // no dev.json here, nothing configured
    let out = cli(elsewhere.path(), &["capsule", "list"]).failed();
    assert!(out.stderr.contains("error: no server"), "{out:#?}");
    assert!(out.stderr.contains("--server"), "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");

    // environment
    let mut cmd = anumate(elsewhere.path());
    cmd.args(["capsule", "push", REFUND])
        .env("ANUMATE_SERVER", &dev.server.url)
        .env("ANUMATE_TOKEN", &token);
    let out = run(cmd).ok();
    assert!(
        out.stdout.contains(&format!("pushed {CAPSULE} version 1")),
        "{out:#?}"
    );
    // a server but no token
    let mut cmd = anumate(elsewhere.path());
    cmd.args(["capsule", "list"])
        .env("ANUMATE_SERVER", &dev.server.url);
    let out = run(cmd).failed();
    assert!(out.stderr.contains("error: no token"), "{out:#?}");

    // flags
    let flags = [
        "--server",
        dev.server.url.as_str(),
        "--token",
        token.as_str(),
    ];
    let out = cli(
        elsewhere.path(),
        &[&["capsule", "list"][..], &flags[..]].concat(),
    )
    .ok();
    assert!(out.stdout.contains(CAPSULE), "{out:#?}");
    let got = cli(
        elsewhere.path(),
        &[
            &["capsule", "get", CAPSULE, "-v", "1", "-o", "json"][..],
            &flags[..],
        ]
        .concat(),
    )
    .ok()
    .json();
    assert_eq!(got["version"]["name"], CAPSULE);

    // a document with several problems
    std::fs::write(
        dev.path().join("bad.yaml"),
        "apiVersion: anumate.dev/v2\n\
         kind: Capsule\n\
         metadata:\n  name: Bad_Name\n\
         spec:\n  steps: []\n  foo: 1\n",
    )
    .unwrap();
    let out = dev.cli(&["capsule", "push", "bad.yaml"]).failed();
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert!(
        lines[0].starts_with("error[INVALID_DOCUMENT]: "),
        "{out:#?}"
    );
    let expected = [
        ("bad.yaml:1:13: ", "apiVersion", "[apiVersion]"),
        ("bad.yaml:4:9: ", "Bad_Name", "[metadata.name]"),
        ("bad.yaml:6:3: ", "\"tools\"", "[spec.tools]"),
        ("bad.yaml:6:10: ", "at least one step", "[spec.steps]"),
        ("bad.yaml:7:3: ", "unknown key \"foo\"", "[spec.foo]"),
    ];
    assert_eq!(lines.len(), 1 + expected.len(), "{out:#?}");
    for (line, (at, text, field)) in lines[1..].iter().zip(expected) {
        let line = line.trim_start();
        assert!(line.starts_with(at), "{line:?} should start with {at:?}");
        assert!(line.contains(text), "{line:?} should mention {text:?}");
        assert!(line.ends_with(field), "{line:?} should end with {field:?}");
    }
    // validate reports the same way
    let out = dev.cli(&["capsule", "validate", "bad.yaml"]).failed();
    assert_eq!(out.stderr, lines.join("\n") + "\n");

    // a YAML syntax error: the file is named once, and no empty `[]` field
    std::fs::write(dev.path().join("broken.yaml"), "apiVersion: x\nkind: [\n").unwrap();
    let out = dev.cli(&["capsule", "push", "broken.yaml"]).failed();
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{out:#?}");
    assert!(lines[0].starts_with("error[INVALID_DOCUMENT]"), "{out:#?}");
    assert!(
        lines[1].starts_with("  broken.yaml:3:1: invalid YAML: "),
        "{out:#?}"
    );
    assert_eq!(lines[1].matches("broken.yaml").count(), 1, "{out:#?}");
    assert!(!lines[1].ends_with("[]"), "{out:#?}");

    // a missing file is a local error
    let out = dev.cli(&["capsule", "push", "missing.yaml"]).failed();
    assert!(
        out.stderr.starts_with("error: cannot read missing.yaml"),
        "{out:#?}"
    );

    // wrong tokens
    let out = dev
        .cli(&["capsule", "list", "--token", "not-a-jwt"])
        .failed();
    assert!(out.stderr.starts_with("error[UNAUTHENTICATED]"), "{out:#?}");
    let other = DevIssuer::load_or_create(&elsewhere.path().join("keys")).unwrap();
    let foreign = other
        .mint(
            "dev",
            "user:mallory",
            &[anumate_auth::Role::Admin],
            Duration::from_secs(60),
        )
        .unwrap();
    let out = dev.cli(&["capsule", "list", "--token", &foreign]).failed();
    assert!(out.stderr.starts_with("error[UNAUTHENTICATED]"), "{out:#?}");
}

// ---------------------------------------------------------------------------
// Over the socket: health, reflection, an unimplemented service; SIGTERM
// ---------------------------------------------------------------------------

// Multi-threaded: the test blocks a thread while it waits for the server to
// exit, and the clients' connection tasks must keep answering its GOAWAY/PING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_unimplemented_and_sigterm() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let mut dev = Dev::start();
    let channel = dev.server.channel().await;

    // health, without a token
    let mut health = HealthClient::new(channel.clone());
    for service in ["anumate.registry.v1.RegistryService", ""] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("health of {service:?}: {s:?}"))
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // reflection v1, without a token
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection")
        .into_inner();
    let message = stream.message().await.expect("reflection answer").unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = message.message_response else {
        panic!("unexpected reflection answer: {message:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    let mut expected = vec![
        "anumate.registry.v1.RegistryService",
        "anumate.compiler.v1.CompilerService",
        "grpc.health.v1.Health",
    ];
    expected.extend_from_slice(anumate_unimplemented::SERVICE_NAMES);
    assert_eq!(anumate_unimplemented::SERVICE_NAMES.len(), 6);
    for name in expected {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    // the registry needs a token; with the dev token it answers
    let mut anonymous = RegistryServiceClient::new(channel.clone());
    let err = anonymous
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut registry =
        RegistryServiceClient::with_interceptor(channel.clone(), BearerToken(dev.token()));
    registry
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .expect("list with the dev token");

    // implemented in dev: policy answers with the dev token
    use anumate_proto::policy::v1::{
        ListPoliciesRequest, policy_service_client::PolicyServiceClient,
    };
    let mut policy =
        PolicyServiceClient::with_interceptor(channel.clone(), BearerToken(dev.token()));
    policy
        .list_policies(ListPoliciesRequest::default())
        .await
        .expect("policy service is served by dev");

    // implemented in dev: the compiler answers with the dev token
    use anumate_proto::compiler::v1::{
        ListPlansRequest, compiler_service_client::CompilerServiceClient,
    };
    let mut compiler =
        CompilerServiceClient::with_interceptor(channel.clone(), BearerToken(dev.token()));
    compiler
        .list_plans(ListPlansRequest::default())
        .await
        .expect("compiler is served by dev");

    // a registered but not yet implemented service
    use anumate_proto::ghostrun::v1::{
        ListPreflightsRequest, ghost_run_service_client::GhostRunServiceClient,
    };
    let mut ghostrun = GhostRunServiceClient::with_interceptor(channel, BearerToken(dev.token()));
    let err = ghostrun
        .list_preflights(ListPreflightsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let info = anumate_errors::Error::from_status(&err);
    assert_eq!(info.code.to_string(), "UNIMPLEMENTED");

    // SIGTERM: drains and exits 0; dev.json no longer points at a dead server
    let started = Instant::now();
    let status = dev
        .server
        .terminate(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", dev.server.logs());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(dev.server.logs().contains("stopped"));
    assert!(!dev.path().join(".anumate/dev.json").exists());
    let out = dev.cli(&["capsule", "list"]).failed();
    assert!(out.stderr.contains("error: no server"), "{out:#?}");
}

// ---------------------------------------------------------------------------
// anumate serve (mesh mode) and migrate, on PostgreSQL
// ---------------------------------------------------------------------------

// Multi-threaded: the test blocks a thread while it waits for the server to
// exit, and the clients' connection tasks must keep answering its GOAWAY/PING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_registry_on_postgres_with_a_configured_issuer() {
    let db = TestDb::postgres().await;
    let migrate_db = TestDb::postgres().await;
    let dir = workdir();
    let path = dir.path();

    // an issuer: its JWKS in a file, tokens signed with its key
    let issuer = DevIssuer::load_or_create(&path.join("issuer")).unwrap();
    let jwks_file = path.join("jwks.json");
    std::fs::write(&jwks_file, serde_json::to_vec(&issuer.jwks()).unwrap()).unwrap();
    let token = issuer
        .sign_claims(&json!({
            "iss": "https://issuer.test",
            "sub": "user:alice",
            "tenant": "acme",
            "roles": ["author"],
            "iat": now(),
            "nbf": now(),
            "exp": now() + 600,
        }))
        .unwrap();
    let config = path.join("anumate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n\n[store]\nurl = {url:?}\n\n\
             [[auth.issuers]]\nissuer = \"https://issuer.test\"\njwks_file = {jwks:?}\n",
            data = path.join("data").display().to_string(),
            url = db.config.url,
            jwks = jwks_file.display().to_string(),
        ),
    )
    .unwrap();
    let config = config.display().to_string();

    let mut cmd = anumate(path);
    cmd.args([
        "serve",
        "registry",
        "--listen",
        "127.0.0.1:0",
        "--config",
        &config,
        "--migrate",
    ]);
    let server = Server::start(cmd, path.join("serve.log"));

    // the generated client over the socket
    let channel = server.channel().await;
    let mut client =
        RegistryServiceClient::with_interceptor(channel.clone(), BearerToken(token.clone()));
    let source = std::fs::read_to_string(path.join(REFUND)).unwrap();
    let pushed = client
        .push_capsule(pb::PushCapsuleRequest {
            source_yaml: source.clone(),
            source_name: "refund.capsule.yaml".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .expect("push")
        .into_inner();
    assert!(pushed.created);
    let version = pushed.version.expect("version");
    assert_eq!(version.version, 1);
    let got = client
        .get_capsule(pb::GetCapsuleRequest {
            name: CAPSULE.into(),
            version: "published".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .version
        .expect("version");
    assert_eq!(got.source_yaml, source);
    assert_eq!(got.content_hash, version.content_hash);
    assert_eq!(got.created_by, "user:alice");

    // only the registry is served
    use anumate_proto::policy::v1::{
        ListPoliciesRequest, policy_service_client::PolicyServiceClient,
    };
    let err = PolicyServiceClient::with_interceptor(channel.clone(), BearerToken(token.clone()))
        .list_policies(ListPoliciesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    // a token from an issuer that is not configured
    let stranger = DevIssuer::load_or_create(&path.join("stranger")).unwrap();
    let bad = stranger
        .mint(
            "acme",
            "user:eve",
            &[anumate_auth::Role::Admin],
            Duration::from_secs(60),
        )
        .unwrap();
    let err = RegistryServiceClient::with_interceptor(channel, BearerToken(bad))
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // `serve --migrate` migrated: nothing left to apply
    let out = cli(path, &["migrate", "--store-url", &db.config.url]).ok();
    assert!(
        out.stdout.starts_with("applied 0 migration(s); "),
        "{out:#?}"
    );

    // migrate on a fresh database, twice
    let out = cli(path, &["migrate", "--store-url", &migrate_db.config.url]).ok();
    let first = out.stdout.trim();
    assert!(first.starts_with("applied "), "{out:#?}");
    assert!(!first.starts_with("applied 0 "), "{out:#?}");
    assert!(first.contains("registry_0001_capsules"), "{out:#?}");
    assert!(first.ends_with("; 0 already applied"), "{out:#?}");
    let applied: usize = first
        .trim_start_matches("applied ")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let out = cli(path, &["migrate", "--store-url", &migrate_db.config.url]).ok();
    assert_eq!(
        out.stdout.trim(),
        format!("applied 0 migration(s); {applied} already applied")
    );

    // the listen address from the environment instead of the flag; SIGTERM stops it
    let mut cmd = anumate(path);
    cmd.args(["serve", "registry", "--config", &config])
        .env("ANUMATE_GRPC__LISTEN", "127.0.0.1:0");
    let mut second = Server::start(cmd, path.join("serve2.log"));
    assert!(second.url.starts_with("http://127.0.0.1:"));
    assert_ne!(second.url, "http://127.0.0.1:7600");
    assert_ne!(second.url, server.url);
    let mut client =
        RegistryServiceClient::with_interceptor(second.channel().await, BearerToken(token));
    let list = client
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.capsules.len(), 1);
    let status = second
        .terminate(Duration::from_secs(10))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", second.logs());
}

#[test]
fn configuration_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[grpc]\nlisen = \"127.0.0.1:0\"\n").unwrap();
    let config = config.display().to_string();
    let out = cli(dir.path(), &["serve", "registry", "--config", &config]).failed();
    assert!(out.stderr.contains("lisen"), "{out:#?}");
    assert!(
        out.stderr.contains("error: invalid configuration"),
        "{out:#?}"
    );

    std::fs::write(dir.path().join("top.toml"), "colour = \"blue\"\n").unwrap();
    let out = cli(dir.path(), &["dev", "--config", "top.toml"]).failed();
    assert!(out.stderr.contains("colour"), "{out:#?}");
    assert!(!dir.path().join(".anumate/dev.json").exists());

    let mut cmd = anumate(dir.path());
    cmd.args(["migrate"])
        .env("ANUMATE_STORE__MAX_CONECTIONS", "3");
    let out = run(cmd).failed();
    assert!(out.stderr.contains("max_conections"), "{out:#?}");

    let out = cli(
        dir.path(),
        &["serve", "registry", "--config", "missing.toml"],
    )
    .failed();
    assert!(out.stderr.contains("missing.toml"), "{out:#?}");
}
