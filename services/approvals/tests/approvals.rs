#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The approvals service driven like its users drive it: real gRPC over TCP,
//! behind the production layers (authentication, per-RPC authorization), the
//! receipts module in the same process receipting every decision, the timer
//! worker running, against SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use anumate_approvals::Approvals;
use anumate_auth::{BearerToken, Role};
use anumate_errors::{ErrorCode, Reason};
use anumate_proto::approvals::v1 as pb;
use anumate_proto::events::v1 as ev;
use anumate_proto::policy::v1::PolicyRuleRef;
use anumate_service::{Context, KeysConfig, ServiceModule};
use anumate_testing::{
    Backend, DevAuth, Layers, ModuleServer, Store, TestDb, expect_error, expect_reason,
    on_both_backends,
};
use pb::approvals_internal_client::ApprovalsInternalClient;
use pb::approvals_service_client::ApprovalsServiceClient;
use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type Authorized = InterceptedService<Channel, BearerToken>;

const TENANT: &str = "tenant-a";
const OTHER: &str = "tenant-b";
const ARGS: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const PLAN: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

struct App {
    server: Option<ModuleServer>,
    auth: DevAuth,
    store: Store,
    db: TestDb,
}

/// A caller's clients of both services.
struct Client {
    public: ApprovalsServiceClient<Authorized>,
    internal: ApprovalsInternalClient<Authorized>,
}

fn migrations() -> Vec<anumate_store::Migration> {
    let mut all = anumate_receipts::migrations();
    all.extend(anumate_approvals::own_migrations());
    all
}

async fn spawn_app(backend: Backend) -> App {
    let (db, store) = anumate_testing::migrated_store(backend, &migrations()).await;
    let auth = DevAuth::with_service_issuer("orchestrator");
    let mut app = App {
        server: None,
        auth,
        store,
        db,
    };
    app.server = Some(app.start(app.store.clone()).await);
    app
}

impl App {
    /// One more server (a replica, or the same after a restart) over `store`,
    /// built as the binary builds it.
    async fn start(&self, store: Store) -> ModuleServer {
        let modules: Vec<Box<dyn ServiceModule>> =
            vec![anumate_receipts::module(), anumate_approvals::module()];
        let listener = anumate_testing::bind().await;
        let own_url = format!("http://{}", listener.local_addr().unwrap());
        let keys = KeysConfig {
            generate_missing: true,
            ..KeysConfig::default()
        };
        let ctx = Context::new(
            serde_json::json!({
                "approvals": {
                    "timer_interval_ms": 50,
                    "watch_poll_ms": 100,
                    "max_watches_per_tenant": 2,
                },
            }),
            Some(store),
            keys,
            self.auth.dir.path().join("keys"),
            None,
            own_url,
        );
        let layers = Layers::platform(
            anumate_testing::GrpcConfig::default(),
            self.auth.authenticator.clone(),
        )
        .unwrap();
        anumate_testing::serve_modules(listener, &modules, ctx, layers).await
    }

    fn server(&self) -> &ModuleServer {
        self.server.as_ref().unwrap()
    }

    fn approvals(&self) -> Approvals {
        self.server().provided.get::<Approvals>().unwrap().clone()
    }

    async fn client_at(&self, server: &ModuleServer, token: String) -> Client {
        let channel = Endpoint::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Client {
            public: ApprovalsServiceClient::with_interceptor(
                channel.clone(),
                BearerToken(token.clone()),
            ),
            internal: ApprovalsInternalClient::with_interceptor(channel, BearerToken(token)),
        }
    }

    /// A user of `tenant` with `roles` and `groups`.
    async fn user_in(
        &self,
        tenant: &str,
        subject: &str,
        roles: &[Role],
        groups: &[&str],
    ) -> Client {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let token = self
            .auth
            .issuer
            .mint_with_groups(tenant, subject, roles, &groups, Duration::from_secs(600))
            .unwrap();
        self.client_at(self.server(), token).await
    }

    /// An approver of the main tenant.
    async fn approver(&self, subject: &str) -> Client {
        self.user_in(TENANT, subject, &[Role::Approver], &[]).await
    }

    /// The orchestrator's service identity in `tenant`.
    async fn orchestrator_in(&self, tenant: &str, server: &ModuleServer) -> Client {
        let token = self
            .auth
            .services
            .as_ref()
            .unwrap()
            .for_service("orchestrator")
            .unwrap()
            .mint(tenant, Duration::from_secs(600))
            .unwrap();
        self.client_at(server, token).await
    }

    async fn orchestrator(&self) -> Client {
        self.orchestrator_in(TENANT, self.server()).await
    }

    /// Outbox rows of the approvals topic, as (type, payload).
    async fn events(&self, tenant: &str) -> Vec<(String, Vec<u8>)> {
        let tx = self.store.read(tenant).await.unwrap();
        anumate_events::read_after(&tx, 0, 10_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.topic == "anumate.approvals")
            .map(|r| (r.event_type, r.payload))
            .collect()
    }

    async fn event_types(&self, tenant: &str) -> Vec<String> {
        self.events(tenant)
            .await
            .into_iter()
            .map(|(t, _)| {
                t.trim_start_matches("dev.anumate.approval.")
                    .trim_end_matches(".v1")
                    .to_owned()
            })
            .collect()
    }
}

fn rule() -> PolicyRuleRef {
    PolicyRuleRef {
        policy: "refund-limits".into(),
        policy_version: 3,
        rule: "big-refunds".into(),
        ..Default::default()
    }
}

fn stage(approvers: &[&str], quorum: i32) -> pb::StageRequest {
    pb::StageRequest {
        name: String::new(),
        approvers: approvers.iter().map(|s| s.to_string()).collect(),
        quorum,
    }
}

/// A request by the orchestrator for a run started by `user:rita`.
fn request(step: &str, stages: Vec<pb::StageRequest>) -> pb::RequestApprovalRequest {
    pb::RequestApprovalRequest {
        run_id: "run-1".into(),
        step_id: step.into(),
        plan_hash: PLAN.into(),
        args_sha256: ARGS.into(),
        tool: "payments.refund".into(),
        rule: Some(rule()),
        reason: "refunds above 1000 EUR".into(),
        requester: "user:rita".into(),
        stages,
        capsule: "refunds".into(),
        capsule_version: 2,
        ..Default::default()
    }
}

async fn open(app: &App, r: pb::RequestApprovalRequest) -> pb::Approval {
    let resp = app
        .orchestrator()
        .await
        .internal
        .request_approval(r)
        .await
        .unwrap()
        .into_inner();
    assert!(resp.created);
    resp.approval.unwrap()
}

fn approve(id: &str) -> pb::ApproveRequest {
    pb::ApproveRequest {
        approval_id: id.into(),
        args_sha256: ARGS.into(),
        comment: "looks right".into(),
        ..Default::default()
    }
}

fn reject(id: &str) -> pb::RejectRequest {
    pb::RejectRequest {
        approval_id: id.into(),
        comment: "no".into(),
        ..Default::default()
    }
}

fn state(a: &pb::Approval) -> pb::ApprovalState {
    pb::ApprovalState::try_from(a.state).unwrap()
}

async fn approved_by(c: &mut Client, id: &str) -> pb::Approval {
    c.public
        .approve(approve(id))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
}

async fn get(c: &mut Client, id: &str) -> pb::Approval {
    c.public
        .get_approval(pb::GetApprovalRequest {
            approval_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
}

/// Polls until `id` leaves `PENDING` or `timeout` passes.
async fn until_final(c: &mut Client, id: &str, timeout: Duration) -> pb::Approval {
    let start = Instant::now();
    loop {
        let a = get(c, id).await;
        if state(&a) != pb::ApprovalState::Pending || start.elapsed() > timeout {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kinds(a: &pb::Approval) -> Vec<pb::DecisionKind> {
    a.decisions
        .iter()
        .map(|d| pb::DecisionKind::try_from(d.kind).unwrap())
        .collect()
}

async fn two_of_three_and_a_late_third_vote(app: App) {
    let a = open(
        &app,
        request(
            "refund",
            vec![stage(&["user:ann", "user:bob", "user:cy"], 2)],
        ),
    )
    .await;
    assert_eq!(state(&a), pb::ApprovalState::Pending);
    assert_eq!(a.capsule, "refunds");
    assert_eq!(a.requester, "user:rita");
    assert!(a.expire_time.is_some());
    let mut ann = app.approver("user:ann").await;
    let mut bob = app.approver("user:bob").await;
    let mut cy = app.approver("user:cy").await;

    let after_ann = approved_by(&mut ann, &a.approval_id).await;
    assert_eq!(after_ann.stages[0].approved_count, 1);
    // A client retry is safe: the recorded decision comes back, no second vote.
    let retry = approved_by(&mut ann, &a.approval_id).await;
    assert_eq!(retry.stages[0].approved_count, 1);
    assert_eq!(retry.decisions.len(), 1);
    // A different decision by the same principal is refused.
    expect_reason(
        ann.public.reject(reject(&a.approval_id)).await,
        Reason::ApprovalAlreadyDecided,
    );

    let done = approved_by(&mut bob, &a.approval_id).await;
    assert_eq!(state(&done), pb::ApprovalState::Approved);
    assert!(done.decide_time.is_some());
    // Every decision is receipted.
    assert!(
        done.decisions.iter().all(|d| !d.receipt_id.is_empty()),
        "{:?}",
        done.decisions
    );

    // The third vote is late.
    expect_reason(
        cy.public.approve(approve(&a.approval_id)).await,
        Reason::ApprovalAlreadyDecided,
    );
    let events = app.events(TENANT).await;
    let types: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "dev.anumate.approval.requested.v1",
            "dev.anumate.approval.granted.v1"
        ]
    );
    let granted = ev::ApprovalGranted::decode(events[1].1.as_slice()).unwrap();
    assert_eq!(granted.approvers, ["user:ann", "user:bob"]);
    assert_eq!(granted.actor, "user:bob");
    assert_eq!(granted.args_sha256, ARGS);
    assert!(!granted.receipt_id.is_empty());
}

async fn ordered_stages(app: App) {
    let mut finance = stage(&["group:finance"], 2);
    finance.name = "finance".into();
    let a = open(
        &app,
        request("refund", vec![stage(&["user:ann"], 1), finance]),
    )
    .await;
    let requested =
        ev::ApprovalRequested::decode(app.events(TENANT).await[0].1.as_slice()).unwrap();
    // The event names every stage's approvers.
    assert_eq!(requested.stages.len(), 2);
    assert_eq!(requested.stages[1].approvers, ["group:finance"]);
    assert_eq!(requested.stages[1].quorum, 2);

    let mut fay = app
        .user_in(TENANT, "user:fay", &[Role::Approver], &["finance"])
        .await;
    let mut gus = app
        .user_in(TENANT, "user:gus", &[Role::Approver], &["finance"])
        .await;
    // Stage 2 is not open yet.
    expect_reason(
        fay.public.approve(approve(&a.approval_id)).await,
        Reason::NotAnApprover,
    );
    let mut ann = app.approver("user:ann").await;
    let after = approved_by(&mut ann, &a.approval_id).await;
    assert_eq!(after.current_stage, 1);
    assert!(after.stages[0].approved);
    assert!(
        after.stages[1].expire_time.is_some(),
        "stage 2's expiry starts as it opens"
    );
    let one = approved_by(&mut fay, &a.approval_id).await;
    assert_eq!(
        state(&one),
        pb::ApprovalState::Pending,
        "two distinct members are needed"
    );
    let done = approved_by(&mut gus, &a.approval_id).await;
    assert_eq!(state(&done), pb::ApprovalState::Approved);
    assert_eq!(done.current_stage, 2);
}

async fn separation_of_duties(app: App) {
    let mut r = request("refund", vec![stage(&["group:ops", "user:ann"], 1)]);
    r.exclude = vec!["user:carl".into()];
    let a = open(&app, r).await;
    // The run's starter, even as a member of an approver group, and the
    // excluded author are refused.
    for who in ["user:rita", "user:carl"] {
        let mut c = app.user_in(TENANT, who, &[Role::Approver], &["ops"]).await;
        expect_reason(
            c.public.approve(approve(&a.approval_id)).await,
            Reason::SelfApproval,
        );
        expect_reason(
            c.public.reject(reject(&a.approval_id)).await,
            Reason::SelfApproval,
        );
    }
    // Nor can anyone delegate to them.
    let mut ann = app.approver("user:ann").await;
    let err = expect_error(
        ann.public
            .delegate(pb::DelegateRequest {
                approval_id: a.approval_id.clone(),
                delegate_to: "user:rita".into(),
                ..Default::default()
            })
            .await,
        ErrorCode::InvalidArgument,
    );
    assert!(
        err.violations.iter().any(|v| v.field == "delegate_to"),
        "{err:?}"
    );
    let after = get(&mut ann, &a.approval_id).await;
    assert!(after.decisions.is_empty());
    assert_eq!(app.event_types(TENANT).await, ["requested"]);
}

async fn outsiders_are_refused(app: App) {
    let a = open(&app, request("refund", vec![stage(&["user:ann"], 1)])).await;
    let mut eve = app.approver("user:eve").await;
    let status = expect_reason(
        eve.public.approve(approve(&a.approval_id)).await,
        Reason::NotAnApprover,
    );
    assert_eq!(status.code.grpc_code(), tonic::Code::PermissionDenied);
    // A reader may read but not decide (the role check of the auth layer).
    let mut auditor = app.user_in(TENANT, "user:ann", &[Role::Auditor], &[]).await;
    expect_error(
        auditor.public.approve(approve(&a.approval_id)).await,
        ErrorCode::PermissionDenied,
    );
    assert_eq!(get(&mut auditor, &a.approval_id).await.decisions.len(), 0);
    // Nor may a user open approvals without the admin role.
    expect_error(
        eve.internal
            .request_approval(request("other", vec![stage(&["user:ann"], 1)]))
            .await,
        ErrorCode::PermissionDenied,
    );
    // Approve must name the arguments the approver saw.
    let mut ann = app.approver("user:ann").await;
    let mut wrong = approve(&a.approval_id);
    wrong.args_sha256 = PLAN.into();
    expect_reason(
        ann.public.approve(wrong).await,
        Reason::ApprovalArgsMismatch,
    );
    assert_eq!(
        state(&get(&mut ann, &a.approval_id).await),
        pb::ApprovalState::Pending
    );
    // One rejection rejects; PII in the comment is masked wherever it goes.
    let rejected = ann
        .public
        .reject(pb::RejectRequest {
            approval_id: a.approval_id.clone(),
            comment: "wrong customer, ask ann@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(state(&rejected), pb::ApprovalState::Rejected);
    let comment = &rejected.decisions[0].comment;
    assert!(
        comment.starts_with("wrong customer") && !comment.contains("ann@example.com"),
        "{comment}"
    );
    let events = app.events(TENANT).await;
    assert_eq!(events[1].0, "dev.anumate.approval.rejected.v1");
    let event = ev::ApprovalRejected::decode(events[1].1.as_slice()).unwrap();
    assert_eq!(&event.comment, comment);
    assert_eq!(event.actor, "user:ann");
}

async fn delegation_without_cycles(app: App) {
    let a = open(
        &app,
        request("refund", vec![stage(&["user:ann", "user:bob"], 2)]),
    )
    .await;
    let mut ann = app.approver("user:ann").await;
    let delegate = |id: &str, to: &str| pb::DelegateRequest {
        approval_id: id.into(),
        delegate_to: to.into(),
        comment: "on leave".into(),
        ..Default::default()
    };
    let after = ann
        .public
        .delegate(delegate(&a.approval_id, "user:dan"))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(after.stages[0].delegates, ["user:dan"]);
    assert_eq!(after.stages[0].delegated_away, ["user:ann"]);
    // Ann handed her place away.
    expect_reason(
        ann.public.approve(approve(&a.approval_id)).await,
        Reason::NotAnApprover,
    );
    // Dan cannot hand it back (a cycle) nor to Bob (already eligible).
    let mut dan = app.approver("user:dan").await;
    for to in ["user:ann", "user:bob"] {
        expect_error(
            dan.public.delegate(delegate(&a.approval_id, to)).await,
            ErrorCode::InvalidArgument,
        );
    }
    approved_by(&mut dan, &a.approval_id).await;
    let mut bob = app.approver("user:bob").await;
    let done = approved_by(&mut bob, &a.approval_id).await;
    assert_eq!(state(&done), pb::ApprovalState::Approved);
    assert_eq!(
        app.event_types(TENANT).await,
        ["requested", "delegated", "granted"]
    );
}

async fn expiry_escalates_then_expires(app: App) {
    let mut r = request("delete-account", vec![stage(&["user:ann", "user:bob"], 2)]);
    r.destructive = true;
    r.expires_after = Some(pbjson_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    r.escalate_to = vec!["user:boss".into()];
    let a = open(&app, r).await;
    let mut ann = app.approver("user:ann").await;
    approved_by(&mut ann, &a.approval_id).await;
    // After the first expiry the stage belongs to the escalation approvers.
    let start = Instant::now();
    let escalated = loop {
        let now = get(&mut ann, &a.approval_id).await;
        if now.escalated || start.elapsed() > Duration::from_secs(10) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(escalated.escalated, "{escalated:?}");
    assert_eq!(state(&escalated), pb::ApprovalState::Pending);
    assert_eq!(escalated.stages[0].approvers, ["user:boss"]);
    assert_eq!(escalated.stages[0].approved_count, 0, "a fresh round");
    // Bob is no approver any more.
    let mut bob = app.approver("user:bob").await;
    expect_reason(
        bob.public.approve(approve(&a.approval_id)).await,
        Reason::NotAnApprover,
    );
    // The second expiry ends it: never approved by a timer.
    let done = until_final(&mut ann, &a.approval_id, Duration::from_secs(10)).await;
    assert_eq!(state(&done), pb::ApprovalState::Expired);
    assert_eq!(
        kinds(&done),
        [
            pb::DecisionKind::Approve,
            pb::DecisionKind::Escalate,
            pb::DecisionKind::Expire
        ]
    );
    assert!(done.decisions.iter().all(|d| !d.receipt_id.is_empty()));
    assert_eq!(
        app.event_types(TENANT).await,
        ["requested", "escalated", "expired"]
    );
    let escalated_event =
        ev::ApprovalEscalated::decode(app.events(TENANT).await[1].1.as_slice()).unwrap();
    assert_eq!(escalated_event.escalate_to, ["user:boss"]);
    assert_eq!(escalated_event.quorum, 1);
    // Operators see the wait: an expired approval that was open two
    // expiries long (the process's series; other tests add to them).
    let exposition = anumate_service::metrics::Metrics::new().encode().unwrap();
    let sample = |series: &str| -> f64 {
        exposition
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        sample(r#"anumate_approval_wait_seconds_count{outcome="expired"}"#) >= 1.0,
        "{exposition}"
    );
    assert!(
        sample(r#"anumate_approval_wait_seconds_sum{outcome="expired"}"#) >= 2.0,
        "{exposition}"
    );
}

async fn a_restart_still_fires_a_pending_timer_once(mut app: App) {
    let mut r = request("refund", vec![stage(&["user:ann"], 1)]);
    r.expires_after = Some(pbjson_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let a = open(&app, r).await;
    // Stop before the expiry; start again (a new pool and worker) after it.
    app.server.take().unwrap().stop().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let store = Store::connect(&app.db.config).await.unwrap();
    app.server = Some(app.start(store).await);
    let mut ann = app.approver("user:ann").await;
    let done = until_final(&mut ann, &a.approval_id, Duration::from_secs(10)).await;
    assert_eq!(state(&done), pb::ApprovalState::Expired);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = get(&mut ann, &a.approval_id).await;
    assert_eq!(kinds(&again), [pb::DecisionKind::Expire]);
    assert_eq!(app.event_types(TENANT).await, ["requested", "expired"]);
}

async fn two_replicas_never_both_fire(app: App) {
    let replica = app
        .start(Store::connect(&app.db.config).await.unwrap())
        .await;
    let mut orchestrator = app.orchestrator_in(TENANT, &replica).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut r = request(&format!("step-{i}"), vec![stage(&["user:ann"], 1)]);
        r.expires_after = Some(pbjson_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        });
        let a = orchestrator
            .internal
            .request_approval(r)
            .await
            .unwrap()
            .into_inner();
        ids.push(a.approval.unwrap().approval_id);
    }
    let mut ann = app.approver("user:ann").await;
    for id in &ids {
        let done = until_final(&mut ann, id, Duration::from_secs(10)).await;
        assert_eq!(state(&done), pb::ApprovalState::Expired);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &ids {
        assert_eq!(
            kinds(&get(&mut ann, id).await),
            [pb::DecisionKind::Expire],
            "{id}"
        );
    }
    let types = app.event_types(TENANT).await;
    assert_eq!(types.iter().filter(|t| *t == "expired").count(), ids.len());
    replica.stop().await;
}

async fn another_tenant_sees_nothing(app: App) {
    let a = open(&app, request("refund", vec![stage(&["user:ann"], 1)])).await;
    let mut other = app.user_in(OTHER, "user:ann", &[Role::Approver], &[]).await;
    expect_reason(
        other
            .public
            .get_approval(pb::GetApprovalRequest {
                approval_id: a.approval_id.clone(),
            })
            .await,
        Reason::ApprovalNotFound,
    );
    expect_reason(
        other.public.approve(approve(&a.approval_id)).await,
        Reason::ApprovalNotFound,
    );
    let list = other
        .public
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.approvals.is_empty());
    let mut orchestrator = app.orchestrator_in(OTHER, app.server()).await;
    expect_reason(
        orchestrator
            .internal
            .cancel_approval(pb::CancelApprovalRequest {
                approval_id: a.approval_id.clone(),
                reason: "x".into(),
            })
            .await,
        Reason::ApprovalNotFound,
    );
    assert!(app.events(OTHER).await.is_empty());
    let mut ann = app.approver("user:ann").await;
    assert_eq!(
        state(&get(&mut ann, &a.approval_id).await),
        pb::ApprovalState::Pending
    );
}

async fn bad_input_writes_nothing(app: App) {
    let mut orchestrator = app.orchestrator().await;
    let cases: Vec<(&str, pb::RequestApprovalRequest)> = vec![
        ("stages[0].approvers", request("s", vec![stage(&[], 1)])),
        (
            "stages[0].quorum",
            request("s", vec![stage(&["user:ann", "user:bob"], 3)]),
        ),
        // The requester is no seat.
        (
            "stages[0].quorum",
            request("s", vec![stage(&["user:ann", "user:rita"], 2)]),
        ),
        (
            "stages[0].approvers[0]",
            request("s", vec![stage(&["ann"], 1)]),
        ),
        ("stages", request("s", vec![])),
        ("expires_after", {
            let mut r = request("s", vec![stage(&["user:ann"], 1)]);
            r.expires_after = Some(pbjson_types::Duration {
                seconds: -5,
                nanos: 0,
            });
            r
        }),
        ("args_sha256", {
            let mut r = request("s", vec![stage(&["user:ann"], 1)]);
            r.args_sha256 = "nope".into();
            r
        }),
        ("rule", {
            let mut r = request("s", vec![stage(&["user:ann"], 1)]);
            r.rule = None;
            r
        }),
        ("escalate_to", {
            let mut r = request("s", vec![stage(&["user:ann"], 1)]);
            r.escalate_to = vec!["user:rita".into()];
            r
        }),
    ];
    for (field, r) in cases {
        let err = expect_error(
            orchestrator.internal.request_approval(r).await,
            ErrorCode::InvalidArgument,
        );
        assert!(
            err.violations.iter().any(|v| v.field == field),
            "{field}: {err:?}"
        );
    }
    let mut ann = app.approver("user:ann").await;
    expect_reason(
        ann.public
            .get_approval(pb::GetApprovalRequest {
                approval_id: "0190f0e0-0000-7000-8000-000000000000".into(),
            })
            .await,
        Reason::ApprovalNotFound,
    );
    expect_reason(
        ann.public
            .approve(approve("0190f0e0-0000-7000-8000-000000000000"))
            .await,
        Reason::ApprovalNotFound,
    );
    // Nothing was written.
    let list = ann
        .public
        .list_approvals(pb::ListApprovalsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.approvals.is_empty());
    assert!(app.events(TENANT).await.is_empty());
    // And the service keeps serving.
    open(&app, request("s", vec![stage(&["user:ann"], 1)])).await;
}

async fn opening_is_idempotent_and_cancel_withdraws(app: App) {
    let a = open(&app, request("refund", vec![stage(&["user:ann"], 1)])).await;
    let mut orchestrator = app.orchestrator().await;
    let again = orchestrator
        .internal
        .request_approval(request("refund", vec![stage(&["user:bob"], 1)]))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.approval.unwrap().approval_id, a.approval_id);
    let cancel = pb::CancelApprovalRequest {
        approval_id: a.approval_id.clone(),
        reason: "run cancelled".into(),
    };
    let cancelled = orchestrator
        .internal
        .cancel_approval(cancel.clone())
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(state(&cancelled), pb::ApprovalState::Cancelled);
    assert_eq!(kinds(&cancelled), [pb::DecisionKind::Cancel]);
    // Cancelling again is a no-op; deciding is refused.
    orchestrator.internal.cancel_approval(cancel).await.unwrap();
    let mut ann = app.approver("user:ann").await;
    expect_reason(
        ann.public.approve(approve(&a.approval_id)).await,
        Reason::ApprovalAlreadyDecided,
    );
    assert_eq!(app.event_types(TENANT).await, ["requested", "cancelled"]);
}

async fn waiters_and_watchers_are_told(app: App) {
    let a = open(&app, request("refund", vec![stage(&["user:ann"], 1)])).await;
    let approvals = app.approvals();
    let id = a.approval_id.clone();
    let waiter = tokio::spawn(async move { approvals.wait(TENANT, &id).await });
    let mut watcher = app.user_in(TENANT, "user:viv", &[Role::Auditor], &[]).await;
    let mut stream = watcher
        .public
        .watch_approvals(pb::WatchApprovalsRequest {
            after_sequence: 0,
            run_id: "run-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Decide once the stream is open; "from now on" excludes the request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ann = app.approver("user:ann").await;
    approved_by(&mut ann, &a.approval_id).await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome.state, pb::ApprovalState::Approved);
    let change = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(change.event_type, "dev.anumate.approval.granted.v1");
    assert_eq!(
        state(&change.approval.unwrap()),
        pb::ApprovalState::Approved
    );
    // Resuming from before the grant replays it.
    let mut resumed = watcher
        .public
        .watch_approvals(pb::WatchApprovalsRequest {
            after_sequence: change.sequence - 1,
            run_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let replay = tokio::time::timeout(Duration::from_secs(5), resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(replay.sequence, change.sequence);
    expect_error(
        watcher
            .public
            .watch_approvals(pb::WatchApprovalsRequest {
                after_sequence: -1,
                run_id: String::new(),
            })
            .await,
        ErrorCode::InvalidArgument,
    );
}

async fn lists_filter_by_state_run_and_who_may_decide(app: App) {
    let a = open(&app, request("one", vec![stage(&["user:ann"], 1)])).await;
    let b = open(&app, request("two", vec![stage(&["group:ops"], 1)])).await;
    let mut other_run = request("three", vec![stage(&["user:bob"], 1)]);
    other_run.run_id = "run-2".into();
    open(&app, other_run).await;
    let mut ann = app
        .user_in(TENANT, "user:ann", &[Role::Approver], &["ops"])
        .await;
    let reader = ann.public.clone();
    let list = |r: pb::ListApprovalsRequest| {
        let mut c = reader.clone();
        async move { c.list_approvals(r).await.unwrap().into_inner() }
    };
    let mine = list(pb::ListApprovalsRequest {
        actionable_by_me: true,
        ..Default::default()
    })
    .await;
    let ids: Vec<&str> = mine
        .approvals
        .iter()
        .map(|x| x.approval_id.as_str())
        .collect();
    assert_eq!(
        ids,
        [b.approval_id.as_str(), a.approval_id.as_str()],
        "newest first"
    );
    approved_by(&mut ann, &a.approval_id).await;
    let run1 = list(pb::ListApprovalsRequest {
        run_id: "run-1".into(),
        state: pb::ApprovalState::Pending as i32,
        ..Default::default()
    })
    .await;
    assert_eq!(run1.approvals.len(), 1);
    let paged = list(pb::ListApprovalsRequest {
        page_size: 2,
        ..Default::default()
    })
    .await;
    assert_eq!(paged.approvals.len(), 2);
    let rest = list(pb::ListApprovalsRequest {
        page_size: 2,
        page_token: paged.next_page_token.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(rest.approvals.len(), 1);
    assert!(rest.next_page_token.is_empty());
    let mut c = ann.public.clone();
    expect_error(
        c.list_approvals(pb::ListApprovalsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        ErrorCode::InvalidArgument,
    );
}

/// Votes racing on one approval (a retried call among them) count once
/// each: quorum is reached exactly once, every counted vote is receipted,
/// one grant is evented, and a vote that came too late is told so.
async fn racing_votes_count_once(app: App) {
    let voters = ["user:ann", "user:bob", "user:cy", "user:dee", "user:eve"];
    let a = open(&app, request("refund", vec![stage(&voters, 2)])).await;
    let mut calls = Vec::new();
    // Ann's call is sent twice, as a client retrying it would.
    for voter in voters.iter().chain(["user:ann"].iter()) {
        let mut c = app.approver(voter).await;
        let id = a.approval_id.clone();
        calls.push(tokio::spawn(
            async move { c.public.approve(approve(&id)).await },
        ));
    }
    let mut late = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(status) => {
                expect_reason(Err::<(), _>(status), Reason::ApprovalAlreadyDecided);
                late += 1;
            }
        }
    }
    let done = get(&mut app.approver("user:ann").await, &a.approval_id).await;
    assert_eq!(state(&done), pb::ApprovalState::Approved);
    assert_eq!(kinds(&done), [pb::DecisionKind::Approve; 2]);
    assert!(
        late >= 3,
        "at most the two counted votes and a retry succeed"
    );
    let receipts: std::collections::HashSet<&str> = done
        .decisions
        .iter()
        .map(|d| d.receipt_id.as_str())
        .collect();
    assert_eq!(receipts.len(), 2);
    assert!(!receipts.contains(""));
    assert_eq!(app.event_types(TENANT).await, ["requested", "granted"]);
}

on_both_backends! {
    two_of_three_and_a_late_third_vote => quorum_sqlite, quorum_postgres;
    racing_votes_count_once => race_sqlite, race_postgres;
    ordered_stages => stages_sqlite, stages_postgres;
    separation_of_duties => sod_sqlite, sod_postgres;
    outsiders_are_refused => outsiders_sqlite, outsiders_postgres;
    delegation_without_cycles => delegation_sqlite, delegation_postgres;
    expiry_escalates_then_expires => expiry_sqlite, expiry_postgres;
    a_restart_still_fires_a_pending_timer_once => restart_sqlite, restart_postgres;
    two_replicas_never_both_fire => replicas_sqlite, replicas_postgres;
    another_tenant_sees_nothing => tenants_sqlite, tenants_postgres;
    bad_input_writes_nothing => bad_input_sqlite, bad_input_postgres;
    opening_is_idempotent_and_cancel_withdraws => idempotent_sqlite, idempotent_postgres;
    waiters_and_watchers_are_told => nudge_sqlite, nudge_postgres;
    lists_filter_by_state_run_and_who_may_decide => lists_sqlite, lists_postgres;
}

/// A clock a test moves by hand.
struct ManualClock(std::sync::atomic::AtomicI64);

impl anumate_approvals::Clock for ManualClock {
    fn now_micros(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The default 24 h expiry, on an injected clock: nothing fires before it,
/// the expiry fires once after it (the worker driven by hand).
async fn default_expiry_on_an_injected_clock(app: App) {
    const HOUR: i64 = 3_600_000_000;
    let clock = std::sync::Arc::new(ManualClock(std::sync::atomic::AtomicI64::new(
        anumate_store::now_micros(),
    )));
    let start = clock.now_micros_value();
    let approvals = Approvals::new(
        app.store.clone(),
        anumate_approvals::ApprovalsConfig::default(),
    )
    .with_clock(clock.clone());
    let caller = anumate_approvals::Caller {
        tenant: TENANT.into(),
        principal: "svc:orchestrator".into(),
        groups: Vec::new(),
        service: true,
    };
    let (a, created) = approvals
        .request(&caller, &request("clock", vec![stage(&["user:ann"], 1)]))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(
        a.expire_time.unwrap().seconds,
        (start + 24 * HOUR).div_euclid(1_000_000)
    );
    // 21 h on: only the reminder (4 h before expiry) is due.
    clock.set(start + 21 * HOUR);
    assert_eq!(approvals.fire_due().await.unwrap(), 1);
    let a_now = approvals.get(TENANT, &a.approval_id).await.unwrap();
    assert_eq!(state(&a_now), pb::ApprovalState::Pending);
    clock.set(start + 24 * HOUR);
    assert_eq!(approvals.fire_due().await.unwrap(), 1);
    assert_eq!(approvals.fire_due().await.unwrap(), 0, "fired once");
    let done = approvals.get(TENANT, &a.approval_id).await.unwrap();
    assert_eq!(state(&done), pb::ApprovalState::Expired);
    assert_eq!(kinds(&done), [pb::DecisionKind::Expire]);
}

impl ManualClock {
    fn now_micros_value(&self) -> i64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set(&self, micros: i64) {
        self.0.store(micros, std::sync::atomic::Ordering::SeqCst);
    }
}

on_both_backends! {
    default_expiry_on_an_injected_clock => clock_sqlite, clock_postgres;
}

/// One tenant cannot take every watch stream; a closed stream gives its
/// place back.
async fn watches_are_limited_per_tenant(app: App) {
    let watch = || pb::WatchApprovalsRequest {
        after_sequence: 0,
        run_id: String::new(),
    };
    let mut viv = app.user_in(TENANT, "user:viv", &[Role::Auditor], &[]).await;
    let first = viv.public.watch_approvals(watch()).await.unwrap();
    let _second = viv.public.watch_approvals(watch()).await.unwrap();
    expect_reason(
        viv.public.watch_approvals(watch()).await,
        Reason::RateLimited,
    );
    let mut other = app.user_in(OTHER, "user:viv", &[Role::Auditor], &[]).await;
    other.public.watch_approvals(watch()).await.unwrap();
    drop(first);
    let start = Instant::now();
    loop {
        match viv.public.watch_approvals(watch()).await {
            Ok(_) => break,
            Err(e) if start.elapsed() < Duration::from_secs(5) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the closed stream's place never came back: {e:?}"),
        }
    }
}

on_both_backends! {
    watches_are_limited_per_tenant => watch_limit_sqlite, watch_limit_postgres;
}

/// A receipts service that is down.
struct ReceiptsDown;

impl anumate_service::clients::ReceiptsClient for ReceiptsDown {
    fn append_receipt<'a>(
        &'a self,
        _caller: &'a anumate_service::clients::Caller,
        _request: anumate_proto::receipts::v1::AppendReceiptRequest,
    ) -> anumate_service::clients::BoxFuture<
        'a,
        anumate_service::clients::UpstreamResult<
            anumate_proto::receipts::v1::AppendReceiptResponse,
        >,
    > {
        Box::pin(async {
            Err(anumate_service::clients::UpstreamError::Local(
                anumate_errors::Error::new(ErrorCode::Unavailable, "receipts are down"),
            ))
        })
    }
}

/// An expiry that cannot be receipted does not happen, and its timer is
/// kept: it fires once the receipts service is back.
async fn an_unreceipted_expiry_is_retried(app: App) {
    const HOUR: i64 = 3_600_000_000;
    let now = anumate_store::now_micros();
    let clock = std::sync::Arc::new(ManualClock(std::sync::atomic::AtomicI64::new(now)));
    let cfg = anumate_approvals::ApprovalsConfig {
        remind_before_secs: 0,
        ..Default::default()
    };
    let down = Approvals::new(app.store.clone(), cfg.clone())
        .with_clock(clock.clone())
        .with_receipts(std::sync::Arc::new(ReceiptsDown));
    let caller = anumate_approvals::Caller {
        tenant: TENANT.into(),
        principal: "svc:orchestrator".into(),
        groups: Vec::new(),
        service: true,
    };
    let (a, _) = down
        .request(&caller, &request("retry", vec![stage(&["user:ann"], 1)]))
        .await
        .unwrap();
    clock.set(now + 25 * HOUR);
    assert_eq!(down.fire_due().await.unwrap(), 0);
    let still = down.get(TENANT, &a.approval_id).await.unwrap();
    assert_eq!(state(&still), pb::ApprovalState::Pending);
    assert!(still.decisions.is_empty());
    // The same decision by an approver is refused as unavailable too.
    let ann = anumate_approvals::Caller {
        tenant: TENANT.into(),
        principal: "user:ann".into(),
        groups: Vec::new(),
        service: false,
    };
    let err = down
        .decide(
            &ann,
            &a.approval_id,
            anumate_approvals::rules::Action::Reject,
            "",
            "",
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable);
    let back = Approvals::new(app.store.clone(), cfg).with_clock(clock.clone());
    assert_eq!(back.fire_due().await.unwrap(), 1);
    let done = back.get(TENANT, &a.approval_id).await.unwrap();
    assert_eq!(state(&done), pb::ApprovalState::Expired);
}

on_both_backends! {
    an_unreceipted_expiry_is_retried => receipts_down_sqlite, receipts_down_postgres;
}

/// The tenant's receipts as (leaf index, leaf hash, receipt id), in log order.
async fn receipt_leaves(store: &Store, tenant: &str) -> Vec<(i64, String, String)> {
    let tx = store.read(tenant).await.unwrap();
    tx.query_all(
        "SELECT leaf_index, leaf_hash, receipt_id FROM receipts WHERE tenant_id = $1 \
         ORDER BY leaf_index",
        vec![tenant.into()],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.try_get("", "leaf_index").unwrap(),
            r.try_get("", "leaf_hash").unwrap(),
            r.try_get("", "receipt_id").unwrap(),
        )
    })
    .collect()
}

/// The log has no gap, and the checkpoint the receipts service publishes
/// (from its stored tree) has the root of the stored leaves.
async fn assert_log_consistent(app: &App, tenant: &str) {
    let leaves = receipt_leaves(&app.store, tenant).await;
    for (i, (index, _, _)) in leaves.iter().enumerate() {
        assert_eq!(*index, i as i64, "leaf indexes have no gap");
    }
    let tree = anumate_receipt::Tree::from_leaf_hashes(
        leaves
            .iter()
            .map(|(_, h, _)| <[u8; 32]>::try_from(hex::decode(h).unwrap()).unwrap()),
    );
    let receipts = app
        .server()
        .provided
        .get::<anumate_receipts::Receipts>()
        .unwrap()
        .clone();
    receipts.publish_checkpoint(tenant).await.unwrap();
    let reader = anumate_receipts::Actor {
        tenant: tenant.into(),
        subject: "user:auditor".into(),
        service: None,
    };
    let cp = receipts
        .checkpoint(&reader, leaves.len() as i64)
        .await
        .unwrap();
    assert_eq!(
        cp.root_hash,
        tree.root().to_vec(),
        "the stored tree is the leaves'"
    );
}

/// Installs (or removes) a trigger that makes storing a grant fail, as a
/// database error in the decision's transaction would.
async fn fail_grants(app: &App, on: bool) {
    use sea_orm::ConnectionTrait as _;
    let owner = app.store.connect_owner().await.unwrap();
    let sql: &[&str] = match (app.store.backend(), on) {
        (anumate_store::Backend::Postgres, true) => &[
            "CREATE FUNCTION test_refuse_grant() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'injected: the grant fails'; END $$",
            "CREATE TRIGGER test_refuse_grant BEFORE UPDATE ON approvals FOR EACH ROW \
             WHEN (NEW.state = 2) EXECUTE FUNCTION test_refuse_grant()",
        ],
        (anumate_store::Backend::Postgres, false) => {
            &["DROP TRIGGER test_refuse_grant ON approvals"]
        }
        (anumate_store::Backend::Sqlite, true) => &[
            "CREATE TRIGGER test_refuse_grant BEFORE UPDATE ON approvals WHEN NEW.state = 2 \
             BEGIN SELECT RAISE(ABORT, 'injected: the grant fails'); END",
        ],
        (anumate_store::Backend::Sqlite, false) => &["DROP TRIGGER test_refuse_grant"],
    };
    for s in sql {
        owner.execute_unprepared(s).await.unwrap();
    }
}

/// The receipt is appended in the decision's own transaction: a decision
/// whose transaction fails leaves no receipt (and no leaf taken), and the
/// next decision is appended where the failed one would have been.
async fn a_failed_decision_leaves_no_receipt(app: App) {
    let a = open(&app, request("refund", vec![stage(&["user:ann"], 1)])).await;
    let b = open(&app, request("refund-2", vec![stage(&["user:bob"], 1)])).await;
    // One receipted decision first, so the log's head is known in process.
    let mut bob = app.approver("user:bob").await;
    approved_by(&mut bob, &b.approval_id).await;
    let before = receipt_leaves(&app.store, TENANT).await;
    assert_eq!(before.len(), 1);

    fail_grants(&app, true).await;
    let mut ann = app.approver("user:ann").await;
    let err = ann.public.approve(approve(&a.approval_id)).await;
    assert!(err.is_err(), "the grant's transaction fails");
    assert_eq!(receipt_leaves(&app.store, TENANT).await, before);
    let still = get(&mut ann, &a.approval_id).await;
    assert_eq!(state(&still), pb::ApprovalState::Pending);
    assert!(still.decisions.is_empty());
    assert_eq!(
        app.event_types(TENANT).await,
        ["requested", "requested", "granted"]
    );

    // Once storing works again, the decision commits with its one receipt.
    fail_grants(&app, false).await;
    let done = approved_by(&mut ann, &a.approval_id).await;
    assert_eq!(state(&done), pb::ApprovalState::Approved);
    let after = receipt_leaves(&app.store, TENANT).await;
    assert_eq!(after.len(), 2);
    assert_eq!(after[1].2, done.decisions[0].receipt_id);
    assert_log_consistent(&app, TENANT).await;
}

/// A receipts service reached as a remote one (only `AppendReceipt`, no
/// shared transaction), as in a mesh.
struct Remote(anumate_receipts::Receipts);

impl anumate_service::clients::ReceiptsClient for Remote {
    fn append_receipt<'a>(
        &'a self,
        caller: &'a anumate_service::clients::Caller,
        request: anumate_proto::receipts::v1::AppendReceiptRequest,
    ) -> anumate_service::clients::BoxFuture<
        'a,
        anumate_service::clients::UpstreamResult<
            anumate_proto::receipts::v1::AppendReceiptResponse,
        >,
    > {
        anumate_service::clients::ReceiptsClient::append_receipt(&self.0, caller, request)
    }
}

/// With a remote receipts service the receipt is appended before the
/// decision commits, and every decision is still receipted once.
async fn a_remote_receipts_service_receipts_first(app: App) {
    let receipts = app
        .server()
        .provided
        .get::<anumate_receipts::Receipts>()
        .unwrap()
        .clone();
    let remote = Approvals::new(app.store.clone(), Default::default())
        .with_receipts(std::sync::Arc::new(Remote(receipts)));
    let orchestrator = anumate_approvals::Caller {
        tenant: TENANT.into(),
        principal: "svc:orchestrator".into(),
        groups: Vec::new(),
        service: true,
    };
    let (a, _) = remote
        .request(
            &orchestrator,
            &request("remote", vec![stage(&["user:ann", "user:bob"], 2)]),
        )
        .await
        .unwrap();
    for who in ["user:ann", "user:bob"] {
        let caller = anumate_approvals::Caller {
            tenant: TENANT.into(),
            principal: who.into(),
            groups: Vec::new(),
            service: false,
        };
        remote
            .decide(
                &caller,
                &a.approval_id,
                anumate_approvals::rules::Action::Approve { args_sha256: ARGS },
                "ok",
                "",
            )
            .await
            .unwrap();
    }
    let done = remote.get(TENANT, &a.approval_id).await.unwrap();
    assert_eq!(state(&done), pb::ApprovalState::Approved);
    let leaves = receipt_leaves(&app.store, TENANT).await;
    let ids: Vec<&str> = done
        .decisions
        .iter()
        .map(|d| d.receipt_id.as_str())
        .collect();
    assert_eq!(
        leaves
            .iter()
            .map(|(_, _, id)| id.as_str())
            .collect::<Vec<_>>(),
        ids
    );
    assert_log_consistent(&app, TENANT).await;
}

on_both_backends! {
    a_failed_decision_leaves_no_receipt => failed_decision_sqlite, failed_decision_postgres;
    a_remote_receipts_service_receipts_first => remote_receipts_sqlite, remote_receipts_postgres;
}

/// A decision whose receipt an earlier attempt already appended (the same
/// content, as a receipt appended before a commit that then failed leaves
/// it) names that receipt: the log gets no second one for it.
async fn an_earlier_attempts_receipt_is_reused(app: App) {
    let a = open(&app, request("refund", vec![stage(&["user:ann"], 1)])).await;
    // The earlier attempt: ann's approval as the service would plan it,
    // receipted, never committed.
    let body: String = app
        .store
        .read(TENANT)
        .await
        .unwrap()
        .query_one(
            "SELECT body FROM approvals WHERE tenant_id = $1 AND approval_id = $2",
            vec![TENANT.into(), a.approval_id.as_str().into()],
        )
        .await
        .unwrap()
        .unwrap()
        .try_get("", "body")
        .unwrap();
    let mut planned: anumate_approvals::rules::Approval = serde_json::from_str(&body).unwrap();
    anumate_approvals::rules::decide(
        &mut planned,
        anumate_approvals::rules::Decider {
            principal: "user:ann",
            groups: &[],
        },
        &anumate_approvals::rules::Action::Approve { args_sha256: ARGS },
        "looks right",
        "",
        anumate_store::now_micros(),
    )
    .unwrap();
    let receipts = app
        .server()
        .provided
        .get::<anumate_receipts::Receipts>()
        .unwrap()
        .clone();
    let earlier = anumate_service::clients::append_receipt_first(
        &receipts,
        &anumate_approvals::receipting::caller(TENANT),
        anumate_approvals::receipting::request(&planned).unwrap(),
        ("the decision's receipt", "nothing was decided"),
    )
    .await
    .unwrap();
    let before = receipt_leaves(&app.store, TENANT).await;

    let done = approved_by(&mut app.approver("user:ann").await, &a.approval_id).await;
    assert_eq!(state(&done), pb::ApprovalState::Approved);
    assert_eq!(done.decisions[0].receipt_id, earlier);
    assert_eq!(receipt_leaves(&app.store, TENANT).await, before);
    let (_, payload) = app
        .events(TENANT)
        .await
        .into_iter()
        .find(|(t, _)| t.contains("granted"))
        .unwrap();
    let granted = ev::ApprovalGranted::decode(payload.as_slice()).unwrap();
    assert_eq!(granted.receipt_id, earlier);
    assert_log_consistent(&app, TENANT).await;
}

on_both_backends! {
    an_earlier_attempts_receipt_is_reused => earlier_receipt_sqlite, earlier_receipt_postgres;
}
