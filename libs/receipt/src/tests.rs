#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn h(hex_str: &str) -> Hash {
    hex::decode(hex_str).unwrap().try_into().unwrap()
}

// Known-answer vectors from transparency-dev/merkle, proof/verify_test.go
// (commit 02194e9afb6c1d95b5381350007963aa70fff472), the RFC 6962 test tree of
// the Certificate Transparency reference implementation. Inclusion vectors
// there number leaves from 1; here they are 0-based.
const LEAVES: [&[u8]; 8] = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
];

const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

/// (0-based leaf index, tree size, audit path).
fn inclusion_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
    vec![
        (
            0,
            8,
            vec![
                h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
            ],
        ),
        (
            5,
            8,
            vec![
                h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
            ],
        ),
        (
            2,
            3,
            vec![h(
                "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            )],
        ),
        (
            1,
            5,
            vec![
                h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            ],
        ),
        (0, 1, vec![]),
    ]
}

/// (first size, second size, proof).
fn consistency_vectors() -> Vec<(u64, u64, Vec<Hash>)> {
    vec![
        (1, 1, vec![]),
        (
            1,
            8,
            vec![
                h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
            ],
        ),
        (
            6,
            8,
            vec![
                h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
            ],
        ),
        (
            2,
            5,
            vec![
                h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            ],
        ),
        (
            6,
            7,
            vec![
                h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
                h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
            ],
        ),
    ]
}

fn kat_tree() -> Tree {
    Tree::from_leaf_hashes(LEAVES.iter().map(|l| leaf_hash(l)))
}

#[test]
fn empty_root_is_sha256_of_nothing() {
    assert_eq!(EMPTY_ROOT, anumate_crypto::sha256(b""));
    assert_eq!(Tree::new().root(), EMPTY_ROOT);
    assert_eq!(CompactRange::new().root(), EMPTY_ROOT);
}

#[test]
fn kat_roots_for_every_size() {
    let tree = kat_tree();
    let leaves: Vec<Hash> = LEAVES.iter().map(|l| leaf_hash(l)).collect();
    let mut range = CompactRange::new();
    for (i, expected) in ROOTS.iter().enumerate() {
        let size = i as u64 + 1;
        range.append(leaves[i], |_, _, _| {});
        assert_eq!(tree.root_at(size).unwrap(), h(expected), "size {size}");
        assert_eq!(range.root(), h(expected), "compact range, size {size}");
        assert_eq!(
            root_at(&LeafHashes(&leaves), size).unwrap(),
            h(expected),
            "leaf store, size {size}"
        );
    }
    assert_eq!(tree.root(), h(ROOTS[7]));
}

#[test]
fn kat_inclusion_proofs_generate_and_verify() {
    let tree = kat_tree();
    for (index, size, expected) in inclusion_vectors() {
        let proof = tree.inclusion_proof(index, size).unwrap();
        assert_eq!(proof, expected, "inclusion proof {index} in {size}");
        let leaf = leaf_hash(LEAVES[index as usize]);
        let root = h(ROOTS[size as usize - 1]);
        verify_inclusion(index, size, &leaf, &proof, &root).unwrap();
        // The corruptions of transparency-dev's corruptInclusionProof.
        let mut probes: Vec<(u64, u64, Hash, Vec<Hash>, Hash)> = vec![
            (index.wrapping_sub(1), size, leaf, proof.clone(), root),
            (index + 1, size, leaf, proof.clone(), root),
            (index ^ 2, size, leaf, proof.clone(), root),
            (index, size * 2, leaf, proof.clone(), root),
            (index, size / 2, leaf, proof.clone(), root),
            (index, size, leaf_hash(b"WrongLeaf"), proof.clone(), root),
            (index, size, leaf, proof.clone(), EMPTY_ROOT),
            (
                index,
                size,
                leaf,
                [proof.clone(), vec![root]].concat(),
                root,
            ),
            (
                index,
                size,
                leaf,
                [vec![root], proof.clone()].concat(),
                root,
            ),
        ];
        for i in 0..proof.len() {
            let mut p = proof.clone();
            p[i][0] ^= 8;
            probes.push((index, size, leaf, p, root));
        }
        if !proof.is_empty() {
            probes.push((index, size, leaf, proof[..proof.len() - 1].to_vec(), root));
        }
        for (n, (i, s, l, p, r)) in probes.into_iter().enumerate() {
            assert!(
                verify_inclusion(i, s, &l, &p, &r).is_err(),
                "probe {n} for ({index}, {size}) verified"
            );
        }
    }
}

#[test]
fn kat_consistency_proofs_generate_and_verify() {
    let tree = kat_tree();
    for (first, second, expected) in consistency_vectors() {
        let proof = tree.consistency_proof(first, second).unwrap();
        assert_eq!(proof, expected, "consistency proof {first} -> {second}");
        let r1 = h(ROOTS[first as usize - 1]);
        let r2 = h(ROOTS[second as usize - 1]);
        verify_consistency(first, second, &proof, &r1, &r2).unwrap();
        if proof.is_empty() {
            continue;
        }
        let mut probes: Vec<(u64, u64, Hash, Hash, Vec<Hash>)> = vec![
            (first - 1, second, r1, r2, proof.clone()),
            (first + 1, second, r1, r2, proof.clone()),
            (first ^ 2, second, r1, r2, proof.clone()),
            (first, second * 2, r1, r2, proof.clone()),
            (first, second / 2, r1, r2, proof.clone()),
            (first, second, EMPTY_ROOT, r2, proof.clone()),
            (first, second, r1, EMPTY_ROOT, proof.clone()),
            (first, second, r2, r1, proof.clone()),
            (first, second, r1, r2, vec![]),
            (first, second, r1, r2, [proof.clone(), vec![r1]].concat()),
            (first, second, r1, r2, [proof.clone(), vec![r2]].concat()),
            (first, second, r1, r2, [vec![r1], proof.clone()].concat()),
            (first, second, r1, r2, [vec![r2], proof.clone()].concat()),
            (
                first,
                second,
                r1,
                r2,
                [vec![proof[0]], proof.clone()].concat(),
            ),
            (first, second, r1, r2, proof[..proof.len() - 1].to_vec()),
        ];
        for i in 0..proof.len() {
            let mut p = proof.clone();
            p[i][0] ^= 16;
            probes.push((first, second, r1, r2, p));
        }
        for (n, (f, s, a, b, p)) in probes.into_iter().enumerate() {
            assert!(
                verify_consistency(f, s, &p, &a, &b).is_err(),
                "probe {n} for ({first}, {second}) verified"
            );
        }
    }
}

#[test]
fn consistency_edge_cases_match_transparency_dev() {
    let r1 = leaf_hash(b"don't care 1");
    let r2 = leaf_hash(b"don't care 2");
    let some = [EMPTY_ROOT];
    assert!(verify_consistency(0, 0, &[], &r1, &r2).is_err());
    assert!(verify_consistency(1, 1, &[], &r1, &r2).is_err());
    assert!(verify_consistency(0, 0, &[], &r1, &r1).is_ok());
    assert!(verify_consistency(0, 1, &[], &r1, &r2).is_ok());
    assert!(verify_consistency(1, 1, &[], &r2, &r2).is_ok());
    assert!(verify_consistency(1, 0, &[], &r1, &r2).is_err());
    assert!(verify_consistency(2, 1, &[], &r1, &r2).is_err());
    assert!(verify_consistency(1, 2, &[], &r1, &r2).is_err());
    assert!(verify_consistency(0, 0, &some, &EMPTY_ROOT, &EMPTY_ROOT).is_err());
    assert!(verify_consistency(0, 1, &some, &EMPTY_ROOT, &EMPTY_ROOT).is_err());
    assert!(verify_consistency(1, 1, &some, &EMPTY_ROOT, &EMPTY_ROOT).is_err());
}

#[test]
fn inclusion_edge_cases() {
    let leaf = leaf_hash(b"data");
    verify_inclusion(0, 1, &leaf, &[], &leaf).unwrap();
    assert!(verify_inclusion(0, 0, &leaf, &[], &leaf).is_err());
    assert!(verify_inclusion(1, 1, &leaf, &[], &leaf).is_err());
    assert!(verify_inclusion(0, 1, &leaf, &[], &EMPTY_ROOT).is_err());
    let tree = kat_tree();
    assert_eq!(
        tree.inclusion_proof(8, 8),
        Err(ProofError::IndexOutOfRange { index: 8, size: 8 })
    );
    assert!(tree.inclusion_proof(0, 9).is_err());
    assert!(tree.consistency_proof(3, 2).is_err());
    assert!(tree.consistency_proof(3, 9).is_err());
}

#[test]
fn compact_range_reports_every_perfect_node_once() {
    let mut range = CompactRange::new();
    let mut seen = Vec::new();
    for i in 0..13u64 {
        range.append(leaf_hash(&i.to_be_bytes()), |level, index, _| {
            seen.push((level, index))
        });
    }
    // 13 leaves: 13 + 6 + 3 + 1 perfect nodes.
    assert_eq!(seen.len(), 23);
    let tree = Tree::from_leaf_hashes((0..13u64).map(|i| leaf_hash(&i.to_be_bytes())));
    let restored = CompactRange::from_store(&tree, 13).unwrap();
    assert_eq!(restored, range);
    assert_eq!(
        CompactRange::from_peaks(13, range.peaks().to_vec()).unwrap(),
        range
    );
    assert!(CompactRange::from_peaks(12, range.peaks().to_vec()).is_err());
    for size in 0..=13 {
        let partial = CompactRange::from_store(&tree, size).unwrap();
        assert_eq!(partial.root(), tree.root_at(size).unwrap());
    }
}

#[test]
fn missing_nodes_are_reported() {
    struct Holey(Tree);
    impl NodeStore for Holey {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn node(&self, level: u32, index: u64) -> Option<Hash> {
            if level == 1 && index == 0 {
                None
            } else {
                self.0.node(level, index)
            }
        }
    }
    let store = Holey(kat_tree());
    assert_eq!(
        inclusion_proof(&store, 3, 5),
        Err(ProofError::MissingNode { level: 1, index: 0 })
    );
}

// ---- signed notes ----

fn signer(name: &str) -> NoteSigner {
    NoteSigner::new(name, anumate_crypto::KeyPair::generate().unwrap()).unwrap()
}

#[test]
fn spki_prefix_matches_p256() {
    use p256::pkcs8::EncodePublicKey as _;
    let key = anumate_crypto::KeyPair::generate().unwrap();
    let point = key.public_jwk().p256_sec1().unwrap();
    let vk = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point).unwrap();
    let der = vk.to_public_key_der().unwrap();
    assert_eq!(der.as_bytes(), p256_spki_der(&point).as_slice());
}

#[test]
fn checkpoint_round_trip() {
    let s = signer("anumate.test/receipts/acme");
    let tree = kat_tree();
    let cp = Checkpoint {
        origin: "anumate.test/receipts/acme".into(),
        size: tree.size(),
        root: tree.root(),
    };
    let note = s.sign_checkpoint(&cp).unwrap();
    assert!(note.starts_with("anumate.test/receipts/acme\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n\n\u{2014} anumate.test/receipts/acme "));
    let v = s.verifier().unwrap();
    assert_eq!(
        open_checkpoint(&note, std::slice::from_ref(&v)).unwrap(),
        cp
    );
    assert!(v.vkey().starts_with(&format!(
        "anumate.test/receipts/acme+{:08x}+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IA",
        s.key_id()
    )));
    assert_eq!(NoteVerifier::from_vkey(&v.vkey()).unwrap(), v);
}

// Checkpoints signed by real logs with signed-note type 0x02 keys, from
// github.com/transparency-dev/formats note/note_verifier_test.go: the Sigstore
// Rekor log key (key id c0d23d6a, Rekor's log id prefix) and the Pixel 6
// transparency log key. They pin the key id (SHA-256 of the SPKI DER) and the
// signature encoding (ASN.1 DER over SHA-256) to what other verifiers expect.
#[test]
fn real_ecdsa_checkpoints_verify() {
    let vectors = [
        (
            "rekor.sigstore.dev+c0d23d6a+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABNhtmPtrWm3U1eQXBogSMdGvXwBcK5AW5i0hrZLOC96l+smGNM7nwZ4QvFK/4sueRoVj//QP22Ni4Qt9DPfkWLc=",
            "Rekor\n798034\nf+7CoKgXKE/tNys9TTXcr/ad6U/K3xvznmzew9y6SP0=\n\n\u{2014} rekor.sigstore.dev wNI9ajBEAiARInWIWyCdyG27CO6LPnPekyw20qO0YJfoaPaowGp/XgIgc+qEHS3+GKVClgqq20uDLet7MCoTURUCRdxwWBHHufk=\n",
            798034,
        ),
        (
            "pixel6_transparency_log+91c16e30+AjBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABN+4x0Jk1yTwvLFI9A4NDdGZcX0aiWVdWM5XJVy0M4VWD3AvyW5Q6Hs9A0mcDkpUoYgn+KKPNzFC0H3nN3q6JQ8=",
            "DEFAULT\n10\nbsWRucJU5xJPHb5eBdOm6+DM+VelCZBuvtI3sHERJ9Y=\n\n\u{2014} pixel6_transparency_log kcFuMDBFAiEAhqMAP8P6qf6QxtUJhzMhbN+MbZ9dwfUHzGQJmffJHtoCIGD0cNe47dHWBoPwYdgBCepB06/+g5O1FmYjXl06owL4\n",
            10,
        ),
    ];
    for (vkey, note, size) in vectors {
        let v = NoteVerifier::from_vkey(vkey).unwrap();
        assert_eq!(v.vkey(), vkey);
        let cp = open_checkpoint(note, std::slice::from_ref(&v)).unwrap();
        assert_eq!(cp.size, size);
        let tampered = note.replacen("\n", "1\n", 2);
        assert!(open_checkpoint(&tampered, std::slice::from_ref(&v)).is_err());
    }
    assert!(NoteVerifier::from_vkey(&vectors[0].0.replacen("c0d23d6a", "c0d23d6b", 1)).is_err());
}

#[test]
fn note_parsing_is_strict() {
    let s = signer("log.example/a");
    let v = s.verifier().unwrap();
    let other = signer("log.example/a").verifier().unwrap();
    let cp = Checkpoint {
        origin: "log.example/a".into(),
        size: 5,
        root: kat_tree().root_at(5).unwrap(),
    };
    let note = s.sign_checkpoint(&cp).unwrap();
    let vs = std::slice::from_ref(&v);

    // Wrong key (same name, other key id): ignored, so no known signer.
    assert_eq!(
        open_checkpoint(&note, std::slice::from_ref(&other)),
        Err(NoteError::UnknownKey)
    );
    // Tampered body.
    let tampered = note.replacen("\n5\n", "\n6\n", 1);
    assert!(matches!(
        open_checkpoint(&tampered, vs),
        Err(NoteError::BadSignature(_))
    ));
    // Extra line in the body is signed text but not a checkpoint.
    let body = format!("{}extension\n", cp.body());
    let extended = s.sign(&body).unwrap();
    assert!(matches!(
        open_checkpoint(&extended, vs),
        Err(NoteError::MalformedCheckpoint(_))
    ));
    // Missing line.
    let short = s.sign("log.example/a\n5\n").unwrap();
    assert!(matches!(
        open_checkpoint(&short, vs),
        Err(NoteError::MalformedCheckpoint(_))
    ));
    // Leading zero in the size, non-canonical root.
    for body in [
        format!("log.example/a\n05\n{}\n", STANDARD_B64.encode(cp.root)),
        "log.example/a\n5\nAAAA\n".to_owned(),
    ] {
        let n = s.sign(&body).unwrap();
        assert!(matches!(
            open_checkpoint(&n, vs),
            Err(NoteError::MalformedCheckpoint(_))
        ));
    }
    // No signatures, no blank line, trailing garbage, control characters.
    for bad in [
        cp.body(),
        format!("{}\n", cp.body()),
        format!("{note}\n"),
        format!("{note}junk\n"),
        note.replacen('\n', "\r\n", 1),
        note.trim_end_matches('\n').to_owned(),
    ] {
        assert!(open_checkpoint(&bad, vs).is_err(), "accepted {bad:?}");
    }
    // An unknown extra signature is ignored; a second known one verifies too.
    let cosigned = format!(
        "{note}{}",
        signer("witness.example")
            .signature_line(&cp.body())
            .unwrap()
    );
    assert_eq!(open_checkpoint(&cosigned, vs).unwrap(), cp);
    // Key names with spaces or '+' are refused.
    assert!(NoteSigner::new("a b", anumate_crypto::KeyPair::generate().unwrap()).is_err());
    assert!(NoteSigner::new("a+b", anumate_crypto::KeyPair::generate().unwrap()).is_err());
}

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as STANDARD_B64;

// ---- receipts ----

struct Fixture {
    key: anumate_crypto::KeyPair,
    jwks: anumate_crypto::Jwks,
    receipt_json: String,
    proof: InclusionProof,
    note: String,
}

fn statement(kid: &str, i: u64) -> Statement {
    Statement {
        receipt_id: format!("0190a8b2-0000-7000-8000-{i:012}"),
        tenant_id: "acme".into(),
        kind: "STEP_EXECUTION".into(),
        subject: Subject {
            run_id: "run-1".into(),
            step_id: "charge".into(),
            attempt: 2,
            plan_hash: format!("sha256:{}", "ab".repeat(32)),
            ..Subject::default()
        },
        content_digest: content_digest(),
        issue_time: "2025-01-02T03:04:05.000006Z".into(),
        kid: kid.into(),
        actor: "svc:orchestrator".into(),
    }
}

fn content() -> serde_json::Value {
    serde_json::json!({"outcome": "ok", "amount": 12.5, "args_hash": "sha256:00"})
}

fn content_digest() -> String {
    anumate_crypto::content_hash(&content()).1
}

fn fixture(n: u64, index: u64) -> Fixture {
    fixture_in_log(n, index, "anumate.dev/receipts/acme")
}

/// A receipt of tenant `acme` and a checkpoint of the log named `origin`.
fn fixture_in_log(n: u64, index: u64, origin: &str) -> Fixture {
    let key = anumate_crypto::KeyPair::generate().unwrap();
    let mut tree = Tree::new();
    let mut target = None;
    for i in 0..n {
        let signed = statement(key.kid(), i).sign(&key).unwrap();
        tree.append(signed.leaf_hash);
        if i == index {
            target = Some(signed);
        }
    }
    let signed = target.unwrap();
    let receipt_json = serde_json::json!({
        "receiptId": format!("0190a8b2-0000-7000-8000-{index:012}"),
        "tenantId": "acme",
        "kind": "RECEIPT_KIND_STEP_EXECUTION",
        "subject": {
            "runId": "run-1",
            "stepId": "charge",
            "attempt": 2,
            "planHash": format!("sha256:{}", "ab".repeat(32)),
        },
        "contentDigest": content_digest(),
        "issueTime": "2025-01-02T03:04:05.000006Z",
        "content": content(),
        "kid": key.kid(),
        "actor": "svc:orchestrator",
        "statementJson": signed.statement_json,
        "signature": signed.signature,
        "leafIndex": index.to_string(),
        "leafHash": STANDARD_B64.encode(signed.leaf_hash),
    })
    .to_string();
    let proof = InclusionProof {
        leaf_index: index,
        tree_size: n,
        audit_path: tree.inclusion_proof(index, n).unwrap(),
    };
    let cp = Checkpoint {
        origin: origin.into(),
        size: n,
        root: tree.root(),
    };
    let note = NoteSigner::new(origin, key.clone())
        .unwrap()
        .sign_checkpoint(&cp)
        .unwrap();
    let jwks = anumate_crypto::KeyRing::new(key.clone()).jwks();
    Fixture {
        key,
        jwks,
        receipt_json,
        proof,
        note,
    }
}

#[test]
fn statement_json_is_canonical_and_sparse() {
    let s = statement("kid-1", 7);
    let json = s.to_json().unwrap();
    assert_eq!(
        json,
        concat!(
            r#"{"actor":"svc:orchestrator","#,
            r#""content_digest":"sha256:509a460e4841a620cab2393776c70987795c656724d342e24fcd2b057ce2e283","#,
            r#""issue_time":"2025-01-02T03:04:05.000006Z","kid":"kid-1","kind":"STEP_EXECUTION","#,
            r#""receipt_id":"0190a8b2-0000-7000-8000-000000000007","#,
            r#""subject":{"attempt":2,"plan_hash":"sha256:abababababababababababababababababababababababababababababababab","#,
            r#""run_id":"run-1","step_id":"charge"},"tenant_id":"acme","v":2}"#
        )
    );
    let mut bad = s.clone();
    bad.kind = "STEP".into();
    assert!(bad.to_json().is_err());
    // The actor is a service identity, never a person.
    for actor in ["", "alice", "svc:", "svc:Orchestrator", "user:svc:x"] {
        let mut bad = s.clone();
        bad.actor = actor.into();
        assert!(bad.to_json().is_err(), "{actor:?}");
    }
    let mut bad = s.clone();
    bad.issue_time = "2025-01-02T03:04:05Z".into();
    assert!(bad.to_json().is_err());
    let mut revocation = s;
    revocation.kind = "TOKEN_REVOCATION".into();
    revocation.subject = Subject {
        jtis: vec!["b".into(), "a".into()],
        ..Subject::default()
    };
    assert!(
        revocation
            .to_json()
            .unwrap()
            .contains(r#""subject":{"jtis":["a","b"]}"#)
    );
}

#[test]
fn offline_verification_accepts_a_good_receipt() {
    let f = fixture(11, 6);
    let v = verify_receipt_offline(&f.receipt_json, &f.proof, &f.note, &f.jwks).unwrap();
    assert_eq!(v.leaf_index, 6);
    assert_eq!(v.checkpoint.size, 11);
    assert_eq!(v.statement.tenant_id, "acme");
    assert_eq!(v.statement.kid, f.key.kid());
    assert_eq!(v.statement.actor, "svc:orchestrator");
    assert_eq!(v.statement.v, 2);
    // The proof survives a JSON round trip in proto3 JSON shape.
    let json = serde_json::to_string(&f.proof).unwrap();
    let camel = json
        .replace("leaf_index", "leafIndex")
        .replace("tree_size", "treeSize")
        .replace("audit_path", "auditPath");
    assert_eq!(
        serde_json::from_str::<InclusionProof>(&camel).unwrap(),
        f.proof
    );
}

#[test]
fn offline_verification_failures_are_distinct() {
    let f = fixture(11, 6);
    let check = |receipt: &str, proof: &InclusionProof, note: &str, jwks: &anumate_crypto::Jwks| {
        verify_receipt_offline(receipt, proof, note, jwks).unwrap_err()
    };
    let mut r: serde_json::Value = serde_json::from_str(&f.receipt_json).unwrap();
    let statement_json = r["statementJson"].as_str().unwrap().to_owned();

    assert!(matches!(
        check("{", &f.proof, &f.note, &f.jwks),
        VerifyError::MalformedReceipt(_)
    ));

    let mut x = r.clone();
    x["statementJson"] = statement_json.replace("\"kid\"", " \"kid\"").into();
    assert_eq!(
        check(&x.to_string(), &f.proof, &f.note, &f.jwks),
        VerifyError::NonCanonicalStatement
    );

    let mut x = r.clone();
    x["statementJson"] = "[1]".into();
    assert!(matches!(
        check(&x.to_string(), &f.proof, &f.note, &f.jwks),
        VerifyError::MalformedStatement(_)
    ));

    let mut x = r.clone();
    x["statementJson"] = statement_json.replace("run-1", "run-2").into();
    assert_eq!(
        check(&x.to_string(), &f.proof, &f.note, &f.jwks),
        VerifyError::BadReceiptSignature
    );

    // The actor is signed: another actor in the receipt is caught, and a
    // statement without one (version 1) is refused.
    let mut x = r.clone();
    x["actor"] = "svc:approvals".into();
    assert_eq!(
        check(&x.to_string(), &f.proof, &f.note, &f.jwks),
        VerifyError::FieldMismatch("actor")
    );
    let mut v1: serde_json::Value = serde_json::from_str(&statement_json).unwrap();
    v1.as_object_mut().unwrap().remove("actor");
    v1.as_object_mut().unwrap().remove("v");
    let v1_json = anumate_crypto::canonical_json(&v1).unwrap();
    let mut x = r.clone();
    x.as_object_mut().unwrap().remove("actor");
    x["statementJson"] = v1_json.clone().into();
    x["signature"] = anumate_crypto::b64url(&f.key.sign(v1_json.as_bytes())).into();
    x.as_object_mut().unwrap().remove("leafHash");
    assert!(matches!(
        check(&x.to_string(), &f.proof, &f.note, &f.jwks),
        VerifyError::MalformedStatement(_)
    ));

    let mut x = r.clone();
    x["tenantId"] = "other".into();
    assert_eq!(
        check(&x.to_string(), &f.proof, &f.note, &f.jwks),
        VerifyError::FieldMismatch("tenant_id")
    );

    for (field, value, name) in [
        (
            "kind",
            serde_json::json!("RECEIPT_KIND_RUN_OUTCOME"),
            "kind",
        ),
        (
            "issueTime",
            serde_json::json!("2025-01-02T03:04:05.000007Z"),
            "issue_time",
        ),
        ("subject", serde_json::json!({"runId": "run-1"}), "subject"),
        ("content", serde_json::json!({"outcome": "bad"}), "content"),
    ] {
        let mut x = r.clone();
        x[field] = value;
        assert_eq!(
            check(&x.to_string(), &f.proof, &f.note, &f.jwks),
            VerifyError::FieldMismatch(name)
        );
    }
    let mut x = r.clone();
    x["issueTime"] = "2025-01-02T03:04:05.000006000Z".into();
    x["kind"] = 1.into();
    verify_receipt_offline(&x.to_string(), &f.proof, &f.note, &f.jwks).unwrap();
    let mut x = r.clone();
    x["extra"] = 1.into();
    assert!(matches!(
        check(&x.to_string(), &f.proof, &f.note, &f.jwks),
        VerifyError::MalformedReceipt(_)
    ));

    let other_ring = anumate_crypto::KeyRing::new(anumate_crypto::KeyPair::generate().unwrap());
    assert!(matches!(
        check(&f.receipt_json, &f.proof, &f.note, &other_ring.jwks()),
        VerifyError::UnknownReceiptKey(_)
    ));

    // A JWKS with the receipt key but where the checkpoint was signed by another key.
    let other = fixture(11, 6);
    let both = anumate_crypto::Jwks {
        keys: vec![f.key.public_jwk()],
    };
    assert_eq!(
        check(&f.receipt_json, &f.proof, &other.note, &both),
        VerifyError::UnknownCheckpointKey
    );

    let tampered = f.note.replacen("\n11\n", "\n12\n", 1);
    assert_eq!(
        check(&f.receipt_json, &f.proof, &tampered, &f.jwks),
        VerifyError::BadCheckpointSignature
    );

    assert!(matches!(
        check(&f.receipt_json, &f.proof, "garbage", &f.jwks),
        VerifyError::MalformedCheckpoint(_)
    ));

    let mut p = f.proof.clone();
    p.tree_size = 12;
    assert!(matches!(
        check(&f.receipt_json, &p, &f.note, &f.jwks),
        VerifyError::TreeSizeMismatch { .. }
    ));

    let mut p = f.proof.clone();
    p.audit_path[1][3] ^= 1;
    assert_eq!(
        check(&f.receipt_json, &p, &f.note, &f.jwks),
        VerifyError::NotIncluded(ProofError::RootMismatch)
    );

    let mut p = f.proof.clone();
    p.leaf_index = 5;
    r["leafIndex"] = "5".into();
    assert_eq!(
        check(&r.to_string(), &p, &f.note, &f.jwks),
        VerifyError::NotIncluded(ProofError::RootMismatch)
    );
    assert_eq!(
        check(&f.receipt_json, &p, &f.note, &f.jwks),
        VerifyError::FieldMismatch("leaf_index")
    );
}

#[test]
fn a_checkpoint_of_another_tenants_log_vouches_for_nothing() {
    // Same key ring, a well-formed proof and a correctly signed checkpoint,
    // but of tenant `globex`'s log: the receipt of `acme` is refused.
    let f = fixture_in_log(11, 6, "anumate.dev/receipts/globex");
    assert_eq!(
        verify_receipt_offline(&f.receipt_json, &f.proof, &f.note, &f.jwks).unwrap_err(),
        VerifyError::WrongLog {
            expected: "anumate.dev/receipts/acme".into(),
            checkpoint: "anumate.dev/receipts/globex".into(),
        }
    );
    assert_eq!(log_origin("acme"), "anumate.dev/receipts/acme");
}
