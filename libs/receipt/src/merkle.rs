//! RFC 6962 / RFC 9162 Merkle tree hashing, roots and proofs.
//!
//! Nodes are addressed as perfect subtrees: `(level, index)` covers the leaves
//! `index << level .. (index + 1) << level`. Such a node never changes once all
//! its leaves exist, so a write-once store can keep every one of them; every
//! root and proof of any tree size is computed from these nodes alone.

use sha2::{Digest, Sha256};

/// A SHA-256 Merkle hash.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of the empty string (RFC 9162 §2.1.1).
pub const EMPTY_ROOT: Hash = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// The leaf hash: SHA-256(0x00 || `data`).
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// The interior node hash: SHA-256(0x01 || `left` || `right`).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Why a proof could not be made or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange {
        /// The leaf index asked for.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The tree sizes cannot be compared (first larger than second) or exceed the store.
    #[error("invalid tree sizes {first} and {second}")]
    InvalidSizes {
        /// The older (or requested) size.
        first: u64,
        /// The newer (or available) size.
        second: u64,
    },
    /// The proof has too many or too few hashes.
    #[error("proof has the wrong number of hashes")]
    WrongLength,
    /// The proof leads to a different root.
    #[error("proof does not lead to the expected root")]
    RootMismatch,
    /// A node the proof needs is missing from the store.
    #[error("node ({level}, {index}) is missing from the store")]
    MissingNode {
        /// Level of the node (0 = leaf).
        level: u32,
        /// Index of the node within its level.
        index: u64,
    },
}

/// Read access to the perfect-subtree nodes of a log.
///
/// `node(0, i)` is the leaf hash of leaf `i`; `node(l, i)` for `l > 0` is the
/// hash of the perfect subtree over leaves `i << l .. (i + 1) << l`. Proof
/// generation only asks for nodes whose leaves are all below [`NodeStore::size`].
/// A store that keeps only leaf hashes can compute the others (see [`LeafHashes`]).
pub trait NodeStore {
    /// The number of leaves.
    fn size(&self) -> u64;
    /// The hash of node `(level, index)`, `None` if the store does not have it.
    fn node(&self, level: u32, index: u64) -> Option<Hash>;
}

/// A [`NodeStore`] over a slice of leaf hashes that computes interior nodes on demand
/// (O(2^level) per node). Fine for tests and small trees; logs should keep nodes.
#[derive(Debug, Clone, Copy)]
pub struct LeafHashes<'a>(pub &'a [Hash]);

impl NodeStore for LeafHashes<'_> {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        if level == 0 {
            return usize::try_from(index)
                .ok()
                .and_then(|i| self.0.get(i))
                .copied();
        }
        let left = self.node(level - 1, index.checked_mul(2)?)?;
        let right = self.node(level - 1, index.checked_mul(2)?.checked_add(1)?)?;
        Some(node_hash(&left, &right))
    }
}

/// The right edge of a Merkle tree: the roots of its perfect subtrees, largest first
/// (one per set bit of the size). Appends in O(log n) and gives the root at any
/// time in O(log n), without the rest of the tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactRange {
    size: u64,
    peaks: Vec<Hash>,
}

impl CompactRange {
    /// The empty tree.
    pub fn new() -> CompactRange {
        CompactRange::default()
    }

    /// Rebuilds a range from a stored size and its peaks (largest subtree first).
    pub fn from_peaks(size: u64, peaks: Vec<Hash>) -> Result<CompactRange, ProofError> {
        if peaks.len() != size.count_ones() as usize {
            return Err(ProofError::WrongLength);
        }
        Ok(CompactRange { size, peaks })
    }

    /// Reads the peaks of the first `size` leaves from a node store.
    pub fn from_store<S: NodeStore + ?Sized>(
        store: &S,
        size: u64,
    ) -> Result<CompactRange, ProofError> {
        if size > store.size() {
            return Err(ProofError::InvalidSizes {
                first: size,
                second: store.size(),
            });
        }
        let mut peaks = Vec::with_capacity(size.count_ones() as usize);
        let mut start = 0u64;
        for level in (0..64u32).rev() {
            if size & (1u64 << level) != 0 {
                let index = start >> level;
                peaks.push(
                    store
                        .node(level, index)
                        .ok_or(ProofError::MissingNode { level, index })?,
                );
                start += 1u64 << level;
            }
        }
        Ok(CompactRange { size, peaks })
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The perfect subtree roots, largest first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// Appends a leaf hash. `on_node` sees every node this completes, leaf first:
    /// `(level, index, hash)` — exactly the nodes a store should persist.
    pub fn append(&mut self, leaf: Hash, mut on_node: impl FnMut(u32, u64, &Hash)) {
        let index = self.size;
        let mut hash = leaf;
        on_node(0, index, &hash);
        let mut level = 0u32;
        while (index >> level) & 1 == 1 {
            // A set bit means a left sibling of the same height is waiting.
            let Some(left) = self.peaks.pop() else { break };
            hash = node_hash(&left, &hash);
            level += 1;
            on_node(level, index >> level, &hash);
        }
        self.peaks.push(hash);
        self.size += 1;
    }

    /// The Merkle Tree Hash of the leaves so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.peaks.iter().rev();
        let Some(first) = iter.next() else {
            return EMPTY_ROOT;
        };
        iter.fold(*first, |acc, peak| node_hash(peak, &acc))
    }
}

/// An in-memory log: every perfect-subtree node, level by level. Append is
/// O(log n) worst case (O(1) amortized); roots and proofs read O(log n) nodes.
/// About 64 bytes per leaf.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    levels: Vec<Vec<Hash>>,
    range: CompactRange,
}

impl Tree {
    /// The empty tree.
    pub fn new() -> Tree {
        Tree::default()
    }

    /// A tree over `leaves` (leaf hashes).
    pub fn from_leaf_hashes(leaves: impl IntoIterator<Item = Hash>) -> Tree {
        let mut tree = Tree::new();
        for leaf in leaves {
            tree.append(leaf);
        }
        tree
    }

    /// Appends a leaf hash and returns its index.
    pub fn append(&mut self, leaf: Hash) -> u64 {
        let index = self.range.size();
        let levels = &mut self.levels;
        self.range.append(leaf, |level, _, hash| {
            let level = level as usize;
            if levels.len() <= level {
                levels.push(Vec::new());
            }
            levels[level].push(*hash);
        });
        index
    }

    /// Appends raw leaf data (hashed with [`leaf_hash`]) and returns its index.
    pub fn append_data(&mut self, data: &[u8]) -> u64 {
        self.append(leaf_hash(data))
    }

    /// The number of leaves.
    pub fn size(&self) -> u64 {
        self.range.size()
    }

    /// The current root.
    pub fn root(&self) -> Hash {
        self.range.root()
    }

    /// The root of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        root_at(self, size)
    }

    /// The inclusion proof of leaf `index` in the tree of the first `size` leaves.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        inclusion_proof(self, index, size)
    }

    /// The consistency proof from the first `first` leaves to the first `second`.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, ProofError> {
        consistency_proof(self, first, second)
    }
}

impl NodeStore for Tree {
    fn size(&self) -> u64 {
        self.range.size()
    }

    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        let index = usize::try_from(index).ok()?;
        self.levels.get(level as usize)?.get(index).copied()
    }
}

/// Largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    1u64 << (63 - (n - 1).leading_zeros())
}

/// MTH(D[start..end]) for a range that occurs in the RFC recursion (`start`
/// aligned to a power of two at least `end - start`): perfect subtrees from
/// the left, folded from the right.
fn subtree_root<S: NodeStore + ?Sized>(
    store: &S,
    start: u64,
    end: u64,
) -> Result<Hash, ProofError> {
    let mut peaks: Vec<Hash> = Vec::with_capacity(8);
    let mut pos = start;
    let len = end - start;
    for level in (0..64u32).rev() {
        if len & (1u64 << level) != 0 {
            let index = pos >> level;
            peaks.push(
                store
                    .node(level, index)
                    .ok_or(ProofError::MissingNode { level, index })?,
            );
            pos += 1u64 << level;
        }
    }
    let mut iter = peaks.iter().rev();
    let Some(first) = iter.next() else {
        return Ok(EMPTY_ROOT);
    };
    Ok(iter.fold(*first, |acc, peak| node_hash(peak, &acc)))
}

/// The Merkle Tree Hash of the first `size` leaves of `store`.
pub fn root_at<S: NodeStore + ?Sized>(store: &S, size: u64) -> Result<Hash, ProofError> {
    if size > store.size() {
        return Err(ProofError::InvalidSizes {
            first: size,
            second: store.size(),
        });
    }
    subtree_root(store, 0, size)
}

/// The RFC 9162 §2.1.3.1 inclusion proof (audit path, leaf to root) of leaf
/// `index` in the tree of the first `size` leaves of `store`.
pub fn inclusion_proof<S: NodeStore + ?Sized>(
    store: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, ProofError> {
    if size > store.size() {
        return Err(ProofError::InvalidSizes {
            first: size,
            second: store.size(),
        });
    }
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // Walk down from the root recording siblings, then reverse (leaf first).
    let mut path = Vec::with_capacity(64);
    let (mut start, mut end) = (0u64, size);
    while end - start > 1 {
        let k = split(end - start);
        if index < start + k {
            path.push(subtree_root(store, start + k, end)?);
            end = start + k;
        } else {
            path.push(subtree_root(store, start, start + k)?);
            start += k;
        }
    }
    path.reverse();
    Ok(path)
}

/// The RFC 9162 §2.1.4.1 consistency proof from the tree of the first `first`
/// leaves to the tree of the first `second` leaves. Empty when `first` is 0 or
/// equals `second`.
pub fn consistency_proof<S: NodeStore + ?Sized>(
    store: &S,
    first: u64,
    second: u64,
) -> Result<Vec<Hash>, ProofError> {
    if first > second || second > store.size() {
        return Err(ProofError::InvalidSizes { first, second });
    }
    if first == 0 || first == second {
        return Ok(Vec::new());
    }
    // SUBPROOF(m, D[start..end], b), unrolled; hashes are collected root-side
    // first and reversed at the end.
    let mut proof = Vec::with_capacity(64);
    let (mut m, mut start, mut end, mut whole) = (first, 0u64, second, true);
    loop {
        let n = end - start;
        if m == n {
            if !whole {
                proof.push(subtree_root(store, start, end)?);
            }
            break;
        }
        let k = split(n);
        if m <= k {
            proof.push(subtree_root(store, start + k, end)?);
            end = start + k;
        } else {
            proof.push(subtree_root(store, start, start + k)?);
            start += k;
            m -= k;
            whole = false;
        }
    }
    proof.reverse();
    Ok(proof)
}

/// The root that an inclusion proof leads to (RFC 9162 §2.1.3.2, steps 1–6).
pub fn root_from_inclusion_proof(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
) -> Result<Hash, ProofError> {
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return Err(ProofError::WrongLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    if s_n != 0 {
        return Err(ProofError::WrongLength);
    }
    Ok(r)
}

/// Verifies an inclusion proof of `leaf` (a leaf hash) at `index` in the tree
/// of `size` leaves with root `root` (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    index: u64,
    size: u64,
    leaf: &Hash,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    let computed = root_from_inclusion_proof(index, size, leaf, proof)?;
    if ct_eq(&computed, root) {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Verifies that the tree `(second, second_root)` extends `(first, first_root)`
/// (RFC 9162 §2.1.4.2). Equal sizes need equal roots and an empty proof; an
/// empty first tree is consistent with everything and needs an empty proof.
pub fn verify_consistency(
    first: u64,
    second: u64,
    proof: &[Hash],
    first_root: &Hash,
    second_root: &Hash,
) -> Result<(), ProofError> {
    if first > second {
        return Err(ProofError::InvalidSizes { first, second });
    }
    if first == second {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if ct_eq(first_root, second_root) {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if first == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    // Step 1: a non-trivial proof is never empty.
    let Some((head, rest)) = proof.split_first() else {
        return Err(ProofError::WrongLength);
    };
    // Step 2: when `first` is a power of two its root is the implicit first element.
    let (start, rest): (&Hash, &[Hash]) = if first.is_power_of_two() {
        (first_root, proof)
    } else {
        (head, rest)
    };
    // Steps 3–4.
    let (mut f_n, mut s_n) = (first - 1, second - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    // Steps 5–6.
    let (mut f_r, mut s_r) = (*start, *start);
    for c in rest {
        if s_n == 0 {
            return Err(ProofError::WrongLength);
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    // Step 7.
    if s_n != 0 {
        return Err(ProofError::WrongLength);
    }
    if ct_eq(&f_r, first_root) && ct_eq(&s_r, second_root) {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// Constant-time equality of two hashes (roots are public, but it costs nothing).
fn ct_eq(a: &Hash, b: &Hash) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
