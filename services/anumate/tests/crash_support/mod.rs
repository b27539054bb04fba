//! What the crash tests (`kill9.rs`, `two_process.rs`) share: `anumate dev`
//! processes on one fresh PostgreSQL database that a test kills with
//! SIGKILL and restarts, a tenant seeded with a capsule of idempotent mock
//! steps, and the checks that every run ended and every (run, step) key
//! acted once in the mock connector's ledger.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anumate_auth::BearerToken;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::connectors::v1 as conpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_store::Backend;
use anumate_store::testing::TestDb;
use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub const BIN: &str = env!("CARGO_BIN_EXE_anumate");

/// The steps of the seeded capsule, in order.
pub const STEPS: &[&str] = &["debit", "credit", "notify"];

/// Tools of the seeded capsule: idempotent mock tools (a re-send after a
/// crash carries the same key, and the mock acts once per key), each call
/// taking `latency`.
fn tools(latency: &str) -> String {
    let tool = |name: &str| {
        format!(
            "apiVersion: anumate.dev/v1\nkind: Tool\nmetadata: {{name: {name}}}\nspec:\n  \
             connector: mock\n  side_effect: write\n  idempotent: true\n  \
             input: {{type: object, required: [to, amount], properties: {{to: {{type: string}}, amount: {{type: integer, minimum: 1}}}}}}\n  \
             mock: {{output: {{id: \"{name}_${{{{ args.to }}}}\"}}, latency: {latency}}}\n"
        )
    };
    ["ledger.debit", "ledger.credit", "mail.notify"]
        .iter()
        .map(|t| tool(t))
        .collect::<Vec<_>>()
        .join("---\n")
}

const POLICY: &str = r#"policy "open" {
  rule "cap" {
    when args.amount > 1000000
    then deny(reason: "too large")
  }
}
"#;

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: transfer
spec:
  inputs:
    to:     {type: string, required: true}
    amount: {type: integer, required: true, minimum: 1}
  tools: [ledger.debit, ledger.credit, mail.notify]
  policies: [open]
  steps:
    - id: debit
      tool: ledger.debit
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
    - id: credit
      tool: ledger.credit
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
    - id: notify
      tool: mail.notify
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
"#;

/// A fresh database and a directory with `anumate.toml` pointing at it:
/// `anumate dev` processes started with it share the database and the
/// keys (the data directory), as replicas share their configured keys.
pub struct Cluster {
    pub db: TestDb,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Cluster {
    /// On PostgreSQL; `extra` is appended to the configuration (the
    /// `[orchestrator]` and `[connectors]` leases of the test).
    pub async fn new(extra: &str) -> Cluster {
        Cluster::on(Backend::Postgres, extra).await
    }

    /// [`Cluster::new`] on `backend` (SQLite: one process at a time).
    pub async fn on(backend: Backend, extra: &str) -> Cluster {
        let db = match backend {
            Backend::Postgres => TestDb::postgres().await,
            Backend::Sqlite => TestDb::sqlite(),
        };
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("anumate.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\n\n[store]\nurl = {url:?}\nowner_url = {owner:?}\n\n{extra}",
                data = dir.path().join("data").display().to_string(),
                url = db.config.url,
                owner = db.config.owner_url,
            ),
        )
        .unwrap();
        Cluster { db, dir, config }
    }

    /// `anumate dev` on this cluster, once serving; its log is appended to
    /// `<dir>/<name>.log`.
    pub async fn start(&self, name: &str) -> Node {
        let config = self.config.clone();
        let dir = self.dir.path().to_owned();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || Node::start(&dir, &config, &name))
            .await
            .unwrap()
    }

    /// The admin token `anumate dev` wrote (tenant `dev`, `user:dev`).
    pub fn token(&self) -> BearerToken {
        let raw = std::fs::read(self.dir.path().join("data/dev.json")).unwrap();
        let state: Value = serde_json::from_slice(&raw).unwrap();
        BearerToken(state["token"].as_str().unwrap().to_owned())
    }

    /// The queue row of run `run_id` and the end of every process log, to
    /// see why a run did not end.
    pub fn diagnose(&self, run_id: &str) -> String {
        let sql = format!(
            "SELECT lease_owner, lease_until, due_at FROM orch_work WHERE run_id = '{run_id}'"
        );
        let url = &self.db.config.url;
        let query = match url.strip_prefix("sqlite://") {
            Some(file) => Command::new("sqlite3")
                .args([file.split('?').next().unwrap_or(file), &sql])
                .output(),
            None => Command::new("psql")
                .args([self.db.config.owner_url.as_str(), "-c", &sql])
                .output(),
        };
        let out = query
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_else(|e| format!("psql: {e}"));
        let mut logs = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                logs.push_str(&format!("--- {} (last lines)\n", path.display()));
                for line in tail.into_iter().rev() {
                    logs.push_str(line);
                    logs.push('\n');
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros();
        format!("orch_work (now: {now} us):\n{out}\n{logs}")
    }

    /// Every log line of the process `name`, across its restarts.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// One `anumate dev` process. Dropping it kills it (SIGKILL).
pub struct Node {
    child: Child,
    /// `http://127.0.0.1:port` of its gRPC listener.
    pub url: String,
    /// Its process id.
    pub pid: u32,
}

impl Node {
    fn start(dir: &Path, config: &Path, name: &str) -> Node {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ANUMATE_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "warn")
            .args(["dev", "--listen", "127.0.0.1:0", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        // Drains stdout for the life of the process.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((_, url)) = line.split_once("serving gRPC on ") {
                        return Node {
                            child,
                            url: url.trim().to_owned(),
                            pid,
                        };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "anumate dev did not start:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
            }
        }
    }

    /// SIGKILL, and reaped.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type Orch = pb::orchestrator_service_client::OrchestratorServiceClient<
    InterceptedService<Channel, BearerToken>,
>;

/// A lazily connecting channel to `url` (a dead node's calls fail fast).
pub fn channel(url: &str) -> Channel {
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(20))
        .connect_lazy()
}

pub fn orch(url: &str, token: &BearerToken) -> Orch {
    pb::orchestrator_service_client::OrchestratorServiceClient::with_interceptor(
        channel(url),
        token.clone(),
    )
}

/// Pushes the tools (each call taking `latency`, e.g. `5ms`), the policy and
/// the capsule, compiles it, turns `require_preflight` off; the plan hash.
pub async fn seed(url: &str, token: &BearerToken, latency: &str) -> String {
    let ch = channel(url);
    rpb::tools_service_client::ToolsServiceClient::with_interceptor(ch.clone(), token.clone())
        .push_tools(rpb::PushToolsRequest {
            source_yaml: tools(latency),
            source_name: "tools.yaml".into(),
        })
        .await
        .unwrap();
    ppb::policy_service_client::PolicyServiceClient::with_interceptor(ch.clone(), token.clone())
        .push_policy(ppb::PushPolicyRequest {
            source: POLICY.into(),
            source_name: "open.policy".into(),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    rpb::registry_service_client::RegistryServiceClient::with_interceptor(
        ch.clone(),
        token.clone(),
    )
    .push_capsule(rpb::PushCapsuleRequest {
        source_yaml: CAPSULE.into(),
        source_name: "transfer.yaml".into(),
        etag: String::new(),
        publish: true,
    })
    .await
    .unwrap();
    let plan = cpb::compiler_service_client::CompilerServiceClient::with_interceptor(
        ch.clone(),
        token.clone(),
    )
    .compile(cpb::CompileRequest {
        capsule_name: "transfer".into(),
        version: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .plan
    .unwrap();
    rpb::tenant_settings_service_client::TenantSettingsServiceClient::with_interceptor(
        ch,
        token.clone(),
    )
    .update_tenant_settings(rpb::UpdateTenantSettingsRequest {
        settings: Some(rpb::TenantSettings {
            require_preflight: Some(false),
            ..Default::default()
        }),
        update_mask: Some(pbjson_types::FieldMask {
            paths: vec!["require_preflight".into()],
        }),
        etag: String::new(),
    })
    .await
    .unwrap();
    plan.plan_hash
}

/// The `Execute` request of the run with idempotency key `key` (the same
/// request every time, so a retry after a crash returns the same run).
pub fn execute_request(plan_hash: &str, key: &str) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        plan_hash: plan_hash.to_owned(),
        inputs: Some(
            serde_json::from_value(json!({"to": format!("acct_{key}"), "amount": 10})).unwrap(),
        ),
        idempotency_key: key.to_owned(),
        ..Default::default()
    }
}

/// `Execute`: the run id, or `None` when the server could not be reached or
/// died under the call.
pub async fn execute(c: &mut Orch, plan_hash: &str, key: &str) -> Option<String> {
    match c.execute(execute_request(plan_hash, key)).await {
        Ok(resp) => Some(resp.into_inner().run.unwrap().run_id),
        Err(status) => {
            // Only a lost server may refuse: anything else is a bug.
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ),
                "Execute {key} failed: {status:?}"
            );
            None
        }
    }
}

pub async fn get_run(c: &mut Orch, run_id: &str) -> pb::Run {
    c.get_run(pb::GetRunRequest {
        run_id: run_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .run
    .unwrap()
}

pub fn is_terminal(run: &pb::Run) -> bool {
    matches!(
        run.state(),
        pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
    )
}

/// Waits (at most `within`) for every run to end; the runs by id. A run
/// still going then fails the test with its queue row and the processes'
/// logs (`cluster`).
pub async fn wait_all_ended(
    cluster: &Cluster,
    c: &mut Orch,
    run_ids: &[String],
    within: Duration,
) -> BTreeMap<String, pb::Run> {
    let deadline = Instant::now() + within;
    let mut ended = BTreeMap::new();
    loop {
        for id in run_ids {
            if ended.contains_key(id) {
                continue;
            }
            let run = get_run(c, id).await;
            if is_terminal(&run) {
                ended.insert(id.clone(), run);
            } else if Instant::now() > deadline {
                panic!(
                    "run {id} did not end within {within:?} ({} of {} ended): {run:#?}\n{}",
                    ended.len(),
                    run_ids.len(),
                    cluster.diagnose(id)
                );
            }
        }
        if ended.len() == run_ids.len() {
            return ended;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every call in the mock connector's ledger.
pub async fn mock_calls(url: &str, token: &BearerToken) -> Vec<conpb::MockCall> {
    let mut hub = conpb::connector_hub_service_client::ConnectorHubServiceClient::with_interceptor(
        channel(url),
        token.clone(),
    );
    let mut calls = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = hub
            .list_mock_calls(conpb::ListMockCallsRequest {
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        calls.extend(page.calls);
        if page.next_page_token.is_empty() {
            return calls;
        }
        page_token = page.next_page_token;
    }
}

/// `anumate <args>` against the server at `url` with `token`, in `dir`;
/// stdout, failing the test when the command fails.
pub async fn cli(url: &str, token: &BearerToken, dir: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ANUMATE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("ANUMATE_SERVER", url)
        .env("ANUMATE_TOKEN", &token.0)
        .env("NO_COLOR", "1")
        .args(args)
        .stdin(Stdio::null());
    let shown = args.join(" ");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "anumate {shown} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every receipt of each run verifies offline (`anumate receipt get --proof`
/// then `anumate receipt verify` with the receipts JWKS), as a user checks
/// them: keys kept across restarts, no receipt left half-appended. Each
/// run has at least one receipt per step and its outcome's; the number of
/// receipts checked.
pub async fn verify_receipts(
    cluster: &Cluster,
    url: &str,
    token: &BearerToken,
    run_ids: &[String],
) -> usize {
    let dir = cluster.dir.path().join("receipts");
    std::fs::create_dir_all(&dir).unwrap();
    let jwks = cli(url, token, &dir, &["receipt", "jwks"]).await;
    std::fs::write(dir.join("jwks.json"), jwks).unwrap();
    let mut bundles = Vec::new();
    for run_id in run_ids {
        let ids = cli(
            url,
            token,
            &dir,
            &["receipt", "list", "--run", run_id, "-q"],
        )
        .await;
        let ids: Vec<&str> = ids.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            ids.len() > STEPS.len(),
            "run {run_id} has {} receipts",
            ids.len()
        );
        for id in ids {
            let bundle = cli(url, token, &dir, &["receipt", "get", id, "--proof"]).await;
            let file = format!("{id}.json");
            std::fs::write(dir.join(&file), bundle).unwrap();
            bundles.push(file);
        }
    }
    let mut args = vec!["receipt", "verify", "--jwks", "jwks.json"];
    args.extend(bundles.iter().map(String::as_str));
    cli(url, token, &dir, &args).await;
    bundles.len()
}

/// What the ledger showed, for the report.
#[derive(Debug, Default)]
pub struct LedgerFigures {
    /// Entries (distinct idempotency keys).
    pub keys: usize,
    /// Deliveries over all keys.
    pub deliveries: i64,
    /// Keys delivered more than once (re-sent after a crash).
    pub redelivered: usize,
}

/// Every run succeeded; the ledger holds exactly one entry per (run, step),
/// keyed `run/step`, that acted, whose output is the step's; no other entry.
pub fn assert_exactly_once(
    runs: &BTreeMap<String, pb::Run>,
    calls: &[conpb::MockCall],
) -> LedgerFigures {
    let mut by_key: HashMap<&str, Vec<&conpb::MockCall>> = HashMap::new();
    for c in calls {
        by_key
            .entry(c.idempotency_key.as_str())
            .or_default()
            .push(c);
    }
    for (run_id, run) in runs {
        let effects: Vec<_> = calls.iter().filter(|c| &c.run_id == run_id).collect();
        assert_eq!(
            run.state(),
            pb::RunState::Succeeded,
            "run {run_id} ended {:?}: {run:#?}\nits effects in the mock ledger: {effects:#?}",
            run.state()
        );
        assert_eq!(run.steps.len(), STEPS.len());
        for step in &run.steps {
            let key = format!("{run_id}/{}", step.step_id);
            for a in &step.attempts {
                assert_eq!(a.idempotency_key, key, "{run:#?}");
            }
            let entries = by_key.get(key.as_str()).map(Vec::as_slice).unwrap_or(&[]);
            assert_eq!(entries.len(), 1, "key {key}: {entries:#?}");
            let call = entries[0];
            assert!(call.acted, "key {key} never acted: {call:#?}");
            assert!(call.deliveries >= 1);
            assert_eq!(call.run_id, *run_id);
            assert_eq!(call.step_id, step.step_id);
            let acted = serde_json::to_value(call.output.as_ref().unwrap()).unwrap();
            let recorded = serde_json::to_value(step.output.as_ref().unwrap()).unwrap();
            assert_eq!(
                acted, recorded,
                "key {key}: the step's output is not the effect's"
            );
        }
    }
    assert_eq!(
        calls.len(),
        runs.len() * STEPS.len(),
        "ledger entries beyond the runs' steps"
    );
    LedgerFigures {
        keys: calls.len(),
        deliveries: calls.iter().map(|c| i64::from(c.deliveries)).sum(),
        redelivered: calls.iter().filter(|c| c.deliveries > 1).count(),
    }
}

/// A small xorshift generator: the kill points, reproducible from the seed
/// the test prints (`ANUMATE_CRASH_SEED` replays one).
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Rng {
        let seed = std::env::var("ANUMATE_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("crash test seed: ANUMATE_CRASH_SEED={seed}");
        Rng(seed)
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
}
