//! Verifies bearer JWTs against the JWKS of trusted issuers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anumate_crypto::{Jwk, Jwks, b64url_decode};
use anumate_errors::{Error, ErrorCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::AuthConfig;
use crate::principal::{Claims, Principal};

/// Verifies bearer tokens. Cheap to clone; clones share the JWKS caches.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    issuers: HashMap<String, Arc<IssuerState>>,
    http: reqwest::Client,
    leeway_secs: u64,
    cache_ttl: Duration,
    min_refetch: Duration,
    max_staleness: Duration,
    verified: Arc<VerifiedCache>,
}

/// Successfully verified tokens by SHA-256, bounded. Verifying an ES256
/// signature costs tens of microseconds; a client (or a service forwarding
/// its caller's token) sends the same token on every call.
struct VerifiedCache {
    capacity: usize,
    entries: Mutex<HashMap<[u8; 32], Verified>>,
}

struct Verified {
    principal: Principal,
    issuer: Arc<IssuerState>,
    /// The key set the signature was checked with.
    keys: Arc<KeySet>,
    /// Unix seconds after which the token is expired (`exp` + leeway).
    valid_until: i64,
}

impl VerifiedCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Verified>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn insert(&self, digest: [u8; 32], entry: Verified) {
        if self.capacity == 0 {
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= self.capacity {
            let now = unix_now();
            entries.retain(|_, v| v.valid_until >= now);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(digest, entry);
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut issuers: Vec<&String> = self.inner.issuers.keys().collect();
        issuers.sort();
        f.debug_struct("Authenticator")
            .field("issuers", &issuers)
            .finish_non_exhaustive()
    }
}

enum Source {
    Static,
    File(PathBuf),
    Url(String),
}

/// Which tenants an issuer may speak for.
enum Tenants {
    Any,
    Only(std::collections::HashSet<String>),
}

/// What an issuer's tokens make of their subject.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IssuerKind {
    /// People and outside clients; `svc:` subjects are refused.
    Users,
    /// The platform's service issuer: subjects are `svc:<name>`.
    Services,
}

struct IssuerState {
    issuer: String,
    audience: String,
    tenants: Tenants,
    kind: IssuerKind,
    source: Source,
    cache: RwLock<Option<Arc<KeySet>>>,
    /// Serialises fetches; holds when the last one was attempted.
    fetch: tokio::sync::Mutex<Option<Instant>>,
}

struct KeySet {
    keys: Vec<PreparedKey>,
    fetched_at: Instant,
}

struct PreparedKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

impl KeySet {
    fn from_jwks(jwks: &Jwks) -> KeySet {
        KeySet {
            keys: jwks.keys.iter().filter_map(prepare).collect(),
            fetched_at: Instant::now(),
        }
    }

    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&PreparedKey> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            // Without a kid only an unambiguous key will do.
            None => {
                let mut usable = self.keys.iter().filter(|k| k.alg == alg);
                match (usable.next(), usable.next()) {
                    (Some(key), None) => Some(key),
                    _ => None,
                }
            }
        }
    }
}

/// A verification key from a JWK, or `None` for keys we cannot or must not use.
fn prepare(jwk: &Jwk) -> Option<PreparedKey> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let (alg, key) = match jwk.kty.as_str() {
        "EC" if jwk.crv.as_deref() == Some("P-256") => (
            Algorithm::ES256,
            DecodingKey::from_ec_components(jwk.x.as_deref()?, jwk.y.as_deref()?).ok()?,
        ),
        "RSA" => (
            Algorithm::RS256,
            DecodingKey::from_rsa_components(jwk.n.as_deref()?, jwk.e.as_deref()?).ok()?,
        ),
        _ => return None,
    };
    // A key that declares another algorithm (e.g. PS256) is not used for ours.
    if jwk.alg.as_deref().is_some_and(|a| a != alg_name(alg)) {
        return None;
    }
    Some(PreparedKey {
        kid: jwk.kid.clone(),
        alg,
        key,
    })
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "ES256",
        Algorithm::RS256 => "RS256",
        _ => "unsupported",
    }
}

fn unauthenticated(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::Unauthenticated, message)
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct UnverifiedIssuer {
    iss: Option<String>,
}

fn decode_segment<T: for<'de> Deserialize<'de>>(segment: &str, what: &str) -> Result<T, Error> {
    let bytes = b64url_decode(segment)
        .ok_or_else(|| unauthenticated(format!("malformed token: {what} is not base64url")))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| unauthenticated(format!("malformed token: {what} is not a JSON object")))
}

impl Authenticator {
    /// An authenticator for the issuers in `cfg`. JWKS files are read now; URLs on first use.
    pub fn new(cfg: AuthConfig) -> Result<Authenticator, Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::new(ErrorCode::Internal, format!("building HTTP client: {e}")))?;
        let mut issuers = HashMap::new();
        for ic in cfg.issuers {
            let audience = match ic.audience.as_deref().map(str::trim) {
                Some(aud) if !aud.is_empty() => aud.to_owned(),
                _ => {
                    return Err(Error::invalid_argument(
                        "auth.issuers.audience",
                        format!(
                            "issuer {:?} has no audience: set the `aud` its tokens must carry for Anumate",
                            ic.issuer
                        ),
                    ));
                }
            };
            let tenants = tenant_binding(&ic.issuer, &ic.tenants)?;
            let (source, initial) = match (ic.jwks_url, ic.jwks_file) {
                (Some(url), _) => {
                    check_jwks_url(&ic.issuer, &url)?;
                    (Source::Url(url), None)
                }
                (None, Some(path)) => {
                    let set = read_jwks_file(&path)?;
                    (Source::File(path), Some(Arc::new(set)))
                }
                (None, None) => {
                    return Err(Error::invalid_argument(
                        "auth.issuers",
                        format!("issuer {:?} has neither jwks_url nor jwks_file", ic.issuer),
                    ));
                }
            };
            let state = IssuerState {
                issuer: ic.issuer.clone(),
                audience,
                tenants,
                kind: IssuerKind::Users,
                source,
                cache: RwLock::new(initial),
                fetch: tokio::sync::Mutex::new(None),
            };
            issuers.insert(ic.issuer, Arc::new(state));
        }
        Ok(Authenticator {
            inner: Arc::new(Inner {
                issuers,
                http,
                leeway_secs: cfg.leeway_secs,
                cache_ttl: Duration::from_secs(cfg.jwks_cache_secs),
                min_refetch: Duration::from_secs(cfg.jwks_min_refetch_secs),
                max_staleness: Duration::from_secs(cfg.max_key_staleness_secs),
                verified: Arc::new(VerifiedCache {
                    capacity: cfg.verified_token_cache,
                    entries: Mutex::new(HashMap::new()),
                }),
            }),
        })
    }

    /// Also trusts `issuer` with fixed keys for every tenant (the dev issuer):
    /// its tokens must carry `aud` [`DEV_AUDIENCE`](crate::DEV_AUDIENCE).
    pub fn with_static_issuer(self, issuer: impl Into<String>, jwks: Jwks) -> Authenticator {
        self.with_static(issuer.into(), crate::DEV_AUDIENCE, IssuerKind::Users, jwks)
    }

    /// Trusts the platform's service issuer ([`ServiceIssuer`](crate::ServiceIssuer))
    /// with its public keys: the only tokens that make a service principal.
    pub fn with_static_service_issuer(self, jwks: Jwks) -> Authenticator {
        self.with_static(
            crate::SERVICE_ISSUER.to_owned(),
            crate::SERVICE_AUDIENCE,
            IssuerKind::Services,
            jwks,
        )
    }

    fn with_static(
        self,
        issuer: String,
        audience: &str,
        kind: IssuerKind,
        jwks: Jwks,
    ) -> Authenticator {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        let state = IssuerState {
            issuer: issuer.clone(),
            audience: audience.to_owned(),
            tenants: Tenants::Any,
            kind,
            source: Source::Static,
            cache: RwLock::new(Some(Arc::new(KeySet::from_jwks(&jwks)))),
            fetch: tokio::sync::Mutex::new(None),
        };
        inner.issuers.insert(issuer, Arc::new(state));
        Authenticator {
            inner: Arc::new(inner),
        }
    }

    /// Verifies `bearer_token` (the JWT, without `Bearer `) and returns who it names.
    pub async fn authenticate(&self, bearer_token: &str) -> Result<Principal, Error> {
        let token = bearer_token.trim();
        if token.is_empty() {
            return Err(unauthenticated("missing bearer token"));
        }
        let digest = anumate_crypto::sha256(token.as_bytes());
        if let Some(principal) = self.remembered(&digest) {
            return Ok(principal);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(unauthenticated(
                "malformed token: expected a compact JWS with three parts",
            ));
        };
        let header: RawHeader = decode_segment(header, "header")?;
        let alg = match header.alg.as_deref() {
            Some("ES256") => Algorithm::ES256,
            Some("RS256") => Algorithm::RS256,
            Some(other) => {
                return Err(unauthenticated(format!(
                    "token algorithm {other:?} is not accepted (ES256 or RS256 only)"
                )));
            }
            None => return Err(unauthenticated("token header has no alg")),
        };
        // The issuer is read unverified only to choose the keys; it is verified below.
        let peek: UnverifiedIssuer = decode_segment(payload, "payload")?;
        let issuer = peek
            .iss
            .ok_or_else(|| unauthenticated("token has no iss claim"))?;
        let state = self
            .inner
            .issuers
            .get(&issuer)
            .ok_or_else(|| unauthenticated(format!("unknown token issuer {issuer:?}")))?;

        let kid = header.kid.as_deref();
        let keys = self.keys_for(state, kid, alg).await?;
        let key = keys.find(kid, alg).ok_or_else(|| match kid {
            Some(kid) => unauthenticated(format!(
                "no key with kid {kid:?} in the JWKS of issuer {issuer:?}"
            )),
            None => unauthenticated(format!(
                "token has no kid and issuer {issuer:?} has no single {} key",
                alg_name(alg)
            )),
        })?;
        if key.alg != alg {
            return Err(unauthenticated(format!(
                "token algorithm {} does not match key {:?} ({})",
                alg_name(alg),
                kid.unwrap_or_default(),
                alg_name(key.alg)
            )));
        }

        let mut validation = Validation::new(alg);
        validation.leeway = self.inner.leeway_secs;
        validation.validate_nbf = true;
        validation.set_issuer(&[&state.issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.set_audience(&[&state.audience]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            let e = map_jwt_error(&e, state);
            if state.kind == IssuerKind::Services {
                // A peer service's token refused (clock skew, a rotated key,
                // a replayed old token): the mesh is broken somewhere, unlike
                // a user's stale token, which only that user sees.
                tracing::warn!(reason = %e.message, code = ?e.code, "service token refused");
            }
            e
        })?;
        let valid_until = data
            .claims
            .exp
            .saturating_add(i64::try_from(self.inner.leeway_secs).unwrap_or(i64::MAX));
        let mut principal = data.claims.into_principal()?;
        if let Tenants::Only(allowed) = &state.tenants
            && !allowed.contains(&principal.tenant_id)
        {
            return Err(Error::new(
                ErrorCode::PermissionDenied,
                format!(
                    "issuer {:?} is not trusted for tenant {:?}",
                    state.issuer, principal.tenant_id
                ),
            ));
        }
        let service = principal
            .subject
            .strip_prefix(crate::SERVICE_SUBJECT_PREFIX)
            .map(str::to_owned);
        match (state.kind, service) {
            (IssuerKind::Services, Some(name)) if !name.is_empty() => {
                principal.service = Some(name);
            }
            (IssuerKind::Services, _) => {
                return Err(unauthenticated(format!(
                    "a token of the service issuer must name a service (sub \"svc:<name>\"), not {:?}",
                    principal.subject
                )));
            }
            (IssuerKind::Users, Some(_)) => {
                return Err(unauthenticated(format!(
                    "subject {:?}: the \"svc:\" prefix is reserved for the platform's service issuer",
                    principal.subject
                )));
            }
            (IssuerKind::Users, None) => {}
        }
        if principal.on_behalf_of.is_some() && state.kind != IssuerKind::Services {
            return Err(unauthenticated(
                "only the platform's service issuer may mint a token acting on behalf of another principal (obo)",
            ));
        }
        self.inner.verified.insert(
            digest,
            Verified {
                principal: principal.clone(),
                issuer: state.clone(),
                keys,
                valid_until,
            },
        );
        Ok(principal)
    }

    /// The principal of a token verified before, while it is unexpired and
    /// its issuer's keys are the ones it was verified with (and not stale).
    fn remembered(&self, digest: &[u8; 32]) -> Option<Principal> {
        let cache = &self.inner.verified;
        if cache.capacity == 0 {
            return None;
        }
        let entries = cache.lock();
        let hit = entries.get(digest)?;
        // Only while this authenticator still trusts that very issuer (clones
        // with other issuers share the cache).
        let trusted = self
            .inner
            .issuers
            .get(&hit.issuer.issuer)
            .is_some_and(|state| Arc::ptr_eq(state, &hit.issuer));
        if !trusted {
            return None;
        }
        let current = snapshot(&hit.issuer)?;
        let keys_current = Arc::ptr_eq(&current, &hit.keys)
            && (matches!(hit.issuer.source, Source::Static)
                || current.fetched_at.elapsed() < self.inner.cache_ttl);
        (keys_current && unix_now() <= hit.valid_until).then(|| hit.principal.clone())
    }

    /// The issuer's keys, fetching them when missing, stale, or lacking `kid`.
    async fn keys_for(
        &self,
        state: &IssuerState,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<KeySet>, Error> {
        let fresh = |set: &KeySet| {
            matches!(state.source, Source::Static)
                || set.fetched_at.elapsed() < self.inner.cache_ttl
        };
        // Static keys never change: an unknown kid is simply unknown.
        if let Some(set) = snapshot(state)
            && (matches!(state.source, Source::Static)
                || (fresh(&set) && set.find(kid, alg).is_some()))
        {
            return Ok(set);
        }
        let mut last_attempt = state.fetch.lock().await;
        // Another request may have refreshed the keys while this one waited.
        let current = snapshot(state);
        if let Some(set) = &current
            && fresh(set)
            && set.find(kid, alg).is_some()
        {
            return Ok(set.clone());
        }
        let may_fetch = last_attempt.is_none_or(|t| t.elapsed() >= self.inner.min_refetch);
        if !may_fetch {
            return self.usable_stale(state, current);
        }
        *last_attempt = Some(Instant::now());
        match self.fetch(state).await {
            Ok(set) => {
                let set = Arc::new(set);
                match state.cache.write() {
                    Ok(mut guard) => *guard = Some(set.clone()),
                    Err(poisoned) => *poisoned.into_inner() = Some(set.clone()),
                }
                Ok(set)
            }
            Err(e) => {
                tracing::warn!(issuer = %state.issuer, error = %e, "JWKS fetch failed");
                // Stale keys beat no keys while the issuer is unreachable, for
                // a bounded time: past it a revoked key must stop working.
                match current {
                    None => Err(e),
                    current => self.usable_stale(state, current),
                }
            }
        }
    }

    /// The cached keys while they are within `max_key_staleness_secs` of their
    /// last successful fetch (static keys always); else `UNAVAILABLE`.
    fn usable_stale(
        &self,
        state: &IssuerState,
        current: Option<Arc<KeySet>>,
    ) -> Result<Arc<KeySet>, Error> {
        match current {
            Some(set)
                if matches!(state.source, Source::Static)
                    || set.fetched_at.elapsed()
                        <= self
                            .inner
                            .cache_ttl
                            .saturating_add(self.inner.max_staleness) =>
            {
                Ok(set)
            }
            Some(set) => Err(Error::new(
                ErrorCode::Unavailable,
                format!(
                    "keys of issuer {:?} were last fetched {} s ago and cannot be refreshed; its tokens are refused until they can",
                    state.issuer,
                    set.fetched_at.elapsed().as_secs()
                ),
            )),
            None => Err(Error::new(
                ErrorCode::Unavailable,
                format!("keys of issuer {:?} are not available", state.issuer),
            )),
        }
    }

    async fn fetch(&self, state: &IssuerState) -> Result<KeySet, Error> {
        match &state.source {
            Source::Static => Err(Error::new(
                ErrorCode::Internal,
                "static keys are not fetched",
            )),
            Source::File(path) => read_jwks_file(path),
            Source::Url(url) => {
                let unavailable = |e: reqwest::Error| {
                    Error::new(
                        ErrorCode::Unavailable,
                        format!("fetching JWKS of issuer {:?}: {e}", state.issuer),
                    )
                };
                let jwks: Jwks = self
                    .inner
                    .http
                    .get(url)
                    .send()
                    .await
                    .and_then(reqwest::Response::error_for_status)
                    .map_err(unavailable)?
                    .json()
                    .await
                    .map_err(unavailable)?;
                tracing::debug!(issuer = %state.issuer, keys = jwks.keys.len(), "fetched JWKS");
                Ok(KeySet::from_jwks(&jwks))
            }
        }
    }
}

/// The tenants `issuer` is configured for; at least one, or `*` for all.
fn tenant_binding(issuer: &str, tenants: &[String]) -> Result<Tenants, Error> {
    if tenants.is_empty() {
        return Err(Error::invalid_argument(
            "auth.issuers.tenants",
            format!(
                "issuer {issuer:?} has no tenants: list the tenants whose tokens it may mint, or [\"*\"] for all"
            ),
        ));
    }
    if tenants.iter().any(|t| t == "*") {
        return Ok(Tenants::Any);
    }
    for t in tenants {
        crate::validate_tenant_id(t).map_err(|why| {
            Error::invalid_argument("auth.issuers.tenants", format!("issuer {issuer:?}: {why}"))
        })?;
    }
    Ok(Tenants::Only(tenants.iter().cloned().collect()))
}

/// JWKS only over https, or plain http to a loopback address (tests, sidecars).
fn check_jwks_url(issuer: &str, url: &str) -> Result<(), Error> {
    let bad = |why: String| {
        Error::invalid_argument("auth.issuers.jwks_url", format!("issuer {issuer:?}: {why}"))
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(format!("{url:?} is not a URL: {e}")))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(bad(format!(
                    "{url:?}: a JWKS must be fetched over https (plain http only to a loopback address)"
                )))
            }
        }
        other => Err(bad(format!("{url:?}: unsupported scheme {other:?}"))),
    }
}

fn snapshot(state: &IssuerState) -> Option<Arc<KeySet>> {
    match state.cache.read() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn read_jwks_file(path: &std::path::Path) -> Result<KeySet, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorCode::Unavailable,
            format!("reading JWKS file {}: {e}", path.display()),
        )
    })?;
    let jwks: Jwks = serde_json::from_str(&text).map_err(|e| {
        Error::invalid_argument(
            "auth.issuers.jwks_file",
            format!("{} is not a JWKS: {e}", path.display()),
        )
    })?;
    Ok(KeySet::from_jwks(&jwks))
}

fn map_jwt_error(e: &jsonwebtoken::errors::Error, state: &IssuerState) -> Error {
    match e.kind() {
        ErrorKind::ExpiredSignature => Error::new(ErrorCode::TokenExpired, "token has expired"),
        ErrorKind::ImmatureSignature => unauthenticated("token is not valid yet (nbf)"),
        ErrorKind::InvalidSignature => unauthenticated("token signature is invalid"),
        ErrorKind::InvalidIssuer => {
            unauthenticated(format!("token issuer is not {:?}", state.issuer))
        }
        ErrorKind::InvalidAudience => unauthenticated(format!(
            "token audience does not include {:?}",
            state.audience
        )),
        ErrorKind::MissingRequiredClaim(claim) => {
            unauthenticated(format!("token has no {claim} claim"))
        }
        ErrorKind::InvalidAlgorithm => unauthenticated("token algorithm does not match its key"),
        ErrorKind::Json(_) => unauthenticated("malformed token claims"),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
            unauthenticated("malformed token")
        }
        other => unauthenticated(format!("token rejected: {other:?}")),
    }
}
