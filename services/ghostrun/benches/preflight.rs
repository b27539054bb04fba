//! Preflight of a 20-step plan with 10 policies, end to end: a gRPC client
//! over TCP, the auth layer, the plan (by hash, or compiled from the capsule
//! name), the policies (cached after the first call), the tenant's settings,
//! the simulation, and storing the report with its event, on SQLite and
//! PostgreSQL. GhostRun reaches the compiler, the policy service and the
//! registry in process (as `anumate dev` and `serve all` compose them) or
//! over gRPC on the server's own listener (`mesh`, one service per process).
//! Prints p50/p95/p99 per backend, wiring and request form. Goal (issue 15):
//! p95 ≤ 5 ms.
//!
//! `cargo bench -p anumate-ghostrun --bench preflight` (PostgreSQL on
//! 127.0.0.1:5432 as the tests use it); `-- in-process` or `-- mesh` runs one
//! wiring, `-- sqlite` or `-- postgres` one backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anumate_auth::{BearerToken, Role};
use anumate_compiler::{Compiler, CompilerConfig, CompilerGrpc, Upstreams};
use anumate_crypto::{KeyPair, KeyRing};
use anumate_ghostrun::{GhostRun, GhostRunConfig, GhostRunGrpc};
use anumate_policy_service::{Policies, PolicyConfig, PolicyGrpc};
use anumate_proto::ghostrun::v1 as pb;
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use anumate_registry::{
    Registry, RegistryConfig, RegistryGrpc, TenantSettingsGrpc, TenantSettingsStore, ToolsGrpc,
};
use anumate_service::clients::Grpc;
use anumate_testing::{self as testing, Backend, DevAuth};
use tonic::service::Routes;
use tonic::transport::Endpoint;

const ITERATIONS: u64 = 500;

fn policy(i: usize) -> String {
    format!(
        r#"policy "p{i}" {{
  rule "post-limit-{i}" priority {i} {{
    when tool == "http.post" and args.body.n > {limit}
    then deny(reason: "too many")
  }}
  rule "refund-{i}" {{
    when tool == "payments.refund" and args.amount > {big} and not (principal.roles contains "finance-lead")
    then require_approval(approvers: ["group:finance"], quorum: 2)
  }}
  rule "mask-{i}" {{
    when tool == "email.send"
    then redact(fields: ["to"])
  }}
}}
"#,
        limit = 100_000 + i,
        big = 1_000_000 + i
    )
}

fn capsule() -> String {
    let mut y = String::from(
        "apiVersion: anumate.dev/v1\nkind: Capsule\nmetadata:\n  name: twenty\nspec:\n  inputs:\n    order_id: {type: string, required: true, pattern: \"^ord_[a-z0-9]+$\"}\n    amount: {type: integer, required: true, minimum: 1}\n  tools: [http.get, http.post, payments.refund, email.send]\n  policies: [",
    );
    y.push_str(
        &(0..10)
            .map(|i| format!("p{i}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    y.push_str("]\n  steps:\n");
    for i in 0..20 {
        let (tool, with) = match i % 4 {
            0 => ("http.get", format!("{{url: \"https://x.example/${{{{ inputs.order_id }}}}/{i}\"}}")),
            1 => ("http.post", format!("{{url: \"https://x.example/p/{i}\", body: {{n: {i}, id: \"${{{{ inputs.order_id }}}}\"}}}}")),
            2 => ("payments.refund", "{order_id: \"${{ inputs.order_id }}\", amount: \"${{ inputs.amount }}\", currency: INR}".to_string()),
            _ => ("email.send", "{to: \"ops@example.com\", template: t}".to_string()),
        };
        y.push_str(&format!(
            "    - id: s{i}\n      tool: {tool}\n      with: {with}\n"
        ));
        if i >= 4 {
            y.push_str(&format!("      needs: [s{}]\n", i - 4));
            y.push_str(&format!(
                "      if: \"${{{{ steps.s{}.output.status != 'failed' }}}}\"\n",
                i - 4
            ));
        }
    }
    y
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wiring {
    InProcess,
    Mesh,
}

async fn run(backend: Backend, wiring: Wiring) {
    let mut migrations = anumate_registry::migrations();
    migrations.extend(anumate_policy_service::REPO_MIGRATIONS.iter().copied());
    migrations.extend(anumate_compiler::REPO_MIGRATIONS.iter().copied());
    migrations.extend(anumate_ghostrun::REPO_MIGRATIONS.iter().copied());
    let (_db, store) = testing::migrated_store(backend, &migrations).await;
    let DevAuth {
        issuer,
        authenticator: auth,
        dir: _dir,
        ..
    } = DevAuth::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let own = format!("http://{addr}");
    let registry = Registry::new(
        store.clone(),
        Arc::new(KeyRing::new(KeyPair::generate().unwrap())),
        &RegistryConfig::default(),
    );
    let policies = Policies::new(store.clone(), &PolicyConfig::default());
    let settings = TenantSettingsStore::new(store.clone());
    let cancel = tokio_util::sync::CancellationToken::new();
    let (followed, token) = (settings.clone(), cancel.clone());
    tokio::spawn(async move { followed.follow_changes(token).await });
    let channel = anumate_service::clients::channel("own", &own).unwrap();
    let grpc = Arc::new(Grpc::new(channel));
    let (compiler, ghostrun) = match wiring {
        Wiring::InProcess => {
            let compiler = Compiler::new(
                store.clone(),
                Upstreams::new(Arc::new(registry.clone()), Arc::new(policies.clone())),
                &CompilerConfig::default(),
            )
            .unwrap();
            let ghostrun = GhostRun::new(
                store.clone(),
                Arc::new(compiler.clone()),
                Arc::new(policies.clone()),
                GhostRunConfig::default(),
            )
            .with_registry(Arc::new(registry.clone()))
            .with_settings(Arc::new(settings.clone()));
            (compiler, ghostrun)
        }
        Wiring::Mesh => {
            let compiler = Compiler::new(
                store.clone(),
                Upstreams::lazy(&own, &own).unwrap(),
                &CompilerConfig::default(),
            )
            .unwrap();
            let ghostrun = GhostRun::new(
                store.clone(),
                grpc.clone(),
                grpc.clone(),
                GhostRunConfig::default(),
            )
            .with_registry(grpc.clone())
            .with_settings(grpc);
            (compiler, ghostrun)
        }
    };
    let (_, server) = testing::serve_on(
        listener,
        auth,
        Routes::new(ToolsGrpc::new(registry.tools().clone()).into_server())
            .add_service(RegistryGrpc::new(registry).into_server())
            .add_service(TenantSettingsGrpc::new(settings).into_server())
            .add_service(PolicyGrpc::new(policies).into_server())
            .add_service(CompilerGrpc::new(compiler).into_server())
            .add_service(GhostRunGrpc::new(ghostrun).into_server()),
    );
    let token = issuer
        .mint("bench", "alice", &[Role::Admin], Duration::from_secs(3600))
        .unwrap();
    let ch = Endpoint::from_shared(own.clone())
        .unwrap()
        .tcp_nodelay(true)
        .connect()
        .await
        .unwrap();
    let t = || BearerToken(token.clone());
    let mut pol =
        ppb::policy_service_client::PolicyServiceClient::with_interceptor(ch.clone(), t());
    for i in 0..10 {
        pol.push_policy(ppb::PushPolicyRequest {
            source: policy(i),
            source_name: format!("p{i}.policy"),
            etag: String::new(),
            publish: true,
        })
        .await
        .unwrap();
    }
    let mut reg =
        rpb::registry_service_client::RegistryServiceClient::with_interceptor(ch.clone(), t());
    reg.push_capsule(rpb::PushCapsuleRequest {
        source_yaml: capsule(),
        source_name: "twenty.yaml".into(),
        etag: String::new(),
        publish: true,
    })
    .await
    .unwrap();
    let mut gr = pb::ghost_run_service_client::GhostRunServiceClient::with_interceptor(ch, t());
    let first = gr
        .preflight(pb::PreflightRequest {
            capsule_name: "twenty".into(),
            inputs_json: r#"{"order_id": "ord_1", "amount": 5000}"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap();
    assert_eq!(first.steps.len(), 20);
    let by_hash = pb::PreflightRequest {
        plan_hash: first.plan_hash.clone(),
        inputs_json: r#"{"order_id": "ord_1", "amount": 5000}"#.into(),
        ..Default::default()
    };
    let by_name = pb::PreflightRequest {
        capsule_name: "twenty".into(),
        inputs_json: r#"{"order_id": "ord_1", "amount": 5000}"#.into(),
        ..Default::default()
    };
    for (form, req) in [("plan hash", by_hash), ("capsule name", by_name)] {
        for _ in 0..50 {
            gr.preflight(req.clone()).await.unwrap();
        }
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        for _ in 0..ITERATIONS {
            let t0 = Instant::now();
            gr.preflight(req.clone()).await.unwrap();
            h.record(t0.elapsed().as_micros() as u64).unwrap();
        }
        println!(
            "preflight 20 steps / 10 policies, {backend:?}, {wiring:?}, by {form}, {ITERATIONS} calls: p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms (verdict {:?}, risk {})",
            h.value_at_quantile(0.50) as f64 / 1000.0,
            h.value_at_quantile(0.95) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            first.verdict(),
            first.risk.as_ref().map_or(0, |r| r.score),
        );
    }
    cancel.cancel();
    server.abort();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |name: &str, all: &[&str]| {
        !args.iter().any(|a| all.contains(&a.as_str())) || args.iter().any(|a| a == name)
    };
    for backend in [Backend::Sqlite, Backend::Postgres] {
        if !wanted(
            if backend == Backend::Sqlite {
                "sqlite"
            } else {
                "postgres"
            },
            &["sqlite", "postgres"],
        ) {
            continue;
        }
        for wiring in [Wiring::InProcess, Wiring::Mesh] {
            if !wanted(
                if wiring == Wiring::InProcess {
                    "in-process"
                } else {
                    "mesh"
                },
                &["in-process", "mesh"],
            ) {
                continue;
            }
            rt.block_on(run(backend, wiring));
        }
    }
}
