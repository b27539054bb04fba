//! Built-in functions: string helpers and PII detectors.
//!
//! The detectors are `libs/redaction`'s — the same code that redacts logs,
//! decision logs and receipts — so a policy condition `is_email(x)` and a
//! `redact(detectors: ["email"])` obligation agree on what an email is.
//! Each predicate is true when the whole (trimmed) string is one match of
//! the detector ([`anumate_redaction::Detector::is_match`]); see
//! [`anumate_redaction::Detector`] for what each accepts and rejects.
//!
//! | function | detector |
//! | --- | --- |
//! | `is_email(s)` | `email` |
//! | `is_phone(s)` | `phone`: E.164 and common national forms |
//! | `is_card(s)` | `card`: 13–19 digits, Luhn |
//! | `is_iban(s)` | `iban`: country length table, mod-97 |
//! | `is_ssn(s)` | `ssn`: US SSN |
//! | `is_ipv4(s)`, `is_ipv6(s)`, `is_ip(s)` | `ipv4`, `ipv6`, either (`ip`) |
//! | `is_api_key(s)` | `api_key`: known prefixes, PEM keys, high-entropy tokens |
//! | `is_jwt(s)` | `jwt`: three base64url parts, header a JSON object with `alg` |

use anumate_redaction::Detector as Found;

use crate::check::Ty;

/// A built-in function, resolved at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `lower(s)`.
    Lower,
    /// `upper(s)`.
    Upper,
    /// `trim(s)`.
    Trim,
    /// `len(s | list | object)`.
    Len,
    /// `starts_with(s, prefix)`.
    StartsWith,
    /// `ends_with(s, suffix)`.
    EndsWith,
    /// A PII detector over one string.
    Detect(Detector),
}

/// A PII detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detector {
    /// Email address.
    Email,
    /// Phone number.
    Phone,
    /// Payment card number (Luhn).
    Card,
    /// IBAN (mod 97).
    Iban,
    /// US social security number.
    Ssn,
    /// IPv4 address.
    Ipv4,
    /// IPv6 address.
    Ipv6,
    /// Any IP address.
    Ip,
    /// API key or secret token.
    ApiKey,
    /// JSON Web Token.
    Jwt,
}

/// Detector names as used in `redact(detectors: [...])`.
pub const DETECTORS: &[(&str, Detector)] = &[
    ("email", Detector::Email),
    ("phone", Detector::Phone),
    ("card", Detector::Card),
    ("iban", Detector::Iban),
    ("ssn", Detector::Ssn),
    ("ipv4", Detector::Ipv4),
    ("ipv6", Detector::Ipv6),
    ("ip", Detector::Ip),
    ("api_key", Detector::ApiKey),
    ("jwt", Detector::Jwt),
];

/// A function signature: name, builtin, argument types, result type.
pub(crate) struct Signature {
    pub name: &'static str,
    pub builtin: Builtin,
    pub args: &'static [Ty],
    pub ret: Ty,
}

const S: Ty = Ty::Str;

/// Every function the expression language knows.
pub(crate) const FUNCTIONS: &[Signature] = &[
    sig("lower", Builtin::Lower, &[S], S),
    sig("upper", Builtin::Upper, &[S], S),
    sig("trim", Builtin::Trim, &[S], S),
    sig("len", Builtin::Len, &[Ty::Any], Ty::Num),
    sig("starts_with", Builtin::StartsWith, &[S, S], Ty::Bool),
    sig("ends_with", Builtin::EndsWith, &[S, S], Ty::Bool),
    sig("is_email", Builtin::Detect(Detector::Email), &[S], Ty::Bool),
    sig("is_phone", Builtin::Detect(Detector::Phone), &[S], Ty::Bool),
    sig("is_card", Builtin::Detect(Detector::Card), &[S], Ty::Bool),
    sig("is_iban", Builtin::Detect(Detector::Iban), &[S], Ty::Bool),
    sig("is_ssn", Builtin::Detect(Detector::Ssn), &[S], Ty::Bool),
    sig("is_ipv4", Builtin::Detect(Detector::Ipv4), &[S], Ty::Bool),
    sig("is_ipv6", Builtin::Detect(Detector::Ipv6), &[S], Ty::Bool),
    sig("is_ip", Builtin::Detect(Detector::Ip), &[S], Ty::Bool),
    sig(
        "is_api_key",
        Builtin::Detect(Detector::ApiKey),
        &[S],
        Ty::Bool,
    ),
    sig("is_jwt", Builtin::Detect(Detector::Jwt), &[S], Ty::Bool),
];

const fn sig(name: &'static str, builtin: Builtin, args: &'static [Ty], ret: Ty) -> Signature {
    Signature {
        name,
        builtin,
        args,
        ret,
    }
}

/// The signature of function `name`.
pub(crate) fn lookup(name: &str) -> Option<&'static Signature> {
    FUNCTIONS.iter().find(|s| s.name == name)
}

impl Detector {
    /// The `libs/redaction` detectors this one stands for (`ip` is both
    /// address families).
    pub fn redaction_detectors(self) -> &'static [Found] {
        match self {
            Detector::Email => &[Found::Email],
            Detector::Phone => &[Found::Phone],
            Detector::Card => &[Found::Card],
            Detector::Iban => &[Found::Iban],
            Detector::Ssn => &[Found::Ssn],
            Detector::Ipv4 => &[Found::Ipv4],
            Detector::Ipv6 => &[Found::Ipv6],
            Detector::Ip => &[Found::Ipv4, Found::Ipv6],
            Detector::ApiKey => &[Found::ApiKey],
            Detector::Jwt => &[Found::Jwt],
        }
    }

    /// The detector named `name` in `redact(detectors: [...])`.
    pub fn named(name: &str) -> Option<Detector> {
        DETECTORS.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
    }

    /// Whether `s` (trimmed) is wholly an instance of this kind of PII.
    pub fn detect(self, s: &str) -> bool {
        self.redaction_detectors().iter().any(|d| d.is_match(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detectors_accept_and_reject() {
        let cases: &[(Detector, &str, bool)] = &[
            (Detector::Email, "a.b+c@example.co.in", true),
            (Detector::Email, "not an email", false),
            (Detector::Email, "a@localhost", false),
            (Detector::Phone, "+91 98765 43210", true),
            (Detector::Phone, "(555) 123-4567", true),
            (Detector::Phone, "12345", false),
            (Detector::Phone, "+0123456789", false),
            (Detector::Card, "4111 1111 1111 1111", true),
            (Detector::Card, "4111 1111 1111 1112", false),
            (Detector::Iban, "GB82 WEST 1234 5698 7654 32", true),
            (Detector::Iban, "GB82 WEST 1234 5698 7654 33", false),
            (Detector::Ssn, "123-45-6789", true),
            (Detector::Ssn, "666-45-6789", false),
            (Detector::Ipv4, "10.0.0.1", true),
            (Detector::Ipv4, "10.0.0.256", false),
            (Detector::Ipv6, "::1", true),
            (Detector::ApiKey, "sk_live_abcdefghijklmnop", true),
            (Detector::ApiKey, "sk_live_short", false),
            (
                Detector::Jwt,
                "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
                true,
            ),
            (Detector::Jwt, "a.b.c", false),
            (Detector::Ip, "10.0.0.1", true),
            (Detector::Ip, "2001:db8::1", true),
            (Detector::Ip, "version 1.2.3", false),
        ];
        for (d, s, want) in cases {
            assert_eq!(d.detect(s), *want, "{d:?} on {s:?}");
        }
    }

    #[test]
    fn detector_names_are_the_redaction_names() {
        for (name, d) in DETECTORS {
            assert_eq!(Detector::named(name), Some(*d));
            match name.parse::<Found>() {
                Ok(f) => assert_eq!(d.redaction_detectors(), [f]),
                Err(_) => assert_eq!(*name, "ip"),
            }
        }
        for f in Found::ALL {
            assert!(Detector::named(f.name()).is_some(), "{f}");
        }
    }
}
