//! What a service is to the `anumate` binary, and how services call each other.
//!
//! - [`ServiceModule`]: one value per service crate that knows its gRPC name,
//!   its migrations, its configuration section, how to build its routes from a
//!   shared [`Context`], and the background tasks it spawns ([`Tasks`]:
//!   cancellation token, supervised, awaited on shutdown). The binary, the
//!   tests and the gateway iterate one list of them.
//! - [`clients`]: one trait per upstream service with an in-process
//!   implementation (in the callee's crate: it calls the domain type, no
//!   socket) and a gRPC one (here), built on the one [`clients::channel`]
//!   factory. Service crates depend on these traits, never on each other.
//! - [`server`]: the modules built into one router ([`server::build`]) and
//!   served behind every production layer ([`server::serve`]): tracing,
//!   `ErrorInfo`, [`metrics`], [`limits`], authentication. The binary and the
//!   tests' servers (`anumate-testing`) both call them, so tests run the
//!   production stack.
//!
//! It lives in its own small crate because both sides need it: every service
//! crate implements it and the binary composes it, and the traits must sit
//! below the service crates so that callers and callees never form a cycle.
#![forbid(unsafe_code)]

pub mod clients;
pub mod limits;
pub mod metrics;
mod module;
pub mod ratelimit;
pub mod server;
mod tasks;
pub mod tls;
pub mod trace;

pub use module::{
    BuildError, Context, KeysConfig, Module, ServiceModule, check_section, default_section,
    no_keys, section as module_section,
};
pub use server::GrpcConfig;
pub use tasks::{TaskError, Tasks};
pub use tls::TlsConfig;
pub use tokio_util::sync::CancellationToken;
