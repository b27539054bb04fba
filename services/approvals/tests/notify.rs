#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Approval webhooks against a real HTTP server on loopback, on SQLite and
//! PostgreSQL: a delivery recorded with the approval's transaction (and only
//! if it commits) is POSTed as Slack-compatible JSON with its secret header,
//! retried with backoff after a 500 until a 200, and recorded (attempts, last
//! status, delivered_at); a receiver that keeps failing is given up after
//! `max_attempts`, one that refuses the request (4xx) at once, an
//! unreachable one is retried with the error recorded.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anumate_approvals::notify::{self, Delivery, NotifyConfig};
use anumate_proto::approvals::v1 as pb;
use anumate_service::CancellationToken;
use anumate_testing::{Backend, Store, TestDb};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request the hook received.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A webhook receiver on loopback answering each request with the next
/// scripted status (the last one once the script runs out).
struct Hook {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hook {
    async fn start(script: &[u16]) -> Hook {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/approvals", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                let script = script.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut socket).await else {
                        return;
                    };
                    log.lock().unwrap().push(request);
                    let status = {
                        let mut s = script.lock().unwrap();
                        if s.len() > 1 {
                            s.pop_front().unwrap()
                        } else {
                            *s.front().unwrap()
                        }
                    };
                    let body = if status < 300 {
                        "ok"
                    } else {
                        "receiver says no"
                    };
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Hook {
            url,
            received,
            task,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

/// Reads one HTTP/1.1 request: headers, then `content-length` bytes of body.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while raw.len() < head_end + length {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let body = serde_json::from_slice(&raw[head_end..head_end + length]).ok()?;
    Some(Received {
        at: Instant::now(),
        headers,
        body,
    })
}

struct App {
    _db: TestDb,
    store: Store,
}

async fn spawn_app(backend: Backend) -> App {
    let mut migrations = anumate_receipts::migrations();
    migrations.extend(anumate_approvals::own_migrations());
    let (db, store) = anumate_testing::migrated_store(backend, &migrations).await;
    App { _db: db, store }
}

fn approval(id: &str) -> pb::Approval {
    pb::Approval {
        approval_id: id.into(),
        state: pb::ApprovalState::Pending as i32,
        run_id: "run-1".into(),
        step_id: "refund".into(),
        tool: "payments.refund".into(),
        requester: "user:oscar".into(),
        capsule: "refund-small-orders".into(),
        capsule_version: 2,
        args_sha256: format!("sha256:{}", "ab".repeat(32)),
        stages: vec![pb::ApprovalStage {
            name: "stage-1".into(),
            approvers: vec!["user:alice".into(), "group:controllers".into()],
            quorum: 2,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn config(hooks: &[&str]) -> NotifyConfig {
    NotifyConfig {
        webhooks: hooks.iter().map(|h| h.to_string()).collect(),
        secret_header: "x-anumate-webhook-secret".into(),
        secret: "s3cret".into(),
        approval_url: "https://console.example/approvals/{id}".into(),
        timeout_ms: 2_000,
        max_attempts: 3,
        backoff_ms: 150,
        max_backoff_ms: 1_000,
        poll_interval_ms: 20,
        ..NotifyConfig::default()
    }
}

/// Records `a`'s notification in a committed tenant transaction.
async fn enqueue(store: &Store, tenant: &str, config: &NotifyConfig, a: &pb::Approval) {
    let tx = store.write(tenant).await.unwrap();
    notify::enqueue(&tx, config, a).await.unwrap();
    tx.commit().await.unwrap();
}

async fn deliveries(store: &Store, tenant: &str, id: &str) -> Vec<Delivery> {
    let tx = store.read(tenant).await.unwrap();
    notify::deliveries(&tx, id).await.unwrap()
}

/// The supervised delivery task, running until the token is cancelled.
fn start(store: &Store, config: &NotifyConfig) -> CancellationToken {
    let cancel = CancellationToken::new();
    let task = notify::task(store.clone(), config.clone());
    let token = cancel.clone();
    tokio::spawn(async move { task(token).await.unwrap() });
    cancel
}

/// Waits until every delivery of `id` is settled (delivered or given up).
async fn settled(store: &Store, tenant: &str, id: &str) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = deliveries(store, tenant, id).await;
        if !all.is_empty()
            && all
                .iter()
                .all(|d| d.delivered_at.is_some() || d.failed_at.is_some())
        {
            return all;
        }
        assert!(Instant::now() < deadline, "not settled: {all:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn retried_after_a_500_until_delivered(app: App) {
    let hook = Hook::start(&[500, 200]).await;
    let cfg = config(&[&hook.url]);
    let a = approval("appr-1");
    enqueue(&app.store, "acme", &cfg, &a).await;
    let cancel = start(&app.store, &cfg);

    let all = settled(&app.store, "acme", "appr-1").await;
    cancel.cancel();
    assert_eq!(all.len(), 1);
    let d = &all[0];
    assert_eq!(d.kind, "requested");
    assert_eq!(d.attempts, 2);
    assert_eq!(d.last_status, Some(200));
    assert_eq!(d.last_error, None);
    assert!(d.delivered_at.is_some() && d.failed_at.is_none(), "{d:#?}");
    assert!(
        !d.webhook.contains("127.0.0.1"),
        "the URL is not stored: {d:#?}"
    );

    let got = hook.received();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert!(
        got[1].at.duration_since(got[0].at) >= Duration::from_millis(150),
        "the retry waited for the backoff"
    );
    for r in &got {
        assert_eq!(r.header("x-anumate-webhook-secret"), Some("s3cret"));
        assert_eq!(r.header("x-anumate-delivery"), Some(d.delivery_id.as_str()));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let body = &got[1].body;
    let text = body["text"].as_str().unwrap();
    assert!(
        text.starts_with(
            "Approval needed: refund-small-orders v2 calls payments.refund in run run-1 (step refund); 0 of 2 from user:alice, group:controllers"
        ),
        "{text}"
    );
    assert!(text.ends_with("https://console.example/approvals/appr-1"));
    let blocks = body["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["type"], "header");
    assert!(
        blocks
            .iter()
            .any(|b| b["elements"][0]["url"] == "https://console.example/approvals/appr-1"),
        "{blocks:#?}"
    );
    assert_eq!(body["anumate"]["tenant"], "acme");
    assert_eq!(body["anumate"]["approval_id"], "appr-1");

    // Another tenant sees none of it.
    assert!(deliveries(&app.store, "other", "appr-1").await.is_empty());

    // A second notification of the same stage is a reminder.
    enqueue(&app.store, "acme", &cfg, &a).await;
    let kinds: Vec<String> = deliveries(&app.store, "acme", "appr-1")
        .await
        .into_iter()
        .map(|d| d.kind)
        .collect();
    assert_eq!(kinds, vec!["requested", "reminder"]);

    // Past retention, settled deliveries go; pending ones stay.
    let notifier = notify::Notifier::new(app.store.clone(), cfg.clone()).unwrap();
    let later = anumate_store::now_micros() + 1;
    assert_eq!(notifier.purge_settled_before(later).await.unwrap(), 1);
    let left = deliveries(&app.store, "acme", "appr-1").await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].kind, "reminder");
    assert!(left[0].delivered_at.is_none());
}

async fn only_committed_pending_approvals_notify(app: App) {
    let hook = Hook::start(&[200]).await;
    let cfg = config(&[&hook.url]);

    // Rolled back with the change it belonged to: nothing recorded or sent.
    let tx = app.store.write("acme").await.unwrap();
    notify::enqueue(&tx, &cfg, &approval("appr-rolled-back"))
        .await
        .unwrap();
    drop(tx);
    // No webhook configured, or no longer pending: nothing either.
    enqueue(
        &app.store,
        "acme",
        &NotifyConfig::default(),
        &approval("appr-quiet"),
    )
    .await;
    let decided = pb::Approval {
        state: pb::ApprovalState::Approved as i32,
        ..approval("appr-decided")
    };
    enqueue(&app.store, "acme", &cfg, &decided).await;
    // A committed one, to know when the task has been through.
    enqueue(&app.store, "acme", &cfg, &approval("appr-ok")).await;

    let cancel = start(&app.store, &cfg);
    settled(&app.store, "acme", "appr-ok").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    for id in ["appr-rolled-back", "appr-quiet", "appr-decided"] {
        assert!(deliveries(&app.store, "acme", id).await.is_empty(), "{id}");
    }
    let got = hook.received();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0].body["anumate"]["approval_id"], "appr-ok");
}

async fn failing_receivers_are_given_up_and_recorded(app: App) {
    let down = Hook::start(&[503]).await;
    let refuses = Hook::start(&[400]).await;
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let cfg = NotifyConfig {
        backoff_ms: 20,
        ..config(&[&down.url, &refuses.url, &closed])
    };
    enqueue(&app.store, "acme", &cfg, &approval("appr-2")).await;
    let cancel = start(&app.store, &cfg);
    let all = settled(&app.store, "acme", "appr-2").await;
    cancel.cancel();
    assert_eq!(all.len(), 3, "one delivery per webhook");
    let mut by_status: Vec<(Option<i32>, i32, String)> = all
        .iter()
        .map(|d| {
            assert!(d.delivered_at.is_none() && d.failed_at.is_some(), "{d:#?}");
            (
                d.last_status,
                d.attempts,
                d.last_error.clone().unwrap_or_default(),
            )
        })
        .collect();
    by_status.sort();
    // Unreachable: retried to the limit, the transport error recorded.
    assert_eq!(by_status[0].0, Some(0));
    assert_eq!(by_status[0].1, 3);
    assert!(!by_status[0].2.is_empty());
    // 400: the receiver refuses the request itself; not retried.
    assert_eq!(by_status[1].0, Some(400));
    assert_eq!(by_status[1].1, 1);
    assert!(by_status[1].2.contains("receiver says no"), "{by_status:?}");
    // 503: retried to the limit.
    assert_eq!(by_status[2].0, Some(503));
    assert_eq!(by_status[2].1, 3);
    assert!(by_status[2].2.starts_with("HTTP 503"), "{by_status:?}");
    assert_eq!(down.received().len(), 3);
    assert_eq!(refuses.received().len(), 1);

    // A webhook removed from the configuration: its deliveries fail saying so.
    let hook = Hook::start(&[200]).await;
    let old = config(&[&hook.url]);
    enqueue(&app.store, "acme", &old, &approval("appr-3")).await;
    let cancel = start(&app.store, &config(&[&down.url]));
    let all = settled(&app.store, "acme", "appr-3").await;
    cancel.cancel();
    assert_eq!(
        all[0].last_error.as_deref(),
        Some("webhook is no longer configured")
    );
    assert!(hook.received().is_empty());
}

/// The service as the binary builds it (receipts in the same process), with
/// `[approvals.notify]` pointing at `hook`.
async fn serve(
    app: &App,
    hook: &Hook,
) -> (anumate_testing::ModuleServer, anumate_testing::DevAuth) {
    use anumate_service::{Context, KeysConfig, ServiceModule};
    let auth = anumate_testing::DevAuth::with_service_issuer("orchestrator");
    let modules: Vec<Box<dyn ServiceModule>> =
        vec![anumate_receipts::module(), anumate_approvals::module()];
    let listener = anumate_testing::bind().await;
    let own_url = format!("http://{}", listener.local_addr().unwrap());
    let ctx = Context::new(
        serde_json::json!({
            "approvals": {
                "timer_interval_ms": 50,
                "notify": {
                    "webhooks": [hook.url],
                    "approval_url": "https://console.example/t/{tenant}/approvals/{id}",
                    "poll_interval_ms": 20,
                    "backoff_ms": 50,
                },
            },
        }),
        Some(app.store.clone()),
        KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        },
        auth.dir.path().join("keys"),
        None,
        own_url,
    );
    let layers = anumate_testing::Layers::platform(
        anumate_testing::GrpcConfig::default(),
        auth.authenticator.clone(),
    )
    .unwrap();
    let server = anumate_testing::serve_modules(listener, &modules, ctx, layers).await;
    (server, auth)
}

/// Waits until the hook has received `n` requests.
async fn received(hook: &Hook, n: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = hook.received();
        if got.len() >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "{} of {n} received", got.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn opening_an_approval_notifies_and_reminds(app: App) {
    use anumate_auth::BearerToken;
    use pb::approvals_internal_client::ApprovalsInternalClient;
    let hook = Hook::start(&[200]).await;
    let (server, auth) = serve(&app, &hook).await;
    let token = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint("acme", Duration::from_secs(600))
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut orchestrator = ApprovalsInternalClient::with_interceptor(channel, BearerToken(token));
    let request = pb::RequestApprovalRequest {
        run_id: "run-9".into(),
        step_id: "refund".into(),
        plan_hash: format!("sha256:{}", "22".repeat(32)),
        args_sha256: format!("sha256:{}", "11".repeat(32)),
        tool: "payments.refund".into(),
        destructive: true,
        rule: Some(anumate_proto::policy::v1::PolicyRuleRef {
            policy: "refund-limits".into(),
            rule: "big-refunds".into(),
            ..Default::default()
        }),
        reason: "refunds above 1000 EUR".into(),
        requester: "user:rita".into(),
        stages: vec![pb::StageRequest {
            name: String::new(),
            approvers: vec!["group:controllers".into()],
            quorum: 2,
        }],
        capsule: "refunds".into(),
        capsule_version: 2,
        // Reminded one second after opening, a second before it expires.
        expires_after: Some(pbjson_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        remind_before: Some(pbjson_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    };
    let opened = orchestrator
        .request_approval(request.clone())
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    let id = opened.approval_id.clone();
    // Asking again (a retried call) opens nothing and notifies no one again.
    let again = orchestrator
        .request_approval(request)
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);

    let got = received(&hook, 2).await;
    server.stop().await;
    let kinds: Vec<&str> = got
        .iter()
        .map(|r| r.body["anumate"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["requested", "reminder"]);
    let first = &got[0].body;
    assert_eq!(first["anumate"]["approval_id"], id.as_str());
    assert_eq!(first["anumate"]["tenant"], "acme");
    assert_eq!(first["anumate"]["approvers"][0], "group:controllers");
    let text = first["text"].as_str().unwrap();
    assert!(
        text.starts_with(
            "Approval needed: refunds v2 calls payments.refund (destructive) in run run-9 (step refund); 0 of 2 from group:controllers; expires "
        ) && text.ends_with(&format!("https://console.example/t/acme/approvals/{id}")),
        "{text}"
    );
    assert!(
        got[1].body["text"]
            .as_str()
            .unwrap()
            .starts_with("Reminder: approval needed"),
        "{:?}",
        got[1].body
    );
    let recorded = deliveries(&app.store, "acme", &id).await;
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    assert!(
        recorded
            .iter()
            .all(|d| d.delivered_at.is_some() && d.attempts == 1)
    );
}

/// The orchestrator's and a user's clients of `server`.
async fn clients(
    server: &anumate_testing::ModuleServer,
    auth: &anumate_testing::DevAuth,
) -> (
    pb::approvals_internal_client::ApprovalsInternalClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            anumate_auth::BearerToken,
        >,
    >,
    pb::approvals_service_client::ApprovalsServiceClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            anumate_auth::BearerToken,
        >,
    >,
) {
    use anumate_auth::BearerToken;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let service = auth
        .services
        .as_ref()
        .unwrap()
        .for_service("orchestrator")
        .unwrap()
        .mint("acme", Duration::from_secs(600))
        .unwrap();
    let ann = auth
        .issuer
        .mint_with_groups(
            "acme",
            "user:ann",
            &[anumate_auth::Role::Approver],
            &[],
            Duration::from_secs(600),
        )
        .unwrap();
    (
        pb::approvals_internal_client::ApprovalsInternalClient::with_interceptor(
            channel.clone(),
            BearerToken(service),
        ),
        pb::approvals_service_client::ApprovalsServiceClient::with_interceptor(
            channel,
            BearerToken(ann),
        ),
    )
}

async fn later_stages_and_escalations_notify(app: App) {
    let hook = Hook::start(&[200]).await;
    let (server, auth) = serve(&app, &hook).await;
    let (mut orchestrator, mut ann) = clients(&server, &auth).await;
    let args = format!("sha256:{}", "11".repeat(32));
    let opened = orchestrator
        .request_approval(pb::RequestApprovalRequest {
            run_id: "run-7".into(),
            step_id: "refund".into(),
            plan_hash: format!("sha256:{}", "22".repeat(32)),
            args_sha256: args.clone(),
            tool: "payments.refund".into(),
            rule: Some(anumate_proto::policy::v1::PolicyRuleRef {
                policy: "refund-limits".into(),
                rule: "big-refunds".into(),
                ..Default::default()
            }),
            requester: "user:rita".into(),
            stages: vec![
                pb::StageRequest {
                    name: "team".into(),
                    approvers: vec!["user:ann".into()],
                    quorum: 1,
                },
                pb::StageRequest {
                    name: "finance".into(),
                    approvers: vec!["user:bob".into()],
                    quorum: 1,
                },
            ],
            escalate_to: vec!["user:boss".into()],
            // Each stage expires a second after it opens; no reminders.
            expires_after: Some(pbjson_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            remind_before: Some(pbjson_types::Duration::default()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    let id = opened.approval_id.clone();
    // Ann approves the first stage: the second opens and its approver is told.
    ann.approve(pb::ApproveRequest {
        approval_id: id.clone(),
        args_sha256: args,
        comment: "fine".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Bob lets it expire: it escalates to the boss, who is told; then it
    // expires for good, which tells nobody.
    let got = received(&hook, 3).await;
    let done = Instant::now() + Duration::from_secs(20);
    loop {
        let a = ann
            .get_approval(pb::GetApprovalRequest {
                approval_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .approval
            .unwrap();
        if a.state == pb::ApprovalState::Expired as i32 {
            break;
        }
        assert!(Instant::now() < done, "not expired: {a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = hook.received();
    server.stop().await;
    assert_eq!(after.len(), 3, "the final expiry notifies nobody");
    let what: Vec<(&str, &Value)> = got
        .iter()
        .map(|r| {
            (
                r.body["anumate"]["kind"].as_str().unwrap(),
                &r.body["anumate"]["approvers"][0],
            )
        })
        .collect();
    assert_eq!(
        what,
        vec![
            ("requested", &Value::from("user:ann")),
            ("requested", &Value::from("user:bob")),
            ("escalated", &Value::from("user:boss")),
        ]
    );
    let second = got[1].body["text"].as_str().unwrap();
    assert!(
        second.starts_with("Approval needed (stage 2 of 2): "),
        "{second}"
    );
    let third = got[2].body["text"].as_str().unwrap();
    assert!(
        third.starts_with("Approval escalated (stage 2 of 2): "),
        "{third}"
    );
    let recorded = deliveries(&app.store, "acme", &id).await;
    assert_eq!(recorded.len(), 3, "{recorded:#?}");
}

/// A configuration the notifier cannot use stops the module from being
/// built (so `anumate serve` / `dev` refuse to start), naming the setting.
async fn a_bad_notify_configuration_refuses_to_start(app: App) {
    use anumate_service::{Context, KeysConfig};
    let auth = anumate_testing::DevAuth::new();
    let cases = [
        (
            serde_json::json!({"webhooks": ["ftp://hooks.example/x"]}),
            "[approvals.notify]: INVALID_ARGUMENT: approvals.notify.webhooks: webhooks[0] must be http or https",
        ),
        (
            serde_json::json!({"webhooks": ["https://hooks.example/x"], "secret": "s3cret"}),
            "[approvals.notify]: INVALID_ARGUMENT: approvals.notify.secret: secret_header and secret go together: set both or neither",
        ),
        (
            serde_json::json!({"max_attempts": 0}),
            "[approvals.notify]: INVALID_ARGUMENT: approvals.notify.max_attempts: must be at least 1",
        ),
    ];
    for (notify, expected) in cases {
        let mut ctx = Context::new(
            serde_json::json!({"approvals": {"notify": notify}}),
            Some(app.store.clone()),
            KeysConfig {
                generate_missing: true,
                ..KeysConfig::default()
            },
            auth.dir.path().join("keys"),
            None,
            "http://127.0.0.1:1".into(),
        );
        let e = anumate_approvals::module().build(&mut ctx).unwrap_err();
        assert_eq!(e.to_string(), expected);
        assert!(!e.to_string().contains("s3cret"), "the secret is not shown");
    }
}

anumate_testing::on_both_backends! {
    retried_after_a_500_until_delivered => retried_after_a_500_until_delivered_sqlite, retried_after_a_500_until_delivered_postgres;
    only_committed_pending_approvals_notify => only_committed_pending_approvals_notify_sqlite, only_committed_pending_approvals_notify_postgres;
    failing_receivers_are_given_up_and_recorded => failing_receivers_are_given_up_and_recorded_sqlite, failing_receivers_are_given_up_and_recorded_postgres;
    opening_an_approval_notifies_and_reminds => opening_an_approval_notifies_and_reminds_sqlite, opening_an_approval_notifies_and_reminds_postgres;
    later_stages_and_escalations_notify => later_stages_and_escalations_notify_sqlite, later_stages_and_escalations_notify_postgres;
    a_bad_notify_configuration_refuses_to_start => a_bad_notify_configuration_refuses_to_start_sqlite, a_bad_notify_configuration_refuses_to_start_postgres;
}
