#![allow(
    clippy::expect_used,
    reason = "a benchmark has nothing to do but stop when set-up fails"
)]
//! Token issue and verify, single-threaded, whole operation (encode or
//! decode, parse, checks, signature), with `ring` and with pure-Rust `p256`
//! side by side. The bare ECDSA sign/verify of each backend is the floor.

use std::hint::black_box;
use std::time::Duration;

use anumate_captokens::{
    ArgsBinding, Backend, Capability, Claims, Constraint, Expectation, IssueError, IssueRequest,
    Issuer, P256Signer, TokenSigner, Verifier,
};
use anumate_crypto::{KeyPair, KeyRing};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

const NOW: i64 = 1_800_000_000;

fn tokens(c: &mut Criterion) {
    let key = KeyPair::generate().expect("key");
    let ring = KeyRing::new(key.clone());
    let p256_signer = P256Signer::from_key_pair(&key).expect("p256 key");
    let issuer = Issuer::new("https://captokens.anumate.test");
    let cap = Capability::new("payments.refund", ["call"])
        .constrain("/amount", Constraint::range(1, 50_000))
        .constrain("/currency", Constraint::one_of(["EUR", "USD"]))
        .constrain(
            "/callback",
            Constraint::prefix("https://orders.example/hooks/"),
        );
    let args = json!({
        "amount": 12_500,
        "currency": "EUR",
        "callback": "https://orders.example/hooks/refund/42",
        "order": "ord_42",
    });
    let request = IssueRequest {
        subject: "user:alice",
        audience: "connector.payments",
        tenant: "tenant-a",
        run: "0196f1c2-7d1e-7c4a-9d0e-1f2a3b4c5d6e",
        step: "refund",
        plan_hash: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        args: ArgsBinding::Args(&args),
        capability: &cap,
        ttl: Some(Duration::from_secs(120)),
        single_use: true,
        now: Some(NOW),
    };
    let token = issuer.issue(&ring, request).expect("issue").token;
    let expected = Expectation::new("connector.payments", "tenant-a", "payments.refund")
        .action("call")
        .args(&args)
        .at(NOW + 1);
    let ring_verifier = Verifier::from_key_ring(&ring).expect("verifier");
    let p256_verifier = Verifier::from_key_ring(&ring)
        .expect("verifier")
        .with_backend(Backend::P256);
    ring_verifier
        .verify(&token, &expected)
        .expect("ring verifies");
    p256_verifier
        .verify(&token, &expected)
        .expect("p256 verifies");

    let mut group = c.benchmark_group("issue");
    group.bench_function("ring", |b| {
        b.iter(|| issuer.issue(&ring, black_box(request)).expect("issue"));
    });
    group.bench_function("p256", |b| {
        b.iter(|| {
            issuer
                .issue(&p256_signer, black_box(request))
                .expect("issue")
        });
    });

    // Everything but the signature: a signer that returns zeros.
    group.bench_function("without_signature", |b| {
        b.iter(|| {
            issuer
                .issue(&NullSigner, black_box(request))
                .expect("issue")
        });
    });
    group.finish();

    let mut group = c.benchmark_group("parts");
    group.bench_function("args_sha256", |b| {
        b.iter(|| anumate_captokens::args_sha256(black_box(&args)));
    });
    let claims_b64 = token.split('.').nth(1).expect("claims segment");
    group.bench_function("decode_claims", |b| {
        b.iter(|| {
            let json = anumate_crypto::b64url_decode(black_box(claims_b64)).expect("base64");
            serde_json::from_slice::<Claims>(&json).expect("claims")
        });
    });
    group.finish();

    let mut group = c.benchmark_group("verify");
    group.bench_function("ring", |b| {
        b.iter(|| {
            ring_verifier
                .verify(black_box(&token), &expected)
                .expect("valid")
        });
    });
    group.bench_function("p256", |b| {
        b.iter(|| {
            p256_verifier
                .verify(black_box(&token), &expected)
                .expect("valid")
        });
    });
    group.finish();

    // The floor: the bare ES256 signature over the same signing input.
    let input = &token[..token.rfind('.').expect("three segments")];
    let sig = key.sign(input.as_bytes());
    let point = key.public_jwk().p256_sec1().expect("point");
    let ring_key =
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point);
    let p256_key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).expect("point");
    let p256_sig = p256::ecdsa::Signature::from_slice(&sig).expect("sig");
    let mut group = c.benchmark_group("floor");
    group.bench_function("ring_sign", |b| {
        b.iter(|| key.sign(black_box(input.as_bytes())))
    });
    group.bench_function("ring_verify", |b| {
        b.iter(|| {
            ring_key
                .verify(black_box(input.as_bytes()), &sig)
                .expect("valid")
        });
    });
    group.bench_function("p256_verify", |b| {
        use p256::ecdsa::signature::Verifier as _;
        b.iter(|| {
            p256_key
                .verify(black_box(input.as_bytes()), &p256_sig)
                .expect("valid")
        });
    });
    group.finish();
}

/// Signs nothing: isolates the cost of everything around the signature.
struct NullSigner;

impl TokenSigner for NullSigner {
    fn kid(&self) -> &str {
        "null"
    }

    fn sign_es256(&self, _msg: &[u8]) -> Result<[u8; 64], IssueError> {
        Ok([0; 64])
    }
}

criterion_group!(benches, tokens);
criterion_main!(benches);
