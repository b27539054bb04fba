//! The development issuer `anumate dev` creates: a local ES256 key that mints tokens.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anumate_crypto::{Jwks, KeyRing, b64url};
use anumate_errors::{Error, ErrorCode};
use serde_json::json;

use crate::principal::Role;

/// The `iss` of dev tokens.
pub const DEV_ISSUER: &str = "anumate-dev";

/// The `aud` of dev tokens.
pub const DEV_AUDIENCE: &str = "anumate";

/// File stem of the dev issuer's key under its directory.
const KEY_NAME: &str = "dev-issuer";

/// Mints ES256 bearer tokens with a key kept under a local directory.
#[derive(Debug, Clone)]
pub struct DevIssuer {
    keys: KeyRing,
}

impl DevIssuer {
    /// Loads the key from `dir/dev-issuer.key.pem`, creating it (mode 0600) if missing.
    pub fn load_or_create(dir: &Path) -> Result<DevIssuer, Error> {
        Ok(DevIssuer {
            keys: KeyRing::load_or_create(dir, KEY_NAME)?,
        })
    }

    /// A dev issuer over an existing key ring.
    pub fn from_key_ring(keys: KeyRing) -> DevIssuer {
        DevIssuer { keys }
    }

    /// The `iss` this issuer writes: `anumate-dev`.
    pub fn issuer(&self) -> &str {
        DEV_ISSUER
    }

    /// The public keys, for `Authenticator::with_static_issuer` or a JWKS endpoint.
    pub fn jwks(&self) -> Jwks {
        self.keys.jwks()
    }

    /// A token for `subject` in `tenant` with `roles`, valid for `ttl` from now.
    pub fn mint(
        &self,
        tenant: &str,
        subject: &str,
        roles: &[Role],
        ttl: Duration,
    ) -> Result<String, Error> {
        self.mint_with_groups(tenant, subject, roles, &[], ttl)
    }

    /// A token for `subject` in `tenant` with `roles` and a `groups` claim
    /// naming `groups` (bare names, or `group:<name>`), valid for `ttl` from
    /// now. Names a verifier would refuse are `INVALID_ARGUMENT` here.
    pub fn mint_with_groups(
        &self,
        tenant: &str,
        subject: &str,
        roles: &[Role],
        groups: &[String],
        ttl: Duration,
    ) -> Result<String, Error> {
        let claim = serde_json::Value::from(groups.to_vec());
        let groups = crate::parse_groups_claim(Some(&claim))
            .map_err(|why| Error::invalid_argument("groups", why))?;
        let now = now_secs()?;
        let exp = now.saturating_add(ttl.as_secs());
        let claims = json!({
            "iss": DEV_ISSUER,
            "sub": subject,
            "aud": DEV_AUDIENCE,
            "tenant": tenant,
            "roles": roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            "groups": groups,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        self.sign_claims(&claims)
    }

    /// Signs arbitrary `claims` as a compact ES256 JWS with this issuer's key.
    pub fn sign_claims(&self, claims: &serde_json::Value) -> Result<String, Error> {
        Ok(sign_jwt(&self.keys, claims))
    }
}

/// `claims` as a compact ES256 JWS signed with the active key of `keys`.
pub(crate) fn sign_jwt(keys: &KeyRing, claims: &serde_json::Value) -> String {
    let key = keys.active();
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": key.kid()});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = key.sign_b64url(signing_input.as_bytes());
    format!("{signing_input}.{signature}")
}

/// Seconds since the epoch.
pub(crate) fn now_secs() -> Result<u64, Error> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::new(ErrorCode::Internal, "system clock is before 1970"))?
        .as_secs())
}
