//! Per-tenant rate limits (`[grpc.rate_limits]`), so one tenant cannot
//! starve the others: a token bucket per (tenant, RPC family), the family
//! being the gRPC service (`anumate.registry.v1.RegistryService`). A call
//! over its bucket is answered `RESOURCE_EXHAUSTED` (`RATE_LIMITED`) with a
//! `google.rpc.RetryInfo` saying when the bucket holds a token again (the
//! REST gateway turns it into 429). The layer runs inside authentication
//! (the tenant is the verified one); calls made by platform services are
//! not limited (they serve a user call that already was), nor health and
//! reflection (no tenant).
//!
//! Memory stays bounded under many tenants: a bucket that has refilled is
//! the same as none (a new one starts full), so about once a second the
//! buckets idle that long are dropped, and only those used within their
//! refill time (burst / rps) are held.

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
    /// From empty to full: idle this long, the bucket is full.
    refill: Duration,
}

/// The buckets and when idle ones were last dropped.
struct Buckets {
    map: HashMap<(String, String), Bucket>,
    swept: Instant,
}

/// How often idle buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The buckets, shared by every connection.
#[derive(Clone)]
pub struct RateLimiter {
    config: Arc<RateLimitConfig>,
    buckets: Arc<Mutex<Buckets>>,
    sweep_every: Duration,
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
            buckets: Arc::new(Mutex::new(Buckets {
                map: HashMap::new(),
                swept: Instant::now(),
            })),
            sweep_every: SWEEP_EVERY,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buckets> {
        match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// How many buckets are held (tenants and families used within their
    /// refill time, and since the last sweep).
    pub fn buckets(&self) -> usize {
        self.lock().map.len()
    }

    /// Takes a token of `tenant`'s bucket for `family`; when it is empty,
    /// how long until it holds one.
    pub fn check(&self, tenant: &str, family: &str) -> Result<(), Duration> {
        let rate = self.config.rate(tenant);
        if rate.rps <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.lock();
        if now.duration_since(buckets.swept) >= self.sweep_every {
            // A bucket idle for its refill time is full: dropping it
            // changes nothing (a new one starts full).
            buckets
                .map
                .retain(|_, b| now.duration_since(b.at) < b.refill);
            buckets.swept = now;
        }
        let bucket = buckets
            .map
            .entry((tenant.to_owned(), family.to_owned()))
            .or_insert(Bucket {
                tokens: rate.capacity(),
                at: now,
                refill: Duration::try_from_secs_f64(rate.capacity() / rate.rps)
                    .unwrap_or(Duration::MAX),
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

    #[test]
    fn idle_buckets_are_dropped_and_busy_ones_kept() {
        let mut tenants = BTreeMap::new();
        // A slow tenant: 1 call, then one every 100 s.
        tenants.insert(
            "slow".to_owned(),
            Rate {
                rps: 0.01,
                burst: 1.0,
            },
        );
        let mut l = RateLimiter::new(RateLimitConfig {
            rps: 1000.0,
            burst: 5.0,
            tenants,
        });
        // No sweep while they fill (the loop is slow in a debug build).
        l.sweep_every = Duration::from_secs(3600);
        l.check("slow", "x.S").unwrap();
        assert!(l.check("slow", "x.S").is_err());
        // Many tenants, one call each: a bucket each, for now.
        for i in 0..10_000 {
            l.check(&format!("t{i}"), "x.S").unwrap();
        }
        assert!(l.buckets() > 10_000, "{}", l.buckets());
        // Their buckets refill in 5 ms; the next call after a sweep
        // interval drops them, not the slow tenant's (still refilling).
        l.sweep_every = Duration::from_millis(20);
        std::thread::sleep(Duration::from_millis(30));
        l.check("t0", "x.S").unwrap();
        assert_eq!(l.buckets(), 2);
        assert!(
            l.check("slow", "x.S").is_err(),
            "the slow tenant stays limited"
        );
        // A dropped tenant starts again with its full burst.
        for _ in 0..5 {
            l.check("t1", "x.S").unwrap();
        }
        assert!(l.check("t1", "x.S").is_err());
    }
}
