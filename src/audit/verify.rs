//! Offline verification of the audit log of a stopped gateway: recompute every leaf
//! and the tree from the entries themselves, check that the entry chunks cover the
//! seqs with no gap or overlap, check every stored Merkle tile against the
//! recomputed tree,
//! check every stored checkpoint's signature and root, and optionally a checkpoint
//! the auditor kept from earlier (which catches a database rolled back to an old
//! copy, checkpoints and all). Last, rebuild every index posting list from the
//! entries and compare it with the stored one as readers see it: the lists are
//! neither sealed nor MACed, and a query by a child, actor, target or action
//! follows them to its entries.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::path::Path;

use super::checkpoint::{self, SignedCheckpoint};
use super::log::{self, open_entry};
use super::merkle::{self, Hash, MemoryTree};
use super::tiles;
use super::AuditError;
use crate::proto::v1::{AuditAction, AuditEntry};
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
        // Said without the writer's "cannot be written": nothing is written here,
        // and a running gateway's lock is the usual cause.
        let why = match e {
            AuditError::Unavailable(why) => why,
            other => other.to_string(),
        };
        cannot_check(format!(
            "cannot open the audit database (is the gateway stopped?): {why}"
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
    // Where the writer lists each entry (checked in 5).
    let mut listed = Listed::default();
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
            listed.push(&entry);
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
    drop(memory);

    // 5. Every index posting list holds exactly the seqs of the entries that
    //    carry its value. Opening the database replayed the write-ahead file and
    //    put that round's lists into sled (the writer's round end), so sled now
    //    holds every list a reader would see.
    if let Some((seq, slots)) = check_indexes(tree, listed, stored_size)? {
        return Err(missing_from_index(tree, entry_file, &keys, seq, slots));
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

/// Where the entries say the writer lists each of them, small enough to keep for
/// millions of entries: per seq, a keyed 64-bit hash of each index prefix of
/// [`log::index_prefixes`] (the key is drawn at random for each run, so no one
/// can make two prefixes collide on purpose), and which of them a stored list
/// has given.
#[derive(Default)]
struct Listed {
    hasher: RandomState,
    /// Per seq, one hash per index slot; 0 where the entry has no such index.
    prefixes: Vec<[u64; log::INDEXES]>,
    /// Per seq, bit `i` set once slot `i` has been given by its index (set from
    /// the start where the slot is empty).
    given: Vec<u8>,
}

/// Every slot given.
const ALL_GIVEN: u8 = (1 << log::INDEXES) - 1;

impl Listed {
    /// Adds the next seq's entry.
    fn push(&mut self, entry: &AuditEntry) {
        let mut slots = [0; log::INDEXES];
        let mut given = 0;
        for (i, prefix) in log::index_prefixes(entry).into_iter().enumerate() {
            match prefix {
                Some(prefix) => slots[i] = self.hash(&prefix),
                None => given |= 1 << i,
            }
        }
        self.prefixes.push(slots);
        self.given.push(given);
    }

    /// Never 0, which marks an empty slot.
    fn hash(&self, prefix: &[u8]) -> u64 {
        self.hasher.hash_one(prefix) | 1
    }

    /// The slot of `seq`'s entry that is listed under the prefix hashed `hash`.
    fn slot(&self, seq: u64, hash: u64) -> Option<usize> {
        let slots = self.prefixes.get(usize::try_from(seq).ok()?)?;
        slots.iter().position(|&h| h == hash)
    }
}

/// Step 5: the stored index posting lists, as readers see them, against where
/// the entries say each is listed. A reader of one index takes its lists stored
/// below the log's size in key order, and gives each seq below the size once,
/// passing over any at or below the last it gave; a query that starts part-way
/// (a later page, a time range) begins at the list stored at or before its
/// first seq ([`log::AuditLog::index_seqs`]). Every list is read once, in key
/// order, one index at a time.
///
/// Fails naming the earliest seq that a list holds without cause or that a
/// reader would pass over. Otherwise returns the earliest seq that some index
/// does not give, if any, and the slots of [`log::index_prefixes`] that do not
/// give it, for the caller to name.
fn check_indexes(
    tree: &sled::Tree,
    mut listed: Listed,
    size: u64,
) -> Result<Option<(u64, u8)>, Failure> {
    let mut earliest = Earliest::default();
    // The index being read: its prefix and its lists so far.
    let mut index: Option<(Vec<u8>, Vec<StoredList>)> = None;
    for tag in [
        log::BY_ACTOR,
        log::BY_ACTION,
        log::BY_SUBJECT,
        log::BY_TARGET,
    ] {
        for kv in tree.scan_prefix([tag]) {
            let (key, value) = kv.map_err(|e| fail(None, e.to_string()))?;
            let prefix = log::posting_prefix(&key).map_err(|e| fail(None, problem_of(e)))?;
            let at = stored_at(&key);
            if index.as_ref().is_none_or(|(p, _)| p[..] != *prefix) {
                if let Some((p, lists)) = index.take() {
                    check_index(&p, &lists, &mut listed, size, &mut earliest);
                }
                index = Some((prefix.to_vec(), Vec::new()));
            }
            match log::decode_postings(&value) {
                Ok(seqs) => {
                    if let Some((_, lists)) = index.as_mut() {
                        lists.push((at, seqs));
                    }
                }
                Err(e) => earliest.note(at, || {
                    format!(
                        "the {} list stored at seq {at}: {}",
                        index_name(prefix),
                        problem_of(e)
                    )
                }),
            }
        }
    }
    if let Some((p, lists)) = index.take() {
        check_index(&p, &lists, &mut listed, size, &mut earliest);
    }
    let missing = listed
        .given
        .iter()
        .enumerate()
        .find(|(_, &g)| g != ALL_GIVEN)
        .map(|(seq, &g)| (seq as u64, !g & ALL_GIVEN));
    match earliest.0 {
        Some((seq, problem)) if missing.is_none_or(|(m, _)| seq <= m) => {
            Err(fail(Some(seq), problem))
        }
        _ => Ok(missing),
    }
}

/// A stored posting list: the seq its key names, and its seqs.
type StoredList = (u64, Vec<u64>);

/// One index's stored `lists`, in key order: marks in `listed` the seqs a reader gets from them, and notes what is
/// wrong.
fn check_index(
    prefix: &[u8],
    lists: &[StoredList],
    listed: &mut Listed,
    size: u64,
    earliest: &mut Earliest,
) {
    let hash = listed.hash(prefix);
    let name = || index_name(prefix);
    let mut last_given: Option<u64> = None;
    for (at, seqs) in lists {
        match seqs.first() {
            Some(first) if first == at => {}
            Some(&first) => earliest.note(first.min(*at), || {
                format!(
                    "the {} list stored at seq {at} begins at seq {first}",
                    name()
                )
            }),
            None => earliest.note(*at, || {
                format!("the {} list stored at seq {at} is empty", name())
            }),
        }
        for &seq in seqs {
            let given = *at < size && seq < size && last_given.is_none_or(|last| seq > last);
            if given {
                last_given = Some(seq);
            }
            let Some(slot) = listed.slot(seq, hash) else {
                earliest.note(seq, || {
                    if seq >= size {
                        format!("listed in the {}, beyond the log's {size} entries", name())
                    } else {
                        format!(
                            "listed in the {}, but the entry does not carry that value",
                            name()
                        )
                    }
                });
                continue;
            };
            if !given {
                // Passed over: missing, unless the reader gave it already.
                continue;
            }
            if let Some(g) = usize::try_from(seq)
                .ok()
                .and_then(|s| listed.given.get_mut(s))
            {
                *g |= 1 << slot;
            }
            // A query starting at `seq` begins at the list stored at or before it.
            let begins = lists.partition_point(|(a, _)| *a <= seq).checked_sub(1);
            if let Some((begins_at, holds)) = begins.and_then(|i| lists.get(i)) {
                if holds.binary_search(&seq).is_err() {
                    earliest.note(seq, || {
                        format!(
                            "missing from the {} list stored at seq {begins_at}, where a query \
                             by it that starts between seqs {begins_at} and {seq} looks for it, \
                             and omits this entry",
                            name()
                        )
                    });
                }
            }
        }
    }
}

/// The failure for entry `seq`, which the indexes of `slots` (of
/// [`log::index_prefixes`]) do not give: named from the entry itself, read
/// again, since only a hash of each index was kept.
fn missing_from_index(
    tree: &sled::Tree,
    entries: &std::sync::Arc<super::entry_file::EntryFile>,
    keys: &Keys,
    seq: u64,
    slots: u8,
) -> Failure {
    let entry = match log::read_entry(tree, entries, keys, seq) {
        Ok(entry) => entry,
        Err(e) => return fail(Some(seq), problem_of(e)),
    };
    let name = log::index_prefixes(&entry)
        .into_iter()
        .enumerate()
        .find_map(|(i, prefix)| prefix.filter(|_| slots & (1 << i) != 0))
        .map_or_else(|| "indexes".to_owned(), |prefix| index_name(&prefix));
    fail(
        Some(seq),
        format!("missing from the {name}: a query by it omits this entry"),
    )
}

/// The earliest seq found wrong so far in the indexes, and what is wrong there.
#[derive(Default)]
struct Earliest(Option<(u64, String)>);

impl Earliest {
    fn note(&mut self, seq: u64, problem: impl FnOnce() -> String) {
        if self.0.as_ref().is_none_or(|(earlier, _)| seq < *earlier) {
            self.0 = Some((seq, problem()));
        }
    }
}

/// The seq a posting list is stored at: the last 8 bytes of its key.
fn stored_at(key: &[u8]) -> u64 {
    key.len()
        .checked_sub(8)
        .and_then(|n| log::read_u64(&key[n..]))
        .unwrap_or(0)
}

/// How a failure names the index of `prefix`.
fn index_name(prefix: &[u8]) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match prefix.split_first() {
        Some((&log::BY_SUBJECT, hex)) => format!("subject index of {}", text(hex)),
        Some((&log::BY_ACTOR, [_, id @ ..])) => format!("actor index of {:?}", text(id)),
        Some((&log::BY_TARGET, [_, id @ ..])) => format!("target agency index of {:?}", text(id)),
        Some((&log::BY_ACTION, code)) => match <[u8; 4]>::try_from(code) {
            Ok(code) => {
                let code = u32::from_be_bytes(code) as i32;
                match AuditAction::try_from(code) {
                    Ok(action) => format!("action index of {}", action.as_str_name()),
                    Err(_) => format!("action index of {code}"),
                }
            }
            Err(_) => format!("index {:?}", text(prefix)),
        },
        _ => format!("index {:?}", text(prefix)),
    }
}

/// An audit error's text without the "audit log damaged at" of its display.
fn problem_of(e: AuditError) -> String {
    match e {
        AuditError::Corrupt(m) => m,
        other => other.to_string(),
    }
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
    use crate::store::keys::SubjectRef;

    /// A stopped gateway's data dir holding `n` entries written by concurrent
    /// callers (so group commits of several entries, in shared chunks) and a
    /// checkpoint.
    async fn written_log(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        write_log(&dir, keys, n, |i| {
            NewEntry::new(
                Actor::system(),
                AuditAction::TlsReloaded,
                AuditOutcome::Allowed,
                &format!("r{i}"),
            )
        })
        .await;
        dir
    }

    /// Writes `n` entries made by `entry` (from 0 to `n - 1`) as concurrent
    /// callers would, and a checkpoint, then stops the log.
    async fn write_log(
        dir: &tempfile::TempDir,
        keys: Arc<Keys>,
        n: usize,
        entry: impl Fn(usize) -> NewEntry + Send + Sync + 'static,
    ) {
        let entry = Arc::new(entry);
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
                let (a, entry) = (auditor.clone(), entry.clone());
                tokio::spawn(async move { a.append(entry(i)).await.unwrap() })
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

    /// Five children (real NHS numbers, keyed with the log's own key), `n` entries
    /// by three agencies about them in turn, some with a target agency: the log,
    /// and the children's subject refs, in the order entry `i` names them (`i % 5`).
    async fn log_about_children(n: usize) -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        let children: Vec<String> = (0..)
            .filter_map(|n| {
                crate::domain::NhsNumber::parse(&format!("{}", 9_434_765_000u64 + n)).ok()
            })
            .take(5)
            .map(|nhs| keys.subject_ref(&nhs).as_str().to_owned())
            .collect();
        let named = children.clone();
        write_log(&dir, keys, n, move |i| entry_about(&named, i)).await;
        (dir, children)
    }

    /// Entry `i` of [`log_about_children`]: about child `i % 5`, by one of three
    /// agencies, one of two actions, every other one with a target agency.
    fn entry_about(children: &[String], i: usize) -> NewEntry {
        let mut e = NewEntry::new(
            Actor {
                id: ["police-met", "school-oakfield", "health-guys"][i % 3].into(),
                ..Actor::system()
            },
            [AuditAction::RecordDisclosed, AuditAction::ConcernRaised][i % 2],
            AuditOutcome::Allowed,
            &format!("r{i}"),
        );
        e.subject = Some(SubjectRef::from_hex(children[i % 5].clone()));
        e.target_agency_id = ["", "csc-southwark"][i % 2].into();
        e
    }

    /// Verifies `dir`, retrying while sled still holds the file lock of a log
    /// just closed.
    fn verify_when_free(dir: &Path) -> Result<Summary, Failure> {
        let mut got = verify_data_dir(dir, None, None);
        for _ in 0..100 {
            match &got {
                Err(f) if f.cannot_check => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    got = verify_data_dir(dir, None, None);
                }
                _ => break,
            }
        }
        got
    }

    /// The writer's own lists verify however it left them: merged over many
    /// write-ahead rounds, split into lists of at most `POSTINGS_PER_KEY`, and,
    /// in a copy taken while it runs (what a crash leaves), the current round's
    /// lists held only by the write-ahead file until the verifier replays it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn indexes_over_many_write_ahead_rounds_and_after_a_crash_verify() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        let children: Vec<String> = (0..5).map(|c| format!("{c:064x}")).collect();
        let settings = AuditSettings {
            dir: dir.path().join("audit"),
            log_id: "test.example/sgw/audit".into(),
            max_batch: 64,
            cache_bytes: 8 << 20,
            // About 1,700 entries of 300 bytes a round: three rounds and a part.
            wal_bytes: 512 * 1024,
        };
        let auditor = Auditor::open(settings, keys, Arc::new(SystemClock)).unwrap();
        let n = 6_000;
        for wave in 0..4 {
            let tasks: Vec<_> = (wave * n / 4..(wave + 1) * n / 4)
                .map(|i| {
                    let (a, mut e) = (auditor.clone(), entry_about(&children, i));
                    e.reason = "x".repeat(200);
                    // One action for all: its lists outgrow `POSTINGS_PER_KEY`.
                    e.action = AuditAction::RecordDisclosed;
                    tokio::spawn(async move { a.append(e).await.unwrap() })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }
        {
            let db = auditor.log().open.load_full().expect("open");
            let action = log::action_index_prefix(AuditAction::RecordDisclosed as i32);
            assert!(
                db.tree.scan_prefix(&action).count() >= 4,
                "several rounds, and lists split within a round"
            );
        }
        let crashed = tempfile::tempdir().unwrap();
        copy_tree(dir.path(), crashed.path());
        let summary = verify_when_free(crashed.path()).unwrap();
        assert_eq!(summary.entries, n as u64);

        auditor.close().await;
        drop(auditor);
        let summary = verify_when_free(dir.path()).unwrap();
        assert_eq!(summary.entries, n as u64);
    }

    /// The seqs of the subject index list stored at `key`.
    fn seqs_at(tree: &sled::Tree, key: &[u8]) -> Vec<u64> {
        log::decode_postings(&tree.get(key).unwrap().expect("a list")).unwrap()
    }

    /// The keys of a child's subject index lists, in order.
    fn subject_lists(tree: &sled::Tree, child: &str) -> Vec<Vec<u8>> {
        tree.scan_prefix(log::subject_index_prefix(child))
            .map(|kv| kv.unwrap().0.to_vec())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_edited_subject_index_fails_verification_naming_the_index_and_seq() {
        let (dir, children) = log_about_children(300).await;
        // Untouched, it verifies, indexes and all.
        let summary = verify_data_dir(dir.path(), None, None).unwrap();
        assert_eq!(summary.entries, 300);
        let index_of = |child: &str| format!("subject index of {child}");

        // One seq taken out of a child's list: SubjectAccessReport would omit it.
        let (seq, got) = tampered(dir.path(), |t, _| {
            let key = subject_lists(t, &children[1]).remove(0);
            let mut seqs = seqs_at(t, &key);
            let dropped = seqs.remove(seqs.len() / 2);
            t.insert(&key, log::encode_postings(&seqs).unwrap())
                .unwrap();
            dropped
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(!err.cannot_check, "{err}");
        assert!(err.problem.contains(&index_of(&children[1])), "{err}");
        assert!(err.problem.contains("missing from"), "{err}");

        // A whole list deleted.
        let (seq, got) = tampered(dir.path(), |t, _| {
            let key = subject_lists(t, &children[2]).remove(0);
            let first = seqs_at(t, &key)[0];
            t.remove(&key).unwrap();
            first
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains(&index_of(&children[2])), "{err}");

        // A seq of another child's entry added to a child's list.
        let (seq, got) = tampered(dir.path(), |t, _| {
            let key = subject_lists(t, &children[0]).remove(0);
            let mut seqs = seqs_at(t, &key);
            // Seqs follow the order of the concurrent appends: take one from
            // the other child's list.
            let other = seqs_at(t, &subject_lists(t, &children[1])[0])[5];
            seqs.push(other);
            seqs.sort_unstable();
            t.insert(&key, log::encode_postings(&seqs).unwrap())
                .unwrap();
            other
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains(&index_of(&children[0])), "{err}");
        assert!(err.problem.contains("does not carry that value"), "{err}");

        // A list for a child no entry names.
        let stranger = "ab".repeat(32);
        let (seq, got) = tampered(dir.path(), |t, _| {
            let key = log::posting_key(log::subject_index_prefix(&stranger), 7);
            t.insert(key, log::encode_postings(&[7]).unwrap()).unwrap();
            7
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains(&index_of(&stranger)), "{err}");
        assert!(err.problem.contains("does not carry that value"), "{err}");

        // A copy of the list's own seq stored as a list of its own, part-way: a
        // full read still gives every seq once, but a query starting after it (a
        // later page, a time range) begins at the copy and skips the rest of the
        // list it was taken from.
        let (seq, got) = tampered(dir.path(), |t, _| {
            let key = subject_lists(t, &children[3]).remove(0);
            let seqs = seqs_at(t, &key);
            let copy = seqs[10];
            t.insert(
                log::posting_key(log::subject_index_prefix(&children[3]), copy),
                log::encode_postings(&[copy]).unwrap(),
            )
            .unwrap();
            seqs[11]
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains(&index_of(&children[3])), "{err}");

        // A list of the earlier layout (8 bytes a seq) whose seqs do not ascend:
        // a reader would drop the seq that goes back.
        let (seq, got) = tampered(dir.path(), |t, _| {
            let key = subject_lists(t, &children[4]).remove(0);
            let mut seqs = seqs_at(t, &key);
            seqs.swap(1, 2);
            let legacy: Vec<u8> = seqs.iter().flat_map(|s| s.to_be_bytes()).collect();
            t.insert(&key, legacy).unwrap();
            seqs[0]
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(err.problem.contains("does not ascend"), "{err}");

        // The other indexes too: an entry dropped from its actor's list.
        let (seq, got) = tampered(dir.path(), |t, _| {
            let prefix = log::text_index_prefix(log::BY_ACTOR, "school-oakfield");
            let (key, value) = t.scan_prefix(&prefix).next().unwrap().unwrap();
            let mut seqs = log::decode_postings(&value).unwrap();
            let dropped = seqs.pop().unwrap();
            t.insert(key, log::encode_postings(&seqs).unwrap()).unwrap();
            dropped
        });
        let err = got.unwrap_err();
        assert_eq!(err.seq, Some(seq), "{err}");
        assert!(
            err.problem.contains("actor index of \"school-oakfield\""),
            "{err}"
        );
    }
}
