#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Mesh mode with mTLS (issue 18): every service as its own
//! `anumate serve <service>` process on one PostgreSQL database, each with
//! its own certificate (SAN `spiffe://anumate/svc/<name>` and 127.0.0.1)
//! from one test CA, `[tls]` on every listener and client, and the service
//! tokens of the platform's issuer. The test walks the golden path across
//! the processes: tools, policy and capsule pushed to their services, the
//! plan compiled (compiler → registry, policy over mTLS), a run executed
//! (orchestrator → compiler, policy, captokens, connectors, receipts over
//! mTLS) to its end, its receipts read back, and the capsule listed through
//! the REST gateway (`anumate serve gateway`, mTLS to its upstream). A client without a
//! certificate, and one with a certificate of another CA, are refused.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anumate_auth::BearerToken;
use anumate_proto::compiler::v1 as cpb;
use anumate_proto::orchestrator::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::receipts::v1 as rcpb;
use anumate_proto::registry::v1 as rpb;
use anumate_service::clients;
use anumate_service::tls::{Tls, TlsConfig};
use common::{Ca, Mesh, Pod, anumate, ca, free_port, start_pod};
use rcgen::{CertificateParams, DnType, KeyPair, SanType};
use tonic::transport::Channel;

/// The services, each its own process (events needs no peer here).
const ROLES: &[&str] = &[
    "registry",
    "receipts",
    "policy",
    "captokens",
    "compiler",
    "approvals",
    "ghostrun",
    "connectors",
    "orchestrator",
    "gateway",
];

const TOOLS: &str = "apiVersion: anumate.dev/v1\nkind: Tool\nmetadata: {name: ledger.debit}\nspec:\n  \
    connector: mock\n  side_effect: write\n  idempotent: true\n  \
    input: {type: object, required: [to, amount], properties: {to: {type: string}, amount: {type: integer, minimum: 1}}}\n  \
    mock: {output: {id: \"debit_${{ args.to }}\"}, latency: 5ms}\n";

const POLICY: &str = "policy \"open\" {\n  rule \"cap\" {\n    when args.amount > 1000000\n    then deny(reason: \"too large\")\n  }\n}\n";

const CAPSULE: &str = r#"apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: transfer
spec:
  inputs:
    to:     {type: string, required: true}
    amount: {type: integer, required: true, minimum: 1}
  tools: [ledger.debit]
  policies: [open]
  steps:
    - id: debit
      tool: ledger.debit
      with: {to: "${{ inputs.to }}", amount: "${{ inputs.amount }}"}
"#;

/// `<dir>/<name>.crt|.key` for `name` (SAN: its SPIFFE id and 127.0.0.1),
/// and `[tls]` with `trust` as both CAs.
fn certify(dir: &Path, ca: &Ca, name: &str, trust: &Path) -> TlsConfig {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names.push(SanType::URI(
        format!("spiffe://anumate/svc/{name}").try_into().unwrap(),
    ));
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let (crt, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    TlsConfig {
        cert: crt,
        key: k,
        client_ca: trust.to_owned(),
        reload_secs: 5,
        ..TlsConfig::default()
    }
}

fn channel(url: &str, tls: &Tls) -> Channel {
    clients::channel_with("test", url, Some(tls)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_its_own_process_over_mtls() {
    let db = anumate_store::testing::TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mesh = Mesh::prepare(d, &db);
    let keys = &mesh.keys;
    let token = BearerToken(mesh.token.clone());
    let certs = d.join("certs");
    std::fs::create_dir_all(&certs).unwrap();

    let mesh_ca = ca("anumate mesh test CA");
    let ca_file = certs.join("ca.crt");
    std::fs::write(&ca_file, &mesh_ca.pem).unwrap();

    let ports: BTreeMap<&str, u16> = ROLES.iter().map(|r| (*r, free_port())).collect();
    let url = |role: &str| format!("https://127.0.0.1:{}", ports[role]);
    let upstreams = format!(
        "[approvals]\nreceipts_url = {receipts:?}\n\n\
         [captokens]\nkey_files = [{captokens_key:?}]\nreceipts_url = {receipts:?}\n\n\
         [compiler]\npolicy_url = {policy:?}\nregistry_url = {registry:?}\n\n\
         [connectors]\ncaptokens_url = {captokens:?}\nregistry_url = {registry:?}\n\n\
         [ghostrun]\ncompiler_url = {compiler:?}\npolicy_url = {policy:?}\nregistry_url = {registry:?}\n\n\
         [orchestrator]\ncompiler_url = {compiler:?}\npolicy_url = {policy:?}\napprovals_url = {approvals:?}\n\
         connectors_url = {connectors:?}\ncaptokens_url = {captokens:?}\nghostrun_url = {ghostrun:?}\n\
         receipts_url = {receipts:?}\nregistry_url = {registry:?}\n\n",
        receipts = url("receipts"),
        policy = url("policy"),
        registry = url("registry"),
        captokens = url("captokens"),
        compiler = url("compiler"),
        approvals = url("approvals"),
        connectors = url("connectors"),
        ghostrun = url("ghostrun"),
        captokens_key = keys.join("captokens.pem").display().to_string(),
    );

    let mut pods = Vec::new();
    for role in ROLES {
        let tls = certify(&certs, &mesh_ca, role, &ca_file);
        let config = format!(
            "{shared}{upstreams}\
             [tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca:?}\nreload_secs = 5\n\n{gateway}",
            shared = mesh.config,
            cert = tls.cert.display().to_string(),
            key = tls.key.display().to_string(),
            ca = ca_file.display().to_string(),
            // The REST gateway in front of the registry (a router would
            // spread the paths over the services), over mTLS.
            gateway = if *role == "gateway" {
                format!(
                    "[gateway]\nlisten = \"127.0.0.1:{}\"\nupstream = {:?}\n",
                    ports["gateway"],
                    url("registry")
                )
            } else {
                String::new()
            },
        );
        let config_path = d.join(format!("{role}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let log = d.join(format!("{role}.log"));
        let mut cmd = anumate(d);
        let listen = if *role == "gateway" {
            "127.0.0.1:0".to_owned()
        } else {
            format!("127.0.0.1:{}", ports[role])
        };
        cmd.args(["serve", role, "--listen", &listen])
            .arg("--config")
            .arg(&config_path)
            .env("ANUMATE_STORE__URL", &db.config.url)
            .env("ANUMATE_ADMIN__LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info");
        let pod = start_pod(cmd, role, log);
        pods.push(pod);
    }
    let logs = || pods.iter().map(Pod::tail).collect::<Vec<_>>().join("\n");

    // The test's own client certificate: a certificate of the CA naming no
    // service (an operator's), with the user's token.
    let me = Tls::load(&certify(&certs, &mesh_ca, "operator-laptop", &ca_file)).unwrap();

    // Refused: no certificate at all, and a certificate of another CA.
    let plain =
        clients::channel_with("test", &url("registry").replace("https", "http"), None).unwrap();
    let err =
        rpb::registry_service_client::RegistryServiceClient::with_interceptor(plain, token.clone())
            .list_capsules(rpb::ListCapsulesRequest::default())
            .await
            .unwrap_err();
    assert_refused(&err);
    let rogue_ca = ca("rogue CA");
    let rogue = certify(&certs, &rogue_ca, "rogue", &ca_file);
    let rogue = Tls::load(&rogue).unwrap();
    let err = rpb::registry_service_client::RegistryServiceClient::with_interceptor(
        channel(&url("registry"), &rogue),
        token.clone(),
    )
    .list_capsules(rpb::ListCapsulesRequest::default())
    .await
    .unwrap_err();
    assert_refused(&err);
    let registry_log = std::fs::read_to_string(d.join("registry.log")).unwrap();
    assert!(
        registry_log.contains("TLS handshake refused"),
        "the refusal is logged:\n{registry_log}"
    );

    // The golden path, each call to the service that owns it.
    rpb::tools_service_client::ToolsServiceClient::with_interceptor(
        channel(&url("registry"), &me),
        token.clone(),
    )
    .push_tools(rpb::PushToolsRequest {
        source_yaml: TOOLS.into(),
        source_name: "tools.yaml".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("push tools: {e:?}\n{}", logs()));
    ppb::policy_service_client::PolicyServiceClient::with_interceptor(
        channel(&url("policy"), &me),
        token.clone(),
    )
    .push_policy(ppb::PushPolicyRequest {
        source: POLICY.into(),
        source_name: "open.policy".into(),
        etag: String::new(),
        publish: true,
    })
    .await
    .unwrap_or_else(|e| panic!("push policy: {e:?}\n{}", logs()));
    rpb::registry_service_client::RegistryServiceClient::with_interceptor(
        channel(&url("registry"), &me),
        token.clone(),
    )
    .push_capsule(rpb::PushCapsuleRequest {
        source_yaml: CAPSULE.into(),
        source_name: "transfer.yaml".into(),
        etag: String::new(),
        publish: true,
    })
    .await
    .unwrap_or_else(|e| panic!("push capsule: {e:?}\n{}", logs()));
    // compiler → registry and policy, over mTLS.
    let plan = cpb::compiler_service_client::CompilerServiceClient::with_interceptor(
        channel(&url("compiler"), &me),
        token.clone(),
    )
    .compile(cpb::CompileRequest {
        capsule_name: "transfer".into(),
        version: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("compile across the mesh: {e:?}\n{}", logs()))
    .into_inner()
    .plan
    .unwrap();
    rpb::tenant_settings_service_client::TenantSettingsServiceClient::with_interceptor(
        channel(&url("registry"), &me),
        token.clone(),
    )
    .update_tenant_settings(rpb::UpdateTenantSettingsRequest {
        settings: Some(rpb::TenantSettings {
            require_preflight: Some(false),
            ..Default::default()
        }),
        update_mask: Some(pbjson_types::FieldMask {
            paths: vec!["require_preflight".into()],
        }),
        etag: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("tenant settings: {e:?}\n{}", logs()));

    // orchestrator → compiler, policy, captokens, connectors, receipts.
    let mut orch = pb::orchestrator_service_client::OrchestratorServiceClient::with_interceptor(
        channel(&url("orchestrator"), &me),
        token.clone(),
    );
    let run_id = orch
        .execute(pb::ExecuteRequest {
            plan_hash: plan.plan_hash.clone(),
            inputs: Some(
                serde_json::from_value(serde_json::json!({"to": "acct_1", "amount": 10})).unwrap(),
            ),
            idempotency_key: "mesh-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("execute across the mesh: {e:?}\n{}", logs()))
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let deadline = Instant::now() + Duration::from_secs(60);
    let run = loop {
        let run = orch
            .get_run(pb::GetRunRequest {
                run_id: run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        if matches!(
            run.state(),
            pb::RunState::Succeeded | pb::RunState::Failed | pb::RunState::Cancelled
        ) {
            break run;
        }
        assert!(
            Instant::now() < deadline,
            "run did not end: {run:#?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(run.state(), pb::RunState::Succeeded, "{run:#?}\n{}", logs());

    // Its receipts, from the receipts service.
    let receipts = rcpb::receipts_service_client::ReceiptsServiceClient::with_interceptor(
        channel(&url("receipts"), &me),
        token.clone(),
    )
    .list_receipts(rcpb::ListReceiptsRequest {
        filter: Some(rcpb::ReceiptFilter {
            run_id: run_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("receipts: {e:?}\n{}", logs()))
    .into_inner()
    .receipts;
    assert!(!receipts.is_empty(), "no receipts for {run_id}");

    // Through the REST gateway, which calls the registry over mTLS.
    let (status, body) = get_with_token(
        &format!("127.0.0.1:{}", ports["gateway"]),
        "/v1/capsules",
        &token.0,
    );
    assert_eq!(status, 200, "{body}\n{}", logs());
    assert!(body.contains("transfer"), "{body}");
    drop(pods);
}

/// Refused before any RPC: the failure is the transport's (the TLS
/// handshake, or the HTTP/2 preface answered by a TLS alert), not a status
/// a server sent.
fn assert_refused(err: &tonic::Status) {
    let transport = std::error::Error::source(err)
        .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some());
    assert!(transport, "not refused by the transport: {err:?}");
}

/// `GET path` with a bearer token over HTTP/1.1: the status and body.
fn get_with_token(addr: &str, path: &str, token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}
