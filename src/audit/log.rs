//! The audit log's sled layout, and every read of it.
//!
//! One sled tree (`audit`) in its own database under `<data_dir>/audit`. A group
//! commit is made atomic and durable by its write-ahead record ([`super::wal`]), not
//! by sled; readers read below the size the writer publishes once it is applied.
//! Keys (all integers big-endian, so byte order is numeric order):
//!
//! | key | value |
//! | --- | --- |
//! | `e` first-seq | where a chunk is in the entry file ([`super::entry_file`]). The chunk holds the entries of seqs `first-seq, first-seq + 1, ...`, each as its length (u32) ‖ its canonical bytes sealed (AES-256-GCM) with its own seq as associated data; see [`CHUNK_BYTES`]. Logs written before the entry file hold the chunk itself here, and those read as before |
//! | `n` tier tile | (logs written before the tile files only: moved to `tiles-<tier>` files beside the database when opened, see [`super::tiles::TileFiles`]) |
//! | `m` | the tree size (u64), in its own tree [`SIZE_TREE`]; logs written before that tree keep it here |
//! | `o` | the log's origin name (`log_id`), fixed at creation |
//! | `c` size | a signed checkpoint: timestamp (u64) ‖ root (32) ‖ signature (64) |
//! | `s` subject-ref (64 hex) first-seq | index by child: a posting list |
//! | `a` len id first-seq | index by actor |
//! | `t` len id first-seq | index by target agency |
//! | `k` action (u32) first-seq | index by action |
//!
//! A group commit writes its entries as one chunk (or a few, see [`CHUNK_BYTES`])
//! instead of one key each: sled copies and logs a leaf on every insert. The chunk
//! holding a seq is the last one whose key is at or before the seq's; chunks
//! cover the seqs below the size with no gap and no overlap. Each entry is still
//! sealed on its own, with its seq as associated data, so an entry moved, swapped
//! or copied to another seq does not open.
//!
//! Index values are posting lists: ascending seqs (u64 each) for that index value,
//! keyed by the first of them. Each write-ahead round's lists reach sled merged
//! when the round ends, and are read from memory until then ([`super::postings`]);
//! logs written before that have one list per commit. The lists are neither
//! sealed nor MACed: `sgw audit verify` rebuilds them from the entries (with
//! [`index_prefixes`], as the writer does) and compares ([`super::verify`]).
//!
//! Entry times never decrease with seq (the writer makes it so), which lets a time
//! range be found by binary search over seq instead of another index.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prost::Message;
use tokio::sync::watch;

use super::checkpoint::{Checkpoint, SignedCheckpoint};
use super::entry::micros_from_timestamp;
use super::entry_file::{ChunkPointer, EntryFile};
use super::merkle::{self, Hash, NodeSource};
use super::postings::RoundPostings;
use super::tiles::{Edge, ProofNodes, TileCache, TileFiles};
use super::writer::LogHealth;
use super::AuditError;
use crate::proto::v1::AuditEntry;
use crate::store::Keys;

pub(crate) const ENTRY: u8 = b'e';
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

/// The sled tree that holds the tree size alone. Every commit writes the size, and
/// sled 0.34 logs a copy of a key's whole leaf every tenth change to it: in
/// [`TREE`] the size's leaf also held index lists of several KiB each, 13 KB of
/// sled's log per commit.
pub const SIZE_TREE: &str = "audit-size";

/// The most sealed bytes the writer puts in one chunk (one entry bigger than this
/// gets a chunk of its own). sled 0.34 splits a leaf beyond 16 keys and writes a
/// message over a quarter of a 512 KiB segment to a separate blob file, which it
/// never fsyncs, outside the durability point's `fdatasync`; 17 chunks of 6 KiB
/// keep every leaf well under that.
pub(crate) const CHUNK_BYTES: usize = 6 * 1024;

/// Whether a key is an entry chunk's.
pub(crate) fn is_entry_key(key: &[u8]) -> bool {
    key.len() == 9 && key[0] == ENTRY
}

/// The bytes of the chunk an `e` key's value stands for: read from the entry file,
/// or the value itself in a log written before that file.
pub(crate) fn chunk_bytes(
    value: sled::IVec,
    entries: &EntryFile,
) -> Result<sled::IVec, AuditError> {
    match ChunkPointer::decode(&value) {
        Some(at) => Ok(entries.read(at?)?.into()),
        None => Ok(value),
    }
}

/// Where the next chunk goes in the entry file: the end of the last chunk stored
/// there (chunks are placed in seq order), 0 when there is none.
pub(crate) fn stored_entries_end(tree: &sled::Tree) -> Result<u64, AuditError> {
    match tree.scan_prefix([ENTRY]).next_back().transpose()? {
        Some((_, value)) => match ChunkPointer::decode(&value) {
            Some(at) => Ok(at?.end()),
            None => Ok(0),
        },
        None => Ok(0),
    }
}

/// The key of the chunk whose first entry is `seq`.
pub(crate) fn entry_key(seq: u64) -> [u8; 9] {
    let mut k = [ENTRY; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Appends one sealed entry to a chunk's value.
pub(crate) fn push_to_chunk(chunk: &mut Vec<u8>, sealed: &[u8]) {
    chunk.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
    chunk.extend_from_slice(sealed);
}

/// The sealed entries of a chunk, in seq order.
pub(crate) fn chunk_entries(chunk: &[u8]) -> Result<Vec<&[u8]>, AuditError> {
    let mut entries = Vec::new();
    let mut rest = chunk;
    while !rest.is_empty() {
        let malformed = || AuditError::Corrupt("malformed entry chunk".into());
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return Err(malformed());
        }
        let (sealed, tail) = tail.split_at(len);
        entries.push(sealed);
        rest = tail;
    }
    Ok(entries)
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

/// How many indexes an entry can be listed in: [`index_prefixes`] gives one
/// slot for each.
pub(crate) const INDEXES: usize = 4;

/// The index prefixes whose posting lists hold `entry`, one slot per index:
/// its child's (when it names one), its actor's, its target agency's (when it
/// has one) and its action's. The writer builds the lists from this and `sgw
/// audit verify` rebuilds them from it, so the two cannot disagree about where an
/// entry belongs.
pub(crate) fn index_prefixes(entry: &AuditEntry) -> [Option<Vec<u8>>; INDEXES] {
    [
        (!entry.subject_ref.is_empty()).then(|| subject_index_prefix(&entry.subject_ref)),
        Some(text_index_prefix(BY_ACTOR, &entry.actor_id)),
        (!entry.target_agency_id.is_empty())
            .then(|| text_index_prefix(BY_TARGET, &entry.target_agency_id)),
        Some(action_index_prefix(entry.action)),
    ]
}

/// The key of a posting list: the index prefix and the list's first seq.
pub(crate) fn posting_key(mut prefix: Vec<u8>, first_seq: u64) -> Vec<u8> {
    prefix.extend_from_slice(&first_seq.to_be_bytes());
    prefix
}

/// Whether a key is an index posting list's.
pub(crate) fn is_posting_key(key: &[u8]) -> bool {
    matches!(
        key.first(),
        Some(&(BY_SUBJECT | BY_ACTOR | BY_TARGET | BY_ACTION))
    )
}

/// The index prefix of a posting list's key (the key without its first seq).
pub(crate) fn posting_prefix(key: &[u8]) -> Result<&[u8], AuditError> {
    match key.len().checked_sub(8) {
        Some(n) if n > 1 && is_posting_key(key) => Ok(&key[..n]),
        _ => Err(AuditError::Corrupt("malformed index posting key".into())),
    }
}

/// The first byte of a posting list in the delta layout. A list of the earlier
/// layout (8 big-endian bytes per seq) starts with a zero byte instead: the top
/// byte of a seq below 2^56.
const POSTINGS_DELTA: u8 = 1;

/// A posting list's value: [`POSTINGS_DELTA`], then the first seq and each later
/// seq's distance from the one before, as LEB128 varints. Seqs in one list are
/// mostly close together, so a seq costs one or two bytes instead of eight: the
/// lists are an eighth of the size to store, and sled, which copies a whole leaf
/// on every insert, spends that much less at each round end.
///
/// Fails unless `seqs` ascend strictly: such a list could not be read back, and
/// the commit that carries it must fail rather than reach the write-ahead file.
pub(crate) fn encode_postings(seqs: &[u64]) -> Result<Vec<u8>, AuditError> {
    let mut out = Vec::with_capacity(1 + 10 + seqs.len() * 2);
    out.push(POSTINGS_DELTA);
    let mut previous = None;
    for &seq in seqs {
        let step = match previous {
            None => seq,
            Some(p) if seq > p => seq - p,
            Some(_) => {
                return Err(AuditError::Unavailable(
                    "an index posting list does not ascend".into(),
                ))
            }
        };
        push_varint(&mut out, step);
        previous = Some(seq);
    }
    Ok(out)
}

/// The seqs of a posting list of either layout. A list must ascend strictly, or
/// it is refused: every writer made its lists so, and a reader that met a seq
/// below the one before would drop it without a word (it keeps each seq once, in
/// order, across lists).
pub(crate) fn decode_postings(bytes: &[u8]) -> Result<Vec<u64>, AuditError> {
    let malformed = || AuditError::Corrupt("malformed index posting list".into());
    let Some((&POSTINGS_DELTA, mut rest)) = bytes.split_first() else {
        // The earlier layout (or an empty list).
        if !bytes.len().is_multiple_of(8) {
            return Err(malformed());
        }
        let seqs: Vec<u64> = bytes.chunks_exact(8).filter_map(read_u64).collect();
        if seqs.windows(2).any(|pair| pair[1] <= pair[0]) {
            return Err(AuditError::Corrupt(
                "index posting list does not ascend".into(),
            ));
        }
        return Ok(seqs);
    };
    let mut seqs = Vec::with_capacity(rest.len());
    while !rest.is_empty() {
        let step = take_varint(&mut rest).ok_or_else(malformed)?;
        let seq = match seqs.last() {
            None => step,
            Some(_) if step == 0 => return Err(malformed()),
            Some(&last) => u64::checked_add(last, step).ok_or_else(malformed)?,
        };
        seqs.push(seq);
    }
    Ok(seqs)
}

/// Appends `value` as an unsigned LEB128 varint: seven bits a byte, low first,
/// the top bit set on every byte but the last.
fn push_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Takes one varint off the front of `bytes`: `None` if it is cut short or does
/// not fit in a u64. (A value may be written with more bytes than it needs; it
/// still means that value.)
fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7f);
        // The tenth byte holds the top bit alone.
        if i == 9 && bits > 1 {
            return None;
        }
        value |= bits << (7 * i);
        if b & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
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

/// The tree size recorded in the log (0 for a new log).
/// The stored tree size: in `sizes` (the [`SIZE_TREE`]), or in `tree` for a log
/// written before that tree; 0 for a new log.
pub(crate) fn stored_size(sizes: &sled::Tree, tree: &sled::Tree) -> Result<u64, AuditError> {
    let stored = match sizes.get(SIZE)? {
        Some(v) => Some(v),
        None => tree.get(SIZE)?,
    };
    Ok(match stored {
        Some(v) => read_u64(&v).ok_or_else(|| AuditError::Corrupt("malformed tree size".into()))?,
        None => 0,
    })
}

pub(crate) fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// The open database as readers see it: the tree, the right edge of the Merkle
/// tree as of the last commit, and the cache of upper tiles. Replaced as a whole
/// when the writer reopens the database.
pub(crate) struct OpenLog {
    pub tree: sled::Tree,
    pub edge: ArcSwap<Edge>,
    /// The full tiles.
    pub files: Arc<TileFiles>,
    /// The entries' chunks.
    pub entries: Arc<EntryFile>,
    pub tiles: TileCache,
    /// The index lists of the current write-ahead round, not yet in sled.
    pub postings: Arc<ArcSwap<RoundPostings>>,
}

impl OpenLog {
    pub(crate) fn new(
        tree: sled::Tree,
        files: Arc<TileFiles>,
        entries: Arc<EntryFile>,
        postings: Arc<ArcSwap<RoundPostings>>,
        edge: Edge,
    ) -> OpenLog {
        let tiles = TileCache::default();
        if let Err(e) = tiles.warm(&files, edge.size) {
            tracing::warn!(error = %e, "cannot read the upper Merkle tiles ahead; proofs will read them as they need them");
        }
        OpenLog {
            tree,
            edge: ArcSwap::from_pointee(edge),
            files,
            entries,
            tiles,
            postings,
        }
    }
}

/// Reads the audit log. Cheap to clone; every read sees only committed entries (those
/// below the committed size the writer publishes).
#[derive(Clone)]
pub struct AuditLog {
    pub(crate) open: Arc<arc_swap::ArcSwapOption<OpenLog>>,
    pub(crate) keys: Arc<Keys>,
    pub(crate) health: watch::Receiver<LogHealth>,
    pub(crate) log_id: String,
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

    /// The open database; `Unavailable` while the writer is recovering from a
    /// failure (it must be able to drop every handle to reopen the database).
    /// Read the size first: the edge is published before the size, so it covers
    /// every size read before it.
    fn open(&self) -> Result<Arc<OpenLog>, AuditError> {
        self.open.load_full().ok_or_else(|| {
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
        let open = self.open()?;
        read_entry(&open.tree, &open.entries, &self.keys, seq)
    }

    /// The root of the first `size` entries.
    pub fn root(&self, size: u64) -> Result<Hash, AuditError> {
        self.check_size("tree_size", size)?;
        let open = self.open()?;
        let edge = open.edge.load();
        merkle::root(size, &ProofNodes::new(&*open.files, &edge, &open.tiles))
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
        let open = self.open()?;
        let edge = open.edge.load();
        let nodes = ProofNodes::new(&*open.files, &edge, &open.tiles);
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
        let open = self.open()?;
        let edge = open.edge.load();
        let nodes = ProofNodes::new(&*open.files, &edge, &open.tiles);
        merkle::consistency_proof(from, to, &nodes).map_err(tree_error)
    }

    /// The newest stored checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, AuditError> {
        let open = self.open()?;
        match open.tree.scan_prefix([CHECKPOINT]).next_back() {
            None => Ok(None),
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(decode_checkpoint(&self.log_id, &self.keys, &k, &v)?))
            }
        }
    }

    /// Every stored checkpoint, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<SignedCheckpoint>, AuditError> {
        stored_checkpoints(&self.open()?.tree, &self.log_id, &self.keys)
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
        let mut entries = self.entries()?;
        let (mut lo, mut hi) = (0u64, size);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let t = entries
                .read(mid)?
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

    /// Seqs from an index prefix, starting at `from_seq`, ascending, below `size`:
    /// sled's lists below the current round's first seq, then the round's own
    /// (see [`super::postings`]).
    pub(crate) fn index_seqs(
        &self,
        prefix: Vec<u8>,
        from_seq: u64,
        size: u64,
    ) -> Result<impl Iterator<Item = Result<u64, AuditError>>, AuditError> {
        let open = self.open()?;
        let round = open.postings.load_full();
        let in_round = round.seqs(&prefix, from_seq, size);
        let size = size.min(round.first_seq());
        let tree = open.tree.clone();
        let at = posting_key(prefix.clone(), from_seq);
        // The list that may hold `from_seq` starts at or before it.
        let start = match tree
            .range(posting_key(prefix.clone(), 0)..=at.clone())
            .next_back()
        {
            Some(kv) => kv?.0.to_vec(),
            None => at,
        };
        // Empty when the round begins at or before `from_seq`.
        let end = posting_key(prefix, size).max(start.clone());
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
            })
            .chain(in_round.into_iter().map(Ok))
            // Lists written by earlier versions (one per commit) may overlap a
            // round's merged list: each seq once, ascending.
            .scan(None::<u64>, |last, s| {
                Some(match s {
                    Ok(seq) if last.is_some_and(|l| seq <= l) => None,
                    Ok(seq) => {
                        *last = Some(seq);
                        Some(Ok(seq))
                    }
                    Err(e) => Some(Err(e)),
                })
            })
            .flatten())
    }

    /// A reader of committed entries that keeps the last chunk it read, for
    /// reading many entries near one another.
    pub(crate) fn entries(&self) -> Result<EntryReader<'_>, AuditError> {
        let open = self.open()?;
        Ok(EntryReader::new(
            open.tree.clone(),
            open.entries.clone(),
            &self.keys,
        ))
    }
}

fn tree_error(e: merkle::TreeError<AuditError>) -> AuditError {
    match e {
        merkle::TreeError::Range(r) => AuditError::OutOfRange(r.to_string()),
        merkle::TreeError::Source(s) => s,
    }
}

/// Reads entries, keeping the chunk it read last: consecutive seqs mostly share
/// one.
pub(crate) struct EntryReader<'k> {
    tree: sled::Tree,
    entries: Arc<EntryFile>,
    keys: &'k Keys,
    /// The last chunk read: its first seq and value.
    chunk: Option<(u64, sled::IVec)>,
}

impl<'k> EntryReader<'k> {
    pub(crate) fn new(tree: sled::Tree, entries: Arc<EntryFile>, keys: &'k Keys) -> Self {
        EntryReader {
            tree,
            entries,
            keys,
            chunk: None,
        }
    }

    /// Reads, opens and decodes entry `seq`, checking it is the entry for that seq.
    pub(crate) fn read(&mut self, seq: u64) -> Result<AuditEntry, AuditError> {
        if let Some((first, chunk)) = &self.chunk {
            if let Some(sealed) = seq
                .checked_sub(*first)
                .and_then(|i| chunk_entries(chunk).ok()?.get(i as usize).copied())
            {
                return open_entry(self.keys, seq, sealed);
            }
        }
        let gone = || AuditError::Corrupt(format!("seq {seq}: entry missing"));
        // The chunk holding `seq` is the last one that starts at or before it.
        let (key, value) = self
            .tree
            .range(entry_key(0)..=entry_key(seq))
            .next_back()
            .ok_or_else(gone)??;
        let first = read_u64(&key[1..]).ok_or_else(gone)?;
        let chunk = chunk_bytes(value, &self.entries)
            .map_err(|e| AuditError::Corrupt(format!("seq {seq}: {e}")))?;
        let entries = chunk_entries(&chunk)
            .map_err(|_| AuditError::Corrupt(format!("seq {seq}: its chunk is malformed")))?;
        let sealed = *entries.get((seq - first) as usize).ok_or_else(gone)?;
        let entry = open_entry(self.keys, seq, sealed)?;
        self.chunk = Some((first, chunk));
        Ok(entry)
    }
}

/// Opens and decodes the sealed entry stored for `seq`, checking it is that seq's.
pub(crate) fn open_entry(keys: &Keys, seq: u64, sealed: &[u8]) -> Result<AuditEntry, AuditError> {
    let canonical = keys
        .audit_seal
        .open(&seal_context(seq), sealed)
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

/// Reads, opens and decodes entry `seq`, checking it is the entry for that seq.
pub(crate) fn read_entry(
    tree: &sled::Tree,
    entries: &Arc<EntryFile>,
    keys: &Keys,
    seq: u64,
) -> Result<AuditEntry, AuditError> {
    EntryReader::new(tree.clone(), entries.clone(), keys).read(seq)
}

/// The edge of the stored tree of `size` entries (when the writer opens the log).
pub(crate) fn stored_edge(
    tree: &sled::Tree,
    tiles: &TileFiles,
    entry_file: &Arc<EntryFile>,
    keys: &Keys,
    size: u64,
) -> Result<Edge, AuditError> {
    let mut entries = EntryReader::new(tree.clone(), entry_file.clone(), keys);
    let last_leaves = (size - size % super::tiles::TILE_WIDTH..size)
        .map(|seq| Ok(merkle::leaf_hash(&entries.read(seq)?.canonical)))
        .collect::<Result<Vec<_>, AuditError>>()?;
    Edge::rebuild(size, &last_leaves, tiles)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn posting_lists_of_the_earlier_layout_still_read() {
        let legacy: Vec<u8> = [5u64, 9, 1 << 40]
            .iter()
            .flat_map(|s| s.to_be_bytes())
            .collect();
        assert_eq!(decode_postings(&legacy).unwrap(), vec![5, 9, 1 << 40]);
        assert_eq!(decode_postings(&[]).unwrap(), Vec::<u64>::new());
        assert!(decode_postings(&legacy[..7]).is_err());
    }

    #[test]
    fn a_list_of_the_earlier_layout_that_does_not_ascend_is_refused() {
        let eight_bytes_a_seq =
            |seqs: &[u64]| -> Vec<u8> { seqs.iter().flat_map(|s| s.to_be_bytes()).collect() };
        for bad in [&[5u64, 9, 7][..], &[5, 5], &[9, 1 << 40, 3]] {
            assert_eq!(
                decode_postings(&eight_bytes_a_seq(bad)),
                Err(AuditError::Corrupt(
                    "index posting list does not ascend".into()
                )),
                "{bad:?}"
            );
        }
        assert_eq!(
            decode_postings(&eight_bytes_a_seq(&[7])).unwrap(),
            vec![7],
            "a list of one seq ascends"
        );
    }

    #[test]
    fn a_posting_list_of_near_seqs_costs_about_a_byte_a_seq() {
        let seqs: Vec<u64> = (1_000_000..1_001_024).collect();
        let encoded = encode_postings(&seqs).unwrap();
        assert_eq!(encoded.len(), 1 + 3 + 1023);
        assert_eq!(decode_postings(&encoded).unwrap(), seqs);
    }

    #[test]
    fn a_list_that_does_not_ascend_is_never_encoded() {
        assert!(encode_postings(&[3, 3]).is_err());
        assert!(encode_postings(&[5, 4]).is_err());
        assert!(encode_postings(&[]).is_ok());
    }

    #[test]
    fn malformed_delta_lists_are_refused() {
        for bad in [
            // Cut short inside a varint.
            vec![POSTINGS_DELTA, 0x80],
            // A repeated seq (a step of zero).
            vec![POSTINGS_DELTA, 3, 0],
            // More than 64 bits.
            [vec![POSTINGS_DELTA], vec![0xff; 9], vec![0x02]].concat(),
            [vec![POSTINGS_DELTA], vec![0xff; 11]].concat(),
            // A step past u64::MAX.
            [vec![POSTINGS_DELTA], vec![0xff; 9], vec![0x01, 0x01]].concat(),
        ] {
            assert!(
                matches!(decode_postings(&bad), Err(AuditError::Corrupt(_))),
                "{bad:?}"
            );
        }
        let max = [vec![POSTINGS_DELTA], vec![0xff; 9], vec![0x01]].concat();
        assert_eq!(decode_postings(&max).unwrap(), vec![u64::MAX]);
    }

    proptest! {
        #[test]
        fn ascending_posting_lists_read_back_as_written(
            mut seqs in proptest::collection::btree_set(any::<u64>(), 0..300)
                .prop_map(|s| s.into_iter().collect::<Vec<_>>()),
            near in 0u64..1 << 50,
        ) {
            prop_assert_eq!(decode_postings(&encode_postings(&seqs).unwrap()).unwrap(), seqs.clone());
            // And lists of close seqs, as the log makes them.
            for (i, s) in seqs.iter_mut().enumerate() {
                *s = near + i as u64 * 3 + (*s % 3);
            }
            prop_assert_eq!(decode_postings(&encode_postings(&seqs).unwrap()).unwrap(), seqs);
        }

        #[test]
        fn no_bytes_make_the_decoder_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_postings(&bytes);
        }
    }
}
