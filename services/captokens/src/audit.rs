//! The token audit trail: recording issues, failed verifications and
//! revocations, and listing them.

use anumate_captokens::{Claims, Rejection};
use anumate_errors::{Error, Result};
use anumate_proto::captokens::v1 as pb;
use anumate_proto::events::v1 as ev;
use anumate_store::{TenantTx, paging};

use crate::{ADMIN_ISSUE_REASON, Actor, AuditQuery, CapTokens, convert, repo};

/// The context of events about tokens rather than one step's call (failed
/// verifications, revocations): subject `tokens`, no plan.
const TOKENS: anumate_events::EventContext<'static> = anumate_events::EventContext {
    subject: "tokens",
    plan_hash: None,
    traceparent: None,
};

/// The `kid` of a token's header, when it has one (for claims of rejected tokens).
pub(crate) fn token_kid(token: &str) -> String {
    convert::peek_kid(token).unwrap_or_default()
}

pub(crate) async fn record_issue(
    tx: &TenantTx,
    actor: &Actor,
    c: &Claims,
    refreshed_from: &str,
    root_iat: i64,
) -> Result<()> {
    repo::insert_token(
        tx,
        &repo::NewToken {
            claims: c,
            refreshed_from_jti: refreshed_from,
            issued_by: &actor.subject,
            root_iat,
        },
    )
    .await?;
    let kind = if refreshed_from.is_empty() {
        pb::AuditKind::Issued
    } else {
        pb::AuditKind::Refreshed
    };
    repo::insert_audit(
        tx,
        &repo::NewAudit {
            kind: kind as i32,
            jti: &c.jti,
            run: &c.run,
            step: &c.step,
            plan_hash: &c.plan_hash,
            audience: &c.aud,
            tool: &c.cap.tool,
            actor: &actor.subject,
            refreshed_from_jti: refreshed_from,
            reason: if actor.admin { ADMIN_ISSUE_REASON } else { "" },
            ..repo::NewAudit::default()
        },
    )
    .await?;
    let event = ev::TokenIssued {
        tenant_id: actor.tenant.clone(),
        jti: c.jti.clone(),
        run_id: c.run.clone(),
        step_id: c.step.clone(),
        plan_hash: c.plan_hash.clone(),
        audience: c.aud.clone(),
        tool: c.cap.tool.clone(),
        expire_time: Some(convert::timestamp(c.exp)),
        single_use: c.single_use,
        refreshed_from_jti: refreshed_from.to_owned(),
        actor: actor.subject.clone(),
    };
    let subject = format!("runs/{}/tokens/{}", c.run, c.jti);
    anumate_events::append(
        tx,
        &event,
        anumate_events::EventContext {
            subject: &subject,
            plan_hash: Some(&c.plan_hash),
            traceparent: None,
        },
    )
    .await?;
    Ok(())
}

/// Audits and events a failed verification in the verifier's tenant. The
/// token's claims are recorded as claimed: for a failure at or before the
/// signature check they are unauthenticated (the verdict says so).
pub(crate) async fn record_verify_failure(
    tx: &TenantTx,
    actor: &Actor,
    audience: &str,
    tool: &str,
    rejection: &Rejection,
) -> Result<()> {
    let reason = rejection.reason();
    let message = rejection.failure.to_string();
    let c = rejection.claims.as_deref();
    let field = |f: fn(&Claims) -> &str| c.map(f).unwrap_or_default();
    let (jti, run, step, plan) = (
        field(|c| &c.jti),
        field(|c| &c.run),
        field(|c| &c.step),
        field(|c| &c.plan_hash),
    );
    repo::insert_audit(
        tx,
        &repo::NewAudit {
            kind: pb::AuditKind::VerifyFailed as i32,
            jti,
            run,
            step,
            plan_hash: plan,
            audience,
            tool,
            actor: &actor.subject,
            verdict: reason.verdict_number(),
            reason: &message,
            ..repo::NewAudit::default()
        },
    )
    .await?;
    let event = ev::TokenVerifyFailed {
        tenant_id: actor.tenant.clone(),
        jti: jti.to_owned(),
        run_id: run.to_owned(),
        step_id: step.to_owned(),
        plan_hash: plan.to_owned(),
        audience: audience.to_owned(),
        tool: tool.to_owned(),
        verdict: reason.verdict_number(),
        message,
        actor: actor.subject.clone(),
    };
    anumate_events::append(tx, &event, TOKENS).await?;
    Ok(())
}

pub(crate) async fn record_revocation(
    tx: &TenantTx,
    actor: &Actor,
    jtis: &[String],
    run: &str,
    c: &Claims,
    reason: &str,
) -> Result<()> {
    let audit = repo::NewAudit {
        run: &c.run,
        step: &c.step,
        plan_hash: &c.plan_hash,
        audience: &c.aud,
        tool: &c.cap.tool,
        ..repo::NewAudit::default()
    };
    record_revocation_entries(tx, actor, jtis, run, &audit, reason, "").await
}

pub(crate) async fn record_revocation_entries(
    tx: &TenantTx,
    actor: &Actor,
    jtis: &[String],
    run: &str,
    template: &repo::NewAudit<'_>,
    reason: &str,
    receipt_id: &str,
) -> Result<()> {
    for jti in jtis {
        repo::insert_audit(
            tx,
            &repo::NewAudit {
                kind: pb::AuditKind::Revoked as i32,
                jti,
                actor: &actor.subject,
                reason,
                ..*template
            },
        )
        .await?;
    }
    let event = ev::TokenRevoked {
        tenant_id: actor.tenant.clone(),
        jtis: jtis.to_vec(),
        run_id: run.to_owned(),
        reason: reason.to_owned(),
        receipt_id: receipt_id.to_owned(),
        actor: actor.subject.clone(),
    };
    anumate_events::append(tx, &event, TOKENS).await?;
    Ok(())
}

impl CapTokens {
    /// Audit entries of the actor's tenant, newest first, and the next page
    /// token (AIP-158 `page_size` and `page_token`; the token carries the
    /// last entry's id).
    pub async fn list_audit(
        &self,
        actor: &Actor,
        query: &AuditQuery,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<pb::TokenAuditEntry>, String)> {
        let (size, before) = paging::page_params(page_size, page_token)?;
        if before
            .as_deref()
            .is_some_and(|id| uuid::Uuid::parse_str(id).is_err())
        {
            return Err(Error::invalid_argument(
                "page_token",
                "not a token from this listing",
            ));
        }
        let tx = self.inner.store.read(&actor.tenant).await?;
        let rows = repo::list_audit(
            &tx,
            &repo::AuditFilter {
                kind: query.kind as i32,
                jti: &query.jti,
                run: &query.run_id,
                start: query.start_micros,
                end: query.end_micros,
                before_id: before.as_deref(),
                limit: size + 1,
            },
        )
        .await?;
        let (rows, next) = paging::finish_page(rows, size, |r| r.audit_id.clone());
        Ok((rows.into_iter().map(convert::audit_entry).collect(), next))
    }
}
