//! Receipt statements (what a receipt signs) and offline verification of a
//! receipt, its inclusion proof and a checkpoint.

use anumate_crypto::{
    Jwks, KeyPair, b64url, b64url_decode, canonical_json, content_hash, verify_es256,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::merkle::{Hash, ProofError, leaf_hash, verify_inclusion};
use crate::note::{Checkpoint, NoteError, open_checkpoint_with_jwks};

/// The receipt kinds: the `ReceiptKind` names without prefix.
pub const RECEIPT_KINDS: [&str; 4] = [
    "STEP_EXECUTION",
    "APPROVAL_DECISION",
    "TOKEN_REVOCATION",
    "RUN_OUTCOME",
];

/// The statement format version: `2` signs the appending service (`actor`).
pub const STATEMENT_VERSION: u64 = 2;

/// The checkpoint origin (and signed-note key name) of a tenant's receipt log.
pub fn log_origin(tenant_id: &str) -> String {
    format!("anumate.dev/receipts/{tenant_id}")
}

/// What a receipt is about; empty fields are left out of the statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    /// Run id.
    pub run_id: String,
    /// Step id.
    pub step_id: String,
    /// Attempt number (0 = not set).
    pub attempt: i32,
    /// Plan hash (`sha256:…`).
    pub plan_hash: String,
    /// Approval id.
    pub approval_id: String,
    /// Revoked token ids (sorted when the statement is built).
    pub jtis: Vec<String>,
}

impl Subject {
    fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (key, value) in [
            ("run_id", &self.run_id),
            ("step_id", &self.step_id),
            ("plan_hash", &self.plan_hash),
            ("approval_id", &self.approval_id),
        ] {
            if !value.is_empty() {
                map.insert(key.into(), Value::String(value.clone()));
            }
        }
        if self.attempt != 0 {
            map.insert("attempt".into(), Value::from(self.attempt));
        }
        if !self.jtis.is_empty() {
            let mut jtis = self.jtis.clone();
            jtis.sort();
            map.insert(
                "jtis".into(),
                Value::Array(jtis.into_iter().map(Value::String).collect()),
            );
        }
        Value::Object(map)
    }
}

/// The fields a receipt signs (see `receipts.proto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// Receipt id (UUID).
    pub receipt_id: String,
    /// Tenant whose log holds the receipt.
    pub tenant_id: String,
    /// One of [`RECEIPT_KINDS`].
    pub kind: String,
    /// What it is about.
    pub subject: Subject,
    /// `sha256:<hex>` of the JCS form of the redacted content.
    pub content_digest: String,
    /// RFC 3339 UTC with `Z` and microseconds, e.g. `2025-01-02T03:04:05.000006Z`.
    pub issue_time: String,
    /// Key id of the signing key.
    pub kid: String,
    /// The appending service identity, `svc:<name>`.
    pub actor: String,
}

impl Statement {
    /// `statement_json`: the RFC 8785 form of the statement object.
    pub fn to_json(&self) -> Result<String, ReceiptError> {
        if !RECEIPT_KINDS.contains(&self.kind.as_str()) {
            return Err(ReceiptError::InvalidField("kind"));
        }
        if !is_issue_time(&self.issue_time) {
            return Err(ReceiptError::InvalidField("issue_time"));
        }
        if !is_content_digest(&self.content_digest) {
            return Err(ReceiptError::InvalidField("content_digest"));
        }
        if !is_actor(&self.actor) {
            return Err(ReceiptError::InvalidField("actor"));
        }
        let value = serde_json::json!({
            "actor": self.actor,
            "v": STATEMENT_VERSION,
            "content_digest": self.content_digest,
            "issue_time": self.issue_time,
            "kid": self.kid,
            "kind": self.kind,
            "receipt_id": self.receipt_id,
            "subject": self.subject.to_json(),
            "tenant_id": self.tenant_id,
        });
        canonical_json(&value).map_err(|_| ReceiptError::InvalidField("statement"))
    }

    /// Signs the statement with `key` (whose kid must be the statement's).
    pub fn sign(&self, key: &KeyPair) -> Result<SignedStatement, ReceiptError> {
        if key.kid() != self.kid {
            return Err(ReceiptError::InvalidField("kid"));
        }
        let statement_json = self.to_json()?;
        let signature = b64url(&key.sign(statement_json.as_bytes()));
        let leaf_hash = leaf_hash(statement_json.as_bytes());
        Ok(SignedStatement {
            statement_json,
            signature,
            leaf_hash,
        })
    }
}

/// A signed statement and its log leaf hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedStatement {
    /// The exact signed bytes.
    pub statement_json: String,
    /// ES256 signature, base64url without padding, raw `r || s`.
    pub signature: String,
    /// RFC 6962 leaf hash of `statement_json`.
    pub leaf_hash: Hash,
}

/// Why a statement could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// A field has an invalid value.
    #[error("invalid receipt field {0}")]
    InvalidField(&'static str),
}

fn is_issue_time(s: &str) -> bool {
    // YYYY-MM-DDTHH:MM:SS.ffffffZ
    let b = s.as_bytes();
    b.len() == 27
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// A service identity: `svc:` and 1-63 characters of `a-z`, `0-9` and `-`.
fn is_actor(s: &str) -> bool {
    s.strip_prefix("svc:").is_some_and(|name| {
        !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

fn is_content_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// An inclusion proof as served by `GetInclusionProof` (hashes base64 in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    /// 0-based index of the leaf.
    #[serde(alias = "leafIndex", with = "int64")]
    pub leaf_index: u64,
    /// Size of the tree the path leads to (the checkpoint's size).
    #[serde(alias = "treeSize", with = "int64")]
    pub tree_size: u64,
    /// Sibling hashes from the leaf up to the root.
    #[serde(alias = "auditPath", with = "hashes")]
    pub audit_path: Vec<Hash>,
}

/// A `Receipt` in proto3 JSON (snake_case names accepted too). Every field
/// is checked against the signed statement, so no byte of a receipt can change
/// without failing verification; unknown fields are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptJson {
    #[serde(alias = "statementJson")]
    statement_json: String,
    signature: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, alias = "receiptId")]
    receipt_id: Option<String>,
    #[serde(default, alias = "tenantId")]
    tenant_id: Option<String>,
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default)]
    subject: Option<Map<String, Value>>,
    #[serde(default, alias = "contentDigest")]
    content_digest: Option<String>,
    #[serde(default, alias = "issueTime")]
    issue_time: Option<String>,
    #[serde(default, alias = "leafIndex", with = "opt_int64")]
    leaf_index: Option<u64>,
    #[serde(default, alias = "leafHash")]
    leaf_hash: Option<String>,
    #[serde(default)]
    content: Option<Value>,
    /// Set when retention removed the content (then there is none to check).
    #[serde(default, alias = "contentArchived")]
    content_archived: Option<bool>,
    #[serde(default)]
    actor: Option<String>,
}

/// The statement fields a verifier reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifiedStatement {
    /// Receipt id.
    pub receipt_id: String,
    /// Tenant id.
    pub tenant_id: String,
    /// Kind name.
    pub kind: String,
    /// Subject fields as signed.
    pub subject: Map<String, Value>,
    /// `sha256:<hex>` content digest.
    pub content_digest: String,
    /// Issue time as signed.
    pub issue_time: String,
    /// Signing key id.
    pub kid: String,
    /// The appending service identity (`svc:<name>`).
    pub actor: String,
    /// Statement version ([`STATEMENT_VERSION`]).
    pub v: u64,
}

/// The outcome of a successful offline verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The signed statement.
    pub statement: VerifiedStatement,
    /// The leaf hash of the receipt.
    pub leaf_hash: Hash,
    /// Its position in the log.
    pub leaf_index: u64,
    /// The checkpoint it is included in.
    pub checkpoint: Checkpoint,
}

/// Why offline verification failed; each check has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The receipt is not JSON of the expected shape.
    #[error("receipt is malformed: {0}")]
    MalformedReceipt(String),
    /// `statement_json` is not a statement object.
    #[error("statement is malformed: {0}")]
    MalformedStatement(String),
    /// `statement_json` is not in RFC 8785 canonical form.
    #[error("statement is not RFC 8785 canonical JSON")]
    NonCanonicalStatement,
    /// An unsigned receipt field disagrees with the signed statement or proof.
    #[error("receipt field {0} does not match the signed statement")]
    FieldMismatch(&'static str),
    /// The statement's `kid` is not in the key set.
    #[error("receipt signing key {0} is not in the key set")]
    UnknownReceiptKey(String),
    /// The receipt signature does not verify.
    #[error("receipt signature does not verify")]
    BadReceiptSignature,
    /// The checkpoint note is not a well-formed checkpoint.
    #[error("checkpoint is malformed: {0}")]
    MalformedCheckpoint(String),
    /// No checkpoint signature is from a key in the key set.
    #[error("checkpoint is not signed by a key in the key set")]
    UnknownCheckpointKey,
    /// A checkpoint signature from a known key does not verify.
    #[error("checkpoint signature does not verify")]
    BadCheckpointSignature,
    /// The proof is for a different tree size than the checkpoint.
    #[error("proof is for tree size {proof}, checkpoint has {checkpoint}")]
    TreeSizeMismatch {
        /// The proof's tree size.
        proof: u64,
        /// The checkpoint's tree size.
        checkpoint: u64,
    },
    /// The checkpoint is of another log than the receipt's tenant's.
    #[error("checkpoint is of log {checkpoint:?}, the receipt is in {expected:?}")]
    WrongLog {
        /// The origin of the receipt's tenant's log.
        expected: String,
        /// The checkpoint's origin.
        checkpoint: String,
    },
    /// The receipt is not in the checkpoint's tree.
    #[error("receipt is not included in the checkpoint's tree: {0}")]
    NotIncluded(ProofError),
}

impl From<NoteError> for VerifyError {
    fn from(e: NoteError) -> VerifyError {
        match e {
            NoteError::Malformed(_) | NoteError::MalformedCheckpoint(_) | NoteError::BadKey(_) => {
                VerifyError::MalformedCheckpoint(e.to_string())
            }
            NoteError::UnknownKey => VerifyError::UnknownCheckpointKey,
            NoteError::BadSignature(_) => VerifyError::BadCheckpointSignature,
        }
    }
}

/// Verifies a receipt offline: its ES256 signature with the key `kid` from
/// `jwks`, its inclusion in the tree of `checkpoint_note` via `proof`, and the
/// checkpoint's signature (a key of `jwks` under the checkpoint's origin),
/// and that the checkpoint is of the receipt's tenant's log ([`log_origin`]).
///
/// `receipt_json` is a `Receipt` in proto3 JSON (or with snake_case names);
/// only `statement_json` and `signature` are required. Every other field
/// present must agree with the signed statement and the proof (`content` must
/// hash to `content_digest`); unknown fields are rejected.
pub fn verify_receipt_offline(
    receipt_json: &str,
    proof: &InclusionProof,
    checkpoint_note: &str,
    jwks: &Jwks,
) -> Result<Verified, VerifyError> {
    let receipt: ReceiptJson = serde_json::from_str(receipt_json)
        .map_err(|e| VerifyError::MalformedReceipt(e.to_string()))?;
    let statement = parse_statement(&receipt)?;

    // Receipt signature.
    let jwk = jwks
        .find(&statement.kid)
        .ok_or_else(|| VerifyError::UnknownReceiptKey(statement.kid.clone()))?;
    let signature = b64url_decode(&receipt.signature).ok_or(VerifyError::BadReceiptSignature)?;
    if !verify_es256(jwk, receipt.statement_json.as_bytes(), &signature) {
        return Err(VerifyError::BadReceiptSignature);
    }
    check_fields(&receipt, &statement)?;

    // Checkpoint signature.
    let checkpoint = open_checkpoint_with_jwks(checkpoint_note, jwks)?;
    // One key ring signs every tenant's log: the origin says whose it is.
    let expected = log_origin(&statement.tenant_id);
    if checkpoint.origin != expected {
        return Err(VerifyError::WrongLog {
            expected,
            checkpoint: checkpoint.origin,
        });
    }

    // Inclusion.
    let leaf = leaf_hash(receipt.statement_json.as_bytes());
    if let Some(claimed) = &receipt.leaf_hash
        && STANDARD.decode(claimed).ok().as_deref() != Some(&leaf[..])
    {
        return Err(VerifyError::FieldMismatch("leaf_hash"));
    }
    if receipt.leaf_index.is_some_and(|i| i != proof.leaf_index) {
        return Err(VerifyError::FieldMismatch("leaf_index"));
    }
    if proof.tree_size != checkpoint.size {
        return Err(VerifyError::TreeSizeMismatch {
            proof: proof.tree_size,
            checkpoint: checkpoint.size,
        });
    }
    verify_inclusion(
        proof.leaf_index,
        checkpoint.size,
        &leaf,
        &proof.audit_path,
        &checkpoint.root,
    )
    .map_err(VerifyError::NotIncluded)?;

    Ok(Verified {
        statement,
        leaf_hash: leaf,
        leaf_index: proof.leaf_index,
        checkpoint,
    })
}

/// Parses `statement_json` and checks it is a canonical, well-formed statement.
fn parse_statement(receipt: &ReceiptJson) -> Result<VerifiedStatement, VerifyError> {
    let value: Value = serde_json::from_str(&receipt.statement_json)
        .map_err(|e| VerifyError::MalformedStatement(e.to_string()))?;
    let canonical =
        canonical_json(&value).map_err(|e| VerifyError::MalformedStatement(e.to_string()))?;
    if canonical != receipt.statement_json {
        return Err(VerifyError::NonCanonicalStatement);
    }
    let statement: VerifiedStatement = serde_json::from_value(value)
        .map_err(|e| VerifyError::MalformedStatement(e.to_string()))?;
    if !RECEIPT_KINDS.contains(&statement.kind.as_str()) {
        return Err(VerifyError::MalformedStatement("unknown kind".into()));
    }
    if statement.v != STATEMENT_VERSION {
        return Err(VerifyError::MalformedStatement(format!(
            "statement version {} (expected {STATEMENT_VERSION})",
            statement.v
        )));
    }
    if !is_actor(&statement.actor) {
        return Err(VerifyError::MalformedStatement("bad actor".into()));
    }
    if !is_issue_time(&statement.issue_time) || !is_content_digest(&statement.content_digest) {
        return Err(VerifyError::MalformedStatement(
            "bad issue_time or content_digest".into(),
        ));
    }
    if normalize_subject(&statement.subject).as_ref() != Some(&statement.subject) {
        return Err(VerifyError::MalformedStatement("bad subject".into()));
    }
    Ok(statement)
}

/// Checks that the receipt's unsigned copies of the statement fields agree with it.
fn check_fields(receipt: &ReceiptJson, statement: &VerifiedStatement) -> Result<(), VerifyError> {
    let checks: [(&'static str, &Option<String>, &String); 5] = [
        ("actor", &receipt.actor, &statement.actor),
        ("kid", &receipt.kid, &statement.kid),
        ("receipt_id", &receipt.receipt_id, &statement.receipt_id),
        ("tenant_id", &receipt.tenant_id, &statement.tenant_id),
        (
            "content_digest",
            &receipt.content_digest,
            &statement.content_digest,
        ),
    ];
    for (field, outer, signed) in checks {
        if outer.as_ref().is_some_and(|o| o != signed) {
            return Err(VerifyError::FieldMismatch(field));
        }
    }
    if let Some(kind) = &receipt.kind {
        let position = RECEIPT_KINDS.iter().position(|k| *k == statement.kind);
        let matches = match kind {
            Value::String(name) => name
                .strip_prefix("RECEIPT_KIND_")
                .is_some_and(|k| k == statement.kind),
            Value::Number(n) => position.is_some_and(|p| n.as_u64() == Some(p as u64 + 1)),
            _ => false,
        };
        if !matches {
            return Err(VerifyError::FieldMismatch("kind"));
        }
    }
    if let Some(subject) = &receipt.subject
        && normalize_subject(subject) != normalize_subject(&statement.subject)
    {
        return Err(VerifyError::FieldMismatch("subject"));
    }
    if let Some(time) = &receipt.issue_time
        && normalize_time(time) != normalize_time(&statement.issue_time)
    {
        return Err(VerifyError::FieldMismatch("issue_time"));
    }
    if receipt.content_archived == Some(true) && receipt.content.is_some() {
        return Err(VerifyError::FieldMismatch("content_archived"));
    }
    if let Some(content) = &receipt.content {
        let (_, digest) = content_hash(content);
        if digest != statement.content_digest {
            return Err(VerifyError::FieldMismatch("content"));
        }
    }
    Ok(())
}

/// Subject fields under their proto names, defaults (proto3 omits them) dropped.
fn normalize_subject(subject: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mut out = Map::new();
    for (key, value) in subject {
        let name = match key.as_str() {
            "runId" | "run_id" => "run_id",
            "stepId" | "step_id" => "step_id",
            "attempt" => "attempt",
            "planHash" | "plan_hash" => "plan_hash",
            "approvalId" | "approval_id" => "approval_id",
            "jtis" => "jtis",
            _ => return None,
        };
        let is_default = match value {
            Value::String(s) => s.is_empty(),
            Value::Number(n) => n.as_i64() == Some(0),
            Value::Array(a) => a.is_empty(),
            _ => return None,
        };
        if !is_default && out.insert(name.to_owned(), value.clone()).is_some() {
            return None;
        }
    }
    Some(out)
}

/// RFC 3339 UTC time with the fraction's trailing zeros dropped (proto3 JSON
/// writes 0, 3, 6 or 9 digits; the statement always 6).
fn normalize_time(time: &str) -> Option<String> {
    let body = time.strip_suffix('Z')?;
    let (secs, frac) = body.split_once('.').unwrap_or((body, ""));
    if secs.len() != 19 || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    Some(format!("{secs}.{}", frac.trim_end_matches('0')))
}

/// proto3 JSON writes int64 as a string; accept a number or a decimal string.
fn parse_int64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Num(u64),
        Str(String),
    }
    match Int::deserialize(d)? {
        Int::Num(n) => Ok(n),
        Int::Str(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

mod int64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        parse_int64(d)
    }
}

mod opt_int64 {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        parse_int64(d).map(Some)
    }
}

mod hashes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[Hash], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|h| STANDARD.encode(h)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        texts
            .iter()
            .map(|t| {
                STANDARD
                    .decode(t)
                    .ok()
                    .and_then(|b| Hash::try_from(b).ok())
                    .ok_or_else(|| serde::de::Error::custom("hash is not base64 of 32 bytes"))
            })
            .collect()
    }
}
