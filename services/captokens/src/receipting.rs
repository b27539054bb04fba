//! Receipts for revocations: every revocation that revokes something is
//! attested by a `TOKEN_REVOCATION` receipt in the tenant's receipt log.
//!
//! The receipt is appended *before* the revocation is committed, outside the
//! revocation's transaction (so an in-process receipts service on the same
//! SQLite file never waits on our write lock), with a dedupe key derived from
//! the target, the planned `jti`s, the reason and the actor. So a revocation
//! never lands without its receipt, and retrying a revocation whose commit
//! failed reuses the receipt instead of appending another.
//!
//! The receipts service is reached through its transport-agnostic client
//! ([`ReceiptsClient`]): in-process when it runs in the same process
//! (`anumate dev`, `anumate serve captokens receipts`), over gRPC otherwise
//! (`[captokens] receipts_url`). Either way the receipt is appended as the
//! `captokens` service identity — the only one the receipts service accepts
//! `TOKEN_REVOCATION` from — and names the revoking principal in its content
//! (`revoked_by`). Over gRPC that identity is a short-lived token of the
//! platform's service issuer, minted per call.

use anumate_errors::{Error, Result};
use anumate_proto::receipts::v1 as rpb;
use anumate_service::clients::{Caller, ReceiptsClient, append_receipt_first};
use serde_json::json;

/// A revocation about to be committed.
#[derive(Debug, Clone)]
pub struct RevocationReceipt<'a> {
    /// Tenant whose tokens are revoked.
    pub tenant: &'a str,
    /// The revoking principal.
    pub actor: &'a str,
    /// `"jti"` or `"run"`: what the request named.
    pub target: &'static str,
    /// The run of the revoked tokens.
    pub run: &'a str,
    /// The `jti`s being revoked.
    pub jtis: &'a [String],
    /// Why.
    pub reason: &'a str,
}

impl RevocationReceipt<'_> {
    /// The receipt's content (redacted and digested by the receipts service).
    pub fn content(&self) -> serde_json::Value {
        json!({
            "action": "revoke",
            "target": self.target,
            "run_id": self.run,
            "jtis": self.jtis,
            "reason": self.reason,
            "revoked_by": self.actor,
        })
    }

    /// A dedupe key that is the same for a retry of the same revocation.
    pub fn dedupe_key(&self) -> String {
        let mut jtis: Vec<&str> = self.jtis.iter().map(String::as_str).collect();
        jtis.sort_unstable();
        let canonical = json!({
            "target": self.target,
            "run": self.run,
            "jtis": jtis,
            "reason": self.reason,
            "actor": self.actor,
        })
        .to_string();
        let digest = anumate_crypto::sha256_hex(canonical.as_bytes());
        format!("token-revocation:{}", &digest[..32])
    }

    fn subject(&self) -> rpb::ReceiptSubject {
        rpb::ReceiptSubject {
            run_id: self.run.to_owned(),
            jtis: self.jtis.to_vec(),
            ..Default::default()
        }
    }

    fn content_struct(&self) -> Result<pbjson_types::Struct> {
        serde_json::from_value(self.content()).map_err(Error::internal)
    }
}

/// The service identity that appends `TOKEN_REVOCATION` receipts.
pub const RECEIPTS_SERVICE_NAME: &str = "captokens";

/// Appends (or finds, for a retry) the receipt of `r` through `receipts`, as
/// the `captokens` service. Returns the receipt id. A remote receipts service
/// that fails or cannot be reached is `UNAVAILABLE` (nothing was revoked);
/// the in-process one's errors pass through as they are.
pub async fn append(receipts: &dyn ReceiptsClient, r: &RevocationReceipt<'_>) -> Result<String> {
    let caller = Caller::Service {
        tenant: r.tenant.to_owned(),
        service: RECEIPTS_SERVICE_NAME,
    };
    let request = rpb::AppendReceiptRequest {
        kind: rpb::ReceiptKind::TokenRevocation as i32,
        subject: Some(r.subject()),
        content: Some(r.content_struct()?),
        dedupe_key: r.dedupe_key(),
    };
    append_receipt_first(
        receipts,
        &caller,
        request,
        ("the revocation receipt", "nothing was revoked"),
    )
    .await
}
