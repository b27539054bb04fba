//! The public keys that verify capability tokens: the captokens service's
//! JWKS (`GetJwks`, or the in-process service's), never its private keys.
//!
//! The set is fetched on first use and kept. A token signed with a key the
//! set does not know (`kid` unknown: the service rotated its keys) makes the
//! hub fetch the set again, at most once per [`REFETCH_EVERY`], before the
//! token is refused as `UNKNOWN_KEY`.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anumate_captokens::{Expectation, Failure, Rejection, VerifiedToken, Verifier};
use anumate_crypto::Jwks;
use anumate_errors::{Error, ErrorCode, Result};
use anumate_service::clients::CapTokensClient;

/// Shortest time between two fetches of the JWKS.
pub const REFETCH_EVERY: Duration = Duration::from_secs(10);

/// Why a token did not verify here.
pub enum Refused {
    /// The token does not authorise this call.
    Token(Rejection),
    /// The keys could not be read.
    Unavailable(Error),
}

/// The verifier over the current JWKS.
pub struct TokenKeys {
    tokens: Arc<dyn CapTokensClient>,
    leeway_secs: u32,
    current: RwLock<Option<Arc<Verifier>>>,
    /// When the set was last fetched (successfully or not).
    fetched_at: Mutex<Option<Instant>>,
    /// Serialises fetches, so a burst of unknown `kid`s fetches once.
    fetching: tokio::sync::Mutex<()>,
}

impl TokenKeys {
    /// Keys read from `tokens` (the captokens service).
    pub fn new(tokens: Arc<dyn CapTokensClient>, leeway_secs: u32) -> TokenKeys {
        TokenKeys {
            tokens,
            leeway_secs,
            current: RwLock::new(None),
            fetched_at: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn current(&self) -> Option<Arc<Verifier>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Fetches the JWKS unless it was fetched less than [`REFETCH_EVERY`] ago
    /// (or `seen` is no longer the current set: another call fetched it).
    async fn refetch(&self, seen: Option<&Arc<Verifier>>) -> Result<Arc<Verifier>> {
        let _one = self.fetching.lock().await;
        let now = self.current();
        if let Some(now) = &now
            && seen.is_none_or(|seen| !Arc::ptr_eq(seen, now))
        {
            return Ok(now.clone());
        }
        let recent = self
            .fetched_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < REFETCH_EVERY);
        if let (true, Some(now)) = (recent, now) {
            return Ok(now);
        }
        *self
            .fetched_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        let json = self.tokens.jwks().await.map_err(|e| {
            Error::new(
                ErrorCode::Unavailable,
                format!(
                    "the capability token keys (captokens GetJwks) are unavailable: {}",
                    e.message()
                ),
            )
        })?;
        let jwks: Jwks = serde_json::from_str(&json).map_err(|e| {
            Error::internal(format!("captokens sent a JWKS that does not parse: {e}"))
        })?;
        let verifier = Arc::new(
            Verifier::from_jwks(&jwks)
                .map_err(|e| Error::internal(format!("captokens JWKS: {e}")))?
                .with_leeway(self.leeway_secs),
        );
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(verifier.clone());
        tracing::info!(
            kids = ?verifier.kids().collect::<Vec<_>>(),
            "connectors: capability token keys fetched"
        );
        Ok(verifier)
    }

    /// Checks `token`'s signature, times and call binding (no revocation or
    /// replay: the captokens service checks those when the token is spent).
    pub async fn verify(
        &self,
        token: &str,
        expected: &Expectation<'_>,
    ) -> std::result::Result<VerifiedToken, Refused> {
        let verifier = match self.current() {
            Some(v) => v,
            None => self.refetch(None).await.map_err(Refused::Unavailable)?,
        };
        match verifier.verify(token, expected) {
            Err(r) if matches!(r.failure, Failure::UnknownKey(_)) => {
                let fresh = self
                    .refetch(Some(&verifier))
                    .await
                    .map_err(Refused::Unavailable)?;
                if Arc::ptr_eq(&fresh, &verifier) {
                    return Err(Refused::Token(r));
                }
                fresh.verify(token, expected).map_err(Refused::Token)
            }
            other => other.map_err(Refused::Token),
        }
    }
}
