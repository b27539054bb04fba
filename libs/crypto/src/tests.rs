use serde_json::{Value, json};

use super::*;

fn from_bits(bits: u64) -> Value {
    json!(f64::from_bits(bits))
}

#[test]
fn sign_verify_round_trip() {
    let key = KeyPair::generate().unwrap();
    let sig = key.sign(b"hello");
    assert_eq!(sig.len(), 64);
    assert!(key.verify(b"hello", &sig));
    assert!(verify_es256(&key.public_jwk(), b"hello", &sig));
    let b64 = key.sign_b64url(b"hello");
    let decoded = b64url_decode(&b64).unwrap();
    assert!(verify_es256(&key.public_jwk(), b"hello", &decoded));
}

#[test]
fn ring_signature_verifies_with_p256_and_back() {
    use p256::ecdsa::signature::Verifier as _;
    let key = KeyPair::generate().unwrap();
    let pem = key.to_pkcs8_pem();
    let signing =
        <p256::ecdsa::SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&pem).unwrap();
    let sig = p256::ecdsa::Signature::from_slice(&key.sign(b"msg")).unwrap();
    assert!(signing.verifying_key().verify(b"msg", &sig).is_ok());
}

#[test]
fn verify_fails_on_flipped_byte_or_wrong_key() {
    let key = KeyPair::generate().unwrap();
    let other = KeyPair::generate().unwrap();
    let sig = key.sign(b"payload");
    for i in [0, 31, 32, 63] {
        let mut bad = sig.clone();
        bad[i] ^= 0x01;
        assert!(!verify_es256(&key.public_jwk(), b"payload", &bad));
    }
    assert!(!verify_es256(&key.public_jwk(), b"payloaD", &sig));
    assert!(!verify_es256(&other.public_jwk(), b"payload", &sig));
    assert!(!verify_es256(&key.public_jwk(), b"payload", &sig[..63]));
    let mut rs256 = key.public_jwk();
    rs256.alg = Some("RS256".into());
    assert!(!verify_es256(&rs256, b"payload", &sig));
}

#[test]
fn pem_round_trip_keeps_kid() {
    let key = KeyPair::generate().unwrap();
    let pem = key.to_pkcs8_pem();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let back = KeyPair::from_pkcs8_pem(&pem).unwrap();
    assert_eq!(back.kid(), key.kid());
    assert_eq!(back.public_jwk(), key.public_jwk());
    assert!(back.verify(b"x", &key.sign(b"x")));
    assert!(KeyPair::from_pkcs8_pem("not a pem").is_err());
}

#[test]
fn sec1_pem_is_accepted() {
    let key = KeyPair::generate().unwrap();
    let signing = <p256::ecdsa::SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(
        &key.to_pkcs8_pem(),
    )
    .unwrap();
    let sec1 = p256::SecretKey::from(signing)
        .to_sec1_pem(p256::pkcs8::LineEnding::LF)
        .unwrap();
    assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
    assert_eq!(KeyPair::from_pkcs8_pem(&sec1).unwrap().kid(), key.kid());
}

#[test]
fn kid_is_rfc7638_thumbprint() {
    // RFC 7638 §3.1 example (RSA).
    let jwk: Jwk = serde_json::from_value(json!({
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29"
    }))
    .unwrap();
    assert_eq!(
        jwk.thumbprint().as_deref(),
        Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
    );
    let key = KeyPair::generate().unwrap();
    assert_eq!(key.public_jwk().thumbprint().as_deref(), Some(key.kid()));
    assert_eq!(key.kid().len(), 43);
}

#[test]
fn jwk_serde_shape() {
    let key = KeyPair::generate().unwrap();
    let v = serde_json::to_value(Jwks {
        keys: vec![key.public_jwk()],
    })
    .unwrap();
    let k = &v["keys"][0];
    assert_eq!(k["kty"], "EC");
    assert_eq!(k["crv"], "P-256");
    assert_eq!(k["alg"], "ES256");
    assert_eq!(k["use"], "sig");
    assert_eq!(k["kid"], key.kid());
    assert!(k.get("n").is_none());
    let back: Jwks = serde_json::from_value(v).unwrap();
    assert_eq!(back.find(key.kid()), Some(&key.public_jwk()));
    assert!(back.find("nope").is_none());
}

#[test]
fn key_ring_persists_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("nested/keys");
    let ring = KeyRing::load_or_create(&sub, "dev").unwrap();
    let path = sub.join("dev.key.pem");
    assert!(path.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = KeyRing::load_or_create(&sub, "dev").unwrap();
    assert_eq!(ring.active().kid(), again.active().kid());
    let sig = ring.active().sign(b"m");
    assert!(again.verify(ring.active().kid(), b"m", &sig));
    assert!(!again.verify("other-kid", b"m", &sig));
}

#[test]
fn key_ring_from_files_rotates_with_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let old = KeyPair::generate().unwrap();
    let new = KeyPair::generate().unwrap();
    let old_path = dir.path().join("old.pem");
    let new_path = dir.path().join("new.pem");
    std::fs::write(&old_path, old.to_pkcs8_pem()).unwrap();
    std::fs::write(&new_path, new.to_pkcs8_pem()).unwrap();
    let ring = KeyRing::from_pem_files(&[new_path, old_path]).unwrap();
    assert_eq!(ring.active().kid(), new.kid());
    let jwks = ring.jwks();
    assert_eq!(jwks.keys.len(), 2);
    assert_eq!(jwks.keys[0].kid.as_deref(), Some(new.kid()));
    assert!(ring.verify(old.kid(), b"m", &old.sign(b"m")));
    assert!(ring.verify(new.kid(), b"m", &new.sign(b"m")));
    assert!(!ring.verify(new.kid(), b"m", &old.sign(b"m")));
    assert!(KeyRing::from_pem_files(&[]).is_err());
    assert!(KeyRing::from_pem_files(&[dir.path().join("missing.pem")]).is_err());

    let public_only = KeyRing::new(new.clone())
        .with_public_jwk(old.public_jwk())
        .unwrap();
    assert!(public_only.verify(old.kid(), b"m", &old.sign(b"m")));
}

#[test]
fn sha256_known_answer() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

/// RFC 8785 Appendix B: IEEE-754 bit patterns and their JCS text (checked against
/// ECMAScript `JSON.stringify` in node).
const NUMBER_VECTORS: &[(u64, &str)] = &[
    (0x0000000000000000, "0"),
    (0x8000000000000000, "0"),
    (0x0000000000000001, "5e-324"),
    (0x8000000000000001, "-5e-324"),
    (0x7fefffffffffffff, "1.7976931348623157e+308"),
    (0xffefffffffffffff, "-1.7976931348623157e+308"),
    (0x4340000000000000, "9007199254740992"),
    (0xc340000000000000, "-9007199254740992"),
    (0x4430000000000000, "295147905179352830000"),
    (0x44b52d02c7e14af5, "9.999999999999997e+22"),
    (0x44b52d02c7e14af6, "1e+23"),
    (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
    (0x444b1ae4d6e2ef4e, "999999999999999700000"),
    (0x444b1ae4d6e2ef4f, "999999999999999900000"),
    (0x444b1ae4d6e2ef50, "1e+21"),
    (0x444b1ae4d6e2ef51, "1.0000000000000001e+21"),
    (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
    (0x3eb0c6f7a0b5ed8d, "0.000001"),
    (0x41b3de4355555553, "333333333.3333332"),
    (0x41b3de4355555554, "333333333.33333325"),
    (0x41b3de4355555555, "333333333.3333333"),
    (0x41b3de4355555556, "333333333.3333334"),
    (0x41b3de4355555557, "333333333.33333343"),
    (0xbecbf647612f3696, "-0.0000033333333333333333"),
    (0x43143ff3c1cb0959, "1424953923781206.2"),
];

#[test]
fn jcs_number_vectors() {
    for (bits, want) in NUMBER_VECTORS {
        let v = from_bits(*bits);
        assert_eq!(canonical_json(&v).unwrap(), *want, "bits {bits:#018x}");
        assert_eq!(serde_json_canonicalizer::to_string(&v).unwrap(), *want);
    }
    // Integers are doubles too.
    assert_eq!(canonical_json(&json!(-0)).unwrap(), "0");
    assert_eq!(
        canonical_json(&json!(10_u64.pow(19))).unwrap(),
        "10000000000000000000"
    );
    assert_eq!(
        canonical_json(&json!(u64::MAX)).unwrap(),
        "18446744073709552000"
    );
    assert_eq!(
        canonical_json(&json!(9_007_199_254_740_993_u64)).unwrap(),
        "9007199254740992"
    );
}

const RFC_EXAMPLE_IN: &str = r#"{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001, -0],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}"#;

const RFC_EXAMPLE_OUT: &str = "{\"literals\":[null,true,false],\"numbers\":[333333333.3333333,1e+30,4.5,0.002,1e-27,0],\"string\":\"€$\\u000f\\nA'B\\\"\\\\\\\\\\\"/\"}";

#[test]
fn jcs_rfc_example() {
    let v: Value = serde_json::from_str(RFC_EXAMPLE_IN).unwrap();
    assert_eq!(canonical_json(&v).unwrap(), RFC_EXAMPLE_OUT);
    assert_eq!(
        serde_json_canonicalizer::to_string(&v).unwrap(),
        RFC_EXAMPLE_OUT
    );
}

#[test]
fn jcs_sorts_by_utf16_code_units() {
    let v: Value = serde_json::from_str(
        r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#,
    )
    .unwrap();
    let want = "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\"ö\":\"Latin Small Letter O With Diaeresis\",\"€\":\"Euro Sign\",\"😀\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
    assert_eq!(canonical_json(&v).unwrap(), want);
    assert_eq!(serde_json_canonicalizer::to_string(&v).unwrap(), want);
}

#[test]
fn jcs_nested_and_escapes_match_reference() {
    let v = json!({
        "z": [1, 2.5, {"b": "\u{1f}\u{7f}\u{2028}", "a": null}],
        "a": {"y": true, "x": [], "w": {}},
        "": "empty key",
    });
    let ours = canonical_json(&v).unwrap();
    assert_eq!(ours, serde_json_canonicalizer::to_string(&v).unwrap());
    assert_eq!(
        ours,
        "{\"\":\"empty key\",\"a\":{\"w\":{},\"x\":[],\"y\":true},\"z\":[1,2.5,{\"a\":null,\"b\":\"\\u001f\u{7f}\u{2028}\"}]}"
    );
}

#[test]
fn content_hash_is_order_independent() {
    let a: Value = serde_json::from_str(r#"{"b":1,"a":[1.0,"x"]}"#).unwrap();
    let b: Value = serde_json::from_str(r#"{ "a": [1, "x"], "b": 1.0 }"#).unwrap();
    let (ca, ha) = content_hash(&a);
    let (cb, hb) = content_hash(&b);
    assert_eq!(ca, r#"{"a":[1,"x"],"b":1}"#);
    assert_eq!(ca, cb);
    assert_eq!(ha, hb);
    assert_eq!(ha, format!("sha256:{}", sha256_hex(ca.as_bytes())));
}

#[test]
fn policy_set_hash_is_over_name_sorted_jcs_and_ignores_order() {
    let a = policy_set_hash([("refunds", "sha256:bb"), ("kyc", "sha256:aa")]);
    let b = policy_set_hash([("kyc", "sha256:aa"), ("refunds", "sha256:bb")]);
    assert_eq!(a, b);
    let jcs = r#"[{"content_hash":"sha256:aa","name":"kyc"},{"content_hash":"sha256:bb","name":"refunds"}]"#;
    assert_eq!(a, format!("sha256:{}", sha256_hex(jcs.as_bytes())));
    // One byte of one member's hash changes the set's hash.
    assert_ne!(
        a,
        policy_set_hash([("kyc", "sha256:ab"), ("refunds", "sha256:bb")])
    );
    // The empty set is the hash of `[]`.
    assert_eq!(policy_set_hash([]), format!("sha256:{}", sha256_hex(b"[]")));
}

#[test]
fn plan_hash_leaves_out_only_the_non_executable_fields() {
    let plan = json!({
        "planHash": "sha256:old",
        "capsuleName": "refund",
        "steps": [{"id": "a", "createdBy": "kept: not top-level"}],
        "estimate": {"durationMs": 5},
        "compilerVersion": "1.2.3",
        "createdBy": "alice",
        "createTime": "2026-01-01T00:00:00Z",
    });
    let content = plan_executable_content(&plan).unwrap();
    assert_eq!(
        content,
        json!({"capsuleName": "refund", "steps": [{"id": "a", "createdBy": "kept: not top-level"}]})
    );
    let jcs = canonical_json(&content).unwrap();
    assert_eq!(
        plan_hash(&plan).unwrap(),
        format!("sha256:{}", sha256_hex(jcs.as_bytes()))
    );
    // Provenance does not change the hash; content does.
    let mut other = plan.clone();
    other["createdBy"] = json!("bob");
    other["estimate"] = json!({"durationMs": 9});
    assert_eq!(plan_hash(&other).unwrap(), plan_hash(&plan).unwrap());
    other["capsuleName"] = json!("refunds");
    assert_ne!(plan_hash(&other).unwrap(), plan_hash(&plan).unwrap());
}

#[test]
fn plan_hash_of_something_not_a_plan_is_an_internal_error() {
    let e = plan_hash(&json!(["not", "a", "plan"])).unwrap_err();
    assert_eq!(e.code, anumate_errors::ErrorCode::Internal);
}

#[test]
fn digests_parse_from_every_accepted_form_to_the_wire_form() {
    let hex = sha256_hex(b"plan");
    let wire = format!("sha256:{hex}");
    assert_eq!(digest(b"plan"), wire);
    for form in [wire.clone(), format!("sha256-{hex}"), hex.clone()] {
        assert_eq!(parse_digest("plan_hash", &form).unwrap(), wire, "{form}");
    }
    for bad in [
        String::new(),
        "sha256:".to_string(),
        hex.to_uppercase(),
        format!("sha256:{}", &hex[..63]),
        format!("sha512:{hex}"),
        format!("sha256:{hex}0"),
    ] {
        let e = parse_digest("plan_hash", &bad).unwrap_err();
        assert_eq!(e.code, anumate_errors::ErrorCode::InvalidArgument, "{bad}");
        assert_eq!(e.violations[0].field, "plan_hash");
    }
}
