//! The tower layer that authenticates every gRPC request, and client helpers.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anumate_errors::{Error, ErrorCode};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;

use crate::authenticator::Authenticator;
use crate::principal::Principal;

/// Paths served without a token: health checks and reflection.
pub const PUBLIC_PATH_PREFIXES: &[&str] = &["/grpc.health.v1.", "/grpc.reflection."];

/// Authenticates each request's bearer token and puts the [`Principal`] in its extensions.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Authenticator,
    public_prefixes: Arc<Vec<String>>,
}

impl AuthLayer {
    /// A layer that lets only health and reflection through without a token.
    pub fn new(auth: Authenticator) -> AuthLayer {
        AuthLayer {
            auth,
            public_prefixes: Arc::new(PUBLIC_PATH_PREFIXES.iter().map(|p| p.to_string()).collect()),
        }
    }

    /// Also serves paths starting with `prefix` without a token.
    pub fn allow_unauthenticated(mut self, prefix: impl Into<String>) -> AuthLayer {
        Arc::make_mut(&mut self.public_prefixes).push(prefix.into());
        self
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
            public_prefixes: self.public_prefixes.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a tonic server.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
    public_prefixes: Arc<Vec<String>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, ResBody> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if self
            .public_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_str()))
        {
            return Box::pin(self.inner.call(req));
        }
        // The ready inner service is the one that must be called; keep a fresh clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            let result = match bearer_token(req.headers()) {
                Ok(token) => auth.authenticate(token).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(principal) => {
                    req.extensions_mut().insert(principal);
                    inner.call(req).await
                }
                Err(e) => {
                    tracing::debug!(path = %req.uri().path(), reason = %e, "request not authenticated");
                    Ok(e.to_status().into_http())
                }
            }
        })
    }
}

/// The token of an `authorization: Bearer <token>` header.
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, Error> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Error::new(ErrorCode::Unauthenticated, "missing authorization metadata"))?;
    let value = value.to_str().map_err(|_| {
        Error::new(
            ErrorCode::Unauthenticated,
            "authorization metadata is not ASCII",
        )
    })?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(Error::new(
            ErrorCode::Unauthenticated,
            "authorization metadata is not \"Bearer <token>\"",
        )),
    }
}

/// The authenticated caller of `req`; `UNAUTHENTICATED` if no [`AuthLayer`] ran.
pub fn principal<T>(req: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    req.extensions().get::<Principal>().cloned().ok_or_else(|| {
        Error::new(ErrorCode::Unauthenticated, "request is not authenticated").to_status()
    })
}

/// A client interceptor that sends `authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerToken(pub String);

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let value: MetadataValue<_> = format!("Bearer {}", self.0).parse().map_err(|_| {
            Error::new(
                ErrorCode::InvalidArgument,
                "bearer token is not valid ASCII",
            )
            .to_status()
        })?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}
