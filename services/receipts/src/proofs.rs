//! Inclusion and consistency proofs, reading only the perfect-subtree nodes
//! they need.

use std::cell::RefCell;
use std::collections::HashMap;

use anumate_errors::{Error, ErrorCode, Result};
use anumate_proto::receipts::v1 as pb;
use anumate_receipt::{Hash, NodeStore, consistency_proof, inclusion_proof};

use crate::checkpoint::checkpoint_proto;
use crate::{Actor, Receipts, repo, size_param};

/// An inclusion proof and the checkpoint it leads to.
#[derive(Debug, Clone)]
pub struct InclusionProofOut {
    /// Leaf index.
    pub leaf_index: u64,
    /// Leaf hash.
    pub leaf_hash: Hash,
    /// Audit path, leaf first.
    pub audit_path: Vec<Hash>,
    /// The checkpoint.
    pub checkpoint: pb::Checkpoint,
}

/// Records which nodes a proof asks for without knowing their hashes.
pub(crate) struct Recorder {
    size: u64,
    asked: RefCell<Vec<(u32, u64)>>,
}

impl NodeStore for Recorder {
    fn size(&self) -> u64 {
        self.size
    }
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        self.asked.borrow_mut().push((level, index));
        Some([0; 32])
    }
}

/// Nodes fetched from the database.
pub(crate) struct Fetched {
    size: u64,
    nodes: HashMap<(u32, u64), Hash>,
}

impl NodeStore for Fetched {
    fn size(&self) -> u64 {
        self.size
    }
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        self.nodes.get(&(level, index)).copied()
    }
}

/// Runs `compute` over the nodes of a tree of `size` leaves, fetching exactly the
/// nodes it reads: a first pass records them, a second computes with them.
pub(crate) async fn with_nodes<T>(
    tx: &anumate_store::TenantTx,
    size: u64,
    compute: impl Fn(&dyn NodeStore) -> std::result::Result<T, anumate_receipt::ProofError>,
) -> Result<T> {
    let recorder = Recorder {
        size,
        asked: RefCell::new(Vec::new()),
    };
    compute(&recorder).map_err(|e| Error::invalid_argument("tree_size", e.to_string()))?;
    let mut wanted = recorder.asked.into_inner();
    wanted.sort_unstable();
    wanted.dedup();
    let store = Fetched {
        size,
        nodes: repo::nodes(tx, &wanted).await?,
    };
    compute(&store).map_err(Error::internal)
}

impl Receipts {
    /// The inclusion proof of a receipt in a published checkpoint's tree.
    pub async fn inclusion_proof(
        &self,
        actor: &Actor,
        receipt_id: &str,
        tree_size: i64,
    ) -> Result<InclusionProofOut> {
        let size = size_param("tree_size", tree_size)?;
        let tx = self.store.read(&actor.tenant).await?;
        let receipt = self.find(&tx, receipt_id).await?;
        let cp = match Self::find_checkpoint(&tx, size).await {
            Err(e) if e.code == ErrorCode::NotFound && size.is_none() => {
                return Err(Error::new(
                    ErrorCode::FailedPrecondition,
                    "no checkpoint has been published yet; retry after the next checkpoint",
                ));
            }
            other => other?,
        };
        if receipt.leaf_index >= cp.size {
            return Err(Error::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "receipt {receipt_id} (leaf {}) is newer than the checkpoint of size {}; retry after the next checkpoint",
                    receipt.leaf_index, cp.size
                ),
            ));
        }
        let index = receipt.leaf_index;
        let audit_path = with_nodes(&tx, cp.size, |s| inclusion_proof(s, index, cp.size)).await?;
        Ok(InclusionProofOut {
            leaf_index: receipt.leaf_index,
            leaf_hash: receipt.leaf_hash,
            audit_path,
            checkpoint: checkpoint_proto(&actor.tenant, &cp),
        })
    }

    /// The consistency proof between two published checkpoints.
    pub async fn consistency_proof(
        &self,
        actor: &Actor,
        first: i64,
        second: i64,
    ) -> Result<(Vec<Hash>, pb::Checkpoint, pb::Checkpoint)> {
        if first < 1 {
            return Err(Error::invalid_argument(
                "first_tree_size",
                "must be at least 1",
            ));
        }
        let second = size_param("second_tree_size", second)?;
        let tx = self.store.read(&actor.tenant).await?;
        let first_cp = Self::find_checkpoint(&tx, Some(first as u64)).await?;
        let second_cp = Self::find_checkpoint(&tx, second).await?;
        if first_cp.size > second_cp.size {
            return Err(Error::invalid_argument(
                "first_tree_size",
                format!(
                    "{} is larger than the second tree size {}",
                    first_cp.size, second_cp.size
                ),
            ));
        }
        let (m, n) = (first_cp.size, second_cp.size);
        let proof = with_nodes(&tx, n, |s| consistency_proof(s, m, n)).await?;
        Ok((
            proof,
            checkpoint_proto(&actor.tenant, &first_cp),
            checkpoint_proto(&actor.tenant, &second_cp),
        ))
    }
}
