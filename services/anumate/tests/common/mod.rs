//! What the binary's CLI tests share: the binary without the caller's
//! `ANUMATE_…` variables, what a run printed, the binary against a service in
//! the test process, `anumate dev` on port 0 in a directory, and a plain HTTP
//! GET for the admin listener.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_anumate");

/// The binary in `dir`, without the caller's `ANUMATE_…` variables (they are
/// configuration, and would leak into what a test means to check).
pub fn anumate(dir: &Path) -> Command {
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

/// The repository's `examples/` folder.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

/// The repository's README.
pub fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    std::fs::read_to_string(path).expect("README.md")
}

/// Copies the directory `from` (recursively) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).unwrap();
        }
    }
}

/// The file `name` in `dir`, or empty.
pub fn read_in(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// Runs `bash <stem>.sh` in `dir` as a newcomer would run a README block:
/// the built `anumate` first on `PATH`, without the caller's `ANUMATE_…`
/// variables (configuration that would change what the commands mean),
/// `NO_COLOR`; stdout and stderr go to `<stem>.out` and `<stem>.err`.
/// `None` when it did not finish within `timeout` (then it is killed).
pub fn run_bash(dir: &Path, stem: &str, timeout: Duration) -> Option<ExitStatus> {
    let bin_dir = Path::new(BIN).parent().unwrap().to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(format!("{stem}.sh")).current_dir(dir);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ANUMATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PATH", path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join(format!("{stem}.out"))).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{stem}.err"))).unwrap());
    let mut child = cmd.spawn().expect("bash");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn new(args: Vec<String>, out: Output) -> Run {
        Run {
            args,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the command succeeded.
    #[track_caller]
    pub fn ok(self) -> Run {
        assert!(self.status.success(), "command failed: {self:#?}");
        self
    }

    /// Asserts the command failed.
    #[track_caller]
    pub fn failed(self) -> Run {
        assert!(
            !self.status.success(),
            "command should have failed: {self:#?}"
        );
        self
    }

    /// Stdout as one JSON value.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `cmd` to its end with an empty stdin.
pub fn run(mut cmd: Command) -> Run {
    let args = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    Run::new(
        args,
        cmd.stdin(Stdio::null()).output().expect("run anumate"),
    )
}

/// `anumate <args>` in `dir`.
pub fn cli(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = anumate(dir);
    cmd.args(args);
    run(cmd)
}

/// `anumate <args>` in `dir` against the server at `url` with `token`, with
/// `stdin` piped in; run off the async runtime, so that a service served by
/// the test process keeps answering.
pub async fn remote(
    url: &str,
    token: &str,
    dir: &Path,
    args: &[impl AsRef<str>],
    stdin: Option<&str>,
) -> Run {
    let mut cmd = anumate(dir);
    cmd.env("ANUMATE_SERVER", url)
        .env("ANUMATE_TOKEN", token)
        .args(args.iter().map(AsRef::as_ref))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let args = args.iter().map(|s| s.as_ref().to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().expect("run anumate");
        let mut pipe = child.stdin.take().expect("piped stdin");
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).expect("write stdin");
        }
        drop(pipe);
        Run::new(args, child.wait_with_output().expect("wait for anumate"))
    })
    .await
    .expect("anumate runner")
}

/// A gRPC service served by the test process (`anumate_testing::serve…`);
/// stopped when dropped.
pub struct Served {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// An admin's token for it.
    pub token: String,
    pub handle: tokio::task::JoinHandle<()>,
    /// What must live as long as the service: its database, its keys.
    pub keep: Vec<Box<dyn std::any::Any>>,
}

impl Served {
    /// `anumate <args>` in `dir` against this service, as its admin.
    pub async fn cli(&self, dir: &Path, args: &[impl AsRef<str>]) -> Run {
        remote(&self.url, &self.token, dir, args, None).await
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// `GET path` over HTTP/1.1 to `addr` (`host:port`): the status and the
/// (de-chunked) body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], "")
}

/// `method path` over HTTP/1.1 to `addr` with `headers` and `body` (JSON
/// when not empty): the status and the (de-chunked) body.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    write!(stream, "{head}\r\n{body}").unwrap();
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

/// `.anumate/dev.json` in `dir`, which `anumate dev` writes there.
pub fn dev_state(dir: &Path) -> Value {
    let raw = std::fs::read(dir.join(".anumate/dev.json")).expect("dev.json");
    serde_json::from_slice(&raw).expect("dev.json is JSON")
}

/// `anumate dev` in a directory; stopped (SIGTERM, then killed) when dropped.
pub struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `anumate dev` on `127.0.0.1:0` in `dir`, once it reports serving.
pub fn start_dev(dir: &Path) -> Dev {
    start_dev_env(dir, &[])
}

/// [`start_dev`] with the environment variables `env` set; its log goes to
/// `dir/dev.log`, shown if it does not start within a minute.
pub fn start_dev_env(dir: &Path, env: &[(&str, &str)]) -> Dev {
    let log = std::fs::File::create(dir.join("dev.log")).expect("dev.log");
    let mut child = anumate(dir)
        .args(["dev", "--listen", "127.0.0.1:0"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start anumate dev");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let dev = Dev(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(" on http://") || line.contains(" on https://") => {
                return dev;
            }
            Ok(_) => {}
            Err(_) => panic!(
                "anumate dev did not start:\n{}",
                std::fs::read_to_string(dir.join("dev.log")).unwrap_or_default()
            ),
        }
    }
}

/// A certificate authority for the TLS tests: its signing identity and its
/// certificate (PEM).
pub struct Ca {
    pub issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

/// A fresh self-signed CA named `name`.
pub fn ca(name: &str) -> Ca {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A free port on 127.0.0.1 (bound, then released for the process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An `anumate serve <role>` process (killed when dropped) and its log.
pub struct Pod {
    child: Child,
    /// The file its stderr (the log) goes to.
    pub log: PathBuf,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pod {
    /// The last lines of its log, headed by the file's name.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {}\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }
}

/// Spawns `cmd` (an `anumate serve <role>`) with its stderr to `log` and
/// waits (up to a minute) until it says it serves.
pub fn start_pod(mut cmd: Command, role: &str, log: PathBuf) -> Pod {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let pod = Pod { child, log };
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("serving ") || line.contains("REST gateway on") => {
                return pod;
            }
            Ok(_) => {}
            Err(_) => panic!("anumate serve {role} did not start:\n{}", pod.tail()),
        }
    }
}

/// What every process of a mesh test shares, in `dir`: signing keys
/// (`keys/{registry,receipts,services,captokens}.pem`), a users' issuer
/// trusted through `users.jwks.json`, the database migrated as its owner.
pub struct Mesh {
    /// The keys' directory.
    pub keys: PathBuf,
    /// The users' issuer (mint more tokens with it).
    pub users: anumate_auth::DevIssuer,
    /// An admin's token of tenant `t1` (`user:alice`).
    pub token: String,
    /// `data_dir`, `[auth]`, `[keys]` and `[store]` of every process's TOML.
    pub config: String,
}

impl Mesh {
    /// Keys, the users' issuer and the migrated database `db` in `dir`.
    pub fn prepare(dir: &Path, db: &anumate_store::testing::TestDb) -> Mesh {
        use anumate_crypto::{KeyPair, KeyRing};
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        for k in ["registry", "receipts", "services", "captokens"] {
            let key = KeyPair::generate().unwrap();
            std::fs::write(keys.join(format!("{k}.pem")), key.to_pkcs8_pem()).unwrap();
        }
        let users =
            anumate_auth::DevIssuer::from_key_ring(KeyRing::new(KeyPair::generate().unwrap()));
        let jwks = dir.join("users.jwks.json");
        std::fs::write(&jwks, serde_json::to_vec(&users.jwks()).unwrap()).unwrap();
        let token = users
            .mint(
                "t1",
                "user:alice",
                &[anumate_auth::Role::Admin],
                Duration::from_secs(600),
            )
            .unwrap();
        let migrate = run({
            let mut c = anumate(dir);
            c.arg("migrate")
                .env("ANUMATE_DATA_DIR", dir.join("data"))
                .env("ANUMATE_STORE__APP_ROLE", "anumate_app")
                .env("ANUMATE_STORE__URL", &db.config.url)
                .env("ANUMATE_STORE__OWNER_URL", &db.config.owner_url);
            c
        });
        assert!(migrate.status.success(), "migrate: {migrate:#?}");
        let path = |p: PathBuf| p.display().to_string();
        let config = format!(
            "data_dir = {data:?}\n\n\
             [auth]\nissuers = [{{ issuer = {iss:?}, audience = {aud:?}, tenants = [\"*\"], jwks_file = {jwks:?} }}]\n\n\
             [keys]\nreceipts_key_files = [{rk:?}]\nregistry_key_files = [{gk:?}]\nservice_key_files = [{sk:?}]\n\n\
             [store]\napp_role = \"anumate_app\"\n\n",
            data = path(dir.join("data")),
            iss = anumate_auth::DEV_ISSUER,
            aud = anumate_auth::DEV_AUDIENCE,
            jwks = path(jwks.clone()),
            rk = path(keys.join("receipts.pem")),
            gk = path(keys.join("registry.pem")),
            sk = path(keys.join("services.pem")),
        );
        Mesh {
            keys,
            users,
            token,
            config,
        }
    }
}
