//! The two servers under load, each a child process: the real `anumate dev`
//! on a fresh store, and the baseline (this bench binary with
//! `--serve-baseline`) on the same store and keys.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anumate_store::testing::TestDb;
use anyhow::{Context as _, bail};

use crate::StoreKind;

/// The `anumate` binary built with this bench (same profile).
const BIN: &str = env!("CARGO_BIN_EXE_anumate");

/// A child process, stopped (SIGTERM, then killed) when dropped.
struct Process {
    child: Child,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` with its stderr in `log`, and waits (up to two minutes) for
/// a stdout line containing `marker`; returns the process and that line.
fn start(mut cmd: Command, log: &Path, marker: &'static str) -> anyhow::Result<(Process, String)> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    let process = Process { child };
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        // Keep reading to the end, so that the child never blocks on a full pipe.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(marker) => return Ok((process, line)),
            Ok(_) => {}
            Err(_) => bail!(
                "{cmd:?} did not start; its log ({}):\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
}

/// The `http://…` address at the end of a "serving … on http://…" line.
fn url_in(line: &str) -> anyhow::Result<String> {
    let at = line
        .find("http://")
        .context("no address in the start line")?;
    Ok(line[at..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// `anumate dev` on a fresh store.
pub struct Ours {
    /// `http://127.0.0.1:port`.
    pub url: String,
    /// The dev admin token (from `dev.json`).
    pub token: String,
    /// The dev tenant.
    pub tenant: String,
    /// The data directory: keys, SQLite file, `dev.json`, the logs.
    pub data_dir: PathBuf,
    /// The serving login's URL (PostgreSQL) or the SQLite file's.
    pub store_url: String,
    /// The store it runs on.
    pub store: StoreKind,
    process: Process,
    _db: Option<TestDb>,
    _dir: tempfile::TempDir,
}

impl Ours {
    /// Starts `anumate dev` on a fresh `store`, listening on a free port.
    pub async fn start(store: StoreKind) -> anyhow::Result<Ours> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path())
            .env("NO_COLOR", "1")
            .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir);
        let (db, store_url) = match store {
            StoreKind::Sqlite => (
                None,
                format!("sqlite://{}", data_dir.join("anumate.db").display()),
            ),
            StoreKind::Postgres => {
                let db = TestDb::postgres().await;
                cmd.args(["--store-url", &db.config.url])
                    .env("ANUMATE_STORE__OWNER_URL", &db.config.owner_url);
                let url = db.config.url.clone();
                (Some(db), url)
            }
        };
        let (process, _) = start(cmd, &dir.path().join("anumate.log"), " on http://")?;
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(data_dir.join("dev.json")).context("reading dev.json")?,
        )
        .context("dev.json")?;
        let text = |k: &str| state[k].as_str().unwrap_or_default().to_owned();
        Ok(Ours {
            url: text("server"),
            token: text("token"),
            tenant: text("tenant"),
            data_dir,
            store_url,
            store,
            process,
            _db: db,
            _dir: dir,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Where the dev issuer's and the platform service keys are.
    pub fn keys_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }

    /// Stops the server, then drops its store.
    pub fn stop(self) {
        let Ours { process, _db, .. } = self;
        drop(process);
        drop(_db);
    }
}

/// The baseline server on `anumate dev`'s store and keys.
pub struct Baseline {
    /// `http://127.0.0.1:port`.
    pub url: String,
    process: Process,
}

impl Baseline {
    /// Starts this bench binary with `--serve-baseline` on `ours`' store.
    pub async fn start(ours: &Ours) -> anyhow::Result<Baseline> {
        let exe = std::env::current_exe().context("the bench's own path")?;
        let mut cmd = Command::new(exe);
        cmd.arg("--serve-baseline")
            .arg("--baseline-store-url")
            .arg(&ours.store_url)
            .arg("--baseline-keys-dir")
            .arg(ours.keys_dir());
        if ours.store == StoreKind::Postgres {
            cmd.args(["--baseline-app-role", "anumate_app"]);
        }
        let (process, line) = start(
            cmd,
            &ours.data_dir.join("baseline.log"),
            crate::baseline::SERVING,
        )?;
        Ok(Baseline {
            url: url_in(&line)?,
            process,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// A process's peak and current resident set, in MiB (`VmHWM`, `VmRSS`).
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub peak_mib: f64,
    pub current_mib: f64,
}

/// Reads `/proc/<pid>/status`; `None` where there is no such file.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line[key.len()..]
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
    };
    Some(Memory {
        peak_mib: kib("VmHWM:")? / 1024.0,
        current_mib: kib("VmRSS:")? / 1024.0,
    })
}
