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

mod common;
use common::{Run, anumate, cli, dev_state, examples, free_port, http_get, run};

const CAPSULE: &str = "refund-small-orders";
const REFUND: &str = "examples/refund.capsule.yaml";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A fresh directory holding a copy of the repository's `examples/`.
fn workdir() -> TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = examples();
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
        Dev::start_with(&[])
    }

    /// `anumate dev --listen 127.0.0.1:0 <extra>`.
    fn start_with(extra: &[&str]) -> Dev {
        let dir = workdir();
        let mut cmd = anumate(dir.path());
        cmd.args(["dev", "--listen", "127.0.0.1:0"]).args(extra);
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
        let state = dev_state(self.path());
        state["token"].as_str().expect("token").to_string()
    }
}

/// `anumate serve <services> --listen 127.0.0.1:0 --migrate --config <config>`
/// in `dir`, not yet started.
fn serve_migrating(dir: &Path, services: &str, config: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = anumate(dir);
    cmd.args([
        "serve",
        services,
        "--listen",
        "127.0.0.1:0",
        "--migrate",
        "--config",
    ])
    .arg(config);
    cmd
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
    let state = dev_state(dev.path());
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
    assert_eq!(pushed["version"]["version"], 1, "int32 is a JSON number");
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
    assert_eq!(list["capsules"][0]["latestVersion"], 1);

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
    assert_eq!(got["capsule"]["publishedVersion"], 1);
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
    assert!(out.stderr.contains("error[CAPSULE_NOT_FOUND]"), "{out:#?}");
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
        "anumate.policy.v1.PolicyService",
        "anumate.receipts.v1.ReceiptsService",
        "anumate.captokens.v1.CapTokensService",
        "anumate.events.v1.EventsService",
        "anumate.ghostrun.v1.GhostRunService",
        "anumate.orchestrator.v1.OrchestratorService",
        "grpc.health.v1.Health",
    ];
    // Every contract is served: no placeholder is left in the composition.
    expected.sort_unstable();
    for name in expected {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    // the registry needs a token
    let mut anonymous = RegistryServiceClient::new(channel.clone());
    let err = anonymous
        .list_capsules(pb::ListCapsulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // implemented in dev: the registry, policy and the compiler answer with
    // the dev token
    use anumate_proto::compiler::v1::{
        ListPlansRequest, compiler_service_client::CompilerServiceClient,
    };
    use anumate_proto::policy::v1::{
        ListPoliciesRequest, policy_service_client::PolicyServiceClient,
    };
    let token = || BearerToken(dev.token());
    let answers = [
        (
            "registry",
            RegistryServiceClient::with_interceptor(channel.clone(), token())
                .list_capsules(pb::ListCapsulesRequest::default())
                .await
                .map(drop),
        ),
        (
            "policy",
            PolicyServiceClient::with_interceptor(channel.clone(), token())
                .list_policies(ListPoliciesRequest::default())
                .await
                .map(drop),
        ),
        (
            "compiler",
            CompilerServiceClient::with_interceptor(channel.clone(), token())
                .list_plans(ListPlansRequest::default())
                .await
                .map(drop),
        ),
    ];
    for (service, answer) in answers {
        answer.unwrap_or_else(|s| panic!("{service} is served by dev: {s:?}"));
    }

    // the orchestrator, the last placeholder, is served for real: an empty
    // tenant has no runs, and an unknown run is RUN_NOT_FOUND
    use anumate_proto::orchestrator::v1::{
        GetRunRequest, ListRunsRequest, orchestrator_service_client::OrchestratorServiceClient,
    };
    let mut orchestrator =
        OrchestratorServiceClient::with_interceptor(channel, BearerToken(dev.token()));
    let runs = orchestrator
        .list_runs(ListRunsRequest::default())
        .await
        .expect("ListRuns is served")
        .into_inner();
    assert!(runs.runs.is_empty(), "{runs:?}");
    let err = orchestrator
        .get_run(GetRunRequest {
            run_id: "0190e7b0-0000-7000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let info = anumate_errors::Error::from_status(&err);
    assert_eq!(info.reason.as_str(), "RUN_NOT_FOUND");

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
            "aud": "anumate",
            "sub": "user:alice",
            "tenant": "acme",
            "roles": ["author"],
            "iat": now(),
            "nbf": now(),
            "exp": now() + 600,
        }))
        .unwrap();
    let registry_key = path.join("registry.pem");
    write_key(&registry_key);
    // Serving as the tables' owner is refused, naming the role.
    let owner_config = path.join("owner.toml");
    std::fs::write(
        &owner_config,
        format!(
            "[store]\nurl = {url:?}\n\n[keys]\nregistry_key_files = [{key:?}]\n",
            url = db.config.owner_url,
            key = registry_key.display().to_string(),
        ),
    )
    .unwrap();
    let out = run(serve_migrating(path, "registry", &owner_config)).failed();
    assert!(out.stderr.contains("refusing to serve"), "{out:#?}");
    assert!(out.stderr.contains("postgres"), "{out:#?}");

    // The serving login serves; the owner's URL migrates.
    let config = path.join("anumate.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n\n[store]\nurl = {url:?}\nowner_url = {owner:?}\n\n\
             [keys]\nregistry_key_files = [{key:?}]\n\n\
             [[auth.issuers]]\nissuer = \"https://issuer.test\"\naudience = \"anumate\"\n\
             tenants = [\"acme\"]\njwks_file = {jwks:?}\n",
            data = path.join("data").display().to_string(),
            url = db.config.url,
            owner = db.config.owner_url,
            key = registry_key.display().to_string(),
            jwks = jwks_file.display().to_string(),
        ),
    )
    .unwrap();
    let config = config.display().to_string();

    let cmd = serve_migrating(path, "registry", &config);
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
    let out = cli(path, &["migrate", "--store-url", &db.config.owner_url]).ok();
    assert!(
        out.stdout.starts_with("applied 0 migration(s); "),
        "{out:#?}"
    );

    // migrate on a fresh database, twice
    let out = cli(
        path,
        &["migrate", "--store-url", &migrate_db.config.owner_url],
    )
    .ok();
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
    let out = cli(
        path,
        &["migrate", "--store-url", &migrate_db.config.owner_url],
    )
    .ok();
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

/// Log lines pass through the redaction detectors: a denied caller whose
/// subject is an email address is logged, but not its address.
#[test]
fn logs_are_redacted() {
    let mut dev = Dev::start_with(&["--log-format", "json"]);
    let token = dev
        .cli(&[
            "auth",
            "dev-token",
            "--subject",
            "alice@example.com",
            "--roles",
            "auditor",
            "--data-dir",
            ".anumate",
        ])
        .ok()
        .stdout
        .trim()
        .to_string();
    let mut cmd = anumate(dev.path());
    cmd.args(["capsule", "push", REFUND])
        .env("ANUMATE_TOKEN", &token);
    let out = run(cmd).failed();
    assert!(out.stderr.to_lowercase().contains("denied"), "{out:#?}");
    // Stop the server so every log line is flushed.
    dev.server
        .terminate(Duration::from_secs(10))
        .expect("exits");
    let logs = dev.server.logs();
    let denied = logs
        .lines()
        .find(|l| l.contains("permission denied"))
        .unwrap_or_else(|| panic!("no permission-denied line:\n{logs}"));
    let line: Value = serde_json::from_str(denied).expect("JSON log line");
    assert_eq!(line["fields"]["subject"], "[REDACTED:email]", "{denied}");
    assert!(!logs.contains("alice@example.com"), "{logs}");
    assert!(!logs.contains(&token), "{logs}");
}

/// The admin listener's `host:port` from `.anumate/dev.json`.
fn dev_admin(dev: &Dev) -> String {
    dev_state(dev.path())["admin"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned()
}

/// Writes a fresh PKCS#8 PEM key to `path`; returns its kid.
fn write_key(path: &Path) -> String {
    let key = anumate_crypto::KeyPair::generate().unwrap();
    std::fs::write(path, key.to_pkcs8_pem()).unwrap();
    key.kid().to_owned()
}

/// `.anumate`, its database, keys and `dev.json` are the user's alone.
#[cfg(unix)]
#[test]
fn dev_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dev = Dev::start();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let data = dev.path().join(".anumate");
    assert_eq!(mode(&data), 0o700, "{}", data.display());
    assert_eq!(mode(&data.join("keys")), 0o700);
    let mut files = vec![data.join("anumate.db"), data.join("dev.json")];
    for entry in std::fs::read_dir(data.join("keys")).unwrap() {
        files.push(entry.unwrap().path());
    }
    for suffix in ["-wal", "-shm"] {
        let p = data.join(format!("anumate.db{suffix}"));
        if p.exists() {
            files.push(p);
        }
    }
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

/// Calls to paths outside the contracts share one `unknown` label: a
/// thousand random paths add one series, not a thousand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_paths_do_not_grow_the_metrics() {
    let dev = Dev::start();
    let admin = dev_admin(&dev);
    let series = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("anumate_grpc_requests_total{"))
            .count()
    };
    let before = series(&http_get(&admin, "/metrics").1);
    let mut grpc = tonic::client::Grpc::new(dev.server.channel().await);
    for i in 0..1000 {
        grpc.ready().await.unwrap();
        let path: http::uri::PathAndQuery = format!("/x{i}.Svc{i}/M{i}").parse().unwrap();
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        let res = grpc.unary(tonic::Request::new(()), path, codec).await;
        assert!(res.is_err());
    }
    let (status, metrics) = http_get(&admin, "/metrics");
    assert_eq!(status, 200);
    assert!(series(&metrics) <= before + 2, "{metrics}");
    assert!(
        metrics.contains(r#"service="unknown",method="unknown""#),
        "{metrics}"
    );
    assert!(!metrics.contains("M999"), "{metrics}");
}

/// With `max_concurrent_requests = 2`, a third call while two are in flight
/// is refused at once with RESOURCE_EXHAUSTED; the two in flight end at the
/// deadline with DEADLINE_EXCEEDED; the server then serves as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_cap_are_shed_and_slow_ones_time_out() {
    use sea_orm::ConnectionTrait as _;
    let dir = workdir();
    let config = dir.path().join("limits.toml");
    std::fs::write(
        &config,
        "[grpc]\nmax_concurrent_requests = 2\nrequest_timeout_secs = 2\n",
    )
    .unwrap();
    let mut cmd = anumate(dir.path());
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config);
    let server = Server::start(cmd, dir.path().join("dev.log"));
    let dev = Dev { server, dir };
    let token = dev.token();
    let source = std::fs::read_to_string(dev.path().join(REFUND)).unwrap();
    let push = |channel: Channel, token: String, source: String| async move {
        RegistryServiceClient::with_interceptor(channel, BearerToken(token))
            .push_capsule(pb::PushCapsuleRequest {
                source_yaml: source,
                source_name: "refund.capsule.yaml".into(),
                etag: String::new(),
                publish: false,
            })
            .await
    };

    // Slow calls: another writer holds the database's write lock.
    let mut opts = sea_orm::ConnectOptions::new(format!(
        "sqlite://{}",
        dev.path().join(".anumate/anumate.db").display()
    ));
    opts.max_connections(1).min_connections(1);
    let blocker = sea_orm::Database::connect(opts).await.unwrap();
    blocker.execute_unprepared("BEGIN IMMEDIATE").await.unwrap();

    let channel = dev.server.channel().await;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(push(channel.clone(), token.clone(), source.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = Instant::now();
    let shed = push(channel.clone(), token.clone(), source.clone())
        .await
        .unwrap_err();
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(
        shed.message().contains("max_concurrent_requests"),
        "{shed:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    for call in slow {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("request_timeout_secs"), "{err:?}");
    }

    blocker.execute_unprepared("COMMIT").await.unwrap();
    let pushed = push(channel, token, source).await.expect("serves after");
    assert!(pushed.into_inner().version.is_some());
}

/// `serve` signs only with configured keys: without them it refuses to start
/// and names the settings; two replicas given the same files (the second an
/// older key, still verifying) publish the same key sets.
/// A service that cannot be built stops `serve` with an error naming what to
/// configure: captokens without receipts in its process needs the platform's
/// service keys to append revocation receipts at `[captokens] receipts_url`.
#[test]
fn serve_names_what_a_service_module_is_missing() {
    let dir = workdir();
    let path = dir.path();
    let key = path.join("tokens.pem");
    write_key(&key);
    let config = path.join("captokens.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = {store:?}\n\n[captokens]\nkey_files = [{key:?}]\nreceipts_url = \"http://127.0.0.1:9\"\n",
            store = format!("sqlite://{}", path.join("tokens.db").display()),
            key = key.display().to_string(),
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let out = run(serve_migrating(path, "captokens", &config)).failed();
    assert!(out.stderr.contains("[captokens] receipts_url"), "{out:#?}");
    assert!(out.stderr.contains("[keys] service_key_files"), "{out:#?}");
}

#[test]
fn serve_needs_configured_keys_and_replicas_share_them() {
    let dir = workdir();
    let path = dir.path();
    let store = format!("sqlite://{}", path.join("shared.db").display());
    let out = cli(
        path,
        &[
            "serve",
            "all",
            "--listen",
            "127.0.0.1:0",
            "--store-url",
            &store,
        ],
    )
    .failed();
    for key in [
        "[keys] registry_key_files",
        "[keys] receipts_key_files",
        "[captokens] key_files",
    ] {
        assert!(out.stderr.contains(key), "{key}: {out:#?}");
    }
    assert!(!path.join("shared.db").exists(), "nothing started");

    let keys = path.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let registry = write_key(&keys.join("registry.pem"));
    let receipts = write_key(&keys.join("receipts.pem"));
    let tokens_new = write_key(&keys.join("tokens-new.pem"));
    let tokens_old = write_key(&keys.join("tokens-old.pem"));
    let _ = registry;
    let k = |name: &str| keys.join(name).display().to_string();
    let start = |n: u16, migrate: bool| {
        let admin = format!("127.0.0.1:{}", free_port());
        let config = path.join(format!("replica{n}.toml"));
        std::fs::write(
            &config,
            format!(
                "[store]\nurl = {store:?}\n\n[admin]\nlisten = {admin:?}\n\n\
                 [keys]\nregistry_key_files = [{reg:?}]\nreceipts_key_files = [{rec:?}]\n\n\
                 [captokens]\nkey_files = [{new:?}, {old:?}]\n",
                reg = k("registry.pem"),
                rec = k("receipts.pem"),
                new = k("tokens-new.pem"),
                old = k("tokens-old.pem"),
            ),
        )
        .unwrap();
        let mut cmd = anumate(path);
        cmd.args(["serve", "all", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config);
        if migrate {
            cmd.arg("--migrate");
        }
        let server = Server::start(cmd, path.join(format!("replica{n}.log")));
        (server, admin)
    };
    let (_a, admin_a) = start(1, true);
    let (_b, admin_b) = start(2, false);
    let jwks = |admin: &str, which: &str| -> Value {
        let (status, body) = http_get(admin, which);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let kids = |set: &Value| -> Vec<String> {
        set["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    let tokens = jwks(&admin_a, "/.well-known/jwks.json");
    assert_eq!(tokens, jwks(&admin_b, "/.well-known/jwks.json"));
    let token_kids = kids(&tokens);
    assert!(
        token_kids.contains(&tokens_new) && token_kids.contains(&tokens_old),
        "{tokens}"
    );
    let receipt_set = jwks(&admin_a, "/.well-known/receipts-jwks.json");
    assert_eq!(
        receipt_set,
        jwks(&admin_b, "/.well-known/receipts-jwks.json")
    );
    assert_eq!(kids(&receipt_set), vec![receipts]);
}

/// `/readyz` answers an unauthenticated caller only that the database is
/// unavailable; the database's own words (names, hosts) go to the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_does_not_echo_database_errors() {
    use sea_orm::ConnectionTrait as _;
    let db = TestDb::postgres().await;
    let dir = workdir();
    let path = dir.path();
    let key = path.join("registry.pem");
    write_key(&key);
    let admin = format!("127.0.0.1:{}", free_port());
    let config = path.join("anumate.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\nurl = {url:?}\nowner_url = {owner:?}\n\n[admin]\nlisten = {admin:?}\n\n\
             [keys]\nregistry_key_files = [{key:?}]\n",
            url = db.config.url,
            owner = db.config.owner_url,
            key = key.display().to_string(),
        ),
    )
    .unwrap();
    let cmd = serve_migrating(path, "registry", &config);
    let server = Server::start(cmd, path.join("serve.log"));
    assert_eq!(http_get(&admin, "/readyz"), (200, "ready\n".to_owned()));

    // The database goes away.
    let name = db
        .config
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let pg = sea_orm::Database::connect(anumate_store::testing::postgres_admin_url())
        .await
        .unwrap();
    pg.execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    let (status, body) = http_get(&admin, "/readyz");
    assert_eq!((status, body.as_str()), (503, "database unavailable\n"));
    assert!(!body.contains(&name));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.logs().contains("readyz: database unavailable") {
        assert!(Instant::now() < deadline, "{}", server.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
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

/// Issue 9: a `svc:` subject in a dev (user) token is not a service; only the
/// platform's service key makes one. Through the real binary: a dev token for
/// `svc:orchestrator`, even with the admin role, cannot append a receipt or
/// mint a capability token, and the admin token cannot append either; a
/// service token from `anumate auth service-token` can.
#[test]
fn only_the_service_issuer_makes_a_service_identity() {
    let dev = Dev::start();
    let forged = dev
        .cli(&[
            "auth",
            "dev-token",
            "--subject",
            "svc:orchestrator",
            "--roles",
            "admin",
        ])
        .ok()
        .stdout
        .trim()
        .to_string();
    let append = |token: &str, key: &str| {
        dev.cli(&[
            "receipt",
            "append",
            "--token",
            token,
            "--kind",
            "step-execution",
            "--run",
            "r1",
            "--step",
            "s1",
            "--attempt",
            "1",
            "--dedupe-key",
            key,
            "--content",
            r#"{"tool": "refund"}"#,
        ])
    };
    let out = append(&forged, "k1").failed();
    assert!(out.stderr.contains("UNAUTHENTICATED"), "{out:#?}");
    assert!(out.stderr.contains("reserved"), "{out:#?}");
    let out = dev
        .cli(&[
            "token",
            "mint",
            "--token",
            &forged,
            "--audience",
            "conn:payments",
            "--tool",
            "payments.refund",
            "--run",
            "r1",
            "--step",
            "s1",
            "--plan-hash",
            "sha256:1111111111111111111111111111111111111111111111111111111111111111",
            "--args",
            "{}",
        ])
        .failed();
    assert!(out.stderr.contains("UNAUTHENTICATED"), "{out:#?}");

    // The dev admin is a person: receipts are the services' to append.
    let out = append(&dev.token(), "k2").failed();
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:#?}");

    let service = dev
        .cli(&["auth", "service-token", "--service", "orchestrator"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let out = append(&service, "k3").ok();
    assert!(
        out.stdout.contains("RECEIPT_KIND_STEP_EXECUTION"),
        "{out:#?}"
    );
    // A service key's token for another service is that service, not the orchestrator.
    let approvals = dev
        .cli(&["auth", "service-token", "--service", "approvals"])
        .ok()
        .stdout
        .trim()
        .to_string();
    let out = append(&approvals, "k4").failed();
    assert!(out.stderr.contains("PERMISSION_DENIED"), "{out:#?}");
}
