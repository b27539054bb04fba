use std::time::Duration;

use anumate_crypto::{KeyPair, KeyRing, b64url};
use futures::executor::block_on;
use serde_json::{Value, json};

use crate::memory::{MemoryReplayGuard, MemoryRevocationList};
use crate::*;

const NOW: i64 = 1_800_000_000;
const AUD: &str = "connector.payments";
const TENANT: &str = "tenant-a";
const TOOL: &str = "payments.refund";
const PLAN: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

struct Fixture {
    key: KeyPair,
    ring: KeyRing,
    issuer: Issuer,
    cap: Capability,
    args: Value,
}

impl Fixture {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        Fixture {
            ring: KeyRing::new(key.clone()),
            key,
            issuer: Issuer::new("https://captokens.anumate.test"),
            cap: Capability::new(TOOL, ["call", "POST"])
                .constrain("/amount", Constraint::range(1, 50_000))
                .constrain("/currency", Constraint::one_of(["EUR", "USD"]))
                .constrain(
                    "/callback",
                    Constraint::prefix("https://orders.example/hooks/"),
                ),
            args: json!({
                "amount": 12_500,
                "currency": "EUR",
                "callback": "https://orders.example/hooks/refund/42",
                "order": "ord_42",
            }),
        }
    }

    fn request(&self) -> IssueRequest<'_> {
        IssueRequest {
            subject: "user:alice",
            audience: AUD,
            tenant: TENANT,
            run: "run-1",
            step: "step-3",
            plan_hash: PLAN,
            args: ArgsBinding::Args(&self.args),
            capability: &self.cap,
            ttl: Some(Duration::from_secs(120)),
            single_use: true,
            now: Some(NOW),
        }
    }

    fn issue(&self) -> IssuedToken {
        self.issuer.issue(&self.ring, self.request()).unwrap()
    }

    fn verifier(&self) -> Verifier {
        Verifier::from_key_ring(&self.ring).unwrap()
    }

    fn expect(&self) -> Expectation<'_> {
        Expectation::new(AUD, TENANT, TOOL)
            .action("call")
            .args(&self.args)
            .binding(PLAN, "run-1", "step-3")
            .at(NOW + 1)
    }

    fn reason(&self, token: &str, expected: &Expectation<'_>) -> Reason {
        match self.verifier().verify(token, expected) {
            Ok(_) => panic!("token verified, expected a rejection"),
            Err(rejection) => rejection.reason(),
        }
    }
}

/// Re-encodes a token with `edit` applied to its header and/or claims JSON,
/// re-signed by `key` (so only the edit can fail verification).
fn resign(token: &str, key: &KeyPair, edit: impl FnOnce(&mut Value, &mut Value)) -> String {
    let mut parts = token.split('.');
    let mut header: Value =
        serde_json::from_slice(&anumate_crypto::b64url_decode(parts.next().unwrap()).unwrap())
            .unwrap();
    let mut claims: Value =
        serde_json::from_slice(&anumate_crypto::b64url_decode(parts.next().unwrap()).unwrap())
            .unwrap();
    edit(&mut header, &mut claims);
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = key.sign_b64url(input.as_bytes());
    format!("{input}.{sig}")
}

fn segments(token: &str) -> Vec<&str> {
    token.split('.').collect()
}

#[test]
fn issued_token_has_the_documented_shape() {
    let f = Fixture::new();
    let issued = f.issue();
    let parts = segments(&issued.token);
    assert_eq!(parts.len(), 3);
    let header: Value =
        serde_json::from_slice(&anumate_crypto::b64url_decode(parts[0]).unwrap()).unwrap();
    assert_eq!(
        header,
        json!({"alg": "ES256", "typ": "JWT", "kid": f.key.kid()})
    );
    let claims: Value =
        serde_json::from_slice(&anumate_crypto::b64url_decode(parts[1]).unwrap()).unwrap();
    let keys: Vec<&str> = claims
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "iss",
            "sub",
            "aud",
            "tenant",
            "run",
            "step",
            "plan_hash",
            "args_sha256",
            "cap",
            "iat",
            "nbf",
            "exp",
            "jti",
            "single_use"
        ]
    );
    assert_eq!(claims["exp"], json!(NOW + 120));
    assert_eq!(claims["iat"], json!(NOW));
    assert_eq!(
        claims["cap"]["constraints"]["/amount"],
        json!({"max": 50_000, "min": 1})
    );
    let jti = uuid::Uuid::parse_str(&issued.jti).unwrap();
    assert_eq!(jti.get_version_num(), 7);
    assert_eq!(issued.exp, NOW + 120);
    assert_eq!(issued.claims.jti, issued.jti);
    // The args hash is SHA-256 over the RFC 8785 form, as `sha256:<hex>`.
    let canonical = r#"{"amount":12500,"callback":"https://orders.example/hooks/refund/42","currency":"EUR","order":"ord_42"}"#;
    assert_eq!(
        claims["args_sha256"],
        json!(format!(
            "sha256:{}",
            anumate_crypto::sha256_hex(canonical.as_bytes())
        ))
    );
}

#[test]
fn valid_token_verifies_with_both_backends() {
    let f = Fixture::new();
    let issued = f.issue();
    for backend in [Backend::Ring, Backend::P256] {
        let verified = f
            .verifier()
            .with_backend(backend)
            .verify(&issued.token, &f.expect())
            .unwrap();
        assert_eq!(verified.claims, issued.claims);
        assert_eq!(verified.kid, f.key.kid());
    }
}

#[test]
fn p256_signer_tokens_verify_with_ring() {
    let f = Fixture::new();
    let signer = P256Signer::from_key_pair(&f.key).unwrap();
    let issued = f.issuer.issue(&signer, f.request()).unwrap();
    f.verifier().verify(&issued.token, &f.expect()).unwrap();
}

#[test]
fn issue_refuses_long_ttl_and_bad_requests() {
    let f = Fixture::new();
    let mut request = f.request();
    request.ttl = Some(Duration::from_secs(301));
    assert!(matches!(
        f.issuer.issue(&f.ring, request),
        Err(IssueError::InvalidTtl {
            requested_secs: 301,
            ..
        })
    ));
    request.ttl = Some(Duration::from_millis(300_001));
    assert!(matches!(
        f.issuer.issue(&f.ring, request),
        Err(IssueError::InvalidTtl { .. })
    ));
    request.ttl = Some(Duration::ZERO);
    assert!(matches!(
        f.issuer.issue(&f.ring, request),
        Err(IssueError::InvalidTtl { .. })
    ));
    request.ttl = Some(Duration::from_secs(300));
    assert_eq!(f.issuer.issue(&f.ring, request).unwrap().exp, NOW + 300);
    request.ttl = None;
    assert_eq!(f.issuer.issue(&f.ring, request).unwrap().exp, NOW + 60);

    let mut request = f.request();
    request.tenant = "";
    assert!(matches!(
        f.issuer.issue(&f.ring, request),
        Err(IssueError::InvalidArgument {
            field: "tenant",
            ..
        })
    ));
    let mut request = f.request();
    request.args = ArgsBinding::Sha256("ABC");
    assert!(matches!(
        f.issuer.issue(&f.ring, request),
        Err(IssueError::InvalidArgument {
            field: "args_sha256",
            ..
        })
    ));
    let bad_cap = Capability::new(TOOL, ["call"]).constrain("amount", Constraint::max(5));
    let mut request = f.request();
    request.capability = &bad_cap;
    assert!(matches!(
        f.issuer.issue(&f.ring, request),
        Err(IssueError::InvalidArgument {
            field: "capability.constraints",
            ..
        })
    ));
    let no_actions = Capability::new(TOOL, Vec::<String>::new());
    let mut request = f.request();
    request.capability = &no_actions;
    assert!(f.issuer.issue(&f.ring, request).is_err());
}

#[test]
fn malformed_tokens() {
    let f = Fixture::new();
    let token = f.issue().token;
    let p = segments(&token);
    let e = f.expect();
    for bad in [
        String::new(),
        "abc".to_owned(),
        format!("{}.{}", p[0], p[1]),
        format!("{token}.{}", p[2]),
        format!("{}!.{}.{}", p[0], p[1], p[2]),
        format!("{}.{}.{}", b64url(b"{not json"), p[1], p[2]),
        format!("{}.{}.{}", p[0], b64url(b"[]"), p[2]),
        format!("{}.{}=.{}", p[0], p[1], p[2]),
        format!("{}.{}.{}", p[0], p[1], "a".repeat(20_000)),
    ] {
        assert_eq!(f.reason(&bad, &e), Reason::Malformed, "{bad:.60}");
    }
    // Missing claims, a lifetime above 300 s, a wrong typ, crit: all malformed even when signed.
    let missing = resign(&token, &f.key, |_, c| {
        c.as_object_mut().unwrap().remove("tenant");
    });
    assert_eq!(f.reason(&missing, &e), Reason::Malformed);
    let long = resign(&token, &f.key, |_, c| c["exp"] = json!(NOW + 301));
    assert_eq!(f.reason(&long, &e), Reason::Malformed);
    let typ = resign(&token, &f.key, |h, _| h["typ"] = json!("at+jwt"));
    assert_eq!(f.reason(&typ, &e), Reason::Malformed);
    let crit = resign(&token, &f.key, |h, _| h["crit"] = json!(["exp"]));
    assert_eq!(f.reason(&crit, &e), Reason::Malformed);
    let unknown_constraint = resign(&token, &f.key, |_, c| {
        c["cap"]["constraints"]["/amount"]["regex"] = json!(".*")
    });
    assert_eq!(f.reason(&unknown_constraint, &e), Reason::Malformed);
}

#[test]
fn truncated_and_bit_flipped_signatures() {
    let f = Fixture::new();
    let token = f.issue().token;
    let e = f.expect();
    for cut in [1, 2, 4, 43, 86] {
        let truncated = &token[..token.len() - cut];
        assert_eq!(f.reason(truncated, &e), Reason::Malformed, "cut {cut}");
    }
    let p = segments(&token);
    let mut sig = anumate_crypto::b64url_decode(p[2]).unwrap();
    for bit in [0, 7, 100, 255, 256, 511] {
        sig[bit / 8] ^= 1 << (bit % 8);
        let flipped = format!("{}.{}.{}", p[0], p[1], b64url(&sig));
        sig[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(f.reason(&flipped, &e), Reason::BadSignature, "bit {bit}");
        let p256 = f
            .verifier()
            .with_backend(Backend::P256)
            .verify(&flipped, &e);
        assert_eq!(p256.unwrap_err().reason(), Reason::BadSignature);
    }
    // A flipped bit in the claims breaks the signature too.
    let mut claims = anumate_crypto::b64url_decode(p[1]).unwrap();
    let at = claims.iter().position(|&b| b == b'1').unwrap();
    claims[at] = b'9';
    let edited = format!("{}.{}.{}", p[0], b64url(&claims), p[2]);
    assert_eq!(f.reason(&edited, &e), Reason::BadSignature);
    // An extra signature byte is malformed.
    sig.push(0);
    let long = format!("{}.{}.{}", p[0], p[1], b64url(&sig));
    assert_eq!(f.reason(&long, &e), Reason::Malformed);
}

#[test]
fn algorithm_confusion_is_rejected() {
    use ring::hmac;
    let f = Fixture::new();
    let token = f.issue().token;
    let p = segments(&token);
    let e = f.expect();
    let with_alg = |alg: &str| {
        let mut header: Value =
            serde_json::from_slice(&anumate_crypto::b64url_decode(p[0]).unwrap()).unwrap();
        header["alg"] = json!(alg);
        b64url(header.to_string().as_bytes())
    };

    // alg none, empty signature.
    let none = format!("{}.{}.", with_alg("none"), p[1]);
    let rejection = f.verifier().verify(&none, &e).unwrap_err();
    assert_eq!(
        rejection.failure,
        Failure::UnsupportedAlgorithm("none".into())
    );

    // HS256 keyed with the public key (both its SEC1 bytes and its JWK JSON).
    let point = f.key.public_jwk().p256_sec1().unwrap();
    let jwk_json = serde_json::to_vec(&f.key.public_jwk()).unwrap();
    for secret in [&point[..], &jwk_json[..]] {
        let input = format!("{}.{}", with_alg("HS256"), p[1]);
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
        let forged = format!("{input}.{}", b64url(tag.as_ref()));
        assert_eq!(f.reason(&forged, &e), Reason::UnsupportedAlgorithm);
    }
    for alg in ["RS256", "ES384", "es256", "PS256", ""] {
        let forged = format!("{}.{}.{}", with_alg(alg), p[1], p[2]);
        assert_eq!(f.reason(&forged, &e), Reason::UnsupportedAlgorithm, "{alg}");
    }
}

#[test]
fn unknown_kid_and_rotation() {
    let old = KeyPair::generate().unwrap();
    let new = KeyPair::generate().unwrap();
    let f = Fixture::new();
    let old_ring = KeyRing::new(old.clone());
    let old_token = f.issuer.issue(&old_ring, f.request()).unwrap().token;

    // Rotated: the new key signs, the old key still verifies.
    let rotated = KeyRing::new(new.clone()).with_retired(&old);
    let new_token = f.issuer.issue(&rotated, f.request()).unwrap();
    assert_eq!(new_token.kid, new.kid());
    let verifier = Verifier::from_key_ring(&rotated).unwrap();
    assert_eq!(
        verifier.verify(&old_token, &f.expect()).unwrap().kid,
        old.kid()
    );
    verifier.verify(&new_token.token, &f.expect()).unwrap();

    // Retired for good: the old key's tokens have an unknown kid.
    let retired = Verifier::from_key_ring(&KeyRing::new(new.clone())).unwrap();
    let rejection = retired.verify(&old_token, &f.expect()).unwrap_err();
    assert_eq!(rejection.failure, Failure::UnknownKey(old.kid().to_owned()));
    let mut verifier = verifier;
    assert!(verifier.remove_key(old.kid()));
    assert_eq!(
        verifier
            .verify(&old_token, &f.expect())
            .unwrap_err()
            .reason(),
        Reason::UnknownKey
    );

    // A token whose kid names a known key but signed by another: bad signature.
    let lying = resign(&old_token, &old, |h, _| h["kid"] = json!(new.kid()));
    assert_eq!(
        verifier.verify(&lying, &f.expect()).unwrap_err().reason(),
        Reason::BadSignature
    );
    // Verifiers built from the published JWKS behave the same.
    let from_jwks = Verifier::from_jwks(&rotated.jwks()).unwrap();
    from_jwks.verify(&old_token, &f.expect()).unwrap();
}

#[test]
fn time_checks_with_leeway() {
    let f = Fixture::new();
    let token = f.issue().token; // iat = nbf = NOW, exp = NOW + 120
    let v = f.verifier();
    let at = |now| f.expect().at(now);
    assert!(v.verify(&token, &at(NOW + 124)).is_ok());
    assert_eq!(
        v.verify(&token, &at(NOW + 125)).unwrap_err().reason(),
        Reason::Expired
    );
    assert!(v.verify(&token, &at(NOW - 5)).is_ok());
    assert_eq!(
        v.verify(&token, &at(NOW - 6)).unwrap_err().reason(),
        Reason::NotYetValid
    );
    let strict = f.verifier().with_leeway(0);
    assert_eq!(
        strict.verify(&token, &at(NOW + 120)).unwrap_err().reason(),
        Reason::Expired
    );
    assert_eq!(
        strict.verify(&token, &at(NOW - 1)).unwrap_err().reason(),
        Reason::NotYetValid
    );
    // A future iat alone is not yet valid either.
    let future_iat = resign(&token, &f.key, |_, c| {
        c["iat"] = json!(NOW + 60);
        c["exp"] = json!(NOW + 120);
    });
    assert_eq!(
        v.verify(&future_iat, &at(NOW + 10)).unwrap_err().reason(),
        Reason::NotYetValid
    );
}

#[test]
fn audience_tenant_binding_capability_args() {
    let f = Fixture::new();
    let token = f.issue().token;
    let base = f.expect();
    let zeros = "0".repeat(64);
    let cases: Vec<(Expectation<'_>, Reason)> = vec![
        (
            Expectation {
                audience: "connector.http",
                ..base
            },
            Reason::WrongAudience,
        ),
        (
            Expectation {
                tenant: "tenant-b",
                ..base
            },
            Reason::WrongTenant,
        ),
        (
            Expectation {
                run: Some("run-2"),
                ..base
            },
            Reason::BindingMismatch,
        ),
        (
            Expectation {
                step: Some("step-4"),
                ..base
            },
            Reason::BindingMismatch,
        ),
        (
            Expectation {
                plan_hash: Some("sha256:00"),
                ..base
            },
            Reason::BindingMismatch,
        ),
        (
            Expectation {
                tool: "payments.charge",
                ..base
            },
            Reason::CapabilityMismatch,
        ),
        (
            Expectation {
                action: Some("DELETE"),
                ..base
            },
            Reason::CapabilityMismatch,
        ),
        (
            Expectation {
                args_sha256: Some(&zeros),
                ..base
            },
            Reason::ArgsMismatch,
        ),
    ];
    for (expected, reason) in &cases {
        assert_eq!(f.reason(&token, expected), *reason, "{expected:?}");
    }
    // Without the arguments (or their hash) a token is never valid: it is
    // bound to its arguments' hash, so the verdict is an arguments mismatch.
    let minimal = Expectation::new(AUD, TENANT, TOOL).at(NOW);
    let rejection = f.verifier().verify(&token, &minimal).unwrap_err();
    assert_eq!(rejection.reason(), Reason::ArgsMismatch);
    assert!(
        matches!(rejection.failure, Failure::ArgsMissing { .. }),
        "{:?}",
        rejection.failure
    );
    // With only the hash, the rest of the optional expectations may be unset.
    let hash = crate::args_sha256(&f.args).unwrap();
    f.verifier()
        .verify(&token, &minimal.args_sha256(&hash))
        .unwrap();
    // Arguments that keep to the constraints but differ from the bound ones.
    let other = json!({
        "amount": 12_501,
        "currency": "EUR",
        "callback": "https://orders.example/hooks/refund/42",
        "order": "ord_42",
    });
    let rejection = f.verifier().verify(&token, &base.args(&other)).unwrap_err();
    assert_eq!(rejection.reason(), Reason::ArgsMismatch);
    assert!(rejection.authenticated);
    assert_eq!(rejection.claims.unwrap().run, "run-1");
    // A matching precomputed hash passes.
    let hex = args_sha256(&f.args).unwrap();
    let by_hash = Expectation {
        args: None,
        args_sha256: Some(&hex),
        ..base
    };
    f.verifier().verify(&token, &by_hash).unwrap();
    // The colon-free spellings of the same digest compare as its wire form.
    let bare = hex.trim_start_matches("sha256:").to_owned();
    let dashed = format!("sha256-{bare}");
    for spelling in [&bare, &dashed] {
        let by_hash = Expectation {
            args_sha256: Some(spelling),
            ..by_hash
        };
        f.verifier().verify(&token, &by_hash).unwrap();
    }
    // And a token issued with one carries the `sha256:` form.
    let mut request = f.request();
    request.args = ArgsBinding::Sha256(&bare);
    let issued = f.issuer.issue(&f.ring, request).unwrap();
    assert_eq!(issued.claims.args_sha256, hex);
}

#[test]
fn constraints_are_enforced() {
    let f = Fixture::new();
    let token = f.issue().token;
    let check = |args: Value| -> Failure {
        let e = f.expect().args(&args);
        f.verifier().verify(&token, &e).unwrap_err().failure
    };
    let with = |key: &str, value: Value| {
        let mut args = f.args.clone();
        args[key] = value;
        args
    };
    let constraint_of = |failure: Failure| match failure {
        Failure::CapabilityMismatch(CapabilityFailure::Constraint {
            path, constraint, ..
        }) => (path, constraint),
        other => panic!("not a constraint failure: {other:?}"),
    };
    assert_eq!(
        constraint_of(check(with("amount", json!(50_001)))),
        ("/amount".into(), "max")
    );
    assert_eq!(
        constraint_of(check(with("amount", json!(0)))),
        ("/amount".into(), "min")
    );
    assert_eq!(
        constraint_of(check(with("amount", json!(50_000.5)))),
        ("/amount".into(), "max")
    );
    assert_eq!(
        constraint_of(check(with("amount", json!("1")))),
        ("/amount".into(), "max")
    );
    assert_eq!(
        constraint_of(check(with("currency", json!("GBP")))),
        ("/currency".into(), "one_of")
    );
    for url in [
        "https://orders.example/admin",
        "https://orders.example/hooks/../admin",
        "https://evil.example/hooks/",
        "https://orders.example/hooks/%2e%2e/x",
    ] {
        assert_eq!(
            constraint_of(check(with("callback", json!(url)))),
            ("/callback".into(), "prefix"),
            "{url}"
        );
    }
    let mut missing = f.args.clone();
    missing.as_object_mut().unwrap().remove("currency");
    assert_eq!(
        check(missing),
        Failure::CapabilityMismatch(CapabilityFailure::MissingArgument {
            path: "/currency".into()
        })
    );
    // The message names the constraint and the argument.
    let message = check(with("amount", json!(99_999))).to_string();
    assert!(
        message.contains("/amount") && message.contains("max"),
        "{message}"
    );
}

#[test]
fn nested_pointers_and_large_integers() {
    let f = Fixture::new();
    let cap =
        Capability::new(TOOL, ["call"]).constrain("/payee/limit", Constraint::max(u64::MAX - 1));
    let args = json!({"payee": {"limit": u64::MAX}});
    let request = IssueRequest {
        args: ArgsBinding::Args(&args),
        capability: &cap,
        ..f.request()
    };
    let token = f.issuer.issue(&f.ring, request).unwrap().token;
    let rejection = f
        .verifier()
        .verify(&token, &f.expect().args(&args))
        .unwrap_err();
    assert_eq!(rejection.reason(), Reason::ConstraintViolated);
}

#[test]
fn revocation_and_replay_through_the_traits() {
    let f = Fixture::new();
    let issued = f.issue();
    let verifier = f.verifier();
    let revocations = MemoryRevocationList::new();
    let replay = MemoryReplayGuard::new();
    let e = f.expect();
    let verify =
        |consume| block_on(verifier.verify_with(&issued.token, &e, &revocations, &replay, consume));
    let reason = |result: Result<VerifiedToken, VerifyError>| match result {
        Err(VerifyError::Rejected(r)) => r.reason(),
        other => panic!("expected a rejection: {other:?}"),
    };

    // A dry check leaves a single-use token usable.
    assert!(!verify(false).unwrap().consumed);
    assert!(verify(true).unwrap().consumed);
    assert_eq!(reason(verify(true)), Reason::Replayed);
    // A dry check of a consumed token reports the replay too.
    assert_eq!(reason(verify(false)), Reason::Replayed);

    // Revocation by jti and by run, checked right after time.
    let second = f.issue();
    let verify2 = |e: &Expectation<'_>| {
        block_on(verifier.verify_with(&second.token, e, &revocations, &replay, true))
    };
    revocations.revoke_run("run-1");
    assert_eq!(reason(verify2(&e)), Reason::Revoked);
    // Revocation comes before audience in the check order.
    let wrong_aud = Expectation {
        audience: "other",
        ..e
    };
    assert_eq!(reason(verify2(&wrong_aud)), Reason::Revoked);
    let fresh = MemoryRevocationList::new();
    fresh.revoke_jti(&second.jti);
    assert_eq!(
        reason(block_on(verifier.verify_with(
            &second.token,
            &e,
            &fresh,
            &replay,
            true
        ))),
        Reason::Revoked
    );
    assert_eq!(replay.purge_expired(issued.exp + 1), 1);
}

#[test]
fn reasons_map_one_to_one_onto_the_proto_verdicts() {
    use anumate_proto::anumate::captokens::v1::TokenVerdict as Verdict;
    let mut numbers = std::collections::HashSet::new();
    for reason in Reason::ALL {
        let verdict = Verdict::from_str_name(reason.verdict_name()).unwrap();
        assert_eq!(verdict as i32, reason.verdict_number(), "{reason:?}");
        assert!(numbers.insert(reason.verdict_number()));
    }
    // Every proto verdict except UNSPECIFIED and VALID has a reason.
    let mut n = 0;
    while let Ok(verdict) = Verdict::try_from(n) {
        if !matches!(verdict, Verdict::Unspecified | Verdict::Valid) {
            assert!(numbers.contains(&n), "{verdict:?} has no Reason");
        }
        n += 1;
    }
    assert_eq!(numbers.len() + 2, usize::try_from(n).unwrap());
}
