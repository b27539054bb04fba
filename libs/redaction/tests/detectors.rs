//! Table-driven true/false positives for every detector.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns

use std::borrow::Cow;

use anumate_redaction::{
    Detector, RedactionConfig, Redactor, Replacement, is_api_key, is_card, is_email, is_iban,
    is_ipv4, is_ipv6, is_jwt, is_phone, is_ssn,
};

/// (detector, text that must be detected exactly, whole).
const TRUE_POSITIVES: &[(Detector, &str)] = &[
    (Detector::Email, "jane.doe@example.com"),
    (Detector::Email, "j+tag@sub.example.co.uk"),
    (Detector::Email, "first_last%x@mail-server.io"),
    (Detector::Email, "A.B-C@EXAMPLE.ORG"),
    (Detector::Email, "x1@y2.travel"),
    (Detector::Email, "rien@example.com"),
    (Detector::Email, "user.name+filter@gmail.com"),
    (Detector::Email, "ops@anumate.dev"),
    (Detector::Phone, "+14155550132"),
    (Detector::Phone, "+1 415 555 0132"),
    (Detector::Phone, "+1 (415) 555-0132"),
    (Detector::Phone, "(415) 555-0132"),
    (Detector::Phone, "415-555-0132"),
    (Detector::Phone, "415.555.0132"),
    (Detector::Phone, "1-415-555-0132"),
    (Detector::Phone, "+91 98765 43210"),
    (Detector::Phone, "+919876543210"),
    (Detector::Phone, "09876543210"),
    (Detector::Phone, "98765 43210"),
    (Detector::Phone, "+44 20 7946 0958"),
    (Detector::Phone, "020 7946 0958"),
    (Detector::Phone, "07911 123456"),
    (Detector::Card, "4111111111111111"),
    (Detector::Card, "4111 1111 1111 1111"),
    (Detector::Card, "4111-1111-1111-1111"),
    (Detector::Card, "5500 0000 0000 0004"),
    (Detector::Card, "378282246310005"),
    (Detector::Card, "3782 822463 10005"),
    (Detector::Card, "6011111111111117"),
    (Detector::Card, "2223003122003222"),
    (Detector::Card, "4222222222222"),
    (Detector::Card, "3530111333300000"),
    (Detector::Iban, "DE89370400440532013000"),
    (Detector::Iban, "DE89 3704 0044 0532 0130 00"),
    (Detector::Iban, "GB82WEST12345698765432"),
    (Detector::Iban, "GB82 WEST 1234 5698 7654 32"),
    (Detector::Iban, "FR1420041010050500013M02606"),
    (Detector::Iban, "NL91ABNA0417164300"),
    (Detector::Iban, "NO9386011117947"),
    (Detector::Iban, "CH9300762011623852957"),
    (Detector::Iban, "BE68539007547034"),
    (Detector::Ssn, "123-45-6789"),
    (Detector::Ssn, "123 45 6789"),
    (Detector::Ssn, "001-01-0001"),
    (Detector::Ssn, "665-12-3456"),
    (Detector::Ssn, "899-99-9999"),
    (Detector::Ssn, "078-05-1121"),
    (Detector::Ssn, "667-01-0101"),
    (Detector::Ssn, "234-56-7890"),
    (Detector::Ipv4, "192.168.1.1"),
    (Detector::Ipv4, "10.0.0.1"),
    (Detector::Ipv4, "8.8.8.8"),
    (Detector::Ipv4, "255.255.255.255"),
    (Detector::Ipv4, "0.0.0.0"),
    (Detector::Ipv4, "172.16.254.3"),
    (Detector::Ipv4, "100.64.0.10"),
    (Detector::Ipv4, "203.0.113.45"),
    (Detector::Ipv6, "2001:db8::1"),
    (Detector::Ipv6, "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    (Detector::Ipv6, "fe80::1ff:fe23:4567:890a"),
    (Detector::Ipv6, "::1"),
    (Detector::Ipv6, "::ffff:192.0.2.128"),
    (Detector::Ipv6, "2606:4700:4700::1111"),
    (Detector::Ipv6, "FE80::0202:B3FF:FE1E:8329"),
    (Detector::Ipv6, "2001:db8:0:0:1:0:0:1"),
    (Detector::ApiKey, "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    (Detector::ApiKey, "sk_test_51HqLyjWDarjtT1zdp7dcXYZ"),
    (Detector::ApiKey, "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    (
        Detector::ApiKey,
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    ),
    (
        Detector::ApiKey,
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOp",
    ),
    (Detector::ApiKey, "AKIAIOSFODNN7EXAMPLE"),
    (Detector::ApiKey, "AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUvW"),
    (Detector::ApiKey, "glpat-xYz12AbC34dEf56GhI78"),
    (Detector::ApiKey, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    (Detector::ApiKey, "Zx9Qm2LpT7vR4kN8sW3yB6hJ"),
    (Detector::ApiKey, "9f86d081884c7d659a2feaa0c55ad015"),
    (
        Detector::ApiKey,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7b\nq8Zx\n-----END RSA PRIVATE KEY-----",
    ),
    (
        Detector::Jwt,
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ),
    (Detector::Jwt, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
    (
        Detector::Jwt,
        "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJhbnVtYXRlIn0.c2lnbmF0dXJlLWJ5dGVzLWhlcmU",
    ),
];

/// (detector, text that must NOT be detected by that detector anywhere).
const FALSE_POSITIVES: &[(Detector, &str)] = &[
    (Detector::Email, "user@localhost"),
    (Detector::Email, "version@2.0"),
    (Detector::Email, "@handle"),
    (Detector::Email, "a@b.c"),
    (Detector::Email, "john.@example.com"),
    (Detector::Email, "john..doe@example.com"),
    (Detector::Email, "x@-example.com"),
    (Detector::Email, "name at example dot com"),
    (Detector::Email, "foo@1.2.3.4"),
    (Detector::Phone, "Order 123456789012"),
    (Detector::Phone, "2024-01-05"),
    (Detector::Phone, "released 1.2.3"),
    (Detector::Phone, "ORD-2024-000123"),
    (Detector::Phone, "555-0132"),
    (Detector::Phone, "100-200-300"),
    (Detector::Phone, "9876543210"),
    (Detector::Phone, "12/05/2024 10:30"),
    (Detector::Phone, "v10.0.1"),
    (Detector::Phone, "3.14159265"),
    (Detector::Phone, "123-456-7890"),
    (Detector::Card, "4111111111111112"),
    (Detector::Card, "1234567812345678"),
    (Detector::Card, "4111 1111-1111 1111"),
    (Detector::Card, "0000000000000000"),
    (Detector::Card, "ORD-4111111111111111"),
    (Detector::Card, "41111111111111111111111"),
    (Detector::Card, "123456789012"),
    (Detector::Card, "9111111111111111"),
    (Detector::Card, "4111111111111111abc"),
    (Detector::Iban, "DE89370400440532013001"),
    (Detector::Iban, "DE8937040044053201300"),
    (Detector::Iban, "XX89370400440532013000"),
    (Detector::Iban, "GB82WEST1234569876543"),
    (Detector::Iban, "de89370400440532013000"),
    (Detector::Iban, "SKU AB12 3456 7890 1234"),
    (Detector::Iban, "NO9386011117948"),
    (Detector::Iban, "HELLO WORLD 2024"),
    (Detector::Ssn, "000-12-3456"),
    (Detector::Ssn, "666-12-3456"),
    (Detector::Ssn, "900-12-3456"),
    (Detector::Ssn, "123-00-4567"),
    (Detector::Ssn, "123-45-0000"),
    (Detector::Ssn, "123456789"),
    (Detector::Ssn, "078-05-1120"),
    (Detector::Ssn, "123-45-67890"),
    (Detector::Ssn, "123-45 6789"),
    (Detector::Ipv4, "1.2.3"),
    (Detector::Ipv4, "v1.2.3.4"),
    (Detector::Ipv4, "256.1.1.1"),
    (Detector::Ipv4, "1.2.3.4.5"),
    (Detector::Ipv4, "01.02.03.04"),
    (Detector::Ipv4, "version 10.0.19045"),
    (Detector::Ipv4, "192.168.1"),
    (Detector::Ipv4, "1.2.3.4a"),
    (Detector::Ipv6, "10:30:00"),
    (Detector::Ipv6, "00:1a:2b:3c:4d:5e"),
    (Detector::Ipv6, "std::fmt::Display"),
    (Detector::Ipv6, "dead::beef"),
    (Detector::Ipv6, "1:2:3"),
    (Detector::Ipv6, "2001:db8:::1"),
    (Detector::Ipv6, "12345::1"),
    (Detector::Ipv6, "ratio 3:2:1"),
    (Detector::ApiKey, "internationalization"),
    (Detector::ApiKey, "customer_billing_address_line"),
    (Detector::ApiKey, "AbstractSingletonProxyFactoryBean"),
    (Detector::ApiKey, "getUserById2FactorAuthentication"),
    (Detector::ApiKey, "550e8400-e29b-41d4-a716-446655440000"),
    (Detector::ApiKey, "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"),
    (
        Detector::ApiKey,
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f0b2b0b822cd15d6c15b0f00a08",
    ),
    (Detector::ApiKey, "/api/v1/customers/12345/orders"),
    (Detector::ApiKey, "sk_live_short"),
    (Detector::ApiKey, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1A"),
    (
        Detector::ApiKey,
        "The quick brown fox jumps over the lazy dog",
    ),
    (Detector::Jwt, "eyJhbGciOiJIUzI1NiJ9"),
    (Detector::Jwt, "eyJub3QiOiJhbGcifQ.eyJzdWIiOiJ4In0.c2ln"),
    (Detector::Jwt, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ"),
    (Detector::Jwt, "eyJxxxxxxxxxxxxxxx.yyyy.zzzz"),
    (Detector::Jwt, "a.b.c"),
    (Detector::Jwt, "www.example.com"),
    (
        Detector::Jwt,
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJ4In0.c2ln.extra",
    ),
    (Detector::Jwt, "config.yaml.bak"),
];

fn only(d: Detector) -> Redactor {
    Redactor::new(RedactionConfig {
        detectors: vec![d],
        replacement: Replacement::Label,
        field_paths: vec![],
    })
    .unwrap()
}

#[test]
fn true_positives_are_found_whole_and_in_context() {
    let all = Redactor::default();
    for (d, text) in TRUE_POSITIVES {
        assert!(d.is_match(text), "{d}: {text:?} should match whole");
        let found = only(*d).find(text);
        assert_eq!(found.len(), 1, "{d}: {text:?} -> {found:?}");
        // In a sentence, with every detector on.
        let sentence = format!("note: {text} (see above)");
        let got = all.redact_str(&sentence);
        assert_eq!(
            got,
            format!("note: [REDACTED:{}] (see above)", d.name()),
            "{d}: {text:?} in context"
        );
    }
}

#[test]
fn false_positives_are_not_found() {
    for (d, text) in FALSE_POSITIVES {
        let r = only(*d);
        assert!(
            r.find(text).is_empty(),
            "{d}: {text:?} -> {:?}",
            r.find(text)
        );
        assert!(!d.is_match(text), "{d}: {text:?} is_match");
        assert!(
            matches!(r.redact_str(text), Cow::Borrowed(_)),
            "{d}: {text:?}"
        );
    }
}

#[test]
fn tables_are_big_enough() {
    for d in Detector::ALL {
        let t = TRUE_POSITIVES.iter().filter(|(x, _)| *x == d).count();
        let f = FALSE_POSITIVES.iter().filter(|(x, _)| *x == d).count();
        assert!(t >= 3 && f >= 8, "{d}: {t} true, {f} false");
        if d != Detector::Jwt {
            assert!(t >= 8, "{d}: {t} true");
        }
    }
}

#[test]
fn predicates_match_whole_values() {
    assert!(is_email(" jane@example.com "));
    assert!(!is_email("mail jane@example.com"));
    assert!(is_phone("+1 415 555 0132"));
    assert!(is_card("4111 1111 1111 1111"));
    assert!(is_iban("GB82 WEST 1234 5698 7654 32"));
    assert!(is_ssn("123-45-6789"));
    assert!(is_ipv4("10.0.0.1"));
    assert!(is_ipv6("2001:db8::1"));
    assert!(is_api_key("AKIAIOSFODNN7EXAMPLE"));
    assert!(is_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."));
    assert!(!is_card("4111 1111 1111 1112"));
}

#[test]
fn names_round_trip() {
    for d in Detector::ALL {
        assert_eq!(d.name().parse::<Detector>().unwrap(), d);
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            format!("\"{}\"", d.name())
        );
    }
    assert!("credit_card".parse::<Detector>().is_err());
}

#[test]
fn clean_text_is_borrowed() {
    let r = Redactor::default();
    for text in [
        "",
        "Order ORD-2024-000123 shipped on 2024-05-01 via UPS, version 1.2.3.",
        "The quick brown fox jumps over the lazy dog",
        "total: 1,234.56 EUR; qty 12; sku AB-1234-XY",
        "plan_hash sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f0b2b0b822cd15d6c15b0f00a08",
        "id 550e8400-e29b-41d4-a716-446655440000 at 10:30:00",
        "grüße aus München — 東京 🚀",
    ] {
        assert!(
            matches!(r.redact_str(text), Cow::Borrowed(_)),
            "{text:?} -> {:?}",
            r.find(text)
        );
    }
}

#[test]
fn mixed_text_offsets_and_fixed_replacement() {
    let r = Redactor::new(RedactionConfig {
        detectors: Detector::ALL.to_vec(),
        replacement: Replacement::Fixed("***".into()),
        field_paths: vec![],
    })
    .unwrap();
    let text = "mail jane@example.com, call +1 415 555 0132, pay 4111 1111 1111 1111 from 10.0.0.1";
    let found = r.find(text);
    let kinds: Vec<Detector> = found.iter().map(|m| m.detector).collect();
    assert_eq!(
        kinds,
        [
            Detector::Email,
            Detector::Phone,
            Detector::Card,
            Detector::Ipv4
        ]
    );
    assert_eq!(&text[found[0].start..found[0].end], "jane@example.com");
    assert_eq!(r.redact_str(text), "mail ***, call ***, pay *** from ***");
}

#[test]
fn card_after_other_digits_is_still_found() {
    let r = only(Detector::Card);
    let got = r.redact_str("ref 1234 4111 1111 1111 1111 ok");
    assert_eq!(got, "ref 1234 [REDACTED:card] ok");
}

#[test]
fn detectors_respect_configuration() {
    let r = only(Detector::Email);
    assert_eq!(
        r.redact_str("jane@example.com 4111111111111111"),
        "[REDACTED:email] 4111111111111111"
    );
}
