#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Tenant settings driven like a client drives them: real gRPC over TCP,
//! behind the real authentication layer, on SQLite and PostgreSQL; the
//! services' client (in process and over gRPC); and on PostgreSQL two
//! registries over one database, where a change made through one reaches
//! the other's cache.

use std::net::SocketAddr;
use std::time::Duration;

use anumate_auth::{BearerToken, Role};
use anumate_errors::{ErrorCode, Reason};
use anumate_proto::events::v1 as ev;
use anumate_proto::registry::v1 as pb;
use anumate_registry::{TenantSettingsGrpc, TenantSettingsStore};
use anumate_service::clients::{Caller, Grpc, TenantSettings, TenantSettingsClient};
use anumate_testing::{
    self as testing, Backend, DevAuth, Store, TestDb, expect_error, expect_reason, on_both_backends,
};
use pb::tenant_settings_service_client::TenantSettingsServiceClient;
use pbjson_types::{Duration as PbDuration, FieldMask};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Client = TenantSettingsServiceClient<InterceptedService<Channel, BearerToken>>;

const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";
const ADMIN: &[Role] = &[Role::Admin];

struct TestApp {
    addr: SocketAddr,
    auth: DevAuth,
    store: Store,
    settings: TenantSettingsStore,
    server: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    _db: TestDb,
}

async fn spawn_app(backend: Backend) -> TestApp {
    let (db, store) = testing::migrated_store(backend, &anumate_registry::migrations()).await;
    let auth = DevAuth::with_service_issuer("orchestrator");
    let (settings, cancel) = follow(store.clone()).await;
    let routes = Routes::new(TenantSettingsGrpc::new(settings.clone()).into_server());
    let (addr, server) = testing::serve(auth.authenticator.clone(), routes).await;
    TestApp {
        addr,
        auth,
        store,
        settings,
        server,
        cancel,
        _db: db,
    }
}

/// A settings store following other processes' changes, once it serves
/// from memory.
async fn follow(store: Store) -> (TenantSettingsStore, CancellationToken) {
    let settings = TenantSettingsStore::new(store);
    let cancel = CancellationToken::new();
    let (followed, token) = (settings.clone(), cancel.clone());
    tokio::spawn(async move { followed.follow_changes(token).await });
    for _ in 0..500 {
        if settings.cache_is_live() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(settings.cache_is_live(), "cache never went live");
    (settings, cancel)
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.server.abort();
    }
}

impl TestApp {
    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self, tenant: &str, roles: &[Role]) -> Client {
        let token = self
            .auth
            .issuer
            .mint(tenant, "alice", roles, Duration::from_secs(300))
            .unwrap();
        TenantSettingsServiceClient::with_interceptor(self.channel().await, BearerToken(token))
    }

    /// The tenant's settings rows and outbox rows.
    async fn counts(&self, tenant: &str) -> (i64, i64) {
        let tx = self.store.read(tenant).await.unwrap();
        let mut n = [0i64; 2];
        for (i, table) in ["tenant_settings", "outbox"].iter().enumerate() {
            let row = tx
                .query_one(
                    &format!("SELECT COUNT(*) AS n FROM {table} WHERE tenant_id = $1"),
                    vec![tenant.into()],
                )
                .await
                .unwrap()
                .unwrap();
            n[i] = row.try_get("", "n").unwrap();
        }
        (n[0], n[1])
    }
}

fn secs(s: i64) -> Option<PbDuration> {
    Some(PbDuration {
        seconds: s,
        nanos: 0,
    })
}

fn update(
    settings: pb::TenantSettings,
    paths: &[&str],
    etag: &str,
) -> pb::UpdateTenantSettingsRequest {
    pb::UpdateTenantSettingsRequest {
        settings: Some(settings),
        update_mask: Some(FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }),
        etag: etag.into(),
    }
}

async fn get(c: &mut Client) -> pb::TenantSettings {
    c.get_tenant_settings(pb::GetTenantSettingsRequest {})
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap()
}

on_both_backends! {
    defaults_then_update => defaults_then_update_sqlite, defaults_then_update_postgres;
    etag_conflict => etag_conflict_sqlite, etag_conflict_postgres;
    only_admins_update => only_admins_update_sqlite, only_admins_update_postgres;
    bad_input_writes_nothing => bad_input_writes_nothing_sqlite, bad_input_writes_nothing_postgres;
    service_clients => service_clients_sqlite, service_clients_postgres;
}

/// A new tenant reads the defaults; an admin changes two fields; every role
/// reads them; the other fields keep their defaults; one event; the other
/// tenant still reads the defaults.
async fn defaults_then_update(app: TestApp) {
    for role in Role::ALL {
        let s = get(&mut app.client(TENANT_A, &[role]).await).await;
        assert_eq!(s.require_preflight, Some(true));
        assert_eq!(s.preflight_citation_ttl, secs(3600));
        assert_eq!(s.approval_default_expiry, secs(86400));
        assert_eq!(s.idempotency_retention, secs(86400));
        assert_eq!(s.run_retention, secs(30 * 86400));
        assert_eq!(s.etag, "r0");
        assert!(s.update_time.is_none());
    }
    assert_eq!(app.counts(TENANT_A).await, (0, 0), "a read writes nothing");

    let mut admin = app.client(TENANT_A, ADMIN).await;
    let changed = pb::TenantSettings {
        require_preflight: Some(false),
        preflight_citation_ttl: secs(1800),
        // Not in the mask: ignored.
        run_retention: secs(7200),
        ..Default::default()
    };
    let after = admin
        .update_tenant_settings(update(
            changed,
            &["require_preflight", "preflight_citation_ttl"],
            "r0",
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(after.require_preflight, Some(false));
    assert_eq!(after.preflight_citation_ttl, secs(1800));
    assert_eq!(after.run_retention, secs(30 * 86400));
    assert_eq!(after.etag, "r1");
    assert!(after.update_time.is_some());

    let read = get(&mut app.client(TENANT_A, &[Role::Auditor]).await).await;
    assert_eq!(read, after);
    assert_eq!(
        TenantSettings::from_proto(&read).preflight_citation_ttl,
        Duration::from_secs(1800)
    );

    let rows = {
        let tx = app.store.read(TENANT_A).await.unwrap();
        anumate_events::read_after(&tx, 0, 100).await.unwrap()
    };
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].topic, "anumate.tenants");
    assert_eq!(rows[0].aggregate_key, TENANT_A);
    let event = ev::TenantSettingsChanged::decode(rows[0].payload.as_slice()).unwrap();
    assert_eq!(
        event.changed_fields,
        vec!["require_preflight", "preflight_citation_ttl"]
    );
    assert_eq!(event.settings.as_ref(), Some(&after));
    assert_eq!(event.actor, "alice");

    // A duration named in the mask but left out goes back to its default.
    let reset = admin
        .update_tenant_settings(update(
            pb::TenantSettings::default(),
            &["preflight_citation_ttl"],
            "",
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(reset.preflight_citation_ttl, secs(3600));
    assert_eq!(
        reset.require_preflight,
        Some(false),
        "not in the mask: unchanged"
    );
    assert_eq!(reset.etag, "r2");

    // The other tenant never sees tenant A's settings.
    let other = get(&mut app.client(TENANT_B, ADMIN).await).await;
    assert_eq!(other.require_preflight, Some(true));
    assert_eq!(other.etag, "r0");
    assert_eq!(app.counts(TENANT_B).await, (0, 0));
}

/// A stale etag is refused with the current one, and nothing changes.
async fn etag_conflict(app: TestApp) {
    let mut admin = app.client(TENANT_A, ADMIN).await;
    let first = pb::TenantSettings {
        approval_default_expiry: secs(3600),
        ..Default::default()
    };
    admin
        .update_tenant_settings(update(first, &["approval_default_expiry"], "r0"))
        .await
        .unwrap();
    let stale = pb::TenantSettings {
        approval_default_expiry: secs(7200),
        ..Default::default()
    };
    let err = expect_error(
        admin
            .update_tenant_settings(update(stale, &["approval_default_expiry"], "r0"))
            .await,
        ErrorCode::EtagMismatch,
    );
    assert!(
        err.metadata
            .contains(&("current_etag".to_owned(), "r1".to_owned())),
        "{err:?}"
    );
    assert!(err.message.contains("etag is r1"), "{}", err.message);
    let now = get(&mut admin).await;
    assert_eq!(now.approval_default_expiry, secs(3600));
    assert_eq!(now.etag, "r1");
    assert_eq!(app.counts(TENANT_A).await, (1, 1));
}

/// Only admins update (authors, operators… are refused before anything is
/// read); the service keeps serving.
async fn only_admins_update(app: TestApp) {
    for role in [Role::Author, Role::Operator, Role::Approver, Role::Auditor] {
        let mut c = app.client(TENANT_A, &[role]).await;
        expect_reason(
            c.update_tenant_settings(update(
                pb::TenantSettings::default(),
                &["require_preflight"],
                "",
            ))
            .await,
            Reason::PermissionDenied,
        );
    }
    assert_eq!(app.counts(TENANT_A).await, (0, 0));
    assert_eq!(
        get(&mut app.client(TENANT_A, ADMIN).await)
            .await
            .require_preflight,
        Some(true)
    );
}

/// An empty mask, unknown paths, out-of-bounds and fractional durations:
/// precise errors naming the field, nothing written, still serving.
async fn bad_input_writes_nothing(app: TestApp) {
    let mut admin = app.client(TENANT_A, ADMIN).await;
    let some = pb::TenantSettings {
        require_preflight: Some(false),
        ..Default::default()
    };

    // Empty mask: never guessed.
    let err = expect_error(
        admin
            .update_tenant_settings(update(some.clone(), &[], ""))
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(err.violations.len(), 1);
    assert_eq!(err.violations[0].field, "update_mask");
    let err = expect_error(
        admin
            .update_tenant_settings(pb::UpdateTenantSettingsRequest {
                settings: Some(some.clone()),
                update_mask: None,
                etag: String::new(),
            })
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(err.violations[0].field, "update_mask");

    // Unknown paths: each named, the known one not applied either.
    let err = expect_error(
        admin
            .update_tenant_settings(update(
                some.clone(),
                &["require_preflight", "etag", "settings.run_retention"],
                "",
            ))
            .await,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(err.violations.len(), 2, "{err:?}");
    assert!(err.violations.iter().all(|v| v.field == "update_mask"));
    assert!(err.message.contains("\"etag\""), "{}", err.message);
    assert!(
        err.message.contains("\"settings.run_retention\""),
        "{}",
        err.message
    );

    // Values out of bounds, negative, fractional: every one named at once.
    let bad = pb::TenantSettings {
        preflight_citation_ttl: secs(59),
        approval_default_expiry: secs(31 * 86400),
        idempotency_retention: Some(PbDuration {
            seconds: 7200,
            nanos: 5,
        }),
        run_retention: secs(-1),
        ..Default::default()
    };
    let err = expect_error(
        admin
            .update_tenant_settings(update(
                bad,
                &[
                    "preflight_citation_ttl",
                    "approval_default_expiry",
                    "idempotency_retention",
                    "run_retention",
                    "require_preflight",
                ],
                "",
            ))
            .await,
        ErrorCode::InvalidArgument,
    );
    let fields: Vec<(&str, &str)> = err
        .violations
        .iter()
        .map(|v| (v.field.as_str(), v.description.as_str()))
        .collect();
    assert_eq!(
        fields,
        vec![
            (
                "settings.preflight_citation_ttl",
                "must be from 1m to 7d, got 59s"
            ),
            (
                "settings.approval_default_expiry",
                "must be from 1m to 30d, got 2678400s"
            ),
            ("settings.idempotency_retention", "must be whole seconds"),
            ("settings.run_retention", "must be from 1h to 400d, got -1s"),
        ]
    );

    assert_eq!(app.counts(TENANT_A).await, (0, 0), "nothing written");
    let s = get(&mut admin).await;
    assert_eq!(s.require_preflight, Some(true));
    assert_eq!(s.etag, "r0");

    // The bounds themselves are accepted.
    let edges = pb::TenantSettings {
        preflight_citation_ttl: secs(60),
        approval_default_expiry: secs(30 * 86400),
        idempotency_retention: secs(3600),
        run_retention: secs(400 * 86400),
        ..Default::default()
    };
    let s = admin
        .update_tenant_settings(update(
            edges,
            &[
                "preflight_citation_ttl",
                "approval_default_expiry",
                "idempotency_retention",
                "run_retention",
            ],
            "r0",
        ))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(s.preflight_citation_ttl, secs(60));
    assert_eq!(s.run_retention, secs(400 * 86400));
}

/// The services' client: in process (cached, dropped on change) and over
/// gRPC as a platform service, which the read rule admits.
async fn service_clients(app: TestApp) {
    let caller = Caller::Service {
        tenant: TENANT_A.into(),
        service: "orchestrator",
    };
    let local: &dyn TenantSettingsClient = &app.settings;
    assert_eq!(
        local.get_tenant_settings(&caller).await.unwrap(),
        TenantSettings::default()
    );
    let issuer = app.auth.services.clone().unwrap();
    let remote = Grpc::new(app.channel().await).with_service_issuer(issuer);
    assert_eq!(
        remote.get_tenant_settings(&caller).await.unwrap(),
        TenantSettings::default()
    );

    let mut admin = app.client(TENANT_A, ADMIN).await;
    admin
        .update_tenant_settings(update(
            pb::TenantSettings {
                run_retention: secs(86400),
                ..Default::default()
            },
            &["run_retention"],
            "",
        ))
        .await
        .unwrap();
    // The cached read saw the change at once (same process).
    let local_now = local.get_tenant_settings(&caller).await.unwrap();
    assert_eq!(local_now.run_retention, Duration::from_secs(86400));
    assert_eq!(local_now.etag, "r1");
    assert_eq!(
        remote.get_tenant_settings(&caller).await.unwrap(),
        local_now
    );

    // A service of another tenant reads its own tenant's defaults.
    let other = Caller::Service {
        tenant: TENANT_B.into(),
        service: "orchestrator",
    };
    assert_eq!(
        remote.get_tenant_settings(&other).await.unwrap(),
        TenantSettings::default()
    );
}

/// Two registries over one PostgreSQL database: a change made through one
/// reaches the other's cache (by notification).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_the_other_process_cache_postgres() {
    let app = spawn_app(Backend::Postgres).await;
    let (other, cancel) = follow(app.store.clone()).await;
    let caller = Caller::Service {
        tenant: TENANT_A.into(),
        service: "orchestrator",
    };
    // Cached in the other process.
    assert!(
        other
            .get_tenant_settings(&caller)
            .await
            .unwrap()
            .require_preflight
    );
    assert!(
        other
            .get_tenant_settings(&caller)
            .await
            .unwrap()
            .require_preflight
    );
    let mut admin = app.client(TENANT_A, ADMIN).await;
    admin
        .update_tenant_settings(update(
            pb::TenantSettings {
                require_preflight: Some(false),
                ..Default::default()
            },
            &["require_preflight"],
            "",
        ))
        .await
        .unwrap();
    let mut seen = None;
    for _ in 0..500 {
        let s = other.get_tenant_settings(&caller).await.unwrap();
        if !s.require_preflight {
            seen = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = seen.expect("the other process never saw the change");
    assert_eq!(seen.etag, "r1");
    cancel.cancel();
}
