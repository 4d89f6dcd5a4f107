//! The audit log's sled layout, and every read of it.
//!
//! One sled tree (`audit`) in its own database under `<data_dir>/audit`, so that one
//! sled batch commits an entry, its Merkle nodes, its index keys and the new size
//! atomically. Keys (all integers big-endian, so byte order is numeric order):
//!
//! | key | value |
//! | --- | --- |
//! | `e` seq | the entry's canonical bytes, sealed (AES-256-GCM, seq as associated data) |
//! | `n` level tile | hashes of up to 64 consecutive complete subtrees of one level: node `index` covers leaves `[index·2^level, (index+1)·2^level)` and sits in tile `index / 64`, slot `index % 64` |
//! | `m` | the tree size (u64) |
//! | `o` | the log's origin name (`log_id`), fixed at creation |
//! | `c` size | a signed checkpoint: timestamp (u64) ‖ root (32) ‖ signature (64) |
//! | `s` subject-ref (64 hex) first-seq | index by child: the seqs of one commit |
//! | `a` len id first-seq | index by actor |
//! | `t` len id first-seq | index by target agency |
//! | `k` action (u32) first-seq | index by action |
//!
//! Index values are posting lists: the ascending seqs (u64 each) that one group
//! commit added for that index value, keyed by the first of them.
//!
//! Entry times never decrease with seq (the writer makes it so), which lets a time
//! range be found by binary search over seq instead of another index.

use std::sync::Arc;

use prost::Message;
use tokio::sync::watch;

use super::checkpoint::{Checkpoint, SignedCheckpoint};
use super::entry::micros_from_timestamp;
use super::merkle::{self, Hash, NodeSource};
use super::writer::LogHealth;
use super::AuditError;
use crate::proto::v1::AuditEntry;
use crate::store::Keys;

pub(crate) const ENTRY: u8 = b'e';
pub(crate) const NODE: u8 = b'n';
pub(crate) const SIZE: &[u8] = b"m";
/// The log's origin name, fixed when the log is created (checkpoints sign it).
pub(crate) const ORIGIN: &[u8] = b"o";
pub(crate) const CHECKPOINT: u8 = b'c';
pub(crate) const BY_SUBJECT: u8 = b's';
pub(crate) const BY_ACTOR: u8 = b'a';
pub(crate) const BY_TARGET: u8 = b't';
pub(crate) const BY_ACTION: u8 = b'k';

/// The sled tree name.
pub const TREE: &str = "audit";

pub(crate) fn entry_key(seq: u64) -> [u8; 9] {
    let mut k = [ENTRY; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Merkle nodes are stored in tiles: the hashes of up to [`TILE_WIDTH`]
/// consecutive nodes of one level in one value, so a group commit rewrites a few
/// tiles instead of inserting a key per node.
pub(crate) const TILE_WIDTH: u64 = 64;

/// The key of the tile holding node `index` of `level`.
pub(crate) fn tile_key(level: u8, index: u64) -> [u8; 10] {
    let mut k = [NODE; 10];
    k[1] = level;
    k[2..].copy_from_slice(&(index / TILE_WIDTH).to_be_bytes());
    k
}

pub(crate) fn checkpoint_key(size: u64) -> [u8; 9] {
    let mut k = [CHECKPOINT; 9];
    k[1..].copy_from_slice(&size.to_be_bytes());
    k
}

/// The prefix of an index over a text value (actor or target id): tag, length, bytes.
pub(crate) fn text_index_prefix(tag: u8, text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut k = Vec::with_capacity(2 + bytes.len() + 8);
    k.push(tag);
    k.push(bytes.len().min(255) as u8);
    k.extend_from_slice(&bytes[..bytes.len().min(255)]);
    k
}

/// The prefix of the subject index for a hex subject ref.
pub(crate) fn subject_index_prefix(subject_hex: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 32 + 8);
    k.push(BY_SUBJECT);
    k.extend_from_slice(subject_hex.as_bytes());
    k
}

pub(crate) fn action_index_prefix(action: i32) -> Vec<u8> {
    let mut k = vec![BY_ACTION];
    k.extend_from_slice(&(action as u32).to_be_bytes());
    k
}

/// The key of a posting list: the index prefix and the list's first seq.
pub(crate) fn posting_key(mut prefix: Vec<u8>, first_seq: u64) -> Vec<u8> {
    prefix.extend_from_slice(&first_seq.to_be_bytes());
    prefix
}

/// A posting list's value: its seqs, ascending, 8 bytes each.
pub(crate) fn encode_postings(seqs: &[u64]) -> Vec<u8> {
    seqs.iter().flat_map(|s| s.to_be_bytes()).collect()
}

fn decode_postings(bytes: &[u8]) -> Result<Vec<u64>, AuditError> {
    if !bytes.len().is_multiple_of(8) {
        return Err(AuditError::Corrupt("malformed index posting list".into()));
    }
    Ok(bytes.chunks_exact(8).filter_map(read_u64).collect())
}

/// Context bytes for sealing entry `seq`.
pub(crate) fn seal_context(seq: u64) -> [u8; 14] {
    let mut c = *b"audit:\0\0\0\0\0\0\0\0";
    c[6..].copy_from_slice(&seq.to_be_bytes());
    c
}

/// The origin name stored in the log, if any.
pub(crate) fn stored_origin(tree: &sled::Tree) -> Result<Option<String>, AuditError> {
    Ok(match tree.get(ORIGIN)? {
        Some(v) => Some(
            String::from_utf8(v.to_vec())
                .map_err(|_| AuditError::Corrupt("malformed origin".into()))?,
        ),
        None => None,
    })
}

pub(crate) fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Reads the audit log. Cheap to clone; every read sees only committed entries (those
/// below the committed size the writer publishes).
#[derive(Clone)]
pub struct AuditLog {
    pub(crate) tree: Arc<arc_swap::ArcSwapOption<sled::Tree>>,
    pub(crate) keys: Arc<Keys>,
    pub(crate) health: watch::Receiver<LogHealth>,
    pub(crate) log_id: String,
}

/// Node reads from a sled tree.
pub(crate) struct SledNodes<'a>(pub &'a sled::Tree);

impl NodeSource for SledNodes<'_> {
    type Error = AuditError;

    fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
        let missing = || AuditError::Corrupt(format!("missing Merkle node {level}/{index}"));
        let tile = self.0.get(tile_key(level, index))?.ok_or_else(missing)?;
        let slot = (index % TILE_WIDTH) as usize * 32;
        tile.get(slot..slot + 32)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(missing)
    }
}

impl AuditLog {
    /// The number of committed entries.
    pub fn size(&self) -> u64 {
        self.health.borrow().size
    }

    /// Whether the log can be written now.
    pub fn writable(&self) -> bool {
        self.health.borrow().writable
    }

    /// The log's origin name in checkpoints.
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// The open tree; `Unavailable` while the writer is recovering from a failure
    /// (it must be able to drop every handle to reopen the database).
    fn tree(&self) -> Result<Arc<sled::Tree>, AuditError> {
        self.tree.load_full().ok_or_else(|| {
            AuditError::Unavailable("the audit store is recovering from a write failure".into())
        })
    }

    /// Entry `seq`, opened, with `canonical` filled in.
    pub fn entry(&self, seq: u64) -> Result<AuditEntry, AuditError> {
        let size = self.size();
        if seq >= size {
            return Err(AuditError::OutOfRange(format!(
                "seq {seq} is beyond the log's {size} entries"
            )));
        }
        read_entry(&*self.tree()?, &self.keys, seq)
    }

    /// The root of the first `size` entries.
    pub fn root(&self, size: u64) -> Result<Hash, AuditError> {
        self.check_size("tree_size", size)?;
        merkle::root(size, &SledNodes(&*self.tree()?))
    }

    /// Leaf hash and audit path of entry `seq` in the tree of `tree_size`.
    pub fn inclusion_proof(
        &self,
        seq: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AuditError> {
        self.check_size("tree_size", tree_size)?;
        if seq >= tree_size {
            return Err(AuditError::OutOfRange(format!(
                "seq {seq} is not below tree_size {tree_size}"
            )));
        }
        let tree = self.tree()?;
        let nodes = SledNodes(&tree);
        let leaf = nodes.node(0, seq)?;
        let proof = merkle::inclusion_proof(seq, tree_size, &nodes).map_err(tree_error)?;
        Ok((leaf, proof))
    }

    /// Consistency proof between two sizes.
    pub fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, AuditError> {
        self.check_size("to_size", to)?;
        if from > to {
            return Err(AuditError::OutOfRange(format!(
                "from_size {from} is greater than to_size {to}"
            )));
        }
        if from == 0 {
            return Ok(Vec::new());
        }
        merkle::consistency_proof(from, to, &SledNodes(&*self.tree()?)).map_err(tree_error)
    }

    /// The newest stored checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, AuditError> {
        let tree = self.tree()?;
        match tree.scan_prefix([CHECKPOINT]).next_back() {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(decode_checkpoint(&self.log_id, &self.keys, &k, &v)?))
            }
        }
    }

    /// Every stored checkpoint, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<SignedCheckpoint>, AuditError> {
        stored_checkpoints(&*self.tree()?, &self.log_id, &self.keys)
    }

    fn check_size(&self, name: &str, size: u64) -> Result<(), AuditError> {
        let current = self.size();
        if size > current {
            return Err(AuditError::OutOfRange(format!(
                "{name} {size} is beyond the log's {current} entries"
            )));
        }
        Ok(())
    }

    /// The first seq whose time is at or after `micros` (binary search: times never
    /// decrease with seq).
    pub fn first_seq_at_or_after(&self, micros: i64, size: u64) -> Result<u64, AuditError> {
        let tree = self.tree()?;
        let (mut lo, mut hi) = (0u64, size);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let t = read_entry(&tree, &self.keys, mid)?
                .time
                .as_ref()
                .map(micros_from_timestamp)
                .unwrap_or(i64::MIN);
            if t < micros {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Seqs from an index prefix, starting at `from_seq`, ascending, below `size`.
    pub(crate) fn index_seqs(
        &self,
        prefix: Vec<u8>,
        from_seq: u64,
        size: u64,
    ) -> Result<impl Iterator<Item = Result<u64, AuditError>>, AuditError> {
        let tree = self.tree()?;
        let at = posting_key(prefix.clone(), from_seq);
        // The list that may hold `from_seq` starts at or before it.
        let start = match tree
            .range(posting_key(prefix.clone(), 0)..=at.clone())
            .next_back()
        {
            Some(kv) => kv?.0.to_vec(),
            None => at,
        };
        let end = posting_key(prefix, size);
        Ok(tree
            .range(start..end)
            .flat_map(move |kv| {
                let seqs = kv
                    .map_err(AuditError::from)
                    .and_then(|(_, v)| decode_postings(&v));
                match seqs {
                    Ok(seqs) => seqs.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                }
            })
            .filter(move |s| match s {
                Ok(seq) => *seq >= from_seq && *seq < size,
                Err(_) => true,
            }))
    }

    pub(crate) fn read(&self, seq: u64) -> Result<AuditEntry, AuditError> {
        read_entry(&*self.tree()?, &self.keys, seq)
    }
}

fn tree_error(e: merkle::TreeError<AuditError>) -> AuditError {
    match e {
        merkle::TreeError::Range(r) => AuditError::OutOfRange(r.to_string()),
        merkle::TreeError::Source(s) => s,
    }
}

/// Reads, opens and decodes entry `seq`, checking it is the entry for that seq.
pub(crate) fn read_entry(
    tree: &sled::Tree,
    keys: &Keys,
    seq: u64,
) -> Result<AuditEntry, AuditError> {
    let sealed = tree
        .get(entry_key(seq))?
        .ok_or_else(|| AuditError::Corrupt(format!("seq {seq}: entry missing")))?;
    let canonical = keys
        .audit_seal
        .open(&seal_context(seq), &sealed)
        .map_err(|_| AuditError::Corrupt(format!("seq {seq}: entry altered (does not open)")))?;
    let mut entry = AuditEntry::decode(canonical.as_slice())
        .map_err(|_| AuditError::Corrupt(format!("seq {seq}: entry does not decode")))?;
    if entry.seq != seq {
        return Err(AuditError::Corrupt(format!(
            "seq {seq}: holds the entry of seq {}",
            entry.seq
        )));
    }
    entry.canonical = canonical;
    Ok(entry)
}

/// Encodes a signed checkpoint's stored value.
pub(crate) fn encode_checkpoint(signed: &SignedCheckpoint) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 32 + 64);
    v.extend_from_slice(&signed.checkpoint.timestamp.to_be_bytes());
    v.extend_from_slice(&signed.checkpoint.root_hash);
    v.extend_from_slice(&signed.signature);
    v
}

pub(crate) fn decode_checkpoint(
    log_id: &str,
    keys: &Keys,
    key: &[u8],
    value: &[u8],
) -> Result<SignedCheckpoint, AuditError> {
    let bad = || AuditError::Corrupt("malformed stored checkpoint".into());
    let tree_size = read_u64(key.get(1..9).ok_or_else(bad)?).ok_or_else(bad)?;
    if value.len() != 8 + 32 + 64 {
        return Err(bad());
    }
    let timestamp = read_u64(&value[..8]).ok_or_else(bad)?;
    let root_hash: Hash = value[8..40].try_into().map_err(|_| bad())?;
    let signature: [u8; 64] = value[40..104].try_into().map_err(|_| bad())?;
    Ok(SignedCheckpoint {
        checkpoint: Checkpoint {
            log_id: log_id.to_owned(),
            tree_size,
            root_hash,
            timestamp,
        },
        signature,
        public_key: super::checkpoint::public_key_of(&keys.checkpoint),
    })
}

pub(crate) fn stored_checkpoints(
    tree: &sled::Tree,
    log_id: &str,
    keys: &Keys,
) -> Result<Vec<SignedCheckpoint>, AuditError> {
    tree.scan_prefix([CHECKPOINT])
        .map(|kv| {
            let (k, v) = kv?;
            decode_checkpoint(log_id, keys, &k, &v)
        })
        .collect()
}
