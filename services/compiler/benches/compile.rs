//! Compile of a 100-step capsule: cold (the compile function alone, no I/O;
//! also with YAML parsing) and cached (the cache-hit path of a repeated
//! compile after the inputs were fetched: memo key over the fetched versions
//! and the memo lookup). Goals: cold ≤ 5 ms, cached ≤ 200 µs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anumate_compiler::{
    Actor, Catalogue, CompileInput, Compiler, CompilerConfig, ResolvedPolicy, Upstreams, compile,
};
use anumate_proto::policy::v1 as ppb;
use anumate_proto::registry::v1 as rpb;
use criterion::{Criterion, criterion_group, criterion_main};

const POLICIES: &str = include_str!("../../../examples/refund.policy");

/// 100 steps: a fan-out of 4 chains of 25, templated arguments, conditions.
fn capsule_yaml() -> String {
    let mut y = String::from(
        "apiVersion: anumate.dev/v1\nkind: Capsule\nmetadata:\n  name: hundred-steps\nspec:\n  inputs:\n    order_id: {type: string, required: true}\n    amount: {type: integer, required: true}\n  tools: [http.get, http.post, payments.refund, email.send]\n  policies: [refund-limits, pii-masking]\n  steps:\n",
    );
    for i in 0..100 {
        let (tool, with) = match i % 4 {
            0 => ("http.get", "{url: \"https://x.example/${{ inputs.order_id }}/".to_string() + &i.to_string() + "\"}"),
            1 => ("http.post", format!("{{url: \"https://x.example/p/{i}\", body: {{n: {i}, id: \"${{{{ inputs.order_id }}}}\"}}}}")),
            2 => ("payments.refund", "{order_id: \"${{ inputs.order_id }}\", amount: \"${{ inputs.amount }}\", currency: INR}".to_string()),
            _ => ("email.send", "{to: \"ops@example.com\", template: t}".to_string()),
        };
        y.push_str(&format!(
            "    - id: s{i}\n      tool: {tool}\n      with: {with}\n"
        ));
        if i >= 4 {
            let up = i - 4;
            y.push_str(&format!("      needs: [s{up}]\n"));
            y.push_str(&format!(
                "      if: \"${{{{ steps.s{up}.output.status != 'failed' }}}}\"\n"
            ));
        }
        if i % 10 == 0 {
            y.push_str("      timeout: 5s\n      retry: {max_attempts: 3, backoff: exponential, initial: 200ms}\n");
        }
    }
    y
}

fn policies() -> Vec<ResolvedPolicy> {
    let split = POLICIES.find("policy \"pii-masking\"").unwrap();
    vec![
        ResolvedPolicy::new("refund-limits", 1, "sha256:aa", &POLICIES[..split]).unwrap(),
        ResolvedPolicy::new("pii-masking", 1, "sha256:bb", &POLICIES[split..]).unwrap(),
    ]
}

fn bench(c: &mut Criterion) {
    let yaml = capsule_yaml();
    let capsule = anumate_capsule::parse(&yaml, &anumate_capsule::Limits::default()).unwrap();
    assert_eq!(capsule.spec.steps.len(), 100);
    let (_, content_hash) = anumate_crypto::content_hash(&capsule.document);
    let catalogue = Catalogue::new(&[]).unwrap();
    let resolved = policies();
    let input = CompileInput {
        capsule: &capsule,
        capsule_version: 1,
        capsule_content_hash: &content_hash,
        policies: &resolved,
        catalogue: &catalogue,
        default_timeout: Duration::from_secs(30),
    };
    let plan = compile(&input).unwrap();
    assert_eq!(plan.steps.len(), 100);
    assert_eq!(plan.levels.len(), 25);

    let mut g = c.benchmark_group("compile_100_steps");
    g.bench_function("cold", |b| b.iter(|| compile(&input).unwrap()));
    g.bench_function("cold_with_yaml_parse", |b| {
        b.iter(|| {
            let capsule =
                anumate_capsule::parse(&yaml, &anumate_capsule::Limits::default()).unwrap();
            compile(&CompileInput {
                capsule: &capsule,
                ..input
            })
            .unwrap()
        })
    });

    // The cache-hit path on a real (SQLite) store: the first call stores the plan.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt.block_on(async {
        let cfg = anumate_store::StoreConfig {
            url: format!("sqlite://{}", dir.path().join("bench.db").display()),
            ..Default::default()
        };
        let store = anumate_store::Store::connect(&cfg).await.unwrap();
        store
            .migrate(&anumate_compiler::migrations())
            .await
            .unwrap();
        store
    });
    let _guard = rt.enter();
    let upstreams = Upstreams::lazy("http://127.0.0.1:1", "http://127.0.0.1:1").unwrap();
    let compiler = Compiler::new(store, upstreams, &CompilerConfig::default()).unwrap();
    let actor = Actor {
        tenant: "bench".into(),
        subject: "bench".into(),
        authorization: None,
        principal: None,
    };
    let cv = rpb::CapsuleVersion {
        name: "hundred-steps".into(),
        version: 1,
        source_yaml: yaml.clone(),
        content_hash: content_hash.clone(),
        ..Default::default()
    };
    let versions: Vec<ppb::PolicyVersion> = resolved
        .iter()
        .map(|p| ppb::PolicyVersion {
            name: p.name.clone(),
            version: p.version,
            content_hash: p.content_hash.clone(),
            source: p.source.clone(),
            ..Default::default()
        })
        .collect();
    let shared = std::sync::Arc::new(capsule.clone());
    let first = rt
        .block_on(compiler.compile_fetched(&actor, &cv, &shared, &versions, &[]))
        .unwrap();
    assert!(!first.cache_hit);
    g.bench_function("cached", |b| {
        b.iter(|| {
            let hit = rt
                .block_on(compiler.compile_fetched(&actor, &cv, &shared, &versions, &[]))
                .unwrap();
            assert!(hit.cache_hit);
            hit
        })
    });
    g.bench_function("stored_plan_lookup_sqlite", |b| {
        b.iter(|| {
            rt.block_on(compiler.get(&actor, &first.plan.plan_hash))
                .unwrap()
        })
    });
    g.finish();
    drop(_guard);
    rpc(c, &yaml);
}

/// The whole `Compile` RPC when the plan is already stored: client → auth →
/// compiler → registry `GetCapsule` and policy `GetPolicy` × 2 over loopback
/// gRPC (each verifying the forwarded token) → memo hit. One process, SQLite.
fn rpc(c: &mut Criterion, yaml: &str) {
    use anumate_auth::{AuthConfig, AuthLayer, Authenticator, BearerToken, DevIssuer, Role};
    use anumate_proto::compiler::v1 as pb;
    use std::sync::Arc;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::load_or_create(dir.path()).unwrap();
    let token = issuer
        .mint("bench", "bench", &[Role::Admin], Duration::from_secs(3600))
        .unwrap();
    let mut client = rt.block_on(async {
        let cfg = anumate_store::StoreConfig {
            url: format!("sqlite://{}", dir.path().join("rpc.db").display()),
            ..Default::default()
        };
        let store = anumate_store::Store::connect(&cfg).await.unwrap();
        let mut migrations = anumate_registry::migrations();
        migrations.extend(anumate_policy_service::REPO_MIGRATIONS.iter().copied());
        migrations.extend(anumate_compiler::REPO_MIGRATIONS.iter().copied());
        store.migrate(&migrations).await.unwrap();
        let auth = Authenticator::new(AuthConfig::default())
            .unwrap()
            .with_static_issuer(issuer.issuer(), issuer.jwks());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own = format!("http://{}", listener.local_addr().unwrap());
        let registry = anumate_registry::Registry::new(
            store.clone(),
            Arc::new(anumate_crypto::KeyRing::new(
                anumate_crypto::KeyPair::generate().unwrap(),
            )),
            &anumate_registry::RegistryConfig::default(),
        );
        let policies = anumate_policy_service::Policies::new(
            store.clone(),
            &anumate_policy_service::PolicyConfig::default(),
        );
        let compiler = Compiler::new(
            store,
            Upstreams::lazy(&own, &own).unwrap(),
            &CompilerConfig::default(),
        )
        .unwrap();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .layer(AuthLayer::new(
                    auth,
                    anumate_auth::AuthzTable::platform().unwrap(),
                ))
                .add_service(
                    anumate_registry::ToolsGrpc::new(registry.tools().clone()).into_server(),
                )
                .add_service(anumate_registry::RegistryGrpc::new(registry).into_server())
                .add_service(anumate_policy_service::PolicyGrpc::new(policies).into_server())
                .add_service(anumate_compiler::CompilerGrpc::new(compiler).into_server())
                .serve_with_incoming(nodelay(listener))
                .await
                .unwrap();
        });
        let channel = tonic::transport::Endpoint::from_shared(own)
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        let t = || BearerToken(token.clone());
        let split = POLICIES.find("policy \"pii-masking\"").unwrap();
        let mut pol =
            ppb::policy_service_client::PolicyServiceClient::with_interceptor(channel.clone(), t());
        for source in [&POLICIES[..split], &POLICIES[split..]] {
            pol.push_policy(ppb::PushPolicyRequest {
                source: source.into(),
                publish: true,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        rpb::registry_service_client::RegistryServiceClient::with_interceptor(channel.clone(), t())
            .push_capsule(rpb::PushCapsuleRequest {
                source_yaml: yaml.to_string(),
                publish: true,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut client =
            pb::compiler_service_client::CompilerServiceClient::with_interceptor(channel, t())
                .max_decoding_message_size(64 * 1024 * 1024);
        let first = client
            .compile(pb::CompileRequest {
                capsule_name: "hundred-steps".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!first.cache_hit);
        client
    });
    let mut g = c.benchmark_group("compile_100_steps_rpc");
    g.bench_function("cached_end_to_end", |b| {
        b.iter(|| {
            let r = rt
                .block_on(client.compile(pb::CompileRequest {
                    capsule_name: "hundred-steps".into(),
                    version: String::new(),
                }))
                .unwrap()
                .into_inner();
            assert!(r.cache_hit);
            r
        })
    });
    g.finish();
}

/// Accepted sockets with TCP_NODELAY, as `anumate` serves them (without it each
/// unary call waits ~40 ms for a delayed ACK).
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
