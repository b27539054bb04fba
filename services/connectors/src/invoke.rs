//! One `Invoke`, in order (see the crate docs): verify the token locally,
//! claim the key, spend the token at the captokens service, act, record.
//! No transaction is open while the token is spent or the connector acts.

use std::time::{Duration, Instant};

use anumate_captokens::{Expectation, Failure};
use anumate_errors::{Error, ErrorCode, Reason, Result};
use anumate_idempotency::{Claim, Key};
use anumate_proto::captokens::v1 as ctpb;
use anumate_service::clients::Caller;
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
        // 3. The key: a recorded result is the answer; else this call holds it.
        if let Some(recorded) = self.claim(inv, &key).await? {
            return Ok(recorded);
        }
        let host = breaker_host(&tool);
        if !self.breakers.admit(inv.tool, &host, Instant::now()) {
            // Nothing happened: the key is free again, the token unspent.
            self.release(inv).await?;
            return Err(connector_error(&ConnectorError::retryable(format!(
                "circuit open for {} at {host}: failing fast",
                inv.tool
            ))));
        }
        // 4. Spend the token in the platform's one replay store (and check
        //    revocations): refused or unknown, nothing acts.
        if let Err(e) = self.spend(inv).await {
            self.breakers.abandon(inv.tool, &host);
            self.release(inv).await?;
            return Err(e);
        }
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
                let recorded_at = self.record(inv, &recorded).await?;
                Ok(Invoked {
                    output,
                    replayed: false,
                    connector: connector_name,
                    recorded_at,
                })
            }
            Err(failure) if failure.retryable => {
                self.release(inv).await?;
                Err(connector_error(&failure))
            }
            Err(failure) => {
                let recorded = json!({"connector": connector_name, "error": {
                    "message": failure.message,
                    "upstream_status": failure.upstream_status,
                }});
                self.record(inv, &recorded).await?;
                Err(connector_error(&failure))
            }
        }
    }

    /// Claims the key in a short transaction: `None` when this call now holds
    /// it, the recorded answer when the same call was recorded before. A key
    /// in flight is looked at again (with backoff) until it is recorded,
    /// released (then claimed), stale (taken over) or `in_flight_wait` passed.
    async fn claim(&self, inv: &Invocation<'_>, key: &Key<'_>) -> Result<Option<Invoked>> {
        let started = Instant::now();
        let mut pause = POLL_FIRST;
        loop {
            let tx = self.store.write(inv.tenant).await?;
            repo::relaxed_commit(&tx).await?;
            match anumate_idempotency::claim(&tx, key).await? {
                Claim::New => {
                    tx.commit().await?;
                    return Ok(None);
                }
                Claim::Replay(recorded) => return replay(recorded).map(Some),
                Claim::Reused { .. } => {
                    return Err(anumate_idempotency::reused_error(
                        "idempotency_key",
                        inv.idempotency_key,
                    ));
                }
                Claim::InFlight => {
                    let cutoff = anumate_store::now_micros().saturating_sub(self.lease_micros);
                    if repo::take_over_stale(&tx, SCOPE, key.key, key.fingerprint, cutoff).await? {
                        tx.commit().await?;
                        tracing::warn!(
                            tool = inv.tool,
                            idempotency_key = inv.idempotency_key,
                            "connectors: took over a key left in flight past its lease"
                        );
                        return Ok(None);
                    }
                }
            }
            drop(tx);
            if started.elapsed() >= self.in_flight_wait {
                return Err(Error::because(
                    Reason::ConnectorRetryable,
                    "a call with this idempotency key is in flight",
                )
                .with_metadata("retryable", "true"));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL_MAX);
        }
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

    /// Frees the key (nothing was done, or a retry may act).
    async fn release(&self, inv: &Invocation<'_>) -> Result<()> {
        let tx = self.store.write(inv.tenant).await?;
        repo::relaxed_commit(&tx).await?;
        anumate_idempotency::release(&tx, SCOPE, inv.idempotency_key).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records the key's result; returns when.
    async fn record(&self, inv: &Invocation<'_>, result: &serde_json::Value) -> Result<i64> {
        let tx = self.store.write(inv.tenant).await?;
        let at = anumate_idempotency::record(&tx, SCOPE, inv.idempotency_key, result).await?;
        tx.commit().await?;
        Ok(at)
    }
}
