//! PII and secret redaction for logs, events, receipts and exports (SPEC §3).
//!
//! - [`Detector`]s find emails, phone numbers, payment cards (Luhn), IBANs
//!   (mod-97), US SSNs, IPv4/IPv6 addresses, API keys/secrets and JWTs.
//!   Their lowercase names are what the policy DSL's
//!   `redact(detectors: [...])` takes.
//! - [`Redactor::redact_str`] replaces matches in a string and returns
//!   [`Cow::Borrowed`] (no allocation) when nothing matched.
//! - [`Redactor::redact_json`] replaces whole values at configured field
//!   paths and scans every other string (and object key) recursively.
//! - [`RedactingMakeWriter`] redacts `tracing` output (JSON, compact or
//!   pretty) before it reaches the underlying writer.
//!
//! ## How scanning stays fast
//! One pass over the bytes computes which features are present (`@`, digit
//! count, colons, longest base64-alphabet run, …). Only detectors whose
//! features are present run; the numeric detectors share one hand-written
//! scanner over digit groups, and regexes (IBAN, key prefixes) run only when
//! their gate passes. Validation (Luhn, mod-97, SSN rules, JWT header JSON) is
//! done on candidates only.
//!
//! ## Detector notes
//! See [`Detector`] for what each one accepts and rejects.
#![forbid(unsafe_code)]

mod detect;
mod json;
mod layer;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use detect::{
    ENTROPY_BASE64_BITS, ENTROPY_HEX_BITS, ENTROPY_MIN_LEN, high_entropy_token, shannon,
};
pub use json::FieldPath;
pub use layer::{RedactingMakeWriter, RedactingWriter};

/// Errors building a [`Redactor`] or parsing detector names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedactionError {
    /// A detector name that is not one of [`Detector::ALL`].
    #[error(
        "unknown detector `{0}` (expected one of: email, phone, card, iban, ssn, ipv4, ipv6, api_key, jwt)"
    )]
    UnknownDetector(String),
    /// A field path that does not parse.
    #[error("invalid field path `{path}`: {reason}")]
    InvalidFieldPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// A built-in detector. The `Display`/`FromStr` names are stable.
///
/// | name | accepts | rejects |
/// |---|---|---|
/// | `email` | `local@domain.tld`, local part `[A-Za-z0-9._%+-]`, TLD alphabetic ≥ 2 | no TLD, numeric TLD, `..`, leading/trailing dot, label starting/ending `-` |
/// | `phone` | E.164 `+<8–15 digits>` with spaces/dashes/dots/parens; `(415) 555-0132`; US `415-555-0132`/`415.555.0132`/`415 555 0132`/`1-415-555-0132`; trunk-0 national 10–11 digits (`020 7946 0958`, `07911 123456`, `09876543210`); India `98765 43210` | bare digit runs without `+` or trunk 0 (order numbers), dates, versions, 7-digit local numbers, numbers glued to words (`ORD-…`) |
/// | `card` | 13–19 digits, optionally grouped (3–6 digits) by one consistent space or dash, first digit 2–6, Luhn-valid | Luhn failures, other first digits, mixed separators |
/// | `iban` | uppercase, optional spaces in groups of 4, country length table, mod-97 = 1 | wrong length or checksum, unknown country |
/// | `ssn` | `AAA-GG-SSSS` or `AAA GG SSSS` | area 000/666/9xx, group 00, serial 0000, 078-05-1120, bare 9 digits |
/// | `ipv4` | dotted quad, octets 0–255 without leading zeros | versions `1.2.3`, `v1.2.3.4`, five-part dotted numbers, octet > 255 |
/// | `ipv6` | anything `std::net::Ipv6Addr` parses with ≥ 2 colons and a digit | times `10:30:00`, MACs, `a::b` without digits, Rust paths |
/// | `api_key` | `sk_live_`/`sk_test_`/`rk_…`, `ghp_`/`gho_`/…, `github_pat_`, `xox[bpas]-`, `AKIA`/`ASIA`, `AIza`, `glpat-`, PEM private key blocks; high-entropy tokens (see [`high_entropy_token`]) | words, identifiers, paths, UUIDs, 40/64-char hex digests |
/// | `jwt` | three base64url segments whose header decodes to a JSON object with a string `alg` | anything whose header does not decode |
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// Email addresses.
    Email,
    /// Phone numbers (E.164 and common national forms).
    Phone,
    /// Payment card numbers (Luhn-valid).
    Card,
    /// International bank account numbers (mod-97-valid).
    Iban,
    /// US social security numbers.
    Ssn,
    /// IPv4 addresses.
    Ipv4,
    /// IPv6 addresses.
    Ipv6,
    /// API keys, private keys and high-entropy secrets.
    ApiKey,
    /// JSON Web Tokens.
    Jwt,
}

impl Detector {
    /// Every detector, in declaration order.
    pub const ALL: [Detector; 9] = [
        Detector::Email,
        Detector::Phone,
        Detector::Card,
        Detector::Iban,
        Detector::Ssn,
        Detector::Ipv4,
        Detector::Ipv6,
        Detector::ApiKey,
        Detector::Jwt,
    ];

    /// The stable lowercase name used by the policy DSL.
    pub fn name(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::Card => "card",
            Detector::Iban => "iban",
            Detector::Ssn => "ssn",
            Detector::Ipv4 => "ipv4",
            Detector::Ipv6 => "ipv6",
            Detector::ApiKey => "api_key",
            Detector::Jwt => "jwt",
        }
    }

    /// Whether the whole of `s` (ignoring surrounding whitespace) is one
    /// match of this detector.
    pub fn is_match(self, s: &str) -> bool {
        let t = s.trim();
        if t.is_empty() {
            return false;
        }
        if self == Detector::Iban && is_iban_whole(t) {
            return true;
        }
        let mut out = Vec::new();
        detect::scan(t, detect::Mask::single(self), &mut out);
        matches!(out.as_slice(), [m] if m.start == 0 && m.end == t.len())
    }

    /// Whether `s` contains at least one match of this detector.
    pub fn is_found_in(self, s: &str) -> bool {
        let mut out = Vec::new();
        detect::scan(s, detect::Mask::single(self), &mut out);
        !out.is_empty()
    }
}

fn is_iban_whole(t: &str) -> bool {
    detect::is_iban_str(t)
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Detector {
    type Err = RedactionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Detector::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| RedactionError::UnknownDetector(s.to_owned()))
    }
}

/// Whether `s` is an email address.
pub fn is_email(s: &str) -> bool {
    Detector::Email.is_match(s)
}
/// Whether `s` is a phone number.
pub fn is_phone(s: &str) -> bool {
    Detector::Phone.is_match(s)
}
/// Whether `s` is a Luhn-valid payment card number.
pub fn is_card(s: &str) -> bool {
    Detector::Card.is_match(s)
}
/// Whether `s` is a checksum-valid IBAN.
pub fn is_iban(s: &str) -> bool {
    Detector::Iban.is_match(s)
}
/// Whether `s` is a valid-looking US SSN.
pub fn is_ssn(s: &str) -> bool {
    Detector::Ssn.is_match(s)
}
/// Whether `s` is an IPv4 address.
pub fn is_ipv4(s: &str) -> bool {
    Detector::Ipv4.is_match(s)
}
/// Whether `s` is an IPv6 address.
pub fn is_ipv6(s: &str) -> bool {
    Detector::Ipv6.is_match(s)
}
/// Whether `s` is an API key, private key block or high-entropy secret.
pub fn is_api_key(s: &str) -> bool {
    Detector::ApiKey.is_match(s)
}
/// Whether `s` is a JWT.
pub fn is_jwt(s: &str) -> bool {
    Detector::Jwt.is_match(s)
}

/// What replaces a match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Replacement {
    /// The same text for everything, e.g. `[REDACTED]`.
    Fixed(String),
    /// `[REDACTED:<detector>]`, and `[REDACTED:field]` for field paths.
    #[default]
    Label,
}

/// How a [`Redactor`] is set up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedactionConfig {
    /// Detectors to run on strings.
    pub detectors: Vec<Detector>,
    /// What replaces a match.
    pub replacement: Replacement,
    /// JSON field paths whose whole value is replaced: dotted keys, `*` for
    /// any key, `[*]` for any array element, `[N]` for one element
    /// (e.g. `customer.email`, `items[*].card`, `*.ssn`).
    pub field_paths: Vec<String>,
}

impl Default for RedactionConfig {
    /// All detectors, labelled replacement, no field paths.
    fn default() -> Self {
        RedactionConfig {
            detectors: Detector::ALL.to_vec(),
            replacement: Replacement::Label,
            field_paths: Vec::new(),
        }
    }
}

/// A detection in a string: byte offsets into the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    /// Which detector matched.
    pub detector: Detector,
    /// Start byte offset (inclusive).
    pub start: usize,
    /// End byte offset (exclusive).
    pub end: usize,
}

/// What [`Redactor::redact_json`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RedactionReport {
    /// Matches replaced, per detector.
    pub counts: BTreeMap<Detector, usize>,
    /// Values replaced because their path matched a field path.
    pub fields: usize,
    /// Paths (`a.b[2].c`) of every value or key changed, in document order.
    /// Object keys that were themselves redacted appear in redacted form.
    pub paths: Vec<String>,
}

impl RedactionReport {
    /// Total number of replacements.
    pub fn total(&self) -> usize {
        self.fields + self.counts.values().sum::<usize>()
    }

    /// Whether nothing was changed.
    pub fn is_empty(&self) -> bool {
        self.total() == 0
    }
}

/// Applies detectors and field paths. Build once, share freely (`Sync`).
#[derive(Debug, Clone)]
pub struct Redactor {
    mask: detect::Mask,
    labels: [String; 9],
    field_label: String,
    paths: Vec<FieldPath>,
}

impl Default for Redactor {
    fn default() -> Self {
        Self::build(RedactionConfig::default(), Vec::new())
    }
}

impl Redactor {
    /// Builds a redactor; fails on a malformed field path.
    pub fn new(config: RedactionConfig) -> Result<Self, RedactionError> {
        let paths = config
            .field_paths
            .iter()
            .map(|p| p.parse())
            .collect::<Result<Vec<FieldPath>, _>>()?;
        Ok(Self::build(config, paths))
    }

    fn build(config: RedactionConfig, paths: Vec<FieldPath>) -> Self {
        let label = |name: &str| match &config.replacement {
            Replacement::Fixed(t) => t.clone(),
            Replacement::Label => format!("[REDACTED:{name}]"),
        };
        Redactor {
            mask: detect::Mask::of(&config.detectors),
            labels: Detector::ALL.map(|d| label(d.name())),
            field_label: label("field"),
            paths,
        }
    }

    /// The replacement text for a detector.
    pub fn replacement_for(&self, d: Detector) -> &str {
        &self.labels[d as usize]
    }

    /// Every detection in `s`, non-overlapping, in order.
    pub fn find(&self, s: &str) -> Vec<Match> {
        let mut out = Vec::new();
        detect::scan(s, self.mask, &mut out);
        out.into_iter()
            .map(|f| Match {
                detector: f.detector,
                start: f.start,
                end: f.end,
            })
            .collect()
    }

    /// `s` with every detection replaced; borrowed when nothing matched.
    pub fn redact_str<'a>(&self, s: &'a str) -> Cow<'a, str> {
        self.redact_counting(s, |_| {})
    }

    fn redact_counting<'a>(&self, s: &'a str, mut seen: impl FnMut(Detector)) -> Cow<'a, str> {
        let mut found = Vec::new();
        detect::scan(s, self.mask, &mut found);
        if found.is_empty() {
            return Cow::Borrowed(s);
        }
        let mut out = String::with_capacity(s.len());
        let mut last = 0;
        for f in &found {
            out.push_str(&s[last..f.start]);
            out.push_str(self.replacement_for(f.detector));
            last = f.end;
            seen(f.detector);
        }
        out.push_str(&s[last..]);
        Cow::Owned(out)
    }

    /// Redacts `value` in place: values at configured field paths are replaced
    /// whole; every other string, object key, and large integer (≥ 7 digits,
    /// which could be a card or phone number) is scanned by the detectors.
    ///
    /// Object keys are scanned because PII does end up as keys (maps keyed by
    /// email); a redacted key that collides with an existing one gets a `#2`,
    /// `#3`, … suffix so no entry is lost. Integers that match become strings.
    pub fn redact_json(&self, value: &mut serde_json::Value) -> RedactionReport {
        let mut report = RedactionReport::default();
        json::redact(self, value, &mut report);
        report
    }
}
