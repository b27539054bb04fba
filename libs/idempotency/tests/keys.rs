#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Claim, record, replay, reuse, expiry and purge against real databases.

use anumate_idempotency::{Claim, Key, MIGRATIONS, claim, fingerprint, purge, record, release};
use anumate_store::{Backend, Store};
use anumate_testing::{TestDb, migrated_store};
use serde_json::json;

const SCOPE: &str = "test.op";

async fn spawn_app(backend: Backend) -> (TestDb, Store) {
    migrated_store(backend, MIGRATIONS).await
}

fn key<'a>(k: &'a str, fp: &'a str, expires_at: i64) -> Key<'a> {
    Key {
        scope: SCOPE,
        key: k,
        fingerprint: fp,
        expires_at,
    }
}

fn in_an_hour() -> i64 {
    anumate_store::now_micros() + 3_600_000_000
}

async fn a_recorded_key_replays_and_refuses_other_requests((_db, store): (TestDb, Store)) {
    let fp = fingerprint(&json!({"amount": 5})).unwrap();
    let other = fingerprint(&json!({"amount": 6})).unwrap();
    let tx = store.write("t1").await.unwrap();
    assert_eq!(
        claim(&tx, &key("k1", &fp, in_an_hour())).await.unwrap(),
        Claim::New
    );
    record(&tx, SCOPE, "k1", &json!({"id": "tr_1"}))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let tx = store.write("t1").await.unwrap();
    match claim(&tx, &key("k1", &fp, in_an_hour())).await.unwrap() {
        Claim::Replay(r) => assert_eq!(r.result, json!({"id": "tr_1"})),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(
        claim(&tx, &key("k1", &other, in_an_hour())).await.unwrap(),
        Claim::Reused {
            fingerprint: fp.clone()
        }
    );
    drop(tx);

    // Another tenant and another scope have their own keys.
    let tx = store.write("t2").await.unwrap();
    assert_eq!(
        claim(&tx, &key("k1", &other, in_an_hour())).await.unwrap(),
        Claim::New
    );
    let other_scope = Key {
        scope: "other.op",
        ..key("k1", &other, in_an_hour())
    };
    drop(tx);
    let tx = store.write("t1").await.unwrap();
    assert_eq!(claim(&tx, &other_scope).await.unwrap(), Claim::New);
}

async fn a_rolled_back_or_released_claim_leaves_the_key_free((_db, store): (TestDb, Store)) {
    let fp = fingerprint(&json!({})).unwrap();
    let tx = store.write("t1").await.unwrap();
    assert_eq!(
        claim(&tx, &key("k", &fp, in_an_hour())).await.unwrap(),
        Claim::New
    );
    drop(tx); // rolled back: the effects and the claim went together

    let tx = store.write("t1").await.unwrap();
    assert_eq!(
        claim(&tx, &key("k", &fp, in_an_hour())).await.unwrap(),
        Claim::New
    );
    release(&tx, SCOPE, "k").await.unwrap();
    tx.commit().await.unwrap();

    let tx = store.write("t1").await.unwrap();
    assert_eq!(
        claim(&tx, &key("k", &fp, in_an_hour())).await.unwrap(),
        Claim::New
    );
    tx.commit().await.unwrap();

    // Committed without a result: in flight, not a replay.
    let tx = store.write("t1").await.unwrap();
    assert_eq!(
        claim(&tx, &key("k", &fp, in_an_hour())).await.unwrap(),
        Claim::InFlight
    );
}

async fn expired_keys_start_over_and_are_purged((_db, store): (TestDb, Store)) {
    let fp = fingerprint(&json!({"a": 1})).unwrap();
    let other = fingerprint(&json!({"a": 2})).unwrap();
    let past = anumate_store::now_micros() - 1;
    let tx = store.write("t1").await.unwrap();
    assert_eq!(
        claim(&tx, &key("old", &fp, past)).await.unwrap(),
        Claim::New
    );
    record(&tx, SCOPE, "old", &json!(1)).await.unwrap();
    assert_eq!(
        claim(&tx, &key("gone", &fp, past)).await.unwrap(),
        Claim::New
    );
    assert_eq!(
        claim(&tx, &key("kept", &fp, in_an_hour())).await.unwrap(),
        Claim::New
    );
    tx.commit().await.unwrap();

    let tx = store.write("t1").await.unwrap();
    // An expired key is forgotten: another request may claim it.
    assert_eq!(
        claim(&tx, &key("old", &other, in_an_hour())).await.unwrap(),
        Claim::New
    );
    assert_eq!(purge(&tx, anumate_store::now_micros()).await.unwrap(), 1);
    tx.commit().await.unwrap();

    let sys = store.system_read().await.unwrap();
    assert_eq!(
        anumate_idempotency::tenants(&sys).await.unwrap(),
        vec!["t1".to_owned()]
    );
}

async fn concurrent_claims_of_one_key_act_once((_db, store): (TestDb, Store)) {
    let fp = fingerprint(&json!({"n": 1})).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let store = store.clone();
        let fp = fp.clone();
        tasks.push(tokio::spawn(async move {
            let tx = store.write("t1").await.unwrap();
            let c = claim(&tx, &key("race", &fp, in_an_hour())).await.unwrap();
            if c == Claim::New {
                record(&tx, SCOPE, "race", &json!("done")).await.unwrap();
            }
            tx.commit().await.unwrap();
            c
        }));
    }
    let mut new = 0;
    for t in tasks {
        match t.await.unwrap() {
            Claim::New => new += 1,
            Claim::Replay(r) => assert_eq!(r.result, json!("done")),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(new, 1);
}

anumate_testing::on_both_backends! {
    a_recorded_key_replays_and_refuses_other_requests => replay_sqlite, replay_postgres;
    a_rolled_back_or_released_claim_leaves_the_key_free => release_sqlite, release_postgres;
    expired_keys_start_over_and_are_purged => expiry_sqlite, expiry_postgres;
    concurrent_claims_of_one_key_act_once => race_sqlite, race_postgres;
}
