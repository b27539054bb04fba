//! Issuing, verifying and refreshing capability tokens.

use std::time::Duration;

use anumate_captokens::{
    ArgsBinding, Expectation, IssueError, IssueRequest, IssuedToken, Reason, ReplayError,
    ReplayGuard as _, VerifiedToken, VerifyError,
};
use anumate_errors::{Error, ErrorCode, Reason as ErrorReason, Result};
use anumate_proto::captokens::v1 as pb;
use anumate_store::TenantTx;

use crate::audit::{record_issue, record_revocation, record_verify_failure, token_kid};
use crate::{Actor, CapTokens, convert, repo, unix_now};

pub(crate) fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// A request's digest field in its one wire form (`sha256:<hex>`), when set;
/// `sha256-<hex>` and bare hex are accepted.
fn digest_field(field: &str, text: &str) -> Result<Option<String>> {
    opt(text)
        .map(|t| anumate_crypto::parse_digest(field, t))
        .transpose()
}

/// The error of a refresh whose token failed verification: the registered
/// reason of the check (`TOKEN_EXPIRED`, `TOKEN_REVOKED`, `TOKEN_ALREADY_USED`;
/// another tenant's token is `TOKEN_NOT_FOUND`), else `UNAUTHENTICATED`.
fn refresh_refused(rejection: &anumate_captokens::Rejection) -> Error {
    let reason = match rejection.reason() {
        Reason::Expired => ErrorReason::TokenExpired,
        Reason::Revoked => ErrorReason::TokenRevoked,
        Reason::Replayed => ErrorReason::TokenAlreadyUsed,
        Reason::WrongTenant => ErrorReason::TokenNotFound,
        _ => ErrorReason::Unauthenticated,
    };
    Error::because(
        reason,
        format!("token cannot be refreshed: {}", rejection.failure),
    )
    .with_metadata("verdict", rejection.reason().verdict_name())
}

pub(crate) fn issue_error(e: IssueError) -> Error {
    match e {
        IssueError::InvalidTtl { .. } => Error::invalid_argument("ttl", e.to_string()),
        IssueError::InvalidArgument { field, reason } => Error::invalid_argument(field, reason),
        IssueError::Signing(why) => Error::internal(why),
    }
}

pub(crate) fn ttl(ttl: Option<&pbjson_types::Duration>) -> Result<Option<Duration>> {
    let Some(d) = ttl else { return Ok(None) };
    let (Ok(secs), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(Error::invalid_argument("ttl", "must not be negative"));
    };
    if nanos >= 1_000_000_000 {
        return Err(Error::invalid_argument("ttl", "nanos out of range"));
    }
    Ok(Some(Duration::new(secs, nanos)))
}

/// The answer when the replay store or revocation list cannot be read: the
/// caller learns only that token state is unavailable; the log says which.
fn state_unavailable(what: &str, why: &str) -> Error {
    tracing::warn!(error = %why, "captokens: {what} unavailable");
    Error::new(ErrorCode::Unavailable, "token state unavailable")
}

impl CapTokens {
    /// Signs a token with the service's keys.
    fn mint(&self, request: IssueRequest<'_>) -> Result<IssuedToken> {
        self.inner
            .issuer
            .issue(self.inner.keys.as_ref(), request)
            .map_err(issue_error)
    }

    /// Verifies `token` against the revocations and replay slots seen by
    /// `tx`, so that consuming it commits (or not) with the audit of the outcome.
    async fn verify_in(
        &self,
        tx: &TenantTx,
        token: &str,
        expected: &Expectation<'_>,
        consume: bool,
    ) -> std::result::Result<VerifiedToken, VerifyError> {
        self.inner
            .verifier
            .verify_with(
                token,
                expected,
                &repo::TxRevocations(tx),
                &repo::TxReplay(tx),
                consume,
            )
            .await
    }

    /// Mints a token for one call in the actor's tenant; audited and evented.
    pub async fn issue(
        &self,
        actor: &Actor,
        req: &pb::IssueTokenRequest,
    ) -> Result<pb::IssueTokenResponse> {
        let capability = convert::capability(req.capability.as_ref())?;
        let ttl = ttl(req.ttl.as_ref())?;
        let plan_hash = digest_field("plan_hash", &req.plan_hash)?.unwrap_or_default();
        let issued = self.mint(IssueRequest {
            // Empty: the caller started the run.
            subject: opt(&req.subject).unwrap_or(&actor.subject),
            audience: &req.audience,
            tenant: &actor.tenant,
            run: &req.run_id,
            step: &req.step_id,
            plan_hash: &plan_hash,
            args: ArgsBinding::Sha256(&req.args_sha256),
            capability: &capability,
            ttl,
            single_use: req.single_use,
            now: None,
        })?;
        // Statements only, no answer needed before the commit: one round
        // trip, in a group commit with other writes of the moment.
        let tx = self.inner.store.write_deferred(&actor.tenant).await?;
        record_issue(&tx, actor, &issued.claims, "", issued.claims.iat).await?;
        tx.commit().await?;
        Ok(pb::IssueTokenResponse {
            claims: Some(convert::claims(&issued.claims, &issued.kid)),
            token: issued.token,
        })
    }

    /// Verifies a token for a call in the actor's tenant. A rejection is a
    /// normal response (audited and evented); errors are for bad requests and
    /// outages.
    pub async fn verify(
        &self,
        actor: &Actor,
        req: &pb::VerifyTokenRequest,
    ) -> Result<pb::VerifyTokenResponse> {
        if req.token.is_empty() {
            return Err(Error::invalid_argument("token", "required"));
        }
        if req.audience.is_empty() {
            return Err(Error::invalid_argument("audience", "required"));
        }
        if req.tool.is_empty() {
            return Err(Error::invalid_argument("tool", "required"));
        }
        // A token is for one call: the verifier names that call completely.
        if req.action.is_empty() {
            return Err(Error::invalid_argument(
                "action",
                "required: the action about to be performed",
            ));
        }
        if req.args.is_none() && req.args_sha256.is_empty() {
            return Err(Error::invalid_argument(
                "args",
                "required: the call's arguments (args) or their hash (args_sha256)",
            ));
        }
        let args = req.args.as_ref().map(convert::args).transpose()?;
        let args_sha256 = digest_field("args_sha256", &req.args_sha256)?;
        let plan_hash = digest_field("plan_hash", &req.plan_hash)?;
        let mut expected = Expectation::new(&req.audience, &actor.tenant, &req.tool);
        expected.action = opt(&req.action);
        expected.args = args.as_ref();
        expected.args_sha256 = args_sha256.as_deref();
        expected.plan_hash = plan_hash.as_deref();
        expected.run = opt(&req.run_id);
        expected.step = opt(&req.step_id);

        let tx = self.inner.store.write(&actor.tenant).await?;
        let outcome = self
            .verify_in(&tx, &req.token, &expected, req.consume)
            .await;
        match outcome {
            Ok(verified) => {
                tx.commit().await?;
                Ok(pb::VerifyTokenResponse {
                    verdict: pb::TokenVerdict::Valid as i32,
                    message: String::new(),
                    claims: Some(convert::claims(&verified.claims, &verified.kid)),
                    consumed: verified.consumed,
                })
            }
            Err(VerifyError::Rejected(rejection)) => {
                record_verify_failure(&tx, actor, &req.audience, &req.tool, &rejection).await?;
                tx.commit().await?;
                Ok(pb::VerifyTokenResponse {
                    verdict: rejection.reason().verdict_number(),
                    message: rejection.failure.to_string(),
                    claims: rejection
                        .claims
                        .as_deref()
                        .map(|c| convert::claims(c, &token_kid(&req.token))),
                    consumed: false,
                })
            }
            Err(VerifyError::Unavailable(why)) => {
                Err(state_unavailable("replay store or revocation list", &why))
            }
        }
    }

    /// Exchanges a valid token for a new one with the same binding; the old
    /// one is revoked in the same transaction.
    pub async fn refresh(
        &self,
        actor: &Actor,
        req: &pb::RefreshTokenRequest,
    ) -> Result<pb::RefreshTokenResponse> {
        if req.token.is_empty() {
            return Err(Error::invalid_argument("token", "required"));
        }
        let ttl = ttl(req.ttl.as_ref())?;
        if let Some(t) = ttl
            && (t.is_zero()
                || t > Duration::from_secs(anumate_captokens::MAX_TTL_SECS.unsigned_abs()))
        {
            return Err(Error::invalid_argument(
                "ttl",
                format!("must be 1..={} s", anumate_captokens::MAX_TTL_SECS),
            ));
        }
        // The audience and tool are the token's own: refresh checks
        // everything but the call.
        let Some(unverified) = convert::peek_claims(&req.token) else {
            return Err(Error::new(
                ErrorCode::Unauthenticated,
                "token does not verify: malformed",
            ));
        };
        // The arguments are the token's own (the signature check covers them).
        let expected = Expectation::new(&unverified.aud, &actor.tenant, &unverified.cap.tool)
            .args_sha256(&unverified.args_sha256);
        let tx = self.inner.store.write(&actor.tenant).await?;
        let outcome = self.verify_in(&tx, &req.token, &expected, false).await;
        let old = match outcome {
            Ok(v) => v.claims,
            Err(VerifyError::Rejected(rejection)) => {
                record_verify_failure(
                    &tx,
                    actor,
                    &unverified.aud,
                    &unverified.cap.tool,
                    &rejection,
                )
                .await?;
                tx.commit().await?;
                return Err(refresh_refused(&rejection));
            }
            Err(VerifyError::Unavailable(why)) => {
                return Err(state_unavailable("token state", &why));
            }
        };
        // The chain's authority ends `max_refresh_lifetime_secs` after its
        // first token was issued, however often it is refreshed.
        let root_iat = repo::find_token(&tx, &old.jti)
            .await?
            .map_or(old.iat, |t| t.root_iat);
        let new_ttl = ttl.map_or(anumate_captokens::DEFAULT_TTL_SECS, |t| {
            i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
        });
        let deadline = root_iat.saturating_add(self.inner.max_refresh_lifetime);
        if unix_now().saturating_add(new_ttl) > deadline {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "token cannot be refreshed: its chain began at {root_iat} and may not outlive {deadline} \
                     ([captokens] max_refresh_lifetime_secs = {}); mint a new token for the call",
                    self.inner.max_refresh_lifetime
                ),
            )
            .with_metadata("verdict", "REFRESH_LIMIT"));
        }
        // A single-use token is spent by its refresh: claiming its replay slot
        // in this transaction makes refresh and consume exclusive (the unique
        // insert waits for a concurrent consume and then loses, or wins and
        // the consume sees REPLAYED), so no consumed token yields a live one.
        if old.single_use {
            match repo::TxReplay(&tx)
                .check_and_consume(&old.jti, old.exp)
                .await
            {
                Ok(()) => {}
                Err(ReplayError::Replayed { .. }) => {
                    return Err(Error::because(
                        ErrorReason::TokenAlreadyUsed,
                        "token cannot be refreshed: it was consumed",
                    )
                    .with_metadata("verdict", Reason::Replayed.verdict_name()));
                }
                Err(ReplayError::Unavailable(why)) => {
                    return Err(state_unavailable("replay store", &why));
                }
            }
        }
        let revocation = repo::NewRevocation {
            jti: Some(&old.jti),
            run: None,
            reason: "refreshed",
            actor: &actor.subject,
        };
        if !repo::insert_revocation(&tx, &revocation).await? {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                "token was revoked or refreshed concurrently",
            ));
        }
        let issued = self.mint(IssueRequest {
            subject: &old.sub,
            audience: &old.aud,
            tenant: &old.tenant,
            run: &old.run,
            step: &old.step,
            plan_hash: &old.plan_hash,
            args: ArgsBinding::Sha256(&old.args_sha256),
            capability: &old.cap,
            ttl,
            single_use: old.single_use,
            now: None,
        })?;
        record_revocation(
            &tx,
            actor,
            std::slice::from_ref(&old.jti),
            &old.run,
            &old,
            "refreshed",
        )
        .await?;
        record_issue(&tx, actor, &issued.claims, &old.jti, root_iat).await?;
        tx.commit().await?;
        Ok(pb::RefreshTokenResponse {
            claims: Some(convert::claims(&issued.claims, &issued.kid)),
            token: issued.token,
            revoked_jti: old.jti,
        })
    }
}
