//! The data read under load, written through the real API as a user and
//! the platform's services would: capsules pushed (and published with the push), a plan
//! compiled, a receipt appended (as `svc:orchestrator`), and a capability
//! token issued right before each `VerifyToken` run (they live five minutes
//! at most).

use std::time::Duration;

use anumate_proto::captokens::v1 as captokens;
use anumate_proto::compiler::v1 as compiler;
use anumate_proto::receipts::v1 as receipts;
use anumate_proto::registry::v1 as registry;
use anyhow::Context as _;
use serde_json::json;
use tonic::transport::Channel;

use crate::Endpoint;
use crate::drive::Call;
use crate::server::Ours;

/// The capsule `GetCapsule` reads (the first of the seeded ones).
const CAPSULE: &str = "bench-0";
/// The audience, tool and run of the capability token.
const AUDIENCE: &str = "connector:bench";
const TOOL: &str = "http.get";
const RUN: &str = "run-bench";
const STEP: &str = "fetch";

/// What the seeding wrote.
pub struct Seeded {
    /// The compiled plan's hash.
    pub plan_hash: String,
    /// The appended receipt's id.
    pub receipt_id: String,
}

/// A small capsule: one step, one tool, no policies.
fn capsule_yaml(name: &str) -> String {
    format!(
        "apiVersion: anumate.dev/v1\n\
         kind: Capsule\n\
         metadata:\n  name: {name}\n  description: A small capsule for the load bench\n  labels: {{team: bench}}\n\
         spec:\n  tools: [{TOOL}]\n  steps:\n    - id: {STEP}\n      tool: {TOOL}\n      with: {{url: \"https://orders.example/v1/ping\"}}\n"
    )
}

/// `req` with `token` as its bearer.
fn bearer<T>(req: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(req);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .context("token as metadata")?,
    );
    Ok(req)
}

async fn channel(ours: &Ours) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(ours.url.clone())?.connect().await?)
}

/// The arguments the capability token is bound to.
fn token_args() -> serde_json::Value {
    json!({"url": "https://orders.example/v1/ping"})
}

/// Pushes (publishing) `capsules` capsules (`bench-0`, …), compiles
/// `bench-0` and appends one receipt.
pub async fn seed(ours: &Ours, capsules: usize) -> anyhow::Result<Seeded> {
    let ch = channel(ours).await?;
    let mut reg = registry::registry_service_client::RegistryServiceClient::new(ch.clone());
    for i in 0..capsules.max(1) {
        let name = format!("bench-{i}");
        reg.push_capsule(bearer(
            registry::PushCapsuleRequest {
                source_yaml: capsule_yaml(&name),
                source_name: format!("{name}.capsule.yaml"),
                etag: String::new(),
                publish: true,
            },
            &ours.token,
        )?)
        .await
        .with_context(|| format!("PushCapsule {name}"))?;
    }
    let plan = compiler::compiler_service_client::CompilerServiceClient::new(ch.clone())
        .compile(bearer(
            compiler::CompileRequest {
                capsule_name: CAPSULE.into(),
                version: String::new(),
            },
            &ours.token,
        )?)
        .await
        .context("Compile")?
        .into_inner()
        .plan
        .context("Compile returned no plan")?;
    let orchestrator =
        anumate_auth::ServiceIssuer::load_or_create(&ours.keys_dir(), "orchestrator")
            .context("the platform's service key")?
            .mint(&ours.tenant, Duration::from_secs(300))
            .context("minting a service token")?;
    let content: pbjson_types::Struct =
        serde_json::from_value(json!({"tool": TOOL, "status": 200, "ok": true}))?;
    let receipt = receipts::receipts_internal_client::ReceiptsInternalClient::new(ch)
        .append_receipt(bearer(
            receipts::AppendReceiptRequest {
                kind: receipts::ReceiptKind::StepExecution as i32,
                subject: Some(receipts::ReceiptSubject {
                    run_id: RUN.into(),
                    step_id: STEP.into(),
                    attempt: 1,
                    plan_hash: plan.plan_hash.clone(),
                    ..Default::default()
                }),
                content: Some(content),
                dedupe_key: format!("step:{RUN}:{STEP}:1"),
            },
            &orchestrator,
        )?)
        .await
        .context("AppendReceipt")?
        .into_inner()
        .receipt
        .context("AppendReceipt returned no receipt")?;
    Ok(Seeded {
        plan_hash: plan.plan_hash,
        receipt_id: receipt.receipt_id,
    })
}

/// Issues a capability token for the seeded plan (as the admin).
async fn issue_token(ours: &Ours, seeded: &Seeded) -> anyhow::Result<String> {
    let args_sha256 =
        anumate_captokens::args_sha256(&token_args()).context("hashing the token's arguments")?;
    let issued = captokens::capability_tokens_internal_client::CapabilityTokensInternalClient::new(
        channel(ours).await?,
    )
    .issue_token(bearer(
        captokens::IssueTokenRequest {
            audience: AUDIENCE.into(),
            subject: String::new(),
            run_id: RUN.into(),
            step_id: STEP.into(),
            plan_hash: seeded.plan_hash.clone(),
            args_sha256,
            capability: Some(captokens::Capability {
                tool: TOOL.into(),
                actions: vec!["call".into()],
                constraints: None,
            }),
            ttl: Some(pbjson_types::Duration {
                seconds: anumate_captokens::MAX_TTL_SECS,
                nanos: 0,
            }),
            single_use: false,
        },
        &ours.token,
    )?)
    .await
    .context("IssueToken")?
    .into_inner();
    Ok(issued.token)
}

/// The request `endpoint` is measured with (a fresh capability token for
/// `VerifyToken`).
pub async fn call_for(endpoint: Endpoint, ours: &Ours, seeded: &Seeded) -> anyhow::Result<Call> {
    Ok(match endpoint {
        Endpoint::GetCapsule => Call::GetCapsule(registry::GetCapsuleRequest {
            name: CAPSULE.into(),
            version: String::new(),
        }),
        Endpoint::ListCapsules => Call::ListCapsules(registry::ListCapsulesRequest {
            page_size: 0,
            page_token: String::new(),
            label_selector: String::new(),
            status: 0,
        }),
        Endpoint::GetPlan => Call::GetPlan(compiler::GetPlanRequest {
            plan_hash: seeded.plan_hash.clone(),
        }),
        Endpoint::VerifyToken => {
            let token = issue_token(ours, seeded).await?;
            Call::VerifyToken(captokens::VerifyTokenRequest {
                token,
                audience: AUDIENCE.into(),
                tool: TOOL.into(),
                action: "call".into(),
                args: Some(serde_json::from_value(token_args())?),
                plan_hash: seeded.plan_hash.clone(),
                run_id: RUN.into(),
                step_id: STEP.into(),
                ..Default::default()
            })
        }
        Endpoint::GetReceipt => Call::GetReceipt(receipts::GetReceiptRequest {
            receipt_id: seeded.receipt_id.clone(),
        }),
    })
}
