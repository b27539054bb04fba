//! What the binary's CLI tests share: the binary without the caller's
//! `ANUMATE_…` variables, and `anumate dev` on port 0 in a directory.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
            Ok(line) if line.contains(" on http://") => return dev,
            Ok(_) => {}
            Err(_) => panic!(
                "anumate dev did not start:\n{}",
                std::fs::read_to_string(dir.join("dev.log")).unwrap_or_default()
            ),
        }
    }
}
