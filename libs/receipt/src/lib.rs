//! Receipts' tamper evidence: the RFC 6962 / RFC 9162 Merkle log math (roots,
//! inclusion and consistency proofs, an incremental tree), checkpoints as
//! C2SP signed notes with ECDSA P-256, receipt statements and offline
//! verification of a receipt against a checkpoint.
//!
//! The Merkle code is our own rather than a crate's: `ct-merkle` keeps leaves
//! and nodes in its own in-memory layout, `rs_merkle` is not RFC 6962
//! (no leaf/node prefixes, different unbalanced trees) and `merkle-log` is a
//! different tree shape. The log service persists perfect-subtree nodes
//! itself, so the math here works on any [`NodeStore`].
#![forbid(unsafe_code)]

mod merkle;
mod note;
mod receipt;

pub use merkle::{
    CompactRange, EMPTY_ROOT, Hash, LeafHashes, NodeStore, ProofError, Tree, consistency_proof,
    inclusion_proof, leaf_hash, node_hash, root_at, root_from_inclusion_proof, verify_consistency,
    verify_inclusion,
};
pub use note::{
    Checkpoint, ECDSA_SIGNATURE_TYPE, NoteError, NoteSigner, NoteVerifier, VerifiedNote,
    ecdsa_key_id, open_checkpoint, open_checkpoint_with_jwks, open_note, p256_spki_der,
};
pub use receipt::{
    InclusionProof, RECEIPT_KINDS, ReceiptError, STATEMENT_VERSION, SignedStatement, Statement,
    Subject, Verified, VerifiedStatement, VerifyError, log_origin, verify_receipt_offline,
};

#[cfg(test)]
mod tests;
