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
//! Two implementations: [`InProcessReceipts`] when the receipts service runs
//! in the same process (`anumate dev`, `anumate serve captokens receipts`),
//! [`GrpcReceipts`] otherwise (`[captokens] receipts_url`). Either way the
//! receipt is appended as the `captokens` service identity — the only one the
//! receipts service accepts `TOKEN_REVOCATION` from — and names the revoking
//! principal in its content (`revoked_by`). Over gRPC that identity is a
//! short-lived token of the platform's service issuer, minted per call.

use std::future::Future;
use std::pin::Pin;

use anumate_auth::{BearerToken, ServiceIssuer};
use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::receipts::v1 as rpb;
use rpb::receipts_service_client::ReceiptsServiceClient;
use serde_json::json;
use tonic::transport::Channel;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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

/// Where revocations are receipted. Returns the receipt id.
pub trait RevocationReceipts: Send + Sync {
    /// Appends (or finds, for a retry) the receipt of `revocation`.
    fn append<'a>(&'a self, revocation: &'a RevocationReceipt<'a>)
    -> BoxFuture<'a, Result<String>>;
}

/// The service identity that appends `TOKEN_REVOCATION` receipts.
pub const RECEIPTS_SERVICE_NAME: &str = "captokens";

/// How long a service token minted for one `AppendReceipt` call lives.
const SERVICE_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// The receipts service of this process.
pub struct InProcessReceipts(pub anumate_receipts::Receipts);

impl RevocationReceipts for InProcessReceipts {
    fn append<'a>(&'a self, r: &'a RevocationReceipt<'a>) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            let actor = anumate_receipts::Actor::service(r.tenant, RECEIPTS_SERVICE_NAME);
            let (receipt, _) = self
                .0
                .append(
                    &actor,
                    rpb::ReceiptKind::TokenRevocation as i32,
                    Some(r.subject()),
                    Some(r.content_struct()?),
                    &r.dedupe_key(),
                )
                .await?;
            Ok(receipt.receipt_id)
        })
    }
}

/// A receipts service reached over gRPC, called as the `captokens` service.
pub struct GrpcReceipts {
    channel: Channel,
    issuer: ServiceIssuer,
}

impl GrpcReceipts {
    /// A lazily connected client of the receipts service at `url`, calling
    /// with tokens of `issuer` (which must mint for `captokens`).
    pub fn new(url: &str, issuer: ServiceIssuer) -> Result<Self> {
        if issuer.service() != RECEIPTS_SERVICE_NAME {
            return Err(Error::invalid_argument(
                "issuer",
                format!(
                    "revocation receipts are appended as {RECEIPTS_SERVICE_NAME:?}, not {:?}",
                    issuer.service()
                ),
            ));
        }
        let channel = Channel::from_shared(url.to_owned())
            .map_err(|e| {
                Error::invalid_argument("captokens.receipts_url", format!("{url:?}: {e}"))
            })?
            .connect_lazy();
        Ok(GrpcReceipts { channel, issuer })
    }
}

impl RevocationReceipts for GrpcReceipts {
    fn append<'a>(&'a self, r: &'a RevocationReceipt<'a>) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move {
            let token = self.issuer.mint(r.tenant, SERVICE_TOKEN_TTL)?;
            let mut client =
                ReceiptsServiceClient::with_interceptor(self.channel.clone(), BearerToken(token));
            let resp = client
                .append_receipt(rpb::AppendReceiptRequest {
                    kind: rpb::ReceiptKind::TokenRevocation as i32,
                    subject: Some(r.subject()),
                    content: Some(r.content_struct()?),
                    dedupe_key: r.dedupe_key(),
                })
                .await
                .map_err(|s| {
                    let e = Error::from_status(&s);
                    Error::new(
                        ErrorCode::Unavailable,
                        format!(
                            "the revocation receipt could not be appended ({}: {}); nothing was revoked",
                            e.code, e.message
                        ),
                    )
                })?
                .into_inner();
            resp.receipt
                .map(|r| r.receipt_id)
                .ok_or_else(|| Error::internal("the receipts service sent no receipt"))
        })
    }
}
