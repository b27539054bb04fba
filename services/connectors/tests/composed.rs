#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The hub as `anumate dev` composes it: the registry, captokens and the
//! connector hub modules in one server, the tool pushed into the tenant's
//! catalogue with `PushTools` and resolved by the hub in process, the
//! capability token signed with the `captokens` key the captokens module
//! loads from the keys directory (the hub reads only its public keys, in
//! process).

use std::time::Duration;

use anumate_auth::{BearerToken, Role};
use anumate_captokens::{ArgsBinding, Capability, IssueRequest, Issuer};
use anumate_crypto::KeyRing;
use anumate_errors::Reason;
use anumate_proto::connectors::v1 as pb;
use anumate_proto::registry::v1 as rpb;
use anumate_service::{Context, KeysConfig, ServiceModule};
use anumate_testing::{Backend, DevAuth, Layers, expect_reason, migrated_store};
use serde_json::json;
use tonic::transport::Endpoint;

const TOOLS: &str = "apiVersion: anumate.dev/v1
kind: Tool
metadata: {name: tickets.create}
spec:
  connector: mock
  side_effect: write
  idempotent: true
  mock: {output: {ticket: \"T-${{ args.n }}\"}}
";

async fn a_pushed_tool_is_invoked_through_the_composed_hub(backend: Backend) {
    let mut migrations = anumate_registry::migrations();
    migrations.extend(anumate_captokens_service::migrations());
    migrations.extend(anumate_connectors::migrations());
    // The outbox comes with both the registry's and captokens' migrations.
    let mut seen = std::collections::HashSet::new();
    migrations.retain(|m| seen.insert(m.id));
    let (_db, store) = migrated_store(backend, &migrations).await;
    let auth = DevAuth::with_service_issuer("orchestrator");
    let keys_dir = auth.dir.path().join("keys");
    let modules: Vec<Box<dyn ServiceModule>> = vec![
        anumate_registry::module(),
        anumate_captokens_service::module(),
        anumate_connectors::module(),
    ];
    let listener = anumate_testing::bind().await;
    let own_url = format!("http://{}", listener.local_addr().unwrap());
    let ctx = Context::new(
        json!({}),
        Some(store),
        KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        },
        keys_dir.clone(),
        None,
        own_url,
    );
    let layers = Layers::platform(
        anumate_testing::GrpcConfig::default(),
        auth.authenticator.clone(),
    )
    .unwrap();
    let server = anumate_testing::serve_modules(listener, &modules, ctx, layers).await;
    let channel = Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let admin = auth
        .issuer
        .mint("t1", "user:admin", &[Role::Admin], Duration::from_secs(300))
        .unwrap();
    let mut tools = rpb::tools_service_client::ToolsServiceClient::with_interceptor(
        channel.clone(),
        BearerToken(admin),
    );
    tools
        .push_tools(rpb::PushToolsRequest {
            source_yaml: TOOLS.into(),
            source_name: "tools.yaml".into(),
        })
        .await
        .unwrap();

    let orchestrator = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint("t1", Duration::from_secs(300))
        .unwrap();
    let mut hub = pb::connector_hub_internal_client::ConnectorHubInternalClient::with_interceptor(
        channel,
        BearerToken(orchestrator),
    );
    let ring = KeyRing::load_or_create(&keys_dir, "captokens").unwrap();
    let mint = |tool: &str, args: &serde_json::Value| {
        Issuer::new("test")
            .issue(
                &ring,
                IssueRequest {
                    subject: "user:alice",
                    audience: &anumate_connectors::ConnectorsConfig::default().audience,
                    tenant: "t1",
                    run: "run-9",
                    step: "s",
                    plan_hash: &format!("sha256:{}", "0".repeat(64)),
                    args: ArgsBinding::Args(args),
                    capability: &Capability {
                        tool: tool.into(),
                        actions: vec!["call".into()],
                        constraints: Default::default(),
                    },
                    ttl: None,
                    single_use: true,
                    now: None,
                },
            )
            .unwrap()
            .token
    };
    let args = json!({"n": 7});
    let request = |tool: &str, key: &str| pb::InvokeRequest {
        tool: tool.into(),
        args: Some(serde_json::from_value(args.clone()).unwrap()),
        idempotency_key: key.into(),
        capability_token: mint(tool, &args),
    };
    let out = hub
        .invoke(request("tickets.create", "k1"))
        .await
        .unwrap()
        .into_inner();
    let output = anumate_engine::json::struct_json(out.output.as_ref().unwrap()).unwrap();
    assert_eq!(output, json!({"ticket": "T-7"}));
    // A tool the tenant never declared.
    expect_reason(
        hub.invoke(request("tickets.delete", "k2")).await,
        Reason::ToolNotFound,
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_sqlite() {
    a_pushed_tool_is_invoked_through_the_composed_hub(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_postgres() {
    a_pushed_tool_is_invoked_through_the_composed_hub(Backend::Postgres).await;
}

/// A configuration still naming the private key files the hub no longer
/// reads does not start, and says what to do instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_key_files_setting_is_refused_with_a_reason() {
    let mut migrations = anumate_registry::migrations();
    migrations.extend(anumate_captokens_service::migrations());
    migrations.extend(anumate_connectors::migrations());
    let mut seen = std::collections::HashSet::new();
    migrations.retain(|m| seen.insert(m.id));
    let (_db, store) = migrated_store(Backend::Sqlite, &migrations).await;
    let auth = DevAuth::with_service_issuer("orchestrator");
    let modules: Vec<Box<dyn ServiceModule>> = vec![
        anumate_registry::module(),
        anumate_captokens_service::module(),
        anumate_connectors::module(),
    ];
    let ctx = Context::new(
        json!({"connectors": {"captoken_key_files": ["/etc/anumate/keys/captokens.pem"]}}),
        Some(store),
        KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        },
        auth.dir.path().join("keys"),
        None,
        "http://127.0.0.1:1".into(),
    );
    let Err(e) = anumate_service::server::build(&modules, ctx).await else {
        panic!("a hub naming captoken_key_files must not start");
    };
    let text = e.to_string();
    assert!(text.contains("captoken_key_files"), "{text}");
    assert!(text.contains("no longer read"), "{text}");
    assert!(text.contains("captokens_url"), "{text}");
}
