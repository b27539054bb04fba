//! What every client command shares: where the server is, how to connect with
//! the bearer token, how failures are told apart and printed, how listings are
//! paged; [`versioned`] holds the commands every versioned document kind shares.

pub(crate) mod versioned;

use std::{path::Path, path::PathBuf, process::ExitCode};

use anumate_auth::BearerToken;
use anumate_errors::Error;
use anumate_service::tls::{Tls, TlsConfig};
use clap::{Args, ValueEnum};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
    /// CA certificates (PEM) trusted for the server's certificate: connect
    /// over TLS to a server with `[tls]` (add --tls-cert and --tls-key when
    /// it asks for a client certificate: `[tls] client_ca`).
    #[arg(long, env = "ANUMATE_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate chain (PEM), signed by a CA the server's
    /// `[tls] client_ca` holds (with --tls-key and --tls-ca).
    #[arg(long, env = "ANUMATE_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "ANUMATE_TLS_KEY", global = true, hide_env_values = true)]
    pub tls_key: Option<PathBuf>,
}

/// How long connecting to a TLS server may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `e` and its causes, `: `-separated (a TLS refusal's reason is a cause).
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// With TLS 1.3 the server judges the client's certificate after the
/// client's side of the handshake is done, so a refusal would only surface
/// as a closed connection in the middle of the first call. One handshake
/// ahead, waiting for the server's first bytes (its HTTP/2 settings), tells
/// the refusal with the server's reason (its TLS alert).
async fn probe(tls: &Tls, uri: &http::Uri, server: &str) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    use tower::ServiceExt;
    let connecting = tls.connector().oneshot(uri.clone());
    let io = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("cannot reach {server} over TLS: no answer in {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot reach {server} over TLS: {}", causes(&e)))?;
    let mut stream = io.into_inner();
    let mut first = [0u8; 1];
    match tokio::time::timeout(CONNECT_TIMEOUT, stream.read(&mut first)).await {
        Ok(Err(e)) => Err(format!(
            "{server} refused this client's TLS certificate: {}",
            causes(&e)
        )),
        Ok(Ok(0)) => Err(format!(
            "{server} closed the TLS connection (does its [tls] client_ca sign --tls-cert?)"
        )),
        // Its settings, or nothing yet: the connection itself tells.
        _ => Ok(()),
    }
}

/// How the CLI speaks TLS to the server.
enum ClientTls {
    /// The server's certificate checked against `--tls-ca`; no client
    /// certificate (a server with `[tls]` and no `client_ca`).
    ServerAuth(tonic::transport::ClientTlsConfig),
    /// mTLS: the server checked, and this client's certificate presented.
    Mutual(Tls),
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
        let channel = match self.tls()? {
            Some(ClientTls::ServerAuth(config)) => {
                // tonic does the TLS: the address must say `https`.
                let https = match server.strip_prefix("http://") {
                    Some(rest) => format!("https://{rest}"),
                    None => server.clone(),
                };
                Endpoint::from_shared(https)
                    .and_then(|e| e.tls_config(config))
                    .map_err(|e| format!("bad server address {server:?}: {}", causes(&e)))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach {server} over TLS: {}", causes(&e)))?
            }
            Some(ClientTls::Mutual(tls)) => {
                // The connector does the TLS: tonic must not see `https`.
                let plain = match server.strip_prefix("https://") {
                    Some(rest) => format!("http://{rest}"),
                    None => server.clone(),
                };
                let endpoint = Endpoint::from_shared(plain)
                    .map_err(|e| format!("bad server address {server:?}: {e}"))?;
                probe(&tls, endpoint.uri(), &server).await?;
                endpoint
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_with_connector(tls.connector())
                    .await
                    .map_err(|e| format!("cannot reach {server} over TLS: {}", causes(&e)))?
            }
            None if server.starts_with("https://") => {
                return Err(format!(
                    "{server} is TLS: pass --tls-ca, and --tls-cert and --tls-key when it asks for a client certificate (or set ANUMATE_TLS_CA, ANUMATE_TLS_CERT and ANUMATE_TLS_KEY)"
                ));
            }
            None => Channel::from_shared(server.clone())
                .map_err(|e| format!("bad server address {server:?}: {e}"))?
                .connect()
                .await
                .map_err(|e| format!("cannot reach {server}: {e}"))?,
        };
        Ok((channel, BearerToken(token)))
    }

    /// The client TLS of `--tls-ca` alone (the server's certificate
    /// checked, no client certificate), or of `--tls-ca`, `--tls-cert` and
    /// `--tls-key` (mTLS, for a server with `[tls] client_ca`).
    fn tls(&self) -> Result<Option<ClientTls>, String> {
        let (ca, cert, key) = match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (None, None, None) => return Ok(None),
            (Some(ca), None, None) => {
                let pem =
                    std::fs::read(ca).map_err(|e| format!("--tls-ca {}: {e}", ca.display()))?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!(
                        "--tls-ca {}: holds no PEM certificate",
                        ca.display()
                    ));
                }
                let config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem));
                return Ok(Some(ClientTls::ServerAuth(config)));
            }
            (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("--tls-ca", ca.is_none()),
                    ("--tls-cert", cert.is_none()),
                    ("--tls-key", key.is_none()),
                ]
                .into_iter()
                .filter_map(|(flag, absent)| absent.then_some(flag))
                .collect();
                return Err(format!(
                    "a client certificate needs --tls-ca, --tls-cert and --tls-key together; missing: {}",
                    missing.join(", ")
                ));
            }
        };
        let config = TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
            reload_secs: 0,
            ..TlsConfig::default()
        };
        Tls::load(&config)
            .map(|t| Some(ClientTls::Mutual(t)))
            .map_err(|e| {
                // The settings' names as this command spells them.
                e.message
                    .replace("tls.cert", "--tls-cert")
                    .replace("tls.key", "--tls-key")
                    .replace("tls.ca", "--tls-ca")
            })
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
        // A status with a cause is the connection's failure, not an answer
        // (e.g. the server refusing this client's certificate): say why.
        if let Some(cause) = std::error::Error::source(&s) {
            return Failure::Local(format!(
                "the connection to the server failed: {}",
                causes(cause)
            ));
        }
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
