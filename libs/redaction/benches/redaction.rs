//! Redaction throughput: `redact_json` on a 64 KB JSON document with mixed
//! PII (~5% of strings) and `redact_str` on clean text.

use anumate_redaction::Redactor;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use std::hint::black_box;

/// Small deterministic generator so runs are comparable.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() as usize) % xs.len()]
    }
}

const CLEAN: &[&str] = &[
    "shipped",
    "pending review",
    "Widget deluxe edition, blue",
    "ORD-2024-000123",
    "2024-05-01T10:30:00Z",
    "version 1.2.3",
    "AB-1234-XY",
    "Customer asked to leave the parcel at the back door.",
    "refund approved by finance",
    "550e8400-e29b-41d4-a716-446655440000",
    "Jane Doe",
    "Berlin",
    "express",
    "qty 12 @ 19.99 EUR",
];

const PII: &[&str] = &[
    "jane.doe@example.com",
    "call me at +1 415 555 0132",
    "card 4111 1111 1111 1111",
    "IBAN DE89 3704 0044 0532 0130 00",
    "ssn 123-45-6789",
    "from 192.168.10.24",
    "key sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "2001:db8::1",
    "(415) 555-0132",
];

fn string(rng: &mut Lcg) -> Value {
    if rng.next() % 100 < 5 {
        Value::String(rng.pick(PII).to_owned())
    } else {
        Value::String(rng.pick(CLEAN).to_owned())
    }
}

fn document(target: usize) -> Value {
    let mut rng = Lcg(42);
    let mut orders = Vec::new();
    let mut size = 0;
    while size < target {
        let order = json!({
            "id": string(&mut rng),
            "status": string(&mut rng),
            "customer": {"name": string(&mut rng), "contact": string(&mut rng), "city": string(&mut rng)},
            "lines": [
                {"sku": string(&mut rng), "qty": rng.next() % 10, "price": 19.99, "note": string(&mut rng)},
                {"sku": string(&mut rng), "qty": rng.next() % 10, "price": 5.5, "note": string(&mut rng)}
            ],
            "notes": [string(&mut rng), string(&mut rng)],
            "created": string(&mut rng),
            "paid": true
        });
        size += order.to_string().len() + 1;
        orders.push(order);
    }
    json!({ "orders": orders })
}

fn bench(c: &mut Criterion) {
    let redactor = Redactor::default();
    let doc = document(64 * 1024);
    let bytes = doc.to_string().len() as u64;

    let mut g = c.benchmark_group("redaction");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("redact_json_64k_mixed_pii", |b| {
        // `_ref`: the copies are made and dropped outside the timed part,
        // so the figure is redaction, not freeing a 64 KB document.
        b.iter_batched_ref(
            || doc.clone(),
            |d| black_box(redactor.redact_json(d)),
            BatchSize::SmallInput,
        )
    });

    let mut rng = Lcg(7);
    let mut text = String::new();
    while text.len() < 64 * 1024 {
        text.push_str(rng.pick(CLEAN));
        text.push(' ');
    }
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("redact_str_64k_clean", |b| {
        b.iter(|| black_box(redactor.redact_str(black_box(&text)).len()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
