//! Offline verification of the audit log of a stopped gateway: recompute every leaf
//! and the tree from the entries themselves, check each against what is stored,
//! check every stored checkpoint's signature and root, and optionally a checkpoint
//! the auditor kept from earlier (which catches a database rolled back to an old
//! copy, checkpoints and all).

use std::path::Path;

use super::checkpoint::{self, SignedCheckpoint};
use super::log::{self, read_entry, SledNodes};
use super::merkle::{self, Hash, MemoryTree, NodeSource};
use super::AuditError;
use crate::store::Keys;

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Entries verified.
    pub entries: u64,
    /// The root of the whole log.
    pub root: Hash,
    /// Stored checkpoints verified.
    pub checkpoints: usize,
    /// The newest stored checkpoint's size.
    pub latest_checkpoint_size: Option<u64>,
    /// The log's origin name.
    pub log_id: String,
}

/// The first problem found. `seq` is the first entry that is bad, where one can be
/// named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", seq.map(|s| format!("seq {s}: ")).unwrap_or_default())]
pub struct Failure {
    /// The first bad seq, when the problem is with an entry.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: String,
    /// True when the log could not be examined at all (locked by a running
    /// gateway, keys missing), as opposed to examined and found bad.
    pub cannot_check: bool,
}

fn fail(seq: Option<u64>, problem: impl Into<String>) -> Failure {
    Failure {
        seq,
        problem: problem.into(),
        cannot_check: false,
    }
}

fn cannot_check(problem: impl Into<String>) -> Failure {
    Failure {
        seq: None,
        problem: problem.into(),
        cannot_check: true,
    }
}

/// Verifies the log under `data_dir` (its origin name is read from the log), whose checkpoints are signed by the
/// `signing_key` file when the gateway is configured with one. `kept` is a signed note the auditor saved from
/// an earlier GetCheckpoint, checked against this log's own verifier key.
pub fn verify_data_dir(
    data_dir: &Path,
    signing_key: Option<&Path>,
    kept: Option<&str>,
) -> Result<Summary, Failure> {
    let keys =
        Keys::load_existing(data_dir, signing_key).map_err(|e| cannot_check(e.to_string()))?;
    let db = sled::Config::new()
        .path(data_dir.join("audit"))
        .open()
        .map_err(|e| {
            cannot_check(format!(
                "cannot open the audit database (is the gateway stopped?): {e}"
            ))
        })?;
    let tree = db
        .open_tree(log::TREE)
        .map_err(|e| fail(None, e.to_string()))?;
    let log_id = log::stored_origin(&tree)
        .map_err(|e| fail(None, e.to_string()))?
        .ok_or_else(|| fail(None, "no audit log here (no origin recorded)"))?;
    let log_id = log_id.as_str();
    let stored_size = match tree.get(log::SIZE).map_err(|e| fail(None, e.to_string()))? {
        Some(v) => log::read_u64(&v).ok_or_else(|| fail(None, "malformed tree size"))?,
        None => 0,
    };

    // 1. Every entry, in order: present, opens, is the entry of its seq, and its
    //    leaf hash is the stored one.
    let mut memory = MemoryTree::new();
    let stored = SledNodes(&tree);
    let mut last_time = i64::MIN;
    for seq in 0..stored_size {
        let entry = read_entry(&tree, &keys, seq).map_err(|e| match e {
            AuditError::Corrupt(m) => fail(
                Some(seq),
                m.trim_start_matches(&format!("seq {seq}: ")).to_owned(),
            ),
            other => fail(Some(seq), other.to_string()),
        })?;
        let leaf = merkle::leaf_hash(&entry.canonical);
        let stored_leaf = stored
            .node(0, seq)
            .map_err(|_| fail(Some(seq), "its stored leaf hash is missing"))?;
        if !merkle::hashes_equal(&leaf, &stored_leaf) {
            return Err(fail(Some(seq), "entry does not match its stored leaf hash"));
        }
        let t = entry
            .time
            .as_ref()
            .map(super::entry::micros_from_timestamp)
            .unwrap_or(i64::MIN);
        if t < last_time {
            return Err(fail(
                Some(seq),
                "entry is older than the one before it (reordered)",
            ));
        }
        last_time = t;
        memory.append(leaf);
    }
    // Entries beyond the recorded size mean the size was rolled back by hand.
    if tree
        .get(log::entry_key(stored_size))
        .map_err(|e| fail(None, e.to_string()))?
        .is_some()
    {
        return Err(fail(
            Some(stored_size),
            "an entry exists beyond the recorded tree size",
        ));
    }
    let root = memory.root();

    // 2. Every stored checkpoint: signed by this log's key, within the log, and the
    //    root of the recomputed tree at its size.
    let public_key = checkpoint::public_key_of(&keys.checkpoint);
    let checkpoints =
        log::stored_checkpoints(&tree, log_id, &keys).map_err(|e| fail(None, e.to_string()))?;
    for cp in &checkpoints {
        check_checkpoint(cp, &public_key, &memory, "stored checkpoint")?;
    }

    // 3. The auditor's own checkpoint.
    if let Some(note) = kept {
        let verifier = checkpoint::VerifierKey::new(log_id, public_key)
            .map_err(|e| fail(None, format!("log id: {e}")))?
            .to_string();
        let cp = checkpoint::parse_signed_note(note, &verifier).map_err(|e| {
            fail(
                None,
                format!("the kept checkpoint does not verify with this log's key: {e}"),
            )
        })?;
        let signed = SignedCheckpoint {
            checkpoint: cp,
            signature: [0; 64],
            public_key,
        };
        check_root(&signed, &memory, "the kept checkpoint")?;
    }
    drop(tree);
    drop(db);
    Ok(Summary {
        entries: stored_size,
        root,
        checkpoints: checkpoints.len(),
        latest_checkpoint_size: checkpoints.last().map(|c| c.checkpoint.tree_size),
        log_id: log_id.to_owned(),
    })
}

fn check_checkpoint(
    cp: &SignedCheckpoint,
    public_key: &[u8; 32],
    memory: &MemoryTree,
    what: &str,
) -> Result<(), Failure> {
    checkpoint::verify(public_key, cp).map_err(|e| {
        fail(
            None,
            format!(
                "{what} at size {}: signature does not verify: {e}",
                cp.checkpoint.tree_size
            ),
        )
    })?;
    check_root(cp, memory, what)
}

fn check_root(cp: &SignedCheckpoint, memory: &MemoryTree, what: &str) -> Result<(), Failure> {
    let size = cp.checkpoint.tree_size;
    if size > memory.size() {
        return Err(fail(
            Some(memory.size()),
            format!(
                "the log has {} entries but {what} covers {size}: entries were removed (truncated or rolled back)",
                memory.size()
            ),
        ));
    }
    let root = merkle::root(size, memory).map_err(|_| fail(None, "cannot recompute the root"))?;
    if !merkle::hashes_equal(&root, &cp.checkpoint.root_hash) {
        return Err(fail(
            None,
            format!("{what} at size {size} does not match the log: an entry before seq {size} was changed"),
        ));
    }
    Ok(())
}
