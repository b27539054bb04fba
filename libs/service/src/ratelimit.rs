//! Per-tenant rate limits (`[grpc.rate_limits]`), so one tenant cannot
//! starve the others: a token bucket per (tenant, RPC family), the family
//! being the gRPC service (`anumate.registry.v1.RegistryService`). A call
//! over its bucket is answered `RESOURCE_EXHAUSTED` (`RATE_LIMITED`) with a
//! `google.rpc.RetryInfo` saying when the bucket holds a token again (the
//! REST gateway turns it into 429). The layer runs inside authentication
//! (the tenant is the verified one); calls made by platform services are
//! not limited (they serve a user call that already was), nor health and
//! reflection (no tenant).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anumate_errors::{Error, ErrorCode, Reason};
use serde::{Deserialize, Serialize};

/// One rate: `rps` calls a second on average, `burst` at once (0: `rps`,
/// at least 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rate {
    /// Calls per second per tenant and RPC family; 0: unlimited.
    pub rps: f64,
    /// Calls allowed at once after a quiet period; 0: `rps` (at least 1).
    pub burst: f64,
}

impl Rate {
    fn capacity(&self) -> f64 {
        if self.burst > 0.0 {
            self.burst
        } else {
            self.rps.max(1.0)
        }
    }
}

/// `[grpc.rate_limits]`: the default rate of every tenant, and tenants'
/// own (`[grpc.rate_limits.tenants.<tenant>]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Calls per second per tenant and RPC family; 0: unlimited.
    pub rps: f64,
    /// Calls allowed at once; 0: `rps` (at least 1).
    pub burst: f64,
    /// Rates of named tenants, instead of the default.
    pub tenants: BTreeMap<String, Rate>,
}

impl RateLimitConfig {
    /// Whether any tenant is limited.
    pub fn enabled(&self) -> bool {
        self.rps > 0.0 || self.tenants.values().any(|r| r.rps > 0.0)
    }

    fn rate(&self, tenant: &str) -> Rate {
        self.tenants.get(tenant).copied().unwrap_or(Rate {
            rps: self.rps,
            burst: self.burst,
        })
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets, shared by every connection.
#[derive(Clone)]
pub struct RateLimiter {
    config: Arc<RateLimitConfig>,
    buckets: Arc<Mutex<HashMap<(String, String), Bucket>>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .finish()
    }
}

impl RateLimiter {
    /// Limits as `config` says.
    pub fn new(config: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            config: Arc::new(config),
            buckets: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Takes a token of `tenant`'s bucket for `family`; when it is empty,
    /// how long until it holds one.
    pub fn check(&self, tenant: &str, family: &str) -> Result<(), Duration> {
        let rate = self.config.rate(tenant);
        if rate.rps <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let bucket = buckets
            .entry((tenant.to_owned(), family.to_owned()))
            .or_insert(Bucket {
                tokens: rate.capacity(),
                at: now,
            });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate.rps).min(rate.capacity());
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate.rps))
        }
    }
}

/// `RESOURCE_EXHAUSTED` (`RATE_LIMITED`) with `ErrorInfo` and `RetryInfo`.
pub fn rate_limited(tenant: &str, family: &str, retry_after: Duration) -> tonic::Status {
    use tonic_types::StatusExt as _;
    let err = Error::new(
        ErrorCode::ResourceExhausted,
        format!(
            "tenant {tenant:?} is over its rate limit for {family}; retry in {} ms",
            retry_after.as_millis().max(1)
        ),
    )
    .with_reason(Reason::RateLimited)
    .with_metadata("tenant", tenant)
    .with_metadata("rpc_family", family)
    .with_metadata("retry_after_ms", retry_after.as_millis().max(1).to_string());
    let status = err.to_status();
    let mut details = status.get_error_details();
    details.set_retry_info(Some(retry_after));
    tonic::Status::with_error_details(status.code(), status.message(), details)
}

/// The limiter as a tower layer (inside authentication).
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: Option<RateLimiter>,
}

impl RateLimitLayer {
    /// `None` or a configuration limiting no one: the layer does nothing.
    pub fn new(config: &RateLimitConfig) -> RateLimitLayer {
        RateLimitLayer {
            limiter: config.enabled().then(|| RateLimiter::new(config.clone())),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] wraps.
#[derive(Clone, Debug)]
pub struct RateLimitService<S> {
    inner: S,
    limiter: Option<RateLimiter>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, ResBody> tower::Service<http::Request<B>> for RateLimitService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(limiter) = &self.limiter
            && let Some(principal) = req.extensions().get::<anumate_auth::Principal>()
            && principal.service_name().is_none()
        {
            let family = req
                .uri()
                .path()
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default();
            if let Err(retry) = limiter.check(&principal.tenant_id, family) {
                tracing::debug!(tenant = %principal.tenant_id, family, "rate limited");
                let status = rate_limited(&principal.tenant_id, family, retry);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_are_per_tenant_and_family_and_refill() {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "big".to_owned(),
            Rate {
                rps: 1000.0,
                burst: 10.0,
            },
        );
        let l = RateLimiter::new(RateLimitConfig {
            rps: 2.0,
            burst: 3.0,
            tenants,
        });
        for _ in 0..3 {
            l.check("a", "x.S").unwrap();
        }
        let wait = l.check("a", "x.S").unwrap_err();
        assert!(
            wait > Duration::from_millis(300) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another family, another tenant: their own buckets.
        l.check("a", "x.T").unwrap();
        l.check("b", "x.S").unwrap();
        for _ in 0..10 {
            l.check("big", "x.S").unwrap();
        }
        std::thread::sleep(Duration::from_millis(520));
        l.check("a", "x.S").unwrap();
        let status = rate_limited("a", "x.S", wait);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        use tonic_types::StatusExt as _;
        let details = status.get_error_details();
        assert_eq!(details.retry_info().unwrap().retry_delay, Some(wait));
        assert_eq!(details.error_info().unwrap().reason, "RATE_LIMITED");
    }
}
