//! `ConsumeToken`: the connector hub spends a token it verified itself, in
//! the platform's one replay store, after the revocation check.

use anumate_captokens::{Failure, Rejection};
use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::captokens::v1 as pb;
use anumate_service::clients::{BoxFuture, Caller, CapTokensClient, UpstreamResult};
use anumate_store::TenantTx;

use crate::audit::record_verify_failure;
use crate::{Actor, CapTokens, convert, repo};

impl CapTokens {
    /// Refuses a revoked token and consumes a single-use one (one statement
    /// in one short transaction). The caller verified signature and binding.
    pub async fn consume(
        &self,
        actor: &Actor,
        req: &pb::ConsumeTokenRequest,
    ) -> Result<pb::ConsumeTokenResponse> {
        let claims = consumable(actor, req)?;
        let tx = self.inner.store.write(&actor.tenant).await?;
        let first_of_tenant = claims.single_use && self.replay_tenant_unknown(&actor.tenant);
        if first_of_tenant {
            repo::note_replay_tenant(&tx).await?;
        }
        let resp = consume_in(&tx, actor, claims).await?;
        tx.commit().await?;
        if first_of_tenant {
            self.replay_tenant_known(&actor.tenant);
        }
        Ok(resp)
    }

    /// [`CapTokens::consume`] in the caller's transaction `tx` (the hub's,
    /// on this service's store): spent if and only if `tx` commits. The
    /// tenant's first replay record of this process is noted (for the
    /// purge) in `tx` too; should `tx` fail, the next process notes it.
    pub async fn consume_in_tx(
        &self,
        tx: &TenantTx,
        actor: &Actor,
        req: &pb::ConsumeTokenRequest,
    ) -> Result<pb::ConsumeTokenResponse> {
        let claims = consumable(actor, req)?;
        if tx.tenant_id() != actor.tenant {
            return Err(Error::internal(
                "the transaction is another tenant's than the caller's",
            ));
        }
        if claims.single_use && self.replay_tenant_unknown(&actor.tenant) {
            repo::note_replay_tenant(tx).await?;
            self.replay_tenant_known(&actor.tenant);
        }
        consume_in(tx, actor, claims).await
    }
}

/// The claims of a token `actor` may spend.
fn consumable(actor: &Actor, req: &pb::ConsumeTokenRequest) -> Result<anumate_captokens::Claims> {
    if req.token.is_empty() {
        return Err(Error::invalid_argument("token", "required"));
    }
    let Some(claims) = convert::peek_claims(&req.token) else {
        return Err(Error::invalid_argument("token", "does not decode"));
    };
    if claims.tenant != actor.tenant {
        return Err(Error::invalid_argument(
            "token",
            "is another tenant's token",
        ));
    }
    Ok(claims)
}

/// Spends (or refuses and audits) the token in `tx`; the caller commits.
async fn consume_in(
    tx: &TenantTx,
    actor: &Actor,
    claims: anumate_captokens::Claims,
) -> Result<pb::ConsumeTokenResponse> {
    let outcome =
        repo::consume(tx, &claims.jti, &claims.run, claims.exp, claims.single_use).await?;
    let failure = match outcome {
        repo::Consumed::Yes | repo::Consumed::NotSingleUse => {
            return Ok(pb::ConsumeTokenResponse {
                verdict: pb::TokenVerdict::Valid as i32,
                message: String::new(),
                consumed: outcome == repo::Consumed::Yes,
            });
        }
        repo::Consumed::Revoked => Failure::Revoked,
        repo::Consumed::Replayed => Failure::Replayed,
    };
    let (aud, tool) = (claims.aud.clone(), claims.cap.tool.clone());
    let rejection = Rejection {
        failure,
        claims: Some(Box::new(claims)),
        authenticated: true,
    };
    record_verify_failure(tx, actor, &aud, &tool, &rejection).await?;
    Ok(pb::ConsumeTokenResponse {
        verdict: rejection.reason().verdict_number(),
        message: rejection.failure.to_string(),
        consumed: false,
    })
}

/// The acting service of an in-process call, checked like the RPC's `authz`
/// option would over gRPC.
fn service_actor(caller: &Caller, allowed: &[&str]) -> Result<Actor> {
    match caller.service() {
        Some(service) if allowed.contains(&service) => Ok(Actor {
            tenant: caller.tenant().to_owned(),
            subject: caller.subject(),
            admin: false,
        }),
        _ => Err(Error::new(
            ErrorCode::PermissionDenied,
            format!("only the {} service may call this", allowed.join(", ")),
        )),
    }
}

/// The service in this process, as the orchestrator and the hub call it.
impl CapTokensClient for CapTokens {
    fn issue<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::IssueTokenRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::IssueTokenResponse>> {
        Box::pin(async move {
            let actor = service_actor(caller, &["orchestrator"])?;
            Ok(CapTokens::issue(self, &actor, &request).await?)
        })
    }

    fn consume<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::ConsumeTokenRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::ConsumeTokenResponse>> {
        Box::pin(async move {
            let actor = service_actor(caller, &["connectors"])?;
            Ok(CapTokens::consume(self, &actor, &request).await?)
        })
    }

    fn jwks(&self) -> BoxFuture<'_, UpstreamResult<String>> {
        Box::pin(async move { Ok(CapTokens::jwks(self)?.0) })
    }

    fn consumes_in_transaction(&self) -> bool {
        true
    }

    fn consume_in<'a>(
        &'a self,
        tx: &'a TenantTx,
        caller: &'a Caller,
        request: pb::ConsumeTokenRequest,
    ) -> BoxFuture<'a, Result<pb::ConsumeTokenResponse>> {
        Box::pin(async move {
            let actor = service_actor(caller, &["connectors"])?;
            CapTokens::consume_in_tx(self, tx, &actor, &request).await
        })
    }
}
