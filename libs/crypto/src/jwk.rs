//! JSON Web Keys (RFC 7517) and ES256 verification against them.

use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::{b64url, b64url_decode, sha256};

/// One public JSON Web Key. EC (P-256) keys use `crv`, `x`, `y`; RSA keys `n`, `e`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `EC` or `RSA`.
    pub kty: String,
    /// Curve of an EC key, `P-256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA public exponent, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Key id; for our keys the RFC 7638 thumbprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Intended algorithm, e.g. `ES256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Intended use, `sig`.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

impl Jwk {
    /// An ES256 signing JWK from raw 32-byte P-256 coordinates; `kid` is the thumbprint.
    pub fn ec_p256(x: &[u8], y: &[u8]) -> Jwk {
        let mut jwk = Jwk {
            kty: "EC".into(),
            crv: Some("P-256".into()),
            x: Some(b64url(x)),
            y: Some(b64url(y)),
            n: None,
            e: None,
            kid: None,
            alg: Some(crate::ES256.into()),
            use_: Some("sig".into()),
        };
        jwk.kid = jwk.thumbprint();
        jwk
    }

    /// The RFC 7638 SHA-256 thumbprint, base64url; `None` if required members are missing.
    pub fn thumbprint(&self) -> Option<String> {
        // Required members only, in lexicographic order, no whitespace.
        let json = match self.kty.as_str() {
            "EC" => format!(
                r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
                json_str(self.crv.as_deref()?),
                json_str(self.x.as_deref()?),
                json_str(self.y.as_deref()?)
            ),
            "RSA" => format!(
                r#"{{"e":{},"kty":"RSA","n":{}}}"#,
                json_str(self.e.as_deref()?),
                json_str(self.n.as_deref()?)
            ),
            _ => return None,
        };
        Some(b64url(&sha256(json.as_bytes())))
    }

    /// The uncompressed SEC1 point (`04 || x || y`) of a P-256 key.
    pub fn p256_sec1(&self) -> Option<[u8; 65]> {
        if self.kty != "EC" || self.crv.as_deref() != Some("P-256") {
            return None;
        }
        let x = b64url_decode(self.x.as_deref()?)?;
        let y = b64url_decode(self.y.as_deref()?)?;
        if x.len() != 32 || y.len() != 32 {
            return None;
        }
        let mut point = [0u8; 65];
        point[0] = 4;
        point[1..33].copy_from_slice(&x);
        point[33..].copy_from_slice(&y);
        Some(point)
    }
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A JSON Web Key Set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

impl Jwks {
    /// The key with id `kid`.
    pub fn find(&self, kid: &str) -> Option<&Jwk> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }
}

/// Verifies a raw 64-byte `r || s` ES256 signature over `msg` with an EC P-256 JWK.
pub fn verify_es256(jwk: &Jwk, msg: &[u8], sig: &[u8]) -> bool {
    if jwk.alg.as_deref().is_some_and(|alg| alg != crate::ES256) {
        return false;
    }
    match jwk.p256_sec1() {
        Some(point) => verify_sec1(&point, msg, sig),
        None => false,
    }
}

/// Verifies with an already decoded uncompressed public point.
pub(crate) fn verify_sec1(point: &[u8; 65], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(msg, sig)
        .is_ok()
}
