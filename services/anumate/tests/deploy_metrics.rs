#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The deployment artifacts against the real binary (issue 18):
//!
//! - every metric the Grafana dashboard (`deploy/grafana/anumate.json`) and
//!   the alert rules (`deploy/prometheus/alerts.yaml`) name is exported at
//!   `/metrics` by `anumate dev` after the golden path's traffic (tool,
//!   policy and capsule pushes, a preflight, a run with two approvals through
//!   the connector hub), and the run's series say what it did (both steps'
//!   tool calls succeeded, the approval was granted); the RPCs they filter
//!   on (`service="…"`, `method="…"`) are RPCs of the contracts;
//! - the configuration the Helm chart renders (`deploy/kubernetes/configmap.yaml`)
//!   and the compose setup's (`deploy/compose/anumate.toml`) load in the
//!   binary, whose configuration refuses unknown keys and mistyped values;
//! - every role of the chart's default render starts as its pod would
//!   (`anumate serve <role>`, the chart's configuration, on PostgreSQL that
//!   the migration Job's command migrated) and answers the gRPC health checks
//!   its readiness and liveness probes make.
//!
//! `scripts/deploy-check` checks the same files' shape (and renders the chart).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{anumate, cli, copy_dir, dev_state, examples, http_get, run, start_dev};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The dashboard and the alert rules, as text.
fn observability_files() -> Vec<(&'static str, String)> {
    [
        "deploy/grafana/anumate.json",
        "deploy/prometheus/alerts.yaml",
    ]
    .into_iter()
    .map(|f| (f, read(f)))
    .collect()
}

/// Every `anumate_…` metric name in `text` (a PromQL identifier starting
/// with the platform's prefix).
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("anumate_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if !before.is_some_and(is_ident) {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// The values a label is matched against in `text`: `label="v"` and each
/// plain alternative of `label=~"a|b"` (alternatives holding regex syntax
/// are skipped).
fn label_values(text: &str, label: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for op in ["=\\\"", "=\"", "=~\\\"", "=~\""] {
        let pat = format!("{label}{op}");
        let mut rest = text;
        while let Some(at) = rest.find(&pat) {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at + pat.len()..];
            let end = tail.find(['"', '\\']).unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                for v in tail[..end].split('|') {
                    if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.') {
                        out.insert(v.to_owned());
                    }
                }
            }
            rest = &tail[end..];
        }
    }
    out
}

/// The sample names of an OpenMetrics exposition.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_owned())
        .collect()
}

/// The value of the sample `series` (name and labels as exposed) in
/// `exposition`; 0 when absent.
fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The names in `wanted` that `exposition` does not export.
fn missing(wanted: &BTreeSet<String>, exposition: &str) -> Vec<String> {
    let have = exported(exposition);
    wanted
        .iter()
        .filter(|n| !have.contains(*n))
        .cloned()
        .collect()
}

/// `package.Service` and the RPC names of every contract in proto/anumate.
fn contracts() -> (BTreeSet<String>, BTreeSet<String>) {
    let mut services = BTreeSet::new();
    let mut methods = BTreeSet::new();
    let mut stack = vec![repo().join("proto/anumate")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "proto") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let package = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("package "))
                .map(|p| p.trim_end_matches(';').trim().to_owned())
                .unwrap_or_default();
            for line in text.lines().map(str::trim) {
                let word = |s: &str| {
                    s.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                };
                if let Some(s) = line.strip_prefix("service ") {
                    services.insert(format!("{package}.{}", word(s)));
                } else if let Some(m) = line.strip_prefix("rpc ") {
                    methods.insert(word(m));
                }
            }
        }
    }
    (services, methods)
}

#[test]
fn the_metric_and_label_scanners_read_promql() {
    let text = r#"sum(rate(anumate_grpc_requests_total{service="anumate.ghostrun.v1.GhostRunService",method=~"Approve|Reject|Watch.*"}[5m])) / x_anumate_not up{job="anumate"}"#;
    assert_eq!(
        metric_names(text),
        BTreeSet::from(["anumate_grpc_requests_total".to_owned()])
    );
    assert_eq!(
        label_values(text, "method"),
        BTreeSet::from(["Approve".to_owned(), "Reject".to_owned()])
    );
    assert_eq!(
        label_values(text, "service"),
        BTreeSet::from(["anumate.ghostrun.v1.GhostRunService".to_owned()])
    );
    // JSON escapes the quotes: still read.
    assert_eq!(
        label_values(r#""expr": "x{method=\"Preflight\"}""#, "method"),
        BTreeSet::from(["Preflight".to_owned()])
    );
    let exposition = "# TYPE anumate_a counter\nanumate_a_total{x=\"1\"} 1\nanumate_b_bucket{le=\"1\"} 2\n# EOF\n";
    let wanted: BTreeSet<String> = ["anumate_a_total", "anumate_b_bucket", "anumate_c"]
        .map(String::from)
        .into();
    assert_eq!(missing(&wanted, exposition), vec!["anumate_c".to_owned()]);
}

#[test]
fn dashboard_and_alerts_filter_on_rpcs_of_the_contracts() {
    let (services, methods) = contracts();
    assert!(services.contains("anumate.ghostrun.v1.GhostRunService"));
    let mut named = 0;
    for (file, text) in observability_files() {
        assert!(
            !metric_names(&text).is_empty(),
            "{file} names no anumate_ metric"
        );
        for s in label_values(&text, "service") {
            assert!(
                services.contains(&s),
                "{file}: service=\"{s}\" is no contract's service"
            );
            named += 1;
        }
        for m in label_values(&text, "method") {
            assert!(
                methods.contains(&m),
                "{file}: method=\"{m}\" is no contract's RPC"
            );
            named += 1;
        }
    }
    assert!(named >= 5, "the files filter on too few RPCs ({named})");
}

/// `anumate <args>` in `dir` as `token` (a dev token of another user).
fn cli_as(dir: &Path, token: &str, args: &[&str]) -> common::Run {
    let mut cmd = anumate(dir);
    cmd.env("ANUMATE_TOKEN", token).args(args);
    run(cmd)
}

#[test]
fn every_metric_the_dashboard_and_alerts_name_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_dir(&examples(), &d.join("examples"));
    // With the suite's Kafka broker the outbox relay runs and exports its
    // backlog and lag; without one, those two are not asked for.
    let kafka = std::env::var("ANUMATE_TEST_KAFKA").ok();
    let _dev = match &kafka {
        Some(brokers) => common::start_dev_env(d, &[("ANUMATE_KAFKA__BROKERS", brokers)]),
        None => start_dev(d),
    };

    // The golden path: pushes, a compile, a preflight, a run that waits for
    // two approvals and then calls the tools through the connector hub.
    cli(d, &["tool", "push", "examples/transfer.tools.yaml"]).ok();
    cli(
        d,
        &["policy", "push", "examples/transfer.policy", "--publish"],
    )
    .ok();
    cli(
        d,
        &[
            "capsule",
            "push",
            "examples/transfer.capsule.yaml",
            "--publish",
        ],
    )
    .ok();
    let inputs = "examples/transfer.inputs.json";
    let pf = cli(d, &["preflight", "transfer", "--inputs", inputs, "-q"]);
    assert_eq!(pf.status.code(), Some(2), "preflight WARNs: {pf:#?}");
    let pf = pf.stdout.trim().to_owned();
    let run_id = cli(
        d,
        &[
            "run",
            "start",
            "transfer",
            "--inputs",
            inputs,
            "--preflight",
            &pf,
            "-q",
        ],
    )
    .ok()
    .stdout
    .trim()
    .to_owned();
    cli(d, &["run", "watch", &run_id, "--until", "waiting-approval"]).ok();
    let approval = cli(
        d,
        &["approval", "list", "--run", &run_id, "--pending", "-q"],
    )
    .ok()
    .stdout
    .trim()
    .to_owned();
    let alice = cli(
        d,
        &[
            "auth",
            "dev-token",
            "--subject",
            "user:alice",
            "--roles",
            "approver",
        ],
    )
    .ok()
    .stdout
    .trim()
    .to_owned();
    let bob = cli(
        d,
        &[
            "auth",
            "dev-token",
            "--subject",
            "user:bob",
            "--groups",
            "treasury",
            "--roles",
            "approver",
        ],
    )
    .ok()
    .stdout
    .trim()
    .to_owned();
    cli_as(d, &alice, &["approval", "approve", &approval]).ok();
    cli_as(d, &bob, &["approval", "approve", &approval]).ok();
    cli(d, &["run", "watch", &run_id]).ok();

    let mut wanted = BTreeSet::new();
    for (_, text) in observability_files() {
        wanted.extend(metric_names(&text));
    }
    assert!(wanted.len() >= 4, "{wanted:?}");
    if kafka.is_none() {
        eprintln!("ANUMATE_TEST_KAFKA unset: the relay's metrics are not checked");
        wanted.retain(|m| !m.starts_with("anumate_events_"));
    }
    let admin = dev_state(d)["admin"].as_str().unwrap().to_owned();
    let admin = admin.trim_start_matches("http://").to_owned();
    // The hub records its metrics as the call returns: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(&admin, "/metrics");
        assert_eq!(status, 200, "{body}");
        let gone = missing(&wanted, &body);
        if gone.is_empty() {
            // What the run did, as the operators' series tell it: both
            // steps' tool calls succeeded, the approval was granted.
            for series in [
                r#"anumate_orchestrator_step_outcomes_total{tool="accounts.lookup",outcome="succeeded"}"#,
                r#"anumate_orchestrator_step_outcomes_total{tool="payments.transfer",outcome="succeeded"}"#,
                r#"anumate_orchestrator_step_duration_seconds_count{tool="payments.transfer",outcome="succeeded"}"#,
                r#"anumate_approval_wait_seconds_count{outcome="granted"}"#,
            ] {
                assert!(
                    sample(&body, series) >= 1.0,
                    "{series} after the golden path:\n{body}"
                );
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dashboard or the alerts name metrics /metrics does not export after the golden path: {gone:?}\n--- /metrics\n{body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The TOML under `anumate.toml: |` in the chart's rendered ConfigMap.
fn chart_config() -> String {
    let yaml = read("deploy/kubernetes/configmap.yaml");
    let start = yaml
        .find("anumate.toml: |\n")
        .expect("configmap.yaml holds anumate.toml")
        + "anumate.toml: |\n".len();
    let mut out = String::new();
    for line in yaml[start..].lines() {
        if !line.is_empty() && !line.starts_with("    ") {
            break;
        }
        out.push_str(line.strip_prefix("    ").unwrap_or(line));
        out.push('\n');
    }
    out
}

/// `anumate migrate` with `config` on a fresh SQLite database: the
/// configuration is parsed as `serve` parses it (unknown keys and mistyped
/// values are errors).
fn migrate_with(config: &str) -> common::Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anumate.toml");
    std::fs::write(&path, config).unwrap();
    let url = format!("sqlite://{}/anumate.db", dir.path().display());
    let mut cmd = anumate(dir.path());
    cmd.args([
        "migrate",
        "--config",
        path.to_str().unwrap(),
        "--store-url",
        &url,
    ])
    .args(["--data-dir", dir.path().to_str().unwrap()]);
    run(cmd)
}

#[test]
fn the_charts_and_composes_configuration_load_in_the_binary() {
    let chart = chart_config();
    assert!(
        chart.contains("[grpc]") && chart.contains("listen = \"0.0.0.0:7600\""),
        "{chart}"
    );
    let ran = migrate_with(&chart);
    assert!(
        ran.status.success(),
        "the chart's anumate.toml:\n{chart}\n{ran:#?}"
    );
    let compose = read("deploy/compose/anumate.toml");
    let ran = migrate_with(&compose);
    assert!(
        ran.status.success(),
        "deploy/compose/anumate.toml: {ran:#?}"
    );
    // What Helm's own toToml would write (30.0 for 30) is refused: the
    // chart's integer rendering matters.
    let floats = chart.replace("shutdown_grace_secs = 30", "shutdown_grace_secs = 30.0");
    assert_ne!(floats, chart);
    let ran = migrate_with(&floats);
    assert!(!ran.status.success(), "{ran:#?}");
    assert!(ran.stderr.contains("shutdown_grace_secs"), "{ran:#?}");
}

/// (role, the gRPC service its readiness probe asks for) of every
/// Deployment in the chart's default render.
fn chart_roles() -> Vec<(String, String)> {
    let yaml = read("deploy/kubernetes/deployments.yaml");
    let mut out = Vec::new();
    let mut role = None;
    let mut in_readiness = false;
    for line in yaml.lines().map(str::trim) {
        if let Some(args) = line.strip_prefix("args: [\"") {
            role = Some(args.trim_end_matches("\"]").to_owned());
        } else if line == "readinessProbe:" {
            in_readiness = true;
        } else if in_readiness {
            in_readiness = false;
            let service = line
                .split("service: ")
                .nth(1)
                .map(|s| s.trim_end_matches('}').trim().to_owned())
                .expect("the readiness probe names a gRPC service");
            out.push((role.take().expect("args before the probe"), service));
        }
    }
    out
}

/// `anumate serve <role>` started as the chart's pod starts it; killed
/// when dropped.
struct Pod(std::process::Child);

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every role of the chart serves with the chart's configuration on a
/// database the chart's migration Job migrated (environment only, as the
/// hook runs before the ConfigMap exists), and answers the gRPC health checks
/// the chart's probes make: its own service (readiness) and "" (liveness).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_of_the_chart_serves_and_passes_its_probes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let db = anumate_store::testing::TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = d.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["registry", "receipts", "services", "captokens"] {
        let key = anumate_crypto::KeyPair::generate().unwrap();
        std::fs::write(keys.join(format!("{k}.pem")), key.to_pkcs8_pem()).unwrap();
    }
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();

    // The migration Job: its environment, no configuration file.
    let mut migrate = anumate(d);
    migrate
        .arg("migrate")
        .env("ANUMATE_DATA_DIR", &data)
        .env("ANUMATE_STORE__APP_ROLE", "anumate_app")
        .env("ANUMATE_STORE__URL", &db.config.url)
        .env("ANUMATE_STORE__OWNER_URL", &db.config.owner_url);
    let ran = run(migrate);
    assert!(
        ran.status.success(),
        "the migration Job's command: {ran:#?}"
    );

    let config = chart_config()
        .replace("/etc/anumate/keys", keys.to_str().unwrap())
        .replace("/var/lib/anumate", data.to_str().unwrap());
    let config_path = d.join("anumate.toml");
    std::fs::write(&config_path, &config).unwrap();

    let roles = chart_roles();
    assert_eq!(roles.len(), 10, "{roles:?}");
    for (role, probe_service) in roles {
        let log = d.join(format!("{role}.log"));
        let mut cmd = anumate(d);
        cmd.args(["serve", &role, "--listen", "127.0.0.1:0", "--config"])
            .arg(&config_path)
            .env("ANUMATE_STORE__URL", &db.config.url)
            .env("ANUMATE_ADMIN__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let pod = Pod(child);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let serving = loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.contains("serving ") && line.contains(" on http://") => {
                    break line;
                }
                Ok(_) => {}
                Err(_) => panic!(
                    "anumate serve {role} did not start with the chart's configuration:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        };
        let url = serving.rsplit(" on ").next().unwrap().trim().to_owned();
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        for service in [probe_service.as_str(), ""] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap_or_else(|e| panic!("{role}: health check {service:?}: {e}"))
                .into_inner()
                .status();
            assert_eq!(status, ServingStatus::Serving, "{role}: {service:?}");
        }
        drop(pod);
    }

    // The gateway's pod: `anumate serve gateway` with the same file (its
    // upstream, the router, is dialled lazily), ready when /openapi.json
    // answers on its http port.
    let gateway = read("deploy/kubernetes/gateway.yaml");
    assert!(gateway.contains("args: [\"gateway\"]"), "{gateway}");
    assert!(
        gateway.contains("httpGet: {path: /openapi.json, port: http}"),
        "{gateway}"
    );
    let log = d.join("gateway.log");
    let mut cmd = anumate(d);
    cmd.args(["serve", "gateway", "--config"])
        .arg(&config_path)
        .env("ANUMATE_GATEWAY__LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let _pod = Pod(child);
    let first = BufReader::new(stdout).lines().next();
    let line = first.and_then(Result::ok).unwrap_or_else(|| {
        panic!(
            "anumate serve gateway did not start with the chart's configuration:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(line.contains("-> http://anumate-router:7600"), "{line}");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (status, body) = http_get(&addr, "/openapi.json");
    assert_eq!(status, 200, "{body}");
}

/// `[section] key = "value"` string settings of a simple TOML file.
fn toml_strings(toml: &str) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    let mut section = String::new();
    for line in toml.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.trim_matches(['[', ']']).to_owned();
        } else if let Some((k, v)) = line.split_once(" = ")
            && let Some(v) = v.trim().strip_prefix('"').and_then(|v| v.split('"').next())
        {
            out.insert((section.clone(), k.trim().to_owned(), v.to_owned()));
        }
    }
    out
}

/// Every upstream a role's configuration names (`pub <role>_url: String` in
/// services/<role>/src/lib.rs) is set, in the chart's and the compose
/// configuration, to that role's address: unset, a role would call its own
/// process, which in mesh mode does not serve the upstream.
#[test]
fn the_chart_and_compose_point_every_role_at_its_upstreams() {
    let roles = [
        "registry",
        "receipts",
        "policy",
        "captokens",
        "compiler",
        "events",
        "approvals",
        "ghostrun",
        "connectors",
        "orchestrator",
    ];
    let mut wanted = Vec::new();
    for role in roles {
        let src = read(&format!("services/{role}/src/lib.rs"));
        for line in src.lines().map(str::trim) {
            let Some(field) = line
                .strip_prefix("pub ")
                .and_then(|l| l.strip_suffix("_url: String,"))
            else {
                continue;
            };
            assert!(roles.contains(&field), "[{role}] {field}_url: no such role");
            wanted.push((role, field.to_owned()));
        }
    }
    assert!(wanted.len() >= 15, "{wanted:?}");
    let chart = toml_strings(&chart_config());
    let compose = toml_strings(&read("deploy/compose/anumate.toml"));
    for (role, upstream) in wanted {
        let key = format!("{upstream}_url");
        let chart_url = format!("http://anumate-{upstream}:7600");
        assert!(
            chart.contains(&(role.to_owned(), key.clone(), chart_url.clone())),
            "the chart's anumate.toml lacks [{role}] {key} = {chart_url:?}"
        );
        let compose_url = format!("http://{upstream}:7600");
        assert!(
            compose.contains(&(role.to_owned(), key.clone(), compose_url.clone())),
            "deploy/compose/anumate.toml lacks [{role}] {key} = {compose_url:?}"
        );
    }
}
