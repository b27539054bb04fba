//! ES256 key pairs and the key ring of an issuer.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anumate_errors::{Error, ErrorCode};
use p256::ecdsa::SigningKey;
use p256::elliptic_curve::Generate as _;
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _, LineEnding};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::jwk::{Jwk, Jwks, verify_sec1};

/// An ES256 (ECDSA P-256 with SHA-256) signing key. Cheap to clone.
#[derive(Clone)]
pub struct KeyPair {
    inner: Arc<Inner>,
}

struct Inner {
    signing: SigningKey,
    ring: EcdsaKeyPair,
    rng: SystemRandom,
    jwk: Jwk,
    kid: String,
    point: [u8; 65],
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("kid", &self.inner.kid)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh random key from the operating system's RNG.
    pub fn generate() -> Result<KeyPair, Error> {
        let signing = SigningKey::try_generate()
            .map_err(|e| Error::new(ErrorCode::Internal, format!("no system randomness: {e}")))?;
        KeyPair::from_signing_key(signing)
    }

    /// Parses a PKCS#8 PEM (`PRIVATE KEY`); SEC1 PEM (`EC PRIVATE KEY`) is accepted too.
    pub fn from_pkcs8_pem(pem: &str) -> Result<KeyPair, Error> {
        let signing = match SigningKey::from_pkcs8_pem(pem) {
            Ok(key) => key,
            Err(pkcs8_err) => match p256::SecretKey::from_sec1_pem(pem) {
                Ok(secret) => SigningKey::from(secret),
                Err(_) => {
                    return Err(Error::new(
                        ErrorCode::InvalidArgument,
                        format!("not a P-256 private key in PKCS#8 or SEC1 PEM: {pkcs8_err}"),
                    ));
                }
            },
        };
        KeyPair::from_signing_key(signing)
    }

    fn from_signing_key(signing: SigningKey) -> Result<KeyPair, Error> {
        // ring only takes PKCS#8 with the public key embedded; p256 writes exactly that.
        let der = signing
            .to_pkcs8_der()
            .map_err(|e| Error::new(ErrorCode::Internal, format!("encoding key: {e}")))?;
        let rng = SystemRandom::new();
        let ring = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.as_bytes(), &rng)
            .map_err(|e| Error::new(ErrorCode::Internal, format!("ring rejected key: {e}")))?;
        let encoded = signing.verifying_key().to_sec1_point(false);
        let point: [u8; 65] = encoded
            .as_bytes()
            .try_into()
            .map_err(|_| Error::new(ErrorCode::Internal, "unexpected P-256 public point length"))?;
        let jwk = Jwk::ec_p256(&point[1..33], &point[33..]);
        let kid = jwk.kid.clone().unwrap_or_default();
        Ok(KeyPair {
            inner: Arc::new(Inner {
                signing,
                ring,
                rng,
                jwk,
                kid,
                point,
            }),
        })
    }

    /// The private key as PKCS#8 PEM (LF line endings).
    pub fn to_pkcs8_pem(&self) -> String {
        match self.inner.signing.to_pkcs8_pem(LineEnding::LF) {
            Ok(pem) => pem.to_string(),
            // Encoding a valid in-memory key does not fail.
            Err(_) => String::new(),
        }
    }

    /// The key id: the RFC 7638 JWK thumbprint, base64url.
    pub fn kid(&self) -> &str {
        &self.inner.kid
    }

    /// The public key as a JWK (`kid`, `alg: ES256`, `use: sig` set).
    pub fn public_jwk(&self) -> Jwk {
        self.inner.jwk.clone()
    }

    /// Signs `msg`: ES256, 64-byte raw `r || s`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        match self.inner.ring.sign(&self.inner.rng, msg) {
            Ok(sig) => sig.as_ref().to_vec(),
            Err(_) => {
                // ring only fails when the RNG does; fall back to deterministic RFC 6979.
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::Signature = self.inner.signing.sign(msg);
                sig.to_bytes().to_vec()
            }
        }
    }

    /// Signs `msg` and returns the signature base64url-encoded (a JWS signature part).
    pub fn sign_b64url(&self, msg: &[u8]) -> String {
        crate::b64url(&self.sign(msg))
    }

    /// Verifies an ES256 signature made by this key.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        verify_sec1(&self.inner.point, msg, sig)
    }
}

#[derive(Debug, Clone)]
struct VerifyKey {
    jwk: Jwk,
    kid: String,
    point: [u8; 65],
}

/// An active signing key plus older keys still accepted for verification.
#[derive(Debug, Clone)]
pub struct KeyRing {
    active: KeyPair,
    // The active key first, then older keys.
    keys: Vec<VerifyKey>,
}

impl KeyRing {
    /// A ring with only `active`.
    pub fn new(active: KeyPair) -> KeyRing {
        let keys = vec![VerifyKey {
            jwk: active.public_jwk(),
            kid: active.kid().to_owned(),
            point: active.inner.point,
        }];
        KeyRing { active, keys }
    }

    /// Adds an older key that still verifies but no longer signs.
    pub fn with_retired(mut self, old: &KeyPair) -> KeyRing {
        if !self.keys.iter().any(|k| k.kid == old.kid()) {
            self.keys.push(VerifyKey {
                jwk: old.public_jwk(),
                kid: old.kid().to_owned(),
                point: old.inner.point,
            });
        }
        self
    }

    /// Adds a public-only P-256 JWK for verification; its `kid` defaults to the thumbprint.
    pub fn with_public_jwk(mut self, jwk: Jwk) -> Result<KeyRing, Error> {
        let point = jwk.p256_sec1().ok_or_else(|| {
            Error::new(
                ErrorCode::InvalidArgument,
                "JWK is not an EC P-256 public key",
            )
        })?;
        let kid = match jwk.kid.clone().or_else(|| jwk.thumbprint()) {
            Some(kid) => kid,
            None => return Err(Error::new(ErrorCode::InvalidArgument, "JWK has no kid")),
        };
        if !self.keys.iter().any(|k| k.kid == kid) {
            let mut jwk = jwk;
            jwk.kid = Some(kid.clone());
            self.keys.push(VerifyKey { jwk, kid, point });
        }
        Ok(self)
    }

    /// Loads `<dir>/<name>.key.pem`, creating the directory and a fresh key (mode 0600) if missing.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<KeyRing, Error> {
        let path = dir.join(format!("{name}.key.pem"));
        if path.exists() {
            return Ok(KeyRing::new(read_key(&path)?));
        }
        fs::create_dir_all(dir).map_err(|e| io_error("creating key directory", dir, &e))?;
        let key = KeyPair::generate()?;
        match create_private_file(&path) {
            Ok(mut file) => {
                file.write_all(key.to_pkcs8_pem().as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io_error("writing key", &path, &e))?;
                Ok(KeyRing::new(key))
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(KeyRing::new(read_key(&path)?))
            }
            Err(e) => Err(io_error("creating key", &path, &e)),
        }
    }

    /// Loads PEM key files; the first is the active key, the rest verify only.
    pub fn from_pem_files(paths: &[PathBuf]) -> Result<KeyRing, Error> {
        let (first, rest) = paths.split_first().ok_or_else(|| {
            Error::new(
                ErrorCode::InvalidArgument,
                "no signing key files configured",
            )
        })?;
        let mut ring = KeyRing::new(read_key(first)?);
        for path in rest {
            ring = ring.with_retired(&read_key(path)?);
        }
        Ok(ring)
    }

    /// The key that signs.
    pub fn active(&self) -> &KeyPair {
        &self.active
    }

    /// The public keys of the ring, active first.
    pub fn jwks(&self) -> Jwks {
        Jwks {
            keys: self.keys.iter().map(|k| k.jwk.clone()).collect(),
        }
    }

    /// Verifies an ES256 `r || s` signature with the ring's key `kid`.
    pub fn verify(&self, kid: &str, msg: &[u8], sig: &[u8]) -> bool {
        self.keys
            .iter()
            .find(|k| k.kid == kid)
            .is_some_and(|k| verify_sec1(&k.point, msg, sig))
    }
}

fn read_key(path: &Path) -> Result<KeyPair, Error> {
    let pem = fs::read_to_string(path).map_err(|e| io_error("reading key", path, &e))?;
    KeyPair::from_pkcs8_pem(&pem).map_err(|e| {
        Error::new(
            e.code,
            format!("key file {}: {}", path.display(), e.message),
        )
    })
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::new(
        ErrorCode::Internal,
        format!("{what} {}: {e}", path.display()),
    )
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private_file(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}
