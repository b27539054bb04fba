//! One `Invoke`, in order (see the crate docs): verify the token locally,
//! claim the key, spend the token at the captokens service, act, record.
//! No transaction is open while the token is spent or the connector acts.

use std::time::{Duration, Instant};

use anumate_captokens::{Expectation, Failure};
use anumate_errors::{Error, ErrorCode, Reason, Result};
use anumate_idempotency::{Claim, Key};
use anumate_proto::captokens::v1 as ctpb;
use anumate_service::clients::Caller;
use anumate_store::TenantTx;
use serde_json::json;

use crate::keys::Refused;
use crate::{
    Call, ConnectorError, Hub, Invocation, Invoked, SCOPE, breaker_host, connector_error, refusal,
    replay, repo,
};

/// First and longest pause between two looks at a key in flight.
const POLL_FIRST: Duration = Duration::from_millis(2);
const POLL_MAX: Duration = Duration::from_millis(50);

impl Hub {
    pub(crate) async fn invoke_checked(&self, inv: &Invocation<'_>) -> Result<Invoked> {
        // 1. The token authorises exactly this call (no I/O but a first or
        //    rotated key set): nothing is read or claimed for a bad token.
        let mut expected = Expectation::new(&self.audience, inv.tenant, inv.tool);
        expected.args = Some(inv.args);
        let verified = match self.keys.verify(inv.token, &expected).await {
            Ok(v) => v,
            Err(Refused::Token(r)) => return Err(refusal(&r.failure)),
            Err(Refused::Unavailable(e)) => return Err(e),
        };
        let fingerprint = anumate_idempotency::fingerprint(&json!({
            "tool": inv.tool,
            "args": inv.args,
        }))?;
        let key = Key {
            scope: SCOPE,
            key: inv.idempotency_key,
            fingerprint: &fingerprint,
            expires_at: anumate_store::now_micros().saturating_add(self.ttl_micros),
        };
        // 2. The tool (served from memory by the registry's documents cache
        //    in process) before any state changes.
        let tool = self.tools.tool(inv.tenant, inv.tool).await?;
        let connector_name = tool.spec.connector.as_string();
        let connector = self
            .connectors
            .get(&connector_name)
            .ok_or_else(|| {
                Error::because(
                    Reason::ConnectorFailed,
                    format!("connector {connector_name:?} is not available in this hub"),
                )
                .with_metadata("retryable", "false")
            })?
            .clone();
        if !connector.serves(inv.tenant) {
            return Err(Error::because(
                Reason::ConnectorFailed,
                format!("connector {connector_name:?} is not available to this tenant"),
            )
            .with_metadata("retryable", "false"));
        }
        // 3. The key: a recorded result is the answer; else this call holds
        //    it and (4.) has spent the token — in the same transaction when
        //    the replay store is in this hub's store.
        let host = breaker_host(&tool);
        let claimed = match self.claim_fast(inv, &key, &host, &verified.claims).await? {
            Some(claimed) => claimed,
            None => self.claim(inv, &key, &host).await?,
        };
        let claimed_at = match claimed {
            Claimed::Recorded(recorded) => return Ok(*recorded),
            Claimed::Held { claimed_at, spent } => {
                if !spent {
                    // 4. Spend the token in the platform's one replay store
                    //    (and check revocations): refused or unknown, nothing acts.
                    if let Err(e) = self.spend(inv).await {
                        self.breakers.abandon(inv.tool, &host);
                        self.release(inv, claimed_at).await?;
                        return Err(e);
                    }
                }
                claimed_at
            }
        };
        // 5. Act, with no transaction open.
        let claims = &verified.claims;
        let outcome = connector
            .invoke(Call {
                tool: &tool,
                args: inv.args,
                idempotency_key: inv.idempotency_key,
                run: &claims.run,
                step: &claims.step,
                tenant: inv.tenant,
                store: &self.store,
            })
            .await;
        let failed = matches!(&outcome, Err(f) if f.retryable);
        if let Some(state) = self
            .breakers
            .record(inv.tool, &host, failed, Instant::now())
        {
            tracing::warn!(tool = inv.tool, host = %host, state = ?state, "connector circuit breaker");
        }
        crate::metrics::breaker(
            inv.tool,
            &host,
            self.breakers.state(inv.tool, &host, Instant::now()),
        );
        // 6. Record (or, retryable, free the key for a retry with a fresh token).
        match outcome {
            Ok(output) => {
                let recorded = json!({"connector": connector_name, "output": output});
                let recorded_at = self.record(inv, claimed_at, &recorded).await?;
                Ok(Invoked {
                    output,
                    replayed: false,
                    connector: connector_name,
                    recorded_at,
                })
            }
            Err(failure) if failure.retryable => {
                self.release(inv, claimed_at).await?;
                Err(connector_error(&failure))
            }
            Err(failure) => {
                let recorded = json!({"connector": connector_name, "error": {
                    "message": failure.message,
                    "upstream_status": failure.upstream_status,
                }});
                self.record(inv, claimed_at, &recorded).await?;
                Err(connector_error(&failure))
            }
        }
    }

    /// Claims the key in a short transaction: the recorded answer when the
    /// same call was recorded before, else this call now holds the key. A
    /// key in flight is looked at again (with backoff) until it is recorded,
    /// released (then claimed), stale (taken over) or `in_flight_wait`
    /// passed (`CALL_IN_FLIGHT`). The circuit breaker is asked before the
    /// claim commits (an open circuit claims nothing), and when the replay
    /// store is in this store the token is spent in the same transaction:
    /// the key is held if and only if the token is spent.
    async fn claim(&self, inv: &Invocation<'_>, key: &Key<'_>, host: &str) -> Result<Claimed> {
        let in_tx = self.tokens.consumes_in_transaction();
        let started = Instant::now();
        // Answer `CALL_IN_FLIGHT` while the caller still listens: give up a
        // tenth of its remaining time (at least 50 ms) before its deadline.
        let give_up = inv.deadline.map(|d| {
            let left = d.saturating_duration_since(started);
            d.checked_sub((left / 10).max(Duration::from_millis(50)))
                .unwrap_or(started)
        });
        let mut pause = POLL_FIRST;
        loop {
            // Without the token in it, a lost claim only reopens the
            // documented crash window: no need to wait for its WAL flush.
            let tx = if in_tx {
                self.store.write(inv.tenant).await?
            } else {
                self.store.write_relaxed(inv.tenant).await?
            };
            let now = anumate_store::now_micros();
            let held = match anumate_idempotency::claim_at(&tx, key, now).await? {
                Claim::New => true,
                Claim::Replay(recorded) => {
                    return Ok(Claimed::Recorded(Box::new(replay(recorded)?)));
                }
                Claim::Reused { .. } => {
                    return Err(anumate_idempotency::reused_error(
                        "idempotency_key",
                        inv.idempotency_key,
                    ));
                }
                Claim::InFlight => {
                    let cutoff = now.saturating_sub(self.lease_micros);
                    let taken =
                        repo::take_over_stale(&tx, SCOPE, key.key, key.fingerprint, now, cutoff)
                            .await?;
                    if taken {
                        tracing::warn!(
                            tool = inv.tool,
                            idempotency_key = inv.idempotency_key,
                            "connectors: took over a key left in flight past its lease"
                        );
                    }
                    taken
                }
            };
            if held {
                if !self.breakers.admit(inv.tool, host, Instant::now()) {
                    // Nothing happened: the claim rolls back, the token is unspent.
                    drop(tx);
                    return Err(connector_error(&ConnectorError::retryable(format!(
                        "circuit open for {} at {host}: failing fast",
                        inv.tool
                    ))));
                }
                if !in_tx {
                    tx.commit().await?;
                    return Ok(Claimed::Held {
                        claimed_at: now,
                        spent: false,
                    });
                }
                return match self.spend_in(&tx, inv).await {
                    Ok(()) => {
                        tx.commit().await?;
                        Ok(Claimed::Held {
                            claimed_at: now,
                            spent: true,
                        })
                    }
                    Err(Spend::Refused(e)) => {
                        // The refusal's audit record commits; the claim does not stay.
                        self.breakers.abandon(inv.tool, host);
                        repo::release_held(&tx, SCOPE, key.key, now).await?;
                        tx.commit().await?;
                        Err(e)
                    }
                    Err(Spend::Failed(e)) => {
                        self.breakers.abandon(inv.tool, host);
                        Err(e)
                    }
                };
            }
            drop(tx);
            let now = Instant::now();
            if now.duration_since(started) >= self.in_flight_wait
                || give_up.is_some_and(|g| now + pause >= g)
            {
                return Err(self.in_flight(inv, key).await);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
    }

    /// The common case in one round trip: a free key claimed and the token
    /// spent in one durable batch (`repo::claim_and_spend`), when the replay
    /// store is in this store on PostgreSQL, the token is single-use and the
    /// circuit is closed. `None`: the key was taken before (a recorded
    /// result, a call in flight, a reused or expired key) or the fast path
    /// does not apply, and nothing was written: [`Hub::claim`] decides. A
    /// refused token undoes the claim in the batch; the refusal is then
    /// audited (and told revoked from spent) by spending it at captokens.
    async fn claim_fast(
        &self,
        inv: &Invocation<'_>,
        key: &Key<'_>,
        host: &str,
        claims: &anumate_captokens::Claims,
    ) -> Result<Option<Claimed>> {
        if !claims.single_use
            || self.store.backend() != anumate_store::Backend::Postgres
            || !self.tokens.consumes_in_transaction()
            || !self.breakers.closed(inv.tool, host)
        {
            return Ok(None);
        }
        let now = anumate_store::now_micros();
        match repo::claim_and_spend(
            &self.store,
            inv.tenant,
            key,
            now,
            &claims.jti,
            &claims.run,
            claims.exp,
        )
        .await?
        {
            repo::FastClaim::Held => Ok(Some(Claimed::Held {
                claimed_at: now,
                spent: true,
            })),
            repo::FastClaim::Taken => Ok(None),
            repo::FastClaim::Refused => {
                match self.spend(inv).await {
                    Err(e) => Err(e),
                    // Spendable a moment later (its replay record purged
                    // meanwhile): spent now without a claim, so refused.
                    Ok(()) => Err(refusal(&Failure::Replayed)),
                }
            }
        }
    }

    /// `CALL_IN_FLIGHT`: another call holds the key; says when the hub takes
    /// it over if that call never ends.
    async fn in_flight(&self, inv: &Invocation<'_>, key: &Key<'_>) -> Error {
        let mut err = Error::because(
            Reason::CallInFlight,
            format!(
                "a call with idempotency key {:?} is in flight in the hub: this call did nothing \
                 and did not spend its token; send it again later with the same key",
                inv.idempotency_key
            ),
        )
        .with_metadata("retryable", "true");
        let claimed = async {
            let tx = self.store.read(inv.tenant).await?;
            repo::claimed_at(&tx, SCOPE, key.key).await
        };
        if let Ok(Some(at)) = claimed.await {
            let expires = at.saturating_add(self.lease_micros);
            if let Some(t) = chrono::DateTime::from_timestamp_micros(expires) {
                err = err.with_metadata(
                    "lease_expire_time",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                );
            }
        }
        err
    }

    /// Spends the token inside the claim's transaction (the replay store is
    /// in this hub's store).
    async fn spend_in(
        &self,
        tx: &TenantTx,
        inv: &Invocation<'_>,
    ) -> std::result::Result<(), Spend> {
        let caller = Caller::Service {
            tenant: inv.tenant.to_owned(),
            service: crate::SERVICE_IDENTITY,
        };
        let resp = self
            .tokens
            .consume_in(
                tx,
                &caller,
                ctpb::ConsumeTokenRequest {
                    token: inv.token.to_owned(),
                },
            )
            .await
            .map_err(Spend::Failed)?;
        verdict(&resp).map_err(Spend::Refused)
    }

    /// Spends the token at the captokens service (revocation, single use).
    async fn spend(&self, inv: &Invocation<'_>) -> Result<()> {
        let caller = Caller::Service {
            tenant: inv.tenant.to_owned(),
            service: crate::SERVICE_IDENTITY,
        };
        let resp = self
            .tokens
            .consume(
                &caller,
                ctpb::ConsumeTokenRequest {
                    token: inv.token.to_owned(),
                },
            )
            .await
            .map_err(|e| {
                let e = e.to_error();
                Error::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the capability token could not be spent (captokens: {}: {}); nothing was called",
                        e.code, e.message
                    ),
                )
            })?;
        verdict(&resp)
    }

    /// Frees the key this call holds (nothing was done, or a retry may act);
    /// a key taken over by another call since stays.
    async fn release(&self, inv: &Invocation<'_>, claimed_at: i64) -> Result<()> {
        let tx = self.store.write_relaxed(inv.tenant).await?;
        repo::release_held(&tx, SCOPE, inv.idempotency_key, claimed_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the result of the call holding the key; returns when. The
    /// commit does not wait for its WAL flush: what the caller does next
    /// with the answer (the orchestrator's step result and receipt) commits
    /// durably after it and so flushes it too, and a database crash before
    /// that leaves the key claimed — the documented crash window.
    async fn record(
        &self,
        inv: &Invocation<'_>,
        claimed_at: i64,
        result: &serde_json::Value,
    ) -> Result<i64> {
        let at = repo::record_held(
            &self.store,
            inv.tenant,
            SCOPE,
            inv.idempotency_key,
            claimed_at,
            result,
        )
        .await?;
        if at.is_none() {
            tracing::warn!(
                tool = inv.tool,
                idempotency_key = inv.idempotency_key,
                "connectors: the key was taken over while this call acted; its result is not recorded"
            );
        }
        Ok(at.unwrap_or_else(anumate_store::now_micros))
    }
}

/// What [`Hub::claim`] found.
enum Claimed {
    /// The same call was recorded before: its answer.
    Recorded(Box<Invoked>),
    /// This call holds the key since `claimed_at` (micros); `spent`: its
    /// token was spent in the claim's transaction.
    Held { claimed_at: i64, spent: bool },
}

/// Why a token was not spent in the claim's transaction.
enum Spend {
    /// Revoked, used before or otherwise refused (audited).
    Refused(Error),
    /// The replay store failed.
    Failed(Error),
}

/// A `ConsumeToken` verdict as the call's answer.
fn verdict(resp: &ctpb::ConsumeTokenResponse) -> Result<()> {
    match ctpb::TokenVerdict::try_from(resp.verdict) {
        Ok(ctpb::TokenVerdict::Valid) => Ok(()),
        Ok(ctpb::TokenVerdict::Revoked) => Err(refusal(&Failure::Revoked)),
        Ok(ctpb::TokenVerdict::Replayed) => Err(refusal(&Failure::Replayed)),
        _ => Err(Error::because(
            Reason::TokenScopeMismatch,
            format!("capability token refused for this call: {}", resp.message),
        )),
    }
}
