//! Property tests: every proof of random trees verifies against an independent
//! recursive RFC 6962 reference, and any single flipped byte in a leaf, proof,
//! root, checkpoint or receipt fails verification.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anumate_receipt::{
    Checkpoint, Hash, InclusionProof, LeafHashes, NoteSigner, Statement, Subject, Tree,
    consistency_proof, inclusion_proof, leaf_hash, node_hash, open_checkpoint, verify_consistency,
    verify_inclusion, verify_receipt_offline,
};
use proptest::prelude::*;

/// MTH straight from RFC 6962 §2.1, recursively over the leaf hashes.
fn reference_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => anumate_receipt::EMPTY_ROOT,
        1 => leaves[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
        }
    }
}

fn leaves_strategy() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_proof_verifies(data in leaves_strategy()) {
        let leaves: Vec<Hash> = data.iter().map(|d| leaf_hash(d)).collect();
        let tree = Tree::from_leaf_hashes(leaves.iter().copied());
        let n = tree.size();
        let roots: Vec<Hash> = (0..=leaves.len()).map(|m| reference_root(&leaves[..m])).collect();
        for m in 0..=n {
            prop_assert_eq!(tree.root_at(m).unwrap(), roots[m as usize]);
        }
        for i in 0..n {
            let proof = tree.inclusion_proof(i, n).unwrap();
            if i % 5 == 0 {
                prop_assert_eq!(&proof, &inclusion_proof(&LeafHashes(&leaves), i, n).unwrap());
            }
            prop_assert!(verify_inclusion(i, n, &leaves[i as usize], &proof, &roots[n as usize]).is_ok());
        }
        // Inclusion in every smaller tree, for a few leaves.
        for m in 1..=n {
            let i = m / 2;
            let proof = tree.inclusion_proof(i, m).unwrap();
            prop_assert!(verify_inclusion(i, m, &leaves[i as usize], &proof, &roots[m as usize]).is_ok());
        }
        for m in 0..=n {
            let proof = tree.consistency_proof(m, n).unwrap();
            if m % 5 == 0 {
                prop_assert_eq!(&proof, &consistency_proof(&LeafHashes(&leaves), m, n).unwrap());
            }
            prop_assert!(verify_consistency(m, n, &proof, &roots[m as usize], &roots[n as usize]).is_ok());
            let half = m + (n - m) / 2;
            let proof = tree.consistency_proof(m, half).unwrap();
            prop_assert!(verify_consistency(m, half, &proof, &roots[m as usize], &roots[half as usize]).is_ok());
        }
    }

    #[test]
    fn flipped_inclusion_bytes_fail(
        data in leaves_strategy(),
        pick in any::<prop::sample::Index>(),
        target in 0u8..3,
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let tree = Tree::from_leaf_hashes(data.iter().map(|d| leaf_hash(d)));
        let n = tree.size();
        let i = pick.index(n as usize) as u64;
        let mut leaf = leaf_hash(&data[i as usize]);
        let mut proof = tree.inclusion_proof(i, n).unwrap();
        let mut root = tree.root();
        let mask = 1u8 << bit;
        match target {
            0 => leaf[pos.index(32)] ^= mask,
            1 if !proof.is_empty() => {
                let p = pos.index(proof.len() * 32);
                proof[p / 32][p % 32] ^= mask;
            }
            _ => root[pos.index(32)] ^= mask,
        }
        prop_assert!(verify_inclusion(i, n, &leaf, &proof, &root).is_err());
    }

    #[test]
    fn flipped_consistency_bytes_fail(
        data in leaves_strategy(),
        pick in any::<prop::sample::Index>(),
        target in 0u8..3,
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let tree = Tree::from_leaf_hashes(data.iter().map(|d| leaf_hash(d)));
        let n = tree.size();
        let m = 1 + pick.index(n as usize) as u64;
        let mut proof = tree.consistency_proof(m, n).unwrap();
        let mut first = tree.root_at(m).unwrap();
        let mut second = tree.root();
        let mask = 1u8 << bit;
        match target {
            0 if !proof.is_empty() => {
                let p = pos.index(proof.len() * 32);
                proof[p / 32][p % 32] ^= mask;
            }
            1 => first[pos.index(32)] ^= mask,
            _ => second[pos.index(32)] ^= mask,
        }
        prop_assert!(verify_consistency(m, n, &proof, &first, &second).is_err());
    }
}

struct Fixture {
    receipt: String,
    proof: InclusionProof,
    note: String,
    jwks: anumate_crypto::Jwks,
    tree: Tree,
}

fn fixture(n: u64, index: u64) -> Fixture {
    let key = anumate_crypto::KeyPair::generate().unwrap();
    let content = serde_json::json!({"decision": "approve", "by": "ops"});
    let (_, digest) = anumate_crypto::content_hash(&content);
    let mut tree = Tree::new();
    let mut receipt = String::new();
    for i in 0..n {
        let statement = Statement {
            receipt_id: format!("r-{i}"),
            tenant_id: "acme".into(),
            kind: "APPROVAL_DECISION".into(),
            subject: Subject {
                run_id: "run-9".into(),
                approval_id: format!("ap-{i}"),
                ..Subject::default()
            },
            content_digest: digest.clone(),
            issue_time: "2025-06-07T08:09:10.123456Z".into(),
            kid: key.kid().into(),
            actor: "svc:approvals".into(),
        };
        let signed = statement.sign(&key).unwrap();
        tree.append(signed.leaf_hash);
        if i == index {
            receipt = serde_json::json!({
                "receiptId": statement.receipt_id,
                "tenantId": "acme",
                "kind": "RECEIPT_KIND_APPROVAL_DECISION",
                "subject": {"runId": "run-9", "approvalId": format!("ap-{i}")},
                "contentDigest": digest,
                "issueTime": "2025-06-07T08:09:10.123456Z",
                "kid": key.kid(),
                "statementJson": signed.statement_json,
                "signature": signed.signature,
                "leafIndex": i.to_string(),
                "leafHash": base64_std(&signed.leaf_hash),
                "content": content,
            })
            .to_string();
        }
    }
    let origin = "anumate.dev/receipts/acme";
    let note = NoteSigner::new(origin, key.clone())
        .unwrap()
        .sign_checkpoint(&Checkpoint {
            origin: origin.into(),
            size: n,
            root: tree.root(),
        })
        .unwrap();
    Fixture {
        receipt,
        proof: InclusionProof {
            leaf_index: index,
            tree_size: n,
            audit_path: tree.inclusion_proof(index, n).unwrap(),
        },
        note,
        jwks: anumate_crypto::KeyRing::new(key).jwks(),
        tree,
    }
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn flip(text: &str, pos: usize, mask: u8) -> Option<String> {
    let mut bytes = text.as_bytes().to_vec();
    bytes[pos] ^= mask;
    // A flip that breaks UTF-8 cannot even be handed to the verifier.
    String::from_utf8(bytes).ok()
}

/// Exhaustive: every byte of the receipt JSON and of the checkpoint note, each
/// flipped in its low bit and (separately) its high bit, fails verification.
#[test]
fn every_flipped_receipt_or_checkpoint_byte_fails() {
    let f = fixture(37, 21);
    verify_receipt_offline(&f.receipt, &f.proof, &f.note, &f.jwks).unwrap();
    let mut checked = 0;
    for mask in [0x01u8, 0x20, 0x80] {
        for pos in 0..f.receipt.len() {
            if let Some(bad) = flip(&f.receipt, pos, mask) {
                assert!(
                    verify_receipt_offline(&bad, &f.proof, &f.note, &f.jwks).is_err(),
                    "receipt byte {pos} ^ {mask:#x} accepted: {bad}"
                );
                checked += 1;
            }
        }
        for pos in 0..f.note.len() {
            if let Some(bad) = flip(&f.note, pos, mask) {
                assert!(
                    verify_receipt_offline(&f.receipt, &f.proof, &bad, &f.jwks).is_err(),
                    "checkpoint byte {pos} ^ {mask:#x} accepted: {bad:?}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 2000);
    // The same note still opens with the tree's data.
    let v = anumate_receipt::NoteVerifier::from_jwk("anumate.dev/receipts/acme", &f.jwks.keys[0])
        .unwrap();
    assert_eq!(open_checkpoint(&f.note, &[v]).unwrap().root, f.tree.root());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn flipped_proof_bytes_fail_offline_verification(
        n in 1u64..300,
        pick in any::<prop::sample::Index>(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let index = pick.index(n as usize) as u64;
        let f = fixture(n, index);
        prop_assert!(verify_receipt_offline(&f.receipt, &f.proof, &f.note, &f.jwks).is_ok());
        let mut proof = f.proof.clone();
        prop_assume!(!proof.audit_path.is_empty());
        let p = pos.index(proof.audit_path.len() * 32);
        proof.audit_path[p / 32][p % 32] ^= 1 << bit;
        prop_assert!(verify_receipt_offline(&f.receipt, &proof, &f.note, &f.jwks).is_err());
    }
}
