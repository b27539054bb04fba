//! Revoking tokens by `jti` or by run, with an audit entry and a revocation
//! receipt per revoked token.

use anumate_errors::{Error, Reason, Result};
use anumate_store::TenantTx;

use crate::audit::record_revocation_entries;
use crate::{Actor, CapTokens, RevocationReceipt, RevokeTarget, receipting, repo, unix_now};

impl CapTokens {
    /// The `jti`s a revocation of `target` would revoke now, and their run,
    /// read without writing. `NOT_FOUND` as for [`CapTokens::revoke`].
    pub(crate) async fn plan_revocation(
        &self,
        tx: &TenantTx,
        target: RevokeTarget<'_>,
        now: i64,
    ) -> Result<(Vec<String>, String)> {
        let live = |exp: i64| exp.saturating_add(self.inner.leeway) > now;
        match target {
            RevokeTarget::Jti(jti) => {
                let token = repo::find_token(tx, jti).await?.ok_or_else(|| {
                    Error::because(Reason::TokenNotFound, format!("no token {jti}"))
                })?;
                let fresh = live(token.exp)
                    && !repo::revocation_exists(tx, Some(jti), None).await?
                    && !repo::revocation_exists(tx, None, Some(&token.run)).await?;
                Ok((if fresh { vec![token.jti] } else { Vec::new() }, token.run))
            }
            RevokeTarget::Run(run) => {
                let tokens = repo::run_tokens(tx, run).await?;
                if tokens.is_empty() {
                    return Err(Error::because(
                        Reason::TokenNotFound,
                        format!("no token of run {run}"),
                    ));
                }
                if repo::revocation_exists(tx, None, Some(run)).await? {
                    return Ok((Vec::new(), run.to_owned()));
                }
                let revoked = repo::revoked_jtis(tx, run).await?;
                let jtis = tokens
                    .into_iter()
                    .filter(|t| live(t.exp) && !revoked.contains(&t.jti))
                    .map(|t| t.jti)
                    .collect();
                Ok((jtis, run.to_owned()))
            }
        }
    }

    /// Revokes one token or a run's tokens; returns the `jti`s newly revoked
    /// and the id of the revocation's receipt (empty when nothing was revoked
    /// or no receipts service is configured).
    /// `NOT_FOUND` when the tenant issued no such token (or no token of the run);
    /// `UNAVAILABLE`, with nothing revoked, when the receipt cannot be appended.
    pub async fn revoke(
        &self,
        actor: &Actor,
        target: RevokeTarget<'_>,
        reason: &str,
    ) -> Result<(Vec<String>, String)> {
        let now = unix_now();
        // The receipt first (outside the revocation's transaction): no
        // revocation is committed without one. See `receipting`.
        let mut receipt_id = String::new();
        if let Some(receipts) = &self.receipts {
            let (planned, run) = {
                let tx = self.inner.store.read(&actor.tenant).await?;
                self.plan_revocation(&tx, target, now).await?
            };
            if !planned.is_empty() {
                let revocation = RevocationReceipt {
                    tenant: &actor.tenant,
                    actor: &actor.subject,
                    target: match target {
                        RevokeTarget::Jti(_) => "jti",
                        RevokeTarget::Run(_) => "run",
                    },
                    run: &run,
                    jtis: &planned,
                    reason,
                };
                receipt_id = receipting::append(receipts.as_ref(), &revocation).await?;
            }
        }
        let tx = self.inner.store.write(&actor.tenant).await?;
        let (jtis, run) = match target {
            RevokeTarget::Jti(jti) => {
                let token = repo::find_token(&tx, jti).await?.ok_or_else(|| {
                    Error::because(Reason::TokenNotFound, format!("no token {jti}"))
                })?;
                let live = token.exp.saturating_add(self.inner.leeway) > now;
                let rev = repo::NewRevocation {
                    jti: Some(jti),
                    run: None,
                    reason,
                    actor: &actor.subject,
                };
                // A token of a revoked run is revoked already: a no-op.
                if live
                    && !repo::revocation_exists(&tx, None, Some(&token.run)).await?
                    && repo::insert_revocation(&tx, &rev).await?
                {
                    (vec![token.jti], token.run)
                } else {
                    (Vec::new(), token.run)
                }
            }
            RevokeTarget::Run(run) => {
                let tokens = repo::run_tokens(&tx, run).await?;
                if tokens.is_empty() {
                    return Err(Error::because(
                        Reason::TokenNotFound,
                        format!("no token of run {run}"),
                    ));
                }
                let rev = repo::NewRevocation {
                    jti: None,
                    run: Some(run),
                    reason,
                    actor: &actor.subject,
                };
                let mut newly = Vec::new();
                if repo::insert_revocation(&tx, &rev).await? {
                    let revoked = repo::revoked_jtis(&tx, run).await?;
                    newly = tokens
                        .into_iter()
                        .filter(|t| {
                            t.exp.saturating_add(self.inner.leeway) > now
                                && !revoked.contains(&t.jti)
                        })
                        .map(|t| t.jti)
                        .collect();
                }
                (newly, run.to_owned())
            }
        };
        if jtis.is_empty() {
            // Revoked meanwhile by another request (with its own receipt).
            receipt_id.clear();
        } else {
            let audit = repo::NewAudit {
                run: &run,
                ..repo::NewAudit::default()
            };
            record_revocation_entries(&tx, actor, &jtis, &run, &audit, reason, &receipt_id).await?;
        }
        tx.commit().await?;
        Ok((jtis, receipt_id))
    }
}
