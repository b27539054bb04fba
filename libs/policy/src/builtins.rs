//! Built-in functions: string helpers and PII detectors.
//!
//! The detectors here are deliberately simple and local; `libs/redaction`
//! will own the production detectors and these will delegate to it.
//!
//! | function | true when the whole (trimmed) string is … |
//! | --- | --- |
//! | `is_email(s)` | `local@domain.tld`: local part of `A-Za-z0-9._%+-`, dotted domain labels of `A-Za-z0-9-`, a TLD of ≥ 2 letters |
//! | `is_phone(s)` | 7–15 digits, optionally a leading `+` (then the first digit is not 0), with spaces, `-`, `.`, `(`, `)` as separators |
//! | `is_card(s)` | 13–19 digits (spaces or `-` allowed between) passing the Luhn check |
//! | `is_iban(s)` | country letters, 2 check digits, 11–30 alphanumerics (spaces allowed), ISO 7064 mod-97 = 1 |
//! | `is_ssn(s)` | US SSN `AAA-GG-SSSS`, area not 000/666/9xx, group not 00, serial not 0000 |
//! | `is_ipv4(s)`, `is_ipv6(s)`, `is_ip(s)` | an address the standard library parses |
//! | `is_api_key(s)` | a known secret prefix (`sk_live_`, `ghp_`, `AKIA`, `xoxb-`, …) followed by ≥ 12 token characters |
//! | `is_jwt(s)` | three base64url parts separated by dots, the first starting `eyJ` |

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
    /// Whether `s` (trimmed) is wholly an instance of this kind of PII.
    pub fn detect(self, s: &str) -> bool {
        let s = s.trim();
        match self {
            Detector::Email => is_email(s),
            Detector::Phone => is_phone(s),
            Detector::Card => is_card(s),
            Detector::Iban => is_iban(s),
            Detector::Ssn => is_ssn(s),
            Detector::Ipv4 => s.parse::<std::net::Ipv4Addr>().is_ok(),
            Detector::Ipv6 => s.parse::<std::net::Ipv6Addr>().is_ok(),
            Detector::Ip => s.parse::<std::net::IpAddr>().is_ok(),
            Detector::ApiKey => is_api_key(s),
            Detector::Jwt => is_jwt(s),
        }
    }
}

fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._%+-".contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|t| t.len() >= 2 && t.chars().all(|c| c.is_ascii_alphabetic()));
    local_ok && domain_ok
}

fn is_phone(s: &str) -> bool {
    let (plus, body) = match s.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let mut digits = String::new();
    for c in body.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return false,
        }
    }
    (7..=15).contains(&digits.len()) && !(plus && digits.starts_with('0'))
}

fn is_card(s: &str) -> bool {
    let mut digits = Vec::with_capacity(19);
    for c in s.chars() {
        match c.to_digit(10) {
            Some(d) => digits.push(d),
            None if c == ' ' || c == '-' => {}
            None => return false,
        }
    }
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn is_iban(s: &str) -> bool {
    let compact: Vec<char> = s
        .chars()
        .filter(|c| *c != ' ')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if !(15..=34).contains(&compact.len())
        || !compact[..2].iter().all(char::is_ascii_alphabetic)
        || !compact[2..4].iter().all(char::is_ascii_digit)
        || !compact.iter().all(char::is_ascii_alphanumeric)
    {
        return false;
    }
    let rearranged = compact[4..].iter().chain(compact[..4].iter());
    let mut rem: u32 = 0;
    for c in rearranged {
        let v = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

fn is_ssn(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [area, group, serial] = parts.as_slice() else {
        return false;
    };
    let all_digits = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_digit());
    all_digits(area, 3)
        && all_digits(group, 2)
        && all_digits(serial, 4)
        && *area != "000"
        && *area != "666"
        && !area.starts_with('9')
        && *group != "00"
        && *serial != "0000"
}

const KEY_PREFIXES: &[&str] = &[
    "sk_live_",
    "sk_test_",
    "pk_live_",
    "rk_live_",
    "sk-",
    "ghp_",
    "gho_",
    "ghs_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "AKIA",
    "AIza",
];

fn is_api_key(s: &str) -> bool {
    KEY_PREFIXES.iter().any(|p| {
        s.strip_prefix(p).is_some_and(|rest| {
            rest.len() >= 12
                && rest
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
    })
}

fn is_jwt(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && s.starts_with("eyJ")
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
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
        ];
        for (d, s, want) in cases {
            assert_eq!(d.detect(s), *want, "{d:?} on {s:?}");
        }
    }
}
