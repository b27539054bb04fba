//! Keys, JWK/JWKS, ES256 signing and verification, SHA-256 and RFC 8785
//! canonical JSON, and the plan and policy-set hashes built on it.
//!
//! Keys are held twice: as a `p256` key (generation, PEM, JWK coordinates) and
//! as a `ring` key pair, because `ring` signs and verifies several times faster
//! than the pure-Rust implementation and the token verify path is hot.
#![forbid(unsafe_code)]

mod hash;
mod jwk;
mod keys;
mod plan;

pub use hash::{
    DIGEST_PREFIX, canonical_json, content_hash, digest, parse_digest, sha256, sha256_hex,
};
pub use jwk::{Jwk, Jwks, verify_es256};
pub use keys::{KeyPair, KeyRing};
pub use plan::{PLAN_NON_EXECUTABLE_FIELDS, plan_executable_content, plan_hash, policy_set_hash};

/// The JWS algorithm name of every key this crate makes.
pub const ES256: &str = "ES256";

/// Base64url without padding, as JOSE uses it.
pub fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes base64url without padding (as JOSE uses it).
pub fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
}

#[cfg(test)]
mod tests;
