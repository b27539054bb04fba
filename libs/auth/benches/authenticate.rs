//! Bearer authentication per call: the full ES256 verification (cache off)
//! beside a token remembered from an earlier call (the default), in one run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anumate_auth::{AuthConfig, Authenticator, DevIssuer, Role};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let issuer = DevIssuer::load_or_create(dir.path()).unwrap();
    let token = issuer
        .mint(
            "bench",
            "user:alice",
            &[Role::Author],
            Duration::from_secs(3600),
        )
        .unwrap();
    let make = |cache| {
        Authenticator::new(AuthConfig {
            verified_token_cache: cache,
            ..AuthConfig::default()
        })
        .unwrap()
        .with_static_issuer(issuer.issuer(), issuer.jwks())
    };
    let full = make(0);
    let remembered = make(10_000);
    rt.block_on(remembered.authenticate(&token)).unwrap();

    let mut g = c.benchmark_group("authenticate");
    g.bench_function("es256_verify_every_call", |b| {
        b.iter(|| rt.block_on(full.authenticate(&token)).unwrap());
    });
    g.bench_function("remembered_token", |b| {
        b.iter(|| rt.block_on(remembered.authenticate(&token)).unwrap());
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
