//! Checkpoints as C2SP signed notes (`c2sp.org/signed-note`, `c2sp.org/tlog-checkpoint`),
//! signed with ECDSA P-256.
//!
//! ```text
//! anumate.example/receipts/acme
//! 42
//! 3Vm7bVH6sCrj3tHn8o5tNXBIg1GG+3oxbgWlGGvJnAw=
//!
//! — anumate.example/receipts/acme 1nbgBTBFAiEA…
//! ```
//!
//! Signatures use signed-note type `0x02` ("ECDSA signatures as implemented by
//! github.com/transparency-dev/witness", the format Sigstore Rekor uses): the
//! signature is ASN.1 DER ECDSA P-256 over SHA-256 of the note text, and the
//! key id is the first four bytes of SHA-256 of the key's DER
//! SubjectPublicKeyInfo. Our logs sign with the key name equal to the origin
//! line, so a verifier that only has a JWKS checks each key under the origin.

use anumate_crypto::{Jwk, Jwks, KeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};

use crate::merkle::Hash;

/// The signed-note signature type byte of ECDSA keys.
pub const ECDSA_SIGNATURE_TYPE: u8 = 0x02;

/// Most signature lines a note may carry; the spec asks verifiers to accept 16.
const MAX_SIGNATURES: usize = 16;

/// DER prefix of a P-256 SubjectPublicKeyInfo with an uncompressed point:
/// SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING (65 bytes) }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Why a checkpoint note was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// The text is not a well-formed signed note.
    #[error("malformed signed note: {0}")]
    Malformed(&'static str),
    /// The note text is not a well-formed checkpoint body.
    #[error("malformed checkpoint: {0}")]
    MalformedCheckpoint(&'static str),
    /// No signature line is from a known key.
    #[error("checkpoint is not signed by any known key")]
    UnknownKey,
    /// A signature from a known key does not verify.
    #[error("checkpoint signature by {0} does not verify")]
    BadSignature(String),
    /// The key cannot sign or verify notes (not a P-256 key, bad name).
    #[error("unusable note key: {0}")]
    BadKey(&'static str),
}

/// A log's signed tree head: origin, tree size and root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The log identity, e.g. `anumate.example/receipts/<tenant>`.
    pub origin: String,
    /// Number of leaves.
    pub size: u64,
    /// RFC 6962 root hash of those leaves.
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: `<origin>\n<size>\n<base64 root>\n`.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        )
    }

    /// Parses a note text strictly: exactly three lines, canonical decimal size,
    /// canonical base64 of a 32-byte root. Extension lines are rejected (we never write any).
    pub fn parse_body(text: &str) -> Result<Checkpoint, NoteError> {
        let bad = NoteError::MalformedCheckpoint;
        let body = text
            .strip_suffix('\n')
            .ok_or(bad("missing final newline"))?;
        let mut lines = body.split('\n');
        let (Some(origin), Some(size), Some(root_text), None) =
            (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(bad("expected exactly origin, size and root lines"));
        };
        if origin.is_empty() || origin.chars().any(char::is_whitespace) || origin.contains('+') {
            return Err(bad("origin is empty or has spaces or '+'"));
        }
        let canonical_size = !size.is_empty()
            && size.bytes().all(|b| b.is_ascii_digit())
            && (size == "0" || !size.starts_with('0'));
        if !canonical_size {
            return Err(bad("tree size is not a canonical decimal"));
        }
        let size: u64 = size.parse().map_err(|_| bad("tree size out of range"))?;
        let root_bytes = STANDARD
            .decode(root_text)
            .map_err(|_| bad("root is not base64"))?;
        let root: Hash = root_bytes
            .try_into()
            .map_err(|_| bad("root is not 32 bytes"))?;
        // Exactly one text per checkpoint: no alternative base64 spellings.
        if STANDARD.encode(root) != root_text {
            return Err(bad("root is not canonical base64"));
        }
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root,
        })
    }
}

/// Checks the signed-note key name rules: non-empty, no spaces, no `+`.
fn check_key_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty() || name.chars().any(char::is_whitespace) || name.contains('+') {
        return Err(NoteError::BadKey("key name is empty or has spaces or '+'"));
    }
    Ok(())
}

/// The DER SubjectPublicKeyInfo of an uncompressed P-256 point.
pub fn p256_spki_der(point: &[u8; 65]) -> Vec<u8> {
    let mut der = Vec::with_capacity(91);
    der.extend_from_slice(&P256_SPKI_PREFIX);
    der.extend_from_slice(point);
    der
}

/// The signed-note key id of a P-256 key: SHA-256(SPKI DER)[..4], big-endian.
pub fn ecdsa_key_id(point: &[u8; 65]) -> u32 {
    let h = anumate_crypto::sha256(&p256_spki_der(point));
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// Signs notes with an ES256 key under a key name.
#[derive(Debug, Clone)]
pub struct NoteSigner {
    name: String,
    key: KeyPair,
    key_id: u32,
}

impl NoteSigner {
    /// A signer for `key` under `name` (use the log's origin).
    pub fn new(name: &str, key: KeyPair) -> Result<NoteSigner, NoteError> {
        check_key_name(name)?;
        let point = key
            .public_jwk()
            .p256_sec1()
            .ok_or(NoteError::BadKey("not a P-256 key"))?;
        Ok(NoteSigner {
            name: name.to_owned(),
            key_id: ecdsa_key_id(&point),
            key,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 4-byte key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The matching verifier.
    pub fn verifier(&self) -> Result<NoteVerifier, NoteError> {
        NoteVerifier::from_jwk(&self.name, &self.key.public_jwk())
    }

    /// One signature line (`— <name> <base64>\n`) over `text`.
    pub fn signature_line(&self, text: &str) -> Result<String, NoteError> {
        let raw = self.key.sign(text.as_bytes());
        let der = p256::ecdsa::Signature::from_slice(&raw)
            .map_err(|_| NoteError::BadKey("signer produced an invalid signature"))?
            .to_der();
        let mut blob = Vec::with_capacity(4 + der.as_bytes().len());
        blob.extend_from_slice(&self.key_id.to_be_bytes());
        blob.extend_from_slice(der.as_bytes());
        Ok(format!(
            "\u{2014} {} {}\n",
            self.name,
            STANDARD.encode(blob)
        ))
    }

    /// Signs a note text (which must end in a newline) and returns the signed note.
    pub fn sign(&self, text: &str) -> Result<String, NoteError> {
        check_text(text)?;
        Ok(format!("{text}\n{}", self.signature_line(text)?))
    }

    /// Signs a checkpoint and returns the signed note.
    pub fn sign_checkpoint(&self, checkpoint: &Checkpoint) -> Result<String, NoteError> {
        // Round-trip the body so we never sign a checkpoint we would not accept.
        let body = checkpoint.body();
        Checkpoint::parse_body(&body)?;
        self.sign(&body)
    }
}

/// Verifies note signatures of one P-256 key under one key name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key_id: u32,
    point: [u8; 65],
}

impl NoteVerifier {
    /// A verifier for the P-256 public JWK `jwk` under `name`.
    pub fn from_jwk(name: &str, jwk: &Jwk) -> Result<NoteVerifier, NoteError> {
        check_key_name(name)?;
        if jwk
            .alg
            .as_deref()
            .is_some_and(|alg| alg != anumate_crypto::ES256)
        {
            return Err(NoteError::BadKey("JWK is not an ES256 key"));
        }
        let point = jwk
            .p256_sec1()
            .ok_or(NoteError::BadKey("JWK is not an EC P-256 key"))?;
        Ok(NoteVerifier {
            name: name.to_owned(),
            key_id: ecdsa_key_id(&point),
            point,
        })
    }

    /// Parses a verifier key in the text form of `transparency-dev/witness` and
    /// Rekor (see [`NoteVerifier::vkey`]); only P-256 keys are accepted.
    pub fn from_vkey(vkey: &str) -> Result<NoteVerifier, NoteError> {
        let mut parts = vkey.splitn(3, '+');
        let (Some(name), Some(id), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::BadKey("verifier key is not name+id+key"));
        };
        check_key_name(name)?;
        let blob = STANDARD
            .decode(b64)
            .map_err(|_| NoteError::BadKey("verifier key is not base64"))?;
        let spki = blob
            .strip_prefix(&[ECDSA_SIGNATURE_TYPE])
            .ok_or(NoteError::BadKey("not an ECDSA (0x02) verifier key"))?;
        let point: [u8; 65] = spki
            .strip_prefix(&P256_SPKI_PREFIX)
            .and_then(|p| p.try_into().ok())
            .ok_or(NoteError::BadKey("not a P-256 SubjectPublicKeyInfo"))?;
        let key_id = ecdsa_key_id(&point);
        if id.len() != 8 || u32::from_str_radix(id, 16).ok() != Some(key_id) {
            return Err(NoteError::BadKey("verifier key id does not match the key"));
        }
        Ok(NoteVerifier {
            name: name.to_owned(),
            key_id,
            point,
        })
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 4-byte key id.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The verifier key in the text form of `transparency-dev/witness` and Rekor:
    /// `<name>+<key id, 8 hex digits>+<base64(0x02 || SPKI DER)>`.
    pub fn vkey(&self) -> String {
        let mut blob = vec![ECDSA_SIGNATURE_TYPE];
        blob.extend_from_slice(&p256_spki_der(&self.point));
        format!(
            "{}+{:08x}+{}",
            self.name,
            self.key_id,
            STANDARD.encode(blob)
        )
    }

    fn verify(&self, text: &str, sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(text.as_bytes(), sig)
            .is_ok()
    }
}

/// A note whose signature(s) verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNote {
    /// The note text (ends in a newline).
    pub text: String,
    /// Names of the known keys whose signatures verified.
    pub signers: Vec<String>,
}

/// The signed-note character rules: no control characters but newline.
fn check_text(text: &str) -> Result<(), NoteError> {
    if text.chars().any(|c| c < ' ' && c != '\n') {
        return Err(NoteError::Malformed("control character"));
    }
    if !text.ends_with('\n') {
        return Err(NoteError::Malformed("text does not end in a newline"));
    }
    Ok(())
}

/// Parses and verifies a signed note (`c2sp.org/signed-note`).
///
/// Signatures from keys not in `verifiers` (name and id) are ignored; a known
/// key's signature that fails rejects the note; at least one must verify.
pub fn open_note(note: &str, verifiers: &[NoteVerifier]) -> Result<VerifiedNote, NoteError> {
    let bad = NoteError::Malformed;
    check_text(note)?;
    // The text is separated from the signatures by the last blank line.
    let split = note
        .rfind("\n\n")
        .ok_or(bad("no blank line before signatures"))?;
    let text = &note[..=split];
    let sigs = &note[split + 2..];
    let lines: Vec<&str> = sigs
        .strip_suffix('\n')
        .ok_or(bad("no signature lines"))?
        .split('\n')
        .collect();
    if lines.len() > MAX_SIGNATURES {
        return Err(bad("too many signatures"));
    }
    let mut signers = Vec::new();
    for line in lines {
        let rest = line.strip_prefix("\u{2014} ").ok_or(bad(
            "signature line does not start with an em dash and a space",
        ))?;
        let (name, b64) = rest
            .split_once(' ')
            .ok_or(bad("signature line has no signature"))?;
        if name.is_empty() || name.contains('+') || b64.contains(' ') {
            return Err(bad("malformed signature line"));
        }
        let blob = STANDARD
            .decode(b64)
            .map_err(|_| bad("signature is not base64"))?;
        if blob.len() < 5 || STANDARD.encode(&blob) != b64 {
            return Err(bad("signature is too short or not canonical base64"));
        }
        let key_id = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]);
        let Some(verifier) = verifiers
            .iter()
            .find(|v| v.name == name && v.key_id == key_id)
        else {
            continue;
        };
        if !verifier.verify(text, &blob[4..]) {
            return Err(NoteError::BadSignature(name.to_owned()));
        }
        if !signers.iter().any(|s| s == name) {
            signers.push(name.to_owned());
        }
    }
    if signers.is_empty() {
        return Err(NoteError::UnknownKey);
    }
    Ok(VerifiedNote {
        text: text.to_owned(),
        signers,
    })
}

/// Parses and verifies a checkpoint note with explicit verifiers.
pub fn open_checkpoint(note: &str, verifiers: &[NoteVerifier]) -> Result<Checkpoint, NoteError> {
    let verified = open_note(note, verifiers)?;
    Checkpoint::parse_body(&verified.text)
}

/// Parses and verifies a checkpoint note with the keys of a JWKS, each taken
/// under the checkpoint's origin as key name (the convention our logs sign with).
pub fn open_checkpoint_with_jwks(note: &str, jwks: &Jwks) -> Result<Checkpoint, NoteError> {
    check_text(note)?;
    let origin = note
        .split_once('\n')
        .map(|(first, _)| first)
        .ok_or(NoteError::Malformed("no origin line"))?;
    check_key_name(origin).map_err(|_| NoteError::MalformedCheckpoint("bad origin"))?;
    let verifiers: Vec<NoteVerifier> = jwks
        .keys
        .iter()
        .filter_map(|jwk| NoteVerifier::from_jwk(origin, jwk).ok())
        .collect();
    open_checkpoint(note, &verifiers)
}
