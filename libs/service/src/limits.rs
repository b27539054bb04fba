//! Server-wide protection around every gRPC call (a tower layer, outside
//! authentication so that shed calls cost no token verification; stacked by
//! [`crate::server::serve`]):
//!
//! - a deadline for unary calls (`[grpc] request_timeout_secs`): past it the
//!   caller gets `DEADLINE_EXCEEDED` and the handler is dropped. Streaming
//!   calls (tails, exports, watches) are exempt: they live as long as the
//!   client reads, and their services bound idle streams themselves;
//! - a cap on calls in flight across all connections (`[grpc]
//!   max_concurrent_requests`): a call over it is answered `RESOURCE_EXHAUSTED`
//!   at once instead of queueing. A streaming call holds its slot until its
//!   stream starts. Health checks are never shed.
//!
//! The per-connection cap on concurrent HTTP/2 streams is the server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (`[grpc] max_concurrent_streams`).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anumate_errors::{Error, ErrorCode};
use tokio::sync::Semaphore;

/// Every RPC of the Anumate, health and reflection contracts as
/// `/pkg.Service/Method`, and whether it streams (either way): the fixed set
/// the limits exempt streams by and the metrics label by.
pub fn contract_methods() -> Vec<(String, bool)> {
    use prost::Message as _;
    let sets = [
        anumate_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut methods = Vec::new();
    for bytes in sets {
        // The sets are compiled into the binary; one that does not decode
        // would only cost its methods their labels and stream exemption.
        let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else {
            continue;
        };
        for file in &set.file {
            let package = file.package();
            let dot = if package.is_empty() { "" } else { "." };
            for service in &file.service {
                for method in &service.method {
                    let path = format!("/{package}{dot}{}/{}", service.name(), method.name());
                    let streams = method.client_streaming() || method.server_streaming();
                    methods.push((path, streams));
                }
            }
        }
    }
    methods
}

/// Calls that are never shed: a load balancer must still see a busy server.
const NEVER_SHED: &str = "/grpc.health.v1.Health/";

/// The limits, shared by every connection.
#[derive(Clone)]
pub struct LimitsLayer {
    timeout: Option<Duration>,
    max: usize,
    permits: Option<Arc<Semaphore>>,
    streaming: Arc<HashSet<String>>,
}

impl LimitsLayer {
    /// `timeout` for unary calls (`None`: no deadline) and at most
    /// `max_in_flight` calls at once (0: no cap).
    pub fn new(timeout: Option<Duration>, max_in_flight: usize) -> LimitsLayer {
        let streaming = contract_methods()
            .into_iter()
            .filter_map(|(path, streams)| streams.then_some(path))
            .collect();
        LimitsLayer {
            timeout,
            max: max_in_flight,
            permits: (max_in_flight > 0).then(|| Arc::new(Semaphore::new(max_in_flight))),
            streaming: Arc::new(streaming),
        }
    }
}

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = Limits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limits {
            inner,
            limits: self.clone(),
        }
    }
}

/// The service of [`LimitsLayer`].
#[derive(Clone)]
pub struct Limits<S> {
    inner: S,
    limits: LimitsLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

fn refuse(error: Error) -> http::Response<tonic::body::Body> {
    error.to_status().into_http()
}

impl<S, B> tower::Service<http::Request<B>> for Limits<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let streaming = self.limits.streaming.contains(path);
        let permit = match &self.limits.permits {
            Some(permits) if !path.starts_with(NEVER_SHED) => {
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        tracing::warn!(path, max = self.limits.max, "call shed: server busy");
                        let busy = Error::new(
                            ErrorCode::ResourceExhausted,
                            format!(
                                "server busy: {} calls in flight ([grpc] max_concurrent_requests); retry later",
                                self.limits.max
                            ),
                        );
                        return Box::pin(std::future::ready(Ok(refuse(busy))));
                    }
                }
            }
            _ => None,
        };
        let timeout = self.limits.timeout.filter(|_| !streaming);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let _permit = permit;
            let Some(limit) = timeout else {
                return fut.await;
            };
            match tokio::time::timeout(limit, fut).await {
                Ok(res) => res,
                Err(_) => Ok(refuse(Error::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "the call took longer than {} s ([grpc] request_timeout_secs)",
                        limit.as_secs_f64()
                    ),
                ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_methods_are_known() {
        let methods: std::collections::HashMap<String, bool> =
            contract_methods().into_iter().collect();
        assert_eq!(
            methods.get("/anumate.registry.v1.RegistryService/PushCapsule"),
            Some(&false)
        );
        assert_eq!(
            methods.get("/anumate.events.v1.EventsService/TailEvents"),
            Some(&true)
        );
        assert_eq!(methods.get("/grpc.health.v1.Health/Watch"), Some(&true));
    }
}
