//! Offline verification of the audit log of a stopped gateway: recompute every leaf
//! and the tree from the entries themselves, check that the entry chunks cover the
//! seqs with no gap or overlap, check every stored Merkle tile against the
//! recomputed tree,
//! check every stored checkpoint's signature and root, and optionally a checkpoint
//! the auditor kept from earlier (which catches a database rolled back to an old
//! copy, checkpoints and all).

use std::path::Path;

use super::checkpoint::{self, SignedCheckpoint};
use super::log::{self, open_entry};
use super::merkle::{self, Hash, MemoryTree};
use super::tiles;
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

/// The log was examined and found bad (at `seq`, where there is one).
pub(crate) fn fail(seq: Option<u64>, problem: impl Into<String>) -> Failure {
    Failure {
        seq,
        problem: problem.into(),
        cannot_check: false,
    }
}

/// The log could not be examined.
pub(crate) fn cannot_check(problem: impl Into<String>) -> Failure {
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
    // Commits that only the write-ahead file holds (after a crash) are replayed
    // first, as the gateway would at start.
    let opened = super::writer::open_database(&data_dir.join("audit"), 64 << 20).map_err(|e| {
        cannot_check(format!(
            "cannot open the audit database (is the gateway stopped?): {e}"
        ))
    })?;
    let (tree, tile_files, entry_file) = (&opened.tree, &opened.tiles, &opened.entries);
    let log_id = log::stored_origin(tree)
        .map_err(|e| fail(None, e.to_string()))?
        .ok_or_else(|| fail(None, "no audit log here (no origin recorded)"))?;
    let log_id = log_id.as_str();
    let stored_size =
        log::stored_size(&opened.sizes, tree).map_err(|e| fail(None, e.to_string()))?;

    // 1. Every entry, in order: in the chunk that should hold it, opens, is the
    //    entry of its seq, and its time is not before the previous one's.
    let mut memory = MemoryTree::new();
    let mut last_time = i64::MIN;
    let corrupt = |seq: u64, e: AuditError| match e {
        AuditError::Corrupt(m) => fail(
            Some(seq),
            m.trim_start_matches(&format!("seq {seq}: ")).to_owned(),
        ),
        other => fail(Some(seq), other.to_string()),
    };
    for kv in tree.scan_prefix([log::ENTRY]) {
        let (key, value) = kv.map_err(|e| fail(None, e.to_string()))?;
        let next = memory.size();
        let first = key
            .get(1..)
            .and_then(log::read_u64)
            .ok_or_else(|| fail(Some(next), "malformed entry key"))?;
        let chunk = log::chunk_bytes(value, entry_file).map_err(|e| corrupt(first, e))?;
        if first > next {
            return Err(fail(Some(next), "entry missing"));
        }
        if first < next {
            return Err(fail(Some(first), "stored twice (chunks overlap)"));
        }
        let sealed =
            log::chunk_entries(&chunk).map_err(|_| fail(Some(first), "its chunk is malformed"))?;
        for (seq, sealed) in (first..).zip(sealed) {
            if seq >= stored_size {
                return Err(fail(
                    Some(seq),
                    "an entry exists beyond the recorded tree size",
                ));
            }
            let entry = open_entry(&keys, seq, sealed).map_err(|e| corrupt(seq, e))?;
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
            memory.append(merkle::leaf_hash(&entry.canonical));
        }
    }
    if memory.size() < stored_size {
        return Err(fail(Some(memory.size()), "entry missing"));
    }

    // 2. Every stored Merkle tile is one the log should have, and holds the nodes
    //    recomputed from the entries (proofs are served from them).
    for id in tiles::full_tiles(stored_size) {
        let bytes =
            tiles::read_full_tile(&**tile_files, id).map_err(|e| fail(None, e.to_string()))?;
        if let Some((level, index)) = tiles::first_difference(id, &bytes, &memory) {
            let seq = index << level;
            return Err(fail(
                Some(seq),
                format!("stored Merkle node {level}/{index} does not match the entries"),
            ));
        }
    }
    // Nothing beyond them: each tier's file holds exactly the log's full tiles.
    let mut expected = std::collections::BTreeMap::<u8, u64>::new();
    for id in tiles::full_tiles(stored_size) {
        *expected.entry(id.tier).or_default() += 1;
    }
    for tier in 0..=u8::try_from(expected.len()).unwrap_or(u8::MAX) {
        let want = expected.get(&tier).copied().unwrap_or(0) * tiles::TILE_BYTES as u64;
        let stored = tile_files
            .stored_bytes(tier)
            .map_err(|e| fail(None, e.to_string()))?;
        if stored != want {
            return Err(fail(
                None,
                format!(
                    "{} holds {stored} bytes of Merkle tiles, which does not fit the log's size \
                     ({want} expected)",
                    tiles::tile_file_name(tier)
                ),
            ));
        }
    }
    let root = memory.root();

    // 3. Every stored checkpoint: signed by this log's key, within the log, and the
    //    root of the recomputed tree at its size.
    let public_key = checkpoint::public_key_of(&keys.checkpoint);
    let checkpoints =
        log::stored_checkpoints(tree, log_id, &keys).map_err(|e| fail(None, e.to_string()))?;
    for cp in &checkpoints {
        check_checkpoint(cp, &public_key, &memory, "stored checkpoint")?;
    }

    // 4. The auditor's own checkpoint.
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
    drop(opened);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::entry_file::{self, ChunkPointer, EntryFile};
    use crate::audit::writer::AuditSettings;
    use crate::audit::{Actor, Auditor, NewEntry};
    use crate::domain::SystemClock;
    use crate::proto::v1::{AuditAction, AuditOutcome};

    /// A stopped gateway's data dir holding `n` entries written by concurrent
    /// callers (so group commits of several entries, in shared chunks) and a
    /// checkpoint.
    async fn written_log(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        let settings = AuditSettings {
            dir: dir.path().join("audit"),
            log_id: "test.example/sgw/audit".into(),
            max_batch: 64,
            cache_bytes: 8 << 20,
            wal_bytes: crate::audit::writer::DEFAULT_WAL_BYTES,
        };
        let auditor = Auditor::open(settings, keys, Arc::new(SystemClock)).unwrap();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let a = auditor.clone();
                tokio::spawn(async move {
                    let e = NewEntry::new(
                        Actor::system(),
                        AuditAction::TlsReloaded,
                        AuditOutcome::Allowed,
                        &format!("r{i}"),
                    );
                    a.append(e).await.unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        auditor.checkpoint().await.unwrap();
        auditor.close().await;
        drop(auditor);
        // sled lets go of its file lock a little after the last handle.
        for _ in 0..100 {
            match verify_data_dir(dir.path(), None, None) {
                Err(f) if f.cannot_check => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                _ => break,
            }
        }
        dir
    }

    /// The first chunk holding at least three entries: its key and entries.
    fn shared_chunk(tree: &sled::Tree, audit: &Path) -> (sled::IVec, Vec<Vec<u8>>) {
        let file = EntryFile::open(audit).unwrap();
        tree.scan_prefix([log::ENTRY])
            .map(|kv| kv.unwrap())
            .map(|(k, v)| {
                let v = log::chunk_bytes(v, &file).unwrap();
                let entries = log::chunk_entries(&v).unwrap();
                (
                    k,
                    entries.into_iter().map(<[u8]>::to_vec).collect::<Vec<_>>(),
                )
            })
            .find(|(_, e)| e.len() >= 3)
            .expect("concurrent appends share a chunk")
    }

    fn chunk(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut c = Vec::new();
        for e in entries {
            log::push_to_chunk(&mut c, e);
        }
        c
    }

    /// Copies the log, changes its tree with `f`, verifies the copy.
    fn tampered(
        dir: &Path,
        f: impl FnOnce(&sled::Tree, &Path) -> u64,
    ) -> (u64, Result<Summary, Failure>) {
        let copied = tempfile::tempdir().unwrap();
        let copy = copied.path().to_path_buf();
        copy_tree(dir, &copy);
        let seq = {
            let db = sled::open(copy.join("audit")).unwrap();
            let tree = db.open_tree(log::TREE).unwrap();
            let seq = f(&tree, &copy.join("audit"));
            db.flush().unwrap();
            seq
        };
        // sled lets go of its file lock a little after the last handle.
        let mut got = verify_data_dir(&copy, None, None);
        for _ in 0..100 {
            match &got {
                Err(f) if f.cannot_check => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    got = verify_data_dir(&copy, None, None);
                }
                _ => break,
            }
        }
        (seq, got)
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    fn first_seq(key: &[u8]) -> u64 {
        log::read_u64(&key[1..]).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tampering_inside_a_shared_chunk_names_the_entry() {
        let dir = written_log(300).await;
        let summary = verify_data_dir(dir.path(), None, None).unwrap();
        assert_eq!(summary.entries, 300);
        assert_eq!(summary.checkpoints, 1);

        // Chunks are in the entry file, with sled holding where: a byte of it
        // changed, and the file cut short.
        let (seq, got) = tampered(dir.path(), |t, audit| {
            use std::os::unix::fs::FileExt;
            let (key, value) = t.scan_prefix([log::ENTRY]).next().unwrap().unwrap();
            let at = ChunkPointer::decode(&value).expect("a pointer").unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(audit.join(entry_file::FILE_NAME))
                .unwrap();
            let mut byte = [0u8];
            // Past the first entry's length: inside its sealed bytes.
            file.read_exact_at(&mut byte, at.offset + 10).unwrap();
            file.write_all_at(&[byte[0] ^ 1], at.offset + 10).unwrap();
            first_seq(&key)
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains("does not open"), "{err}");
        let (seq, got) = tampered(dir.path(), |t, audit| {
            let (key, value) = t.scan_prefix([log::ENTRY]).next_back().unwrap().unwrap();
            let at = ChunkPointer::decode(&value).expect("a pointer").unwrap();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(audit.join(entry_file::FILE_NAME))
                .unwrap();
            file.set_len(at.offset + 1).unwrap();
            first_seq(&key)
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains("entry file ends before"), "{err}");

        // One byte of the middle entry of a chunk (written inline, as logs written
        // before the entry file keep them).
        let (seq, got) = tampered(dir.path(), |t, audit| {
            let (key, mut entries) = shared_chunk(t, audit);
            let last = entries[1].len() - 20;
            entries[1][last] ^= 1;
            t.insert(&key, chunk(&entries)).unwrap();
            first_seq(&key) + 1
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains("does not open"), "{err}");

        // An entry cut out of a chunk: the next one is now at the wrong seq.
        let (seq, got) = tampered(dir.path(), |t, audit| {
            let (key, mut entries) = shared_chunk(t, audit);
            entries.remove(1);
            t.insert(&key, chunk(&entries)).unwrap();
            first_seq(&key) + 1
        });
        assert_eq!(got.unwrap_err().seq, Some(seq));

        // Two entries of a chunk swapped.
        let (seq, got) = tampered(dir.path(), |t, audit| {
            let (key, mut entries) = shared_chunk(t, audit);
            entries.swap(0, 2);
            t.insert(&key, chunk(&entries)).unwrap();
            first_seq(&key)
        });
        assert_eq!(got.unwrap_err().seq, Some(seq));

        // A whole chunk dropped.
        let (seq, got) = tampered(dir.path(), |t, audit| {
            let (key, _) = shared_chunk(t, audit);
            t.remove(&key).unwrap();
            first_seq(&key)
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains("missing"), "{err}");

        // A stored Merkle node changed: proofs would be served from it. Here in a
        // tile kept in sled, as logs written before the tile files did: opening the
        // log moves it into the files.
        let (seq, got) = tampered(dir.path(), |t, audit| {
            let id = tiles::TileId { tier: 0, index: 0 };
            let mut tile = std::fs::read(audit.join(tiles::tile_file_name(0))).unwrap();
            tile.truncate(tiles::TILE_BYTES);
            tile[3 * 32] ^= 1;
            t.insert(tiles::tile_key(id), tile).unwrap();
            3
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains("Merkle node 0/3"), "{err}");

        // The same in the tile file itself.
        let (seq, got) = tampered(dir.path(), |_, audit| {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(audit.join(tiles::tile_file_name(0)))
                .unwrap();
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, 5 * 32).unwrap();
            file.write_all_at(&[byte[0] ^ 1], 5 * 32).unwrap();
            5
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains("Merkle node 0/5"), "{err}");

        // A tile more than the log's size has.
        let (_, got) = tampered(dir.path(), |_, audit| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(audit.join(tiles::tile_file_name(0)))
                .unwrap()
                .write_all(&[7u8; tiles::TILE_BYTES])
                .unwrap();
            0
        });
        let err = got.unwrap_err();
        assert!(err.problem.contains("does not fit the log's size"), "{err}");

        // An entry appended beyond the recorded size.
        let (seq, got) = tampered(dir.path(), |t, audit| {
            let (_, entries) = shared_chunk(t, audit);
            t.insert(log::entry_key(300), chunk(&entries[..1])).unwrap();
            300
        });
        assert_eq!(got.unwrap_err().seq, Some(seq));
    }
}
