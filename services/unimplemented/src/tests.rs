//! Calls one method of every placeholder service through its generated client
//! over a real TCP connection.

use super::*;
use anumate_proto::orchestrator::v1::{
    ExecuteRequest, WatchRunRequest, orchestrator_service_client::OrchestratorServiceClient,
};
use tonic::transport::{Channel, Server};
use tonic_types::StatusExt;

async fn spawn_server() -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let routes = add_all(RoutesBuilder::default()).routes();
    tokio::spawn(
        Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

#[track_caller]
fn assert_unimplemented<T: std::fmt::Debug>(result: Result<T, tonic::Status>, method: &str) {
    assert_unimplemented_in(result, None, method);
}

/// As [`assert_unimplemented`], and when `service` is given, checks the
/// `service` metadata names it.
#[track_caller]
fn assert_unimplemented_in<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    service: Option<&str>,
    method: &str,
) {
    let status = result.expect_err("placeholder must fail");
    assert_eq!(
        status.code(),
        tonic::Code::Unimplemented,
        "{method}: {status:?}"
    );
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo detail");
    assert_eq!(info.reason, "UNIMPLEMENTED", "{method}");
    assert_eq!(info.domain, "anumate.dev", "{method}");
    assert_eq!(
        info.metadata.get("method").map(String::as_str),
        Some(method)
    );
    if let Some(service) = service {
        assert_eq!(
            info.metadata.get("service").map(String::as_str),
            Some(service),
            "{method}"
        );
    }
    assert!(
        status
            .message()
            .ends_with(&format!("/{method} is not implemented yet"))
    );
}

#[tokio::test]
async fn every_service_answers_unimplemented_over_tcp() {
    let channel = spawn_server().await;

    let mut orchestrator = OrchestratorServiceClient::new(channel);
    let r = orchestrator.execute(ExecuteRequest::default()).await;
    assert_unimplemented(r, "Execute");
    let r = orchestrator.watch_run(WatchRunRequest::default()).await;
    assert_unimplemented(r, "WatchRun");
}

#[test]
fn service_names_are_the_full_grpc_names() {
    assert_eq!(SERVICE_NAMES.len(), 1);
    for name in SERVICE_NAMES {
        assert!(
            name.starts_with("anumate.") && name.ends_with("Service"),
            "{name}"
        );
    }
    let mut unique = SERVICE_NAMES.to_vec();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), SERVICE_NAMES.len());
    assert!(!SERVICE_NAMES.contains(&"anumate.registry.v1.RegistryService"));
    assert!(!SERVICE_NAMES.contains(&"anumate.compiler.v1.CompilerService"));
    // Implemented services are not shadowed by placeholders.
    for implemented in [
        "anumate.policy.v1.PolicyService",
        "anumate.captokens.v1.CapTokensService",
        "anumate.receipts.v1.ReceiptsService",
        "anumate.approvals.v1.ApprovalsService",
        "anumate.ghostrun.v1.GhostRunService",
    ] {
        assert!(!SERVICE_NAMES.contains(&implemented), "{implemented}");
    }
    // Each internal service goes with the public service of its package.
    assert!(INTERNAL_SERVICE_NAMES.is_empty());
    for internal in INTERNAL_SERVICE_NAMES {
        let package = internal.rsplit_once('.').map(|(p, _)| p);
        assert!(internal.ends_with("Internal"), "{internal}");
        assert!(
            SERVICE_NAMES
                .iter()
                .any(|name| name.rsplit_once('.').map(|(p, _)| p) == package),
            "{internal} has no public service to go with"
        );
    }
}

#[test]
fn add_except_skips_named_services() {
    // RoutesBuilder exposes no introspection, but adding a service twice
    // panics (overlapping routes): re-adding everything after skipping
    // everything proves nothing was added.
    let routes = add_except(RoutesBuilder::default(), SERVICE_NAMES);
    let routes = add_all(routes);
    let _ = routes.routes();
}

#[tokio::test]
async fn each_module_serves_its_placeholder_and_needs_no_store() {
    let modules = modules();
    let names: Vec<&str> = modules.iter().map(|m| m.name()).collect();
    assert_eq!(names, SERVICE_NAMES);
    let mut ctx = Context::new(
        serde_json::Value::Null,
        None,
        anumate_service::KeysConfig::default(),
        std::path::PathBuf::new(),
        None,
        String::new(),
    );
    for m in &modules {
        assert!(!m.needs_store() && m.migrations().is_empty());
        m.build(&mut ctx)
            .expect("placeholder builds without a store");
    }
    let (routes, _, _) = ctx.into_parts();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        Server::builder()
            .add_routes(routes.routes())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = OrchestratorServiceClient::new(channel)
        .execute(ExecuteRequest::default())
        .await;
    assert_unimplemented(r, "Execute");
}
