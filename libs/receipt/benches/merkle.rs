//! Merkle log benchmarks: appends, and inclusion proof generation plus
//! verification in a large tree.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use anumate_receipt::{Hash, Tree, leaf_hash, verify_inclusion};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

fn leaves(n: u64) -> Vec<Hash> {
    (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect()
}

fn append(c: &mut Criterion) {
    let hashes = leaves(100_000);
    let mut group = c.benchmark_group("append");
    group.sample_size(10);
    group.throughput(Throughput::Elements(hashes.len() as u64));
    group.bench_function("100k leaves (leaf hashes given)", |b| {
        b.iter(|| Tree::from_leaf_hashes(hashes.iter().copied()))
    });
    group.bench_function("100k leaves (hashing leaf data)", |b| {
        b.iter_batched(
            Tree::new,
            |mut tree| {
                for i in 0..100_000u64 {
                    tree.append_data(&i.to_be_bytes());
                }
                tree
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn proofs(c: &mut Criterion) {
    const N: u64 = 1_000_000;
    let tree = Tree::from_leaf_hashes(leaves(N));
    let root = tree.root();
    let mut group = c.benchmark_group("inclusion n=1M");
    let mut i = 0u64;
    group.bench_function("generate", |b| {
        b.iter(|| {
            i = (i + 7_919) % N;
            tree.inclusion_proof(black_box(i), N).unwrap()
        })
    });
    let proof = tree.inclusion_proof(123_457, N).unwrap();
    let leaf = leaf_hash(&123_457u64.to_be_bytes());
    group.bench_function("verify", |b| {
        b.iter(|| verify_inclusion(black_box(123_457), N, &leaf, &proof, &root).unwrap())
    });
    group.bench_function("generate + verify", |b| {
        b.iter(|| {
            i = (i + 7_919) % N;
            let proof = tree.inclusion_proof(i, N).unwrap();
            verify_inclusion(i, N, &leaf_hash(&i.to_be_bytes()), &proof, &root).unwrap()
        })
    });
    group.bench_function("consistency generate (500k -> 1M)", |b| {
        b.iter(|| tree.consistency_proof(black_box(500_001), N).unwrap())
    });
    group.finish();
}

criterion_group!(benches, append, proofs);
criterion_main!(benches);
