//! Placeholder gRPC services for the contracts whose implementation has not
//! landed yet: the orchestrator.
//!
//! Every method of every service here answers gRPC `UNIMPLEMENTED` with a
//! `google.rpc.Status` whose `ErrorInfo` has `domain = "anumate.dev"` and
//! `reason = "UNIMPLEMENTED"` (plus `service` and `method` metadata), so
//! clients, the REST gateway (HTTP 501) and the health service see the full
//! surface of the platform from day one. Each placeholder is a
//! [`ServiceModule`] in the binary's composition list, until its real crate
//! replaces it there. A module would serve its package's service-only
//! service (`…Internal`, without HTTP rules) next to the public one, as the
//! real crates do (no remaining placeholder has one).
//!
//! Implementing the generated server traits (rather than a catch-all route)
//! keeps this crate honest: a change to a proto that adds or renames an RPC
//! fails to compile here until the placeholder is updated.
//!
//! ```no_run
//! let routes = anumate_unimplemented::add_all(tonic::service::RoutesBuilder::default());
//! # let _ = routes;
//! ```
#![forbid(unsafe_code)]

use anumate_errors::{Error, ErrorCode};
use anumate_proto::orchestrator::v1::orchestrator_service_server::{
    self, OrchestratorServiceServer,
};
use anumate_service::{BuildError, Context, ServiceModule};
use anumate_store::Migration;
use tonic::service::RoutesBuilder;

/// Full gRPC names of the placeholder services (for the health service and
/// reflection), in the order [`add_all`] adds them: one public service per
/// placeholder module, which is also the module's name.
pub const SERVICE_NAMES: &[&str] = &[orchestrator_service_server::SERVICE_NAME];

/// Full gRPC names of the service-only placeholders (no HTTP rules, so the
/// REST gateway cannot route them). Each is served, added and skipped with the
/// public service of its package in [`SERVICE_NAMES`].
pub const INTERNAL_SERVICE_NAMES: &[&str] = &[];

/// A service implementation that answers every method with [`status`]. It
/// implements the server trait of every service in [`SERVICE_NAMES`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Unimplemented;

/// The status every placeholder method returns: `UNIMPLEMENTED` with
/// `ErrorInfo.reason = "UNIMPLEMENTED"` and `service` / `method` metadata.
pub fn status(service: &str, method: &str) -> tonic::Status {
    Error::new(
        ErrorCode::Unimplemented,
        format!("{service}/{method} is not implemented yet"),
    )
    .with_metadata("service", service)
    .with_metadata("method", method)
    .to_status()
}

/// Adds every placeholder service to `routes`.
pub fn add_all(routes: RoutesBuilder) -> RoutesBuilder {
    add_except(routes, &[])
}

/// Adds the placeholder services whose full name is not in `skip` (a name of
/// [`SERVICE_NAMES`]; its package's internal service goes with it).
pub fn add_except(mut routes: RoutesBuilder, skip: &[&str]) -> RoutesBuilder {
    for name in SERVICE_NAMES {
        if !skip.contains(name) {
            add(&mut routes, name);
        }
    }
    routes
}

/// Adds the placeholder named `name` (one of [`SERVICE_NAMES`]) and the
/// internal service of its package, if any.
fn add(routes: &mut RoutesBuilder, name: &str) {
    match name {
        n if n == orchestrator_service_server::SERVICE_NAME => {
            routes.add_service(OrchestratorServiceServer::new(Unimplemented));
        }
        _ => {}
    }
}

/// The placeholders as service modules, for the binary's composition list:
/// `anumate serve orchestrator` serves the placeholder.
pub fn modules() -> Vec<Box<dyn ServiceModule>> {
    [(
        orchestrator_service_server::SERVICE_NAME,
        "orchestrator",
        "Orchestrator (not implemented yet: answers UNIMPLEMENTED)",
    )]
    .into_iter()
    .map(|(name, section, about)| {
        Box::new(Placeholder {
            name,
            section,
            about,
        }) as Box<dyn ServiceModule>
    })
    .collect()
}

/// One placeholder service: no tables, no store, no tasks.
struct Placeholder {
    name: &'static str,
    section: &'static str,
    about: &'static str,
}

impl ServiceModule for Placeholder {
    fn name(&self) -> &'static str {
        self.name
    }

    fn section(&self) -> &'static str {
        self.section
    }

    fn about(&self) -> &'static str {
        self.about
    }

    fn needs_store(&self) -> bool {
        false
    }

    fn migrations(&self) -> Vec<Migration> {
        Vec::new()
    }

    fn build(&self, ctx: &mut Context) -> Result<(), BuildError> {
        add(&mut ctx.routes, self.name);
        Ok(())
    }
}

/// Implements a generated server trait for [`Unimplemented`]. Each entry is
/// `fn method(Request) -> Response;`; server-streaming methods follow as
/// `stream method(Request) -> StreamType<Item>;`. The RPC name reported is the
/// request type without `Request` (buf lint guarantees they match).
macro_rules! unimplemented_service {
    (
        $pkg:ident :: $server:ident :: $service:ident {
            $( fn $method:ident($req:ident) -> $resp:ident; )*
            $( stream $smethod:ident($sreq:ident) -> $stream:ident<$item:ident>; )*
        }
    ) => {
        #[tonic::async_trait]
        impl anumate_proto::$pkg::v1::$server::$service for Unimplemented {
            $(
                async fn $method(
                    &self,
                    _request: tonic::Request<anumate_proto::$pkg::v1::$req>,
                ) -> Result<tonic::Response<anumate_proto::$pkg::v1::$resp>, tonic::Status> {
                    Err(rpc_status(anumate_proto::$pkg::v1::$server::SERVICE_NAME, stringify!($req)))
                }
            )*
            $(
                type $stream = tonic::codegen::BoxStream<anumate_proto::$pkg::v1::$item>;

                async fn $smethod(
                    &self,
                    _request: tonic::Request<anumate_proto::$pkg::v1::$sreq>,
                ) -> Result<tonic::Response<Self::$stream>, tonic::Status> {
                    Err(rpc_status(anumate_proto::$pkg::v1::$server::SERVICE_NAME, stringify!($sreq)))
                }
            )*
        }
    };
}

fn rpc_status(service: &str, request_type: &str) -> tonic::Status {
    let method = request_type.strip_suffix("Request").unwrap_or(request_type);
    status(service, method)
}

unimplemented_service!(orchestrator::orchestrator_service_server::OrchestratorService {
    fn execute(ExecuteRequest) -> ExecuteResponse;
    fn get_run(GetRunRequest) -> GetRunResponse;
    fn list_runs(ListRunsRequest) -> ListRunsResponse;
    fn pause_run(PauseRunRequest) -> PauseRunResponse;
    fn resume_run(ResumeRunRequest) -> ResumeRunResponse;
    fn cancel_run(CancelRunRequest) -> CancelRunResponse;
    fn kill_run(KillRunRequest) -> KillRunResponse;
    fn resolve_step(ResolveStepRequest) -> ResolveStepResponse;
    fn list_run_history(ListRunHistoryRequest) -> ListRunHistoryResponse;
    stream watch_run(WatchRunRequest) -> WatchRunStream<WatchRunResponse>;
});

#[cfg(test)]
mod tests;
