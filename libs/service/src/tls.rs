//! mTLS between services (`[tls]`), with rustls and no sidecar.
//!
//! - [`TlsConfig`]: this process's certificate and key (presented both as a
//!   server and as a client), the CA that signs the clients it accepts
//!   (`client_ca`: set, a client without a certificate it signed is refused
//!   during the handshake) and the CA it trusts when calling other services
//!   (`ca`, default `client_ca`).
//! - [`Tls`]: those files loaded into a rustls server and client
//!   configuration, and loaded again when they change ([`Tls::reload`],
//!   polled every `reload_secs` by [`Tls::spawn_reloader`]): a rotated
//!   certificate is used by the next handshake, without a restart, and one
//!   that does not load is logged and the previous one kept. tonic's
//!   `ServerTlsConfig` cannot reload, so the server accepts through
//!   [`incoming`] (a tokio-rustls acceptor fed to `serve_with_incoming`) and
//!   the clients connect through [`Tls::connector`].
//! - The service identity of a peer: its certificate's SAN
//!   `spiffe://<trust_domain>/svc/<name>` or DNS `<name>.<trust_domain>`
//!   ([`service_identity`]). [`PeerIdentityLayer`] (inside authentication)
//!   puts it in the request's extensions as [`PeerIdentity`] and refuses a
//!   token naming another service (`SERVICE_IDENTITY_MISMATCH`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anumate_errors::{Error, ErrorCode, Reason};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tls]`: mTLS on every gRPC listener and client of the process. Off
/// while `cert` is empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// This service's certificate chain (PEM), presented to clients and,
    /// as a client, to the services it calls. Its SAN names the service.
    pub cert: PathBuf,
    /// The certificate's private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) whose clients are accepted; a client without a
    /// certificate they signed is refused. Empty: no client certificate is
    /// asked for (TLS without the "m").
    pub client_ca: PathBuf,
    /// CA certificates (PEM) trusted when calling other services; empty:
    /// `client_ca`.
    pub ca: PathBuf,
    /// Seconds between checks of the files for changes; 0: never reload.
    pub reload_secs: u64,
    /// The trust domain of service identities in certificates:
    /// `spiffe://<trust_domain>/svc/<name>` or DNS `<name>.<trust_domain>`.
    pub trust_domain: String,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::new(),
            key: PathBuf::new(),
            client_ca: PathBuf::new(),
            ca: PathBuf::new(),
            reload_secs: 30,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
        }
    }
}

impl TlsConfig {
    /// Whether `[tls]` is configured.
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }

    fn trust_domain(&self) -> &str {
        if self.trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN
        } else {
            &self.trust_domain
        }
    }

    fn ca(&self) -> &Path {
        if self.ca.as_os_str().is_empty() {
            &self.client_ca
        } else {
            &self.ca
        }
    }
}

/// The trust domain when `[tls] trust_domain` is empty.
pub const DEFAULT_TRUST_DOMAIN: &str = "anumate";

/// The files' bytes, as last loaded (a change to any reloads all).
#[derive(PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    ca: Option<Vec<u8>>,
}

struct Loaded {
    files: Files,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// `[tls]` loaded: the current rustls configurations (cheap to clone).
#[derive(Clone)]
pub struct Tls {
    config: Arc<TlsConfig>,
    current: Arc<RwLock<Arc<Loaded>>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("config", &self.config).finish()
    }
}

fn bad(key: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid_argument(key, why.to_string())
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| bad(key, format!("cannot read {}: {e}", path.display())))
}

fn certs(key: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(key, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad(key, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn roots(key: &str, pem: &[u8]) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in certs(key, pem)? {
        roots
            .add(cert)
            .map_err(|e| bad(key, format!("not a CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

impl Files {
    fn read(config: &TlsConfig) -> Result<Files, Error> {
        let optional = |key: &str, path: &Path| {
            (!path.as_os_str().is_empty())
                .then(|| read(key, path))
                .transpose()
        };
        Ok(Files {
            cert: read("tls.cert", &config.cert)?,
            key: read("tls.key", &config.key)?,
            client_ca: optional("tls.client_ca", &config.client_ca)?,
            ca: optional("tls.ca", config.ca())?,
        })
    }

    fn build(self) -> Result<Loaded, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certs("tls.cert", &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key)
            .map_err(|e| bad("tls.key", format!("not a PEM private key: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls", e))?;
        let server = match &self.client_ca {
            Some(pem) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots("tls.client_ca", pem)?,
                    provider.clone(),
                )
                .build()
                .map_err(|e| bad("tls.client_ca", e))?;
                server.with_client_cert_verifier(verifier)
            }
            None => server.with_no_client_auth(),
        };
        let mut server = server
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| bad("tls.key", format!("does not match tls.cert: {e}")))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let Some(ca) = &self.ca else {
            return Err(bad(
                "tls.ca",
                "set tls.ca or tls.client_ca: the CA trusted when calling other services",
            ));
        };
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("tls", e))?
            .with_root_certificates(roots("tls.ca", ca)?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("tls.key", e))?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Loaded {
            files: self,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

impl Tls {
    /// Loads `config`'s files; `INVALID_ARGUMENT` naming the setting when one
    /// cannot be read or does not hold what it should.
    pub fn load(config: &TlsConfig) -> Result<Tls, Error> {
        let loaded = Files::read(config)?.build()?;
        Ok(Tls {
            config: Arc::new(config.clone()),
            current: Arc::new(RwLock::new(Arc::new(loaded))),
        })
    }

    /// `[tls]` as loaded.
    pub fn config(&self) -> &TlsConfig {
        &self.config
    }

    fn loaded(&self) -> Arc<Loaded> {
        match self.current.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The server configuration new handshakes use.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.loaded().server.clone()
    }

    /// The client configuration new connections use.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.loaded().client.clone()
    }

    /// Reads the files again and, when they changed, swaps in the
    /// configurations built from them: `Ok(true)` if it did. Files that do
    /// not load leave the current ones in place.
    pub fn reload(&self) -> Result<bool, Error> {
        let files = Files::read(&self.config)?;
        if files == self.loaded().files {
            return Ok(false);
        }
        let loaded = Arc::new(files.build()?);
        match self.current.write() {
            Ok(mut current) => *current = loaded,
            Err(poisoned) => *poisoned.into_inner() = loaded,
        }
        Ok(true)
    }

    /// Polls the files every `reload_secs` (none when 0) until `cancel`,
    /// logging each reload and each failure to reload.
    pub fn spawn_reloader(
        &self,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.config.reload_secs == 0 {
            return None;
        }
        let every = Duration::from_secs(self.config.reload_secs);
        let tls = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match tls.reload() {
                    Ok(true) => {
                        tracing::info!(cert = %tls.config.cert.display(), "TLS certificates reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(reason = %e.message, "TLS files changed but do not load; keeping the previous certificates")
                    }
                }
            }
        }))
    }

    /// A connector for [`tonic::transport::Endpoint::connect_with_connector_lazy`]:
    /// TCP (with `TCP_NODELAY`), then TLS with the current client
    /// configuration, verifying the server's certificate for the URI's host.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector { tls: self.clone() }
    }

    /// The service identity in `cert` (see [`service_identity`]).
    pub fn identity(&self, cert: &CertificateDer<'_>) -> Option<String> {
        service_identity(cert, self.config.trust_domain())
    }
}

/// The platform service a certificate names: the `<name>` of a SAN URI
/// `spiffe://<trust_domain>/svc/<name>`, else of a SAN DNS name
/// `<name>.<trust_domain>`; `None` when it names none.
pub fn service_identity(cert: &CertificateDer<'_>, trust_domain: &str) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let valid = |n: &str| {
        !n.is_empty()
            && n.len() <= 63
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let spiffe = format!("spiffe://{trust_domain}/svc/");
    if let Some(name) = cert
        .valid_uri_names()
        .filter_map(|u| u.strip_prefix(spiffe.as_str()))
        .find(|n| valid(n))
    {
        return Some(name.to_owned());
    }
    let suffix = format!(".{trust_domain}");
    cert.valid_dns_names()
        .filter_map(|d| d.strip_suffix(suffix.as_str()))
        .find(|n| valid(n))
        .map(str::to_owned)
}

/// Accepted connections, TLS handshakes done (each on its own task, so a
/// slow client holds up no one): what `serve_with_incoming` serves. A
/// refused handshake (no certificate, one the CA did not sign, an expired
/// one) is logged at WARN with the peer's address and rustls' reason.
pub fn incoming(
    listener: TcpListener,
    tls: Tls,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, reason = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// See [`Tls::connector`].
#[derive(Clone, Debug)]
pub struct TlsConnector {
    tls: Tls,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.client_config();
        Box::pin(async move {
            let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone())
                .map_err(|e| invalid(format!("{host}: not a TLS server name: {e}")))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// The service identity of the peer of an mTLS connection (its
/// certificate's SAN), in the request's extensions. `None` inside: the
/// peer presented a certificate that names no service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Option<String>);

/// Inside authentication, on mTLS connections: puts the peer's
/// [`PeerIdentity`] in the request's extensions and refuses, with
/// `PERMISSION_DENIED` (`SERVICE_IDENTITY_MISMATCH`, logged), a service
/// token whose service is not the one the peer's certificate names. A
/// user's token forwarded by a service passes (its roles were checked).
#[derive(Clone, Debug)]
pub struct PeerIdentityLayer {
    tls: Option<Tls>,
}

impl PeerIdentityLayer {
    /// Identities read as `tls` configures them (its trust domain); `None`:
    /// the layer does nothing.
    pub fn new(tls: Option<Tls>) -> PeerIdentityLayer {
        PeerIdentityLayer { tls }
    }
}

impl<S> tower::Layer<S> for PeerIdentityLayer {
    type Service = PeerIdentityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerIdentityService {
            inner,
            tls: self.tls.clone(),
        }
    }
}

/// The service [`PeerIdentityLayer`] wraps.
#[derive(Clone, Debug)]
pub struct PeerIdentityService<S> {
    inner: S,
    tls: Option<Tls>,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for PeerIdentityService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = self.tls.as_ref().and_then(|tls| {
            let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
            let certs = info.peer_certs()?;
            Some(certs.first().and_then(|c| tls.identity(c)))
        });
        let Some(peer) = peer else {
            return Box::pin(self.inner.call(req));
        };
        let token_service = req
            .extensions()
            .get::<anumate_auth::Principal>()
            .and_then(|p| p.service_name().map(str::to_owned));
        if let Some(token_service) = token_service
            && peer.as_deref() != Some(token_service.as_str())
        {
            let peer_name = peer.clone().unwrap_or_default();
            let addr = req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr());
            tracing::warn!(
                method = %req.uri().path(),
                token_service = %token_service,
                peer_service = %peer_name,
                peer = ?addr,
                "service identity mismatch: the token's service is not the certificate's"
            );
            let err = Error::new(
                ErrorCode::PermissionDenied,
                match &peer {
                    Some(p) => format!(
                        "the token is for service {token_service:?} but the connection's certificate is service {p:?}"
                    ),
                    None => format!(
                        "the token is for service {token_service:?} but the connection's certificate names no service"
                    ),
                },
            )
            .with_reason(Reason::ServiceIdentityMismatch)
            .with_metadata("token_service", token_service)
            .with_metadata("peer_service", peer_name);
            return Box::pin(async move { Ok(err.to_status().into_http()) });
        }
        req.extensions_mut().insert(PeerIdentity(peer));
        Box::pin(self.inner.call(req))
    }
}
