//! What every client command shares: where the server is, how to connect with
//! the bearer token, how failures are told apart and printed, how listings are
//! paged; [`versioned`] holds the commands every versioned document kind shares.

pub(crate) mod versioned;

use std::{path::Path, path::PathBuf, process::ExitCode};

use anumate_auth::BearerToken;
use anumate_errors::Error;
use clap::{Args, ValueEnum};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

use crate::dev_state;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Human-readable text.
    #[default]
    Human,
    /// The response message as proto3 JSON.
    Json,
}

/// Where the server is and who we are.
#[derive(Args, Debug, Clone)]
pub struct Connection {
    /// Server address, e.g. http://127.0.0.1:7600 (default: the `anumate dev`
    /// started from this directory, found in ./.anumate/dev.json).
    #[arg(long, env = "ANUMATE_SERVER", global = true)]
    pub server: Option<String>,
    /// Bearer token (default: the dev admin token in ./.anumate/dev.json).
    #[arg(long, env = "ANUMATE_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,
    /// Data directory searched for dev.json.
    #[arg(long, default_value = ".anumate", global = true)]
    pub data_dir: PathBuf,
}

/// A channel that sends the bearer token with every call.
pub(crate) type Authed = InterceptedService<Channel, BearerToken>;

impl Connection {
    /// Connects to the server named by `--server`, `ANUMATE_SERVER` or
    /// `<data_dir>/dev.json`, with the bearer token found the same way.
    pub(crate) async fn channel(&self) -> Result<(Channel, BearerToken), String> {
        let state = dev_state::read(&self.data_dir);
        let server = self
            .server
            .clone()
            .or_else(|| state.as_ref().map(|s| s.server.clone()))
            .ok_or_else(|| {
                "no server: pass --server or set ANUMATE_SERVER (or run `anumate dev` in this directory first)"
                    .to_string()
            })?;
        let token = self
            .token
            .clone()
            .or_else(|| state.as_ref().map(|s| s.token.clone()))
            .ok_or_else(|| "no token: pass --token or set ANUMATE_TOKEN".to_string())?;
        let channel = Channel::from_shared(server.clone())
            .map_err(|e| format!("bad server address {server:?}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {server}: {e}"))?;
        Ok((channel, BearerToken(token)))
    }

    /// Connects and wraps the channel in a generated client, e.g.
    /// `conn.client(RegistryServiceClient::with_interceptor)`.
    pub(crate) async fn client<C>(
        &self,
        new: impl FnOnce(Channel, BearerToken) -> C,
    ) -> Result<C, Failure> {
        let (channel, token) = self.channel().await.map_err(Failure::Local)?;
        Ok(new(channel, token))
    }
}

/// A failure of a client command, printed by [`finish`].
#[derive(Debug)]
pub(crate) enum Failure {
    /// Local problem (no server configured, unreadable file, bad flag).
    Local(String),
    /// The server answered with an error.
    Remote(Error),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Remote(Error::from_status(&s))
    }
}

/// The exit code of a command's result; a failure is printed first, a
/// server's error positioned in `file` when the command read one.
pub(crate) fn finish(result: Result<ExitCode, Failure>, file: Option<&str>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(Failure::Remote(error)) => {
            report(&error, file);
            ExitCode::FAILURE
        }
        Err(Failure::Local(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Reads a file named on the command line.
/// A time for people: `2026-12-04 07:56:29 UTC` at second precision, `-` when absent.
pub(crate) fn time(ts: Option<&pbjson_types::Timestamp>) -> String {
    ts.and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
    })
    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    .unwrap_or_else(|| "-".into())
}

pub(crate) fn read_file(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::Local(format!("cannot read {}: {e}", path.display())))
}

/// Prints a value as pretty JSON (an encoding failure is printed instead).
pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode output: {e}"),
    }
}

/// Prints an answer as JSON with `-o json`, else in words with `human`.
pub(crate) fn show<R: serde::Serialize>(out: Output, reply: &R, human: impl FnOnce(&R)) {
    if out == Output::Json {
        print_json(reply);
    } else {
        human(reply);
    }
}

/// Every page of a listing: `page(token)` fetches the page at `token` (the
/// first at "") and returns its items and the next page's token, empty after
/// the last page.
pub(crate) async fn all_pages<T>(
    mut page: impl AsyncFnMut(String) -> Result<(Vec<T>, String), Failure>,
) -> Result<Vec<T>, Failure> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
}

/// Prints an error: its specific reason (`ErrorInfo.reason`), message, and each violation as
/// `file:line:col: text [field]` (no `[field]` when the violation names none).
pub(crate) fn report(error: &Error, file: Option<&str>) {
    eprintln!("error[{}]: {}", error.reason, error.message);
    for v in &error.violations {
        let text = v.description.as_str();
        let field = if v.field.is_empty() {
            String::new()
        } else {
            format!(" [{}]", v.field)
        };
        match (v.position, file) {
            (Some((line, col)), Some(f)) => eprintln!("  {f}:{line}:{col}: {text}{field}"),
            (Some((line, col)), None) => eprintln!("  {line}:{col}: {text}{field}"),
            (None, _) if v.field.is_empty() => eprintln!("  {text}"),
            (None, _) => eprintln!("  {}: {text}", v.field),
        }
    }
}
