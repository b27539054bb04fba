//! Receipts for decisions: every approve, reject, delegation, escalation,
//! expiry and cancellation is attested by an `APPROVAL_DECISION` receipt in
//! the tenant's receipt log.
//!
//! When the log lives in this process's store (`anumate dev`, a single
//! `anumate serve`), the receipt is appended inside the decision's own
//! transaction, last before its commit: a receipt exists iff its decision
//! committed, and a decision waits for one WAL flush, not two. With a
//! remote receipts service (a mesh) that is impossible; then, as for
//! revocations (see the captokens service), the receipt is appended *before*
//! the decision commits, with a dedupe key derived from the decision's
//! content. A decision never lands without its receipt; retrying one whose
//! commit failed reuses the receipt. A decision that loses a race after its
//! receipt was appended (the approval changed meanwhile) leaves a receipt of
//! an attempt that did not count; the approval's history is what counted.

use anumate_errors::{Error, Result};
use anumate_proto::receipts::v1 as rpb;
use anumate_service::clients::{Caller, PreparedReceipt, ReceiptsClient, append_receipt_first};
use serde_json::json;

use crate::rules::{Approval, Decision};

/// The service identity that appends `APPROVAL_DECISION` receipts.
pub const RECEIPTS_SERVICE_NAME: &str = "approvals";

/// The receipt content of decision `d` on `a` (no times: a retry of the same
/// decision has the same content).
pub fn content(a: &Approval, d: &Decision) -> serde_json::Value {
    json!({
        "action": d.kind.as_str(),
        "approval_id": a.id,
        "actor": d.actor,
        "stage": d.stage,
        "escalated": d.escalated,
        "comment": d.comment,
        "delegate_to": d.delegate_to,
        "escalate_to": d.escalate_to,
        "args_sha256": a.args_sha256,
        "tool": a.tool,
        "state": format!("{:?}", a.status).to_lowercase(),
        "timer_generation": a.timer_gen,
    })
}

/// The caller that appends decision receipts in `tenant`.
pub fn caller(tenant: &str) -> Caller {
    Caller::Service {
        tenant: tenant.to_owned(),
        service: RECEIPTS_SERVICE_NAME,
    }
}

/// The append request of `a`'s last decision.
pub fn request(a: &Approval) -> Result<rpb::AppendReceiptRequest> {
    let d = a
        .decisions
        .last()
        .ok_or_else(|| Error::internal("no decision to receipt"))?;
    let content = content(a, d);
    let digest = anumate_crypto::sha256_hex(content.to_string().as_bytes());
    Ok(rpb::AppendReceiptRequest {
        kind: rpb::ReceiptKind::ApprovalDecision as i32,
        subject: Some(rpb::ReceiptSubject {
            run_id: a.run_id.clone(),
            step_id: a.step_id.clone(),
            plan_hash: a.plan_hash.clone(),
            approval_id: a.id.clone(),
            ..Default::default()
        }),
        content: Some(serde_json::from_value(content).map_err(Error::internal)?),
        dedupe_key: format!("approval:{}:{}", a.id, &digest[..32]),
    })
}

/// Signs the receipt of `a`'s last decision, to append inside the
/// decision's transaction (the log in this store).
pub fn prepare(
    receipts: &dyn ReceiptsClient,
    tenant: &str,
    a: &Approval,
) -> Result<PreparedReceipt> {
    receipts.prepare_receipt(&caller(tenant), request(a)?)
}

/// Appends (or finds, for a retry) the receipt of `a`'s last decision
/// before the decision's transaction (a remote receipts service). Returns
/// the receipt id. A remote receipts service that fails is `UNAVAILABLE`
/// (nothing was decided).
pub async fn append(receipts: &dyn ReceiptsClient, tenant: &str, a: &Approval) -> Result<String> {
    append_receipt_first(
        receipts,
        &caller(tenant),
        request(a)?,
        ("the decision's receipt", "nothing was decided"),
    )
    .await
}
