//! Tenant settings reads and writes as services and admins make them, on
//! SQLite and PostgreSQL: the in-process client's cached read (what GhostRun
//! and the orchestrator call per request in `anumate dev` / `serve all`),
//! `GetTenantSettings` over gRPC (TCP, auth layer; what a mesh service
//! calls) and `UpdateTenantSettings` over gRPC (the row, its event and the
//! notification in one transaction). Prints p50/p95/p99 per case.
//!
//! `cargo bench -p anumate-registry --bench settings` (PostgreSQL on
//! 127.0.0.1:5432 as the tests use it); `-- sqlite` or `-- postgres` runs one
//! backend.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anumate_auth::{BearerToken, Role};
use anumate_proto::registry::v1 as pb;
use anumate_registry::{TenantSettingsGrpc, TenantSettingsStore};
use anumate_service::clients::{Caller, TenantSettingsClient};
use anumate_testing::{self as testing, Backend, DevAuth};
use pb::tenant_settings_service_client::TenantSettingsServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Endpoint;

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label:<44} n={:<6} p50 {:>9.1?}  p95 {:>9.1?}  p99 {:>9.1?}",
        samples.len(),
        at(0.50),
        at(0.95),
        at(0.99)
    );
}

async fn run(backend: Backend) {
    let (_db, store) = testing::migrated_store(backend, &anumate_registry::migrations()).await;
    let settings = TenantSettingsStore::new(store);
    let cancel = CancellationToken::new();
    let followed = settings.clone();
    let token = cancel.clone();
    tokio::spawn(async move { followed.follow_changes(token).await });
    while !settings.cache_is_live() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let auth = DevAuth::new();
    let (addr, server) = testing::serve(
        auth.authenticator.clone(),
        Routes::new(TenantSettingsGrpc::new(settings.clone()).into_server()),
    )
    .await;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let jwt = auth
        .issuer
        .mint("bench", "admin", &[Role::Admin], Duration::from_secs(3600))
        .unwrap();
    let mut client = TenantSettingsServiceClient::with_interceptor(channel, BearerToken(jwt));
    let name = format!("{backend:?}").to_lowercase();

    let caller = Caller::Service {
        tenant: "bench".into(),
        service: "orchestrator",
    };
    let local: &dyn TenantSettingsClient = &settings;
    local.get_tenant_settings(&caller).await.unwrap();
    let mut samples = Vec::new();
    for _ in 0..100_000 {
        let t = Instant::now();
        local.get_tenant_settings(&caller).await.unwrap();
        samples.push(t.elapsed());
    }
    report(&format!("{name}: in-process get (cached)"), samples);

    let mut samples = Vec::new();
    for _ in 0..2_000 {
        let t = Instant::now();
        client
            .get_tenant_settings(pb::GetTenantSettingsRequest {})
            .await
            .unwrap();
        samples.push(t.elapsed());
    }
    report(&format!("{name}: GetTenantSettings over gRPC"), samples);

    let mut samples = Vec::new();
    for i in 0..500 {
        let request = pb::UpdateTenantSettingsRequest {
            settings: Some(pb::TenantSettings {
                run_retention: Some(pbjson_types::Duration {
                    seconds: 3600 * (24 + i % 48),
                    nanos: 0,
                }),
                ..Default::default()
            }),
            update_mask: Some(pbjson_types::FieldMask {
                paths: vec!["run_retention".into()],
            }),
            etag: String::new(),
        };
        let t = Instant::now();
        client.update_tenant_settings(request).await.unwrap();
        samples.push(t.elapsed());
    }
    report(&format!("{name}: UpdateTenantSettings over gRPC"), samples);

    cancel.cancel();
    server.abort();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let only = |b: &str| {
        !args.iter().any(|a| a == "sqlite" || a == "postgres") || args.iter().any(|a| a == b)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if only("sqlite") {
            run(Backend::Sqlite).await;
        }
        if only("postgres") {
            run(Backend::Postgres).await;
        }
    });
}
