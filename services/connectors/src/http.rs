//! The `http` connector: one request built from the tool's `spec.http`
//! templates over `args` (and `${{ secrets.NAME }}`, resolved here only),
//! sent with rustls to allow-listed hosts only.
//!
//! The SSRF guard: the URL's host and every redirect's must be in
//! `allowed_hosts` (the URL's own host when none are declared); unless the
//! tool sets `allow_private`, a literal address and every address a name
//! resolves to must be public (no loopback, private, link-local, CGNAT,
//! unspecified or multicast targets) — checked on the resolved addresses, so
//! a public name pointing inside is refused too. Timeouts and a response size
//! cap bound every call. Failures are classified: connect errors, timeouts,
//! 429 and 5xx are retryable; the rest are not. Messages name the host and
//! the status, never the URL, headers or body (which may hold secrets).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use crate::connector::{Call, Connector, ConnectorError};
use crate::template;

/// Per-call timeout when the tool declares none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read when the tool declares no cap.
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 1024 * 1024;
/// Most redirects followed.
const MAX_REDIRECTS: usize = 5;

/// The `http` connector, holding the resolved secrets.
#[derive(Clone, Default)]
pub struct Http {
    secrets: Arc<HashMap<String, String>>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: values never reach a log line.
        let mut names: Vec<&String> = self.secrets.keys().collect();
        names.sort();
        f.debug_struct("Http").field("secrets", &names).finish()
    }
}

impl Http {
    /// A connector resolving `${{ secrets.NAME }}` from `secrets`.
    pub fn new(secrets: HashMap<String, String>) -> Self {
        Http {
            secrets: Arc::new(secrets),
        }
    }

    /// Replaces every secret value in `text` (an upstream's error body or a
    /// library message could echo one back).
    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for value in self.secrets.values().filter(|v| !v.is_empty()) {
            out = out.replace(value.as_str(), "[secret]");
        }
        out
    }
}

/// Whether `ip` is an address a tool may reach without `allow_private`.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// Resolves names and refuses non-public addresses (unless allowed).
struct GuardedResolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allow_private && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(format!("{host} resolves to a non-public address {}", bad.ip()).into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether `url` may be reached: http(s), an allowed host, and a public
/// literal address unless `allow_private`.
fn check_target(url: &reqwest::Url, allowed: &[String], allow_private: bool) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if !allowed.iter().any(|h| h.eq_ignore_ascii_case(host)) {
        return Err(format!("host {host:?} is not in allowed_hosts"));
    }
    if let Ok(ip) = host.parse::<IpAddr>()
        && !allow_private
        && !is_public(ip)
    {
        return Err(format!(
            "{ip} is not a public address (allow_private is off)"
        ));
    }
    Ok(())
}

impl Connector for Http {
    fn invoke<'a>(&'a self, call: Call<'a>) -> BoxFuture<'a, Result<Value, ConnectorError>> {
        Box::pin(async move {
            let spec = call
                .tool
                .spec
                .http
                .as_ref()
                .ok_or_else(|| ConnectorError::permanent("the tool declares no spec.http"))?;
            let root = json!({"args": call.args, "secrets": *self.secrets});
            let bad_template = |what: &str, e: String| {
                ConnectorError::permanent(format!("spec.http.{what}: {}", self.scrub(&e)))
            };
            let url_text =
                template::render_text(&spec.url, &root).map_err(|e| bad_template("url", e))?;
            let url = reqwest::Url::parse(&url_text).map_err(|e| {
                ConnectorError::permanent(format!("spec.http.url does not render to a URL: {e}"))
            })?;
            let allowed: Vec<String> = if spec.allowed_hosts.is_empty() {
                url.host_str().map(str::to_owned).into_iter().collect()
            } else {
                spec.allowed_hosts.clone()
            };
            check_target(&url, &allowed, spec.allow_private).map_err(ConnectorError::permanent)?;
            let host = url.host_str().unwrap_or_default().to_owned();

            let redirect_allowed = allowed.clone();
            let allow_private = spec.allow_private;
            let client = reqwest::Client::builder()
                .use_rustls_tls()
                .timeout(spec.timeout.unwrap_or(DEFAULT_TIMEOUT))
                .dns_resolver(Arc::new(GuardedResolver { allow_private }))
                .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= MAX_REDIRECTS {
                        return attempt.error("too many redirects");
                    }
                    match check_target(attempt.url(), &redirect_allowed, allow_private) {
                        Ok(()) => attempt.follow(),
                        Err(why) => attempt.error(format!("redirect refused: {why}")),
                    }
                }))
                .build()
                .map_err(|e| ConnectorError::permanent(format!("http client: {e}")))?;
            let method = reqwest::Method::from_bytes(spec.method.as_bytes())
                .map_err(|_| ConnectorError::permanent("spec.http.method is not a method"))?;
            let mut request = client
                .request(method, url)
                .header("idempotency-key", call.idempotency_key);
            for (name, value) in &spec.headers {
                let value = template::render_text(value, &root)
                    .map_err(|e| bad_template(&format!("headers.{name}"), e))?;
                request = request.header(name.as_str(), value);
            }
            if let Some(body) = &spec.body {
                let body = template::render_in(body, &root).map_err(|e| bad_template("body", e))?;
                request = request.json(&body);
            }
            let mut response = request
                .send()
                .await
                .map_err(|e| classify(&host, &e, self))?;
            let status = response.status();
            let cap = spec
                .max_response_bytes
                .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| classify(&host, &e, self))?
            {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > cap {
                    return Err(ConnectorError::permanent(format!(
                        "{host} answered more than {cap} bytes"
                    )));
                }
            }
            if !status.is_success() {
                let retryable = status.as_u16() == 429 || status.is_server_error();
                return Err(ConnectorError {
                    retryable,
                    message: format!("{host} answered {}", status.as_u16()),
                    upstream_status: Some(status.as_u16()),
                });
            }
            // An upstream may echo what it was sent: no secret leaves the hub.
            let text = self.scrub(&String::from_utf8_lossy(&body));
            Ok(serde_json::from_str(&text)
                .unwrap_or_else(|_| json!({"status": status.as_u16(), "body": text})))
        })
    }
}

fn classify(host: &str, e: &reqwest::Error, http: &Http) -> ConnectorError {
    if e.is_redirect() {
        // The policy's message says which host was refused (no secrets).
        let why = std::error::Error::source(e)
            .map(ToString::to_string)
            .unwrap_or_default();
        return ConnectorError::permanent(format!("{host}: {}", http.scrub(&why)));
    }
    if e.is_timeout() {
        return ConnectorError::retryable(format!("{host} timed out"));
    }
    // A refused resolution is a policy decision, not an outage.
    let chain = error_chain(e);
    if chain.contains("non-public address") {
        return ConnectorError::permanent(format!("{host}: {}", http.scrub(&chain)));
    }
    ConnectorError::retryable(format!("could not reach {host}"))
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        text.push_str(": ");
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                !is_public(private.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                "{private}"
            );
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(
                is_public(public.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                "{public}"
            );
        }
    }
}
