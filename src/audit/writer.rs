//! The single audit writer: group commit.
//!
//! Requests from every handler queue on one channel. The writer thread takes what has
//! queued (up to `max_batch`), gives each entry the next seq and a time that never
//! goes backwards, computes its Merkle nodes on the in-memory right edge of the tree
//! ([`super::tiles`]), and gathers the entries (as one chunk, or a few), the tiles they
//! completed, index keys and the new size as **one** batch. The batch is made durable
//! once, as one record of the write-ahead file ([`super::wal`]) and its `fdatasync`,
//! and only then applied (entries and the size to sled, tiles to their files,
//! index lists to the round's lists in memory, [`super::postings`]) and published
//! to readers. Then each waiter is answered with its [`Durable`] receipt. One fsync
//! is shared by everything in the batch. When the write-ahead file is full, the
//! round's index lists go into sled, sled is flushed and synced (its `flush` ends
//! in `sync_file_range`, which does not empty the disk's write cache, so its file
//! is `fdatasync`ed too) and the file starts over. Commits wait for that round
//! end, so the entry and tile files it must also make durable are synced by a
//! thread of their own while the round fills ([`super::early_sync`]).
//!
//! If any step fails, every waiter of that batch gets [`AuditError::Unavailable`],
//! the log reports itself unwritable (health NOT_SERVING), and the writer reopens
//! the database (sled remembers its first I/O error until reopened; the write-ahead
//! file is replayed into it) before it accepts another batch; until that succeeds
//! every append fails fast.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::{mpsc, oneshot, watch};

use super::checkpoint::{Checkpoint, SignedCheckpoint};
use super::early_sync::EarlySync;
use super::entry::{canonical_bytes, NewEntry};
use super::entry_file::{self, EntryFile};
use super::log::{self, AuditLog, OpenLog};
use super::merkle;
use super::postings::RoundPostings;
use super::tiles::{self, Edge, TileFiles};
use super::wal::{self, Wal};
use super::AuditError;
use crate::domain::Clock;
use crate::store::Keys;

/// Proof that an entry is durably in the log: only the writer makes these, after the
/// durability point. A response that discloses anything is built from one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    seq: u64,
    time_micros: i64,
}

impl Durable {
    /// A receipt for `seq`: for audit stores, once the entry's commit is durable.
    pub(crate) fn new(seq: u64, time_micros: i64) -> Self {
        Durable { seq, time_micros }
    }

    /// The entry's sequence number (its Merkle leaf index).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The entry's time, microseconds since the epoch.
    pub fn time_micros(&self) -> i64 {
        self.time_micros
    }
}

/// Whether the log can be written, and how big it is; published by the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHealth {
    /// False after a failed commit, until the database has been reopened.
    pub writable: bool,
    /// Committed entries.
    pub size: u64,
}

/// Statistics of group commits, for metrics and the benchmark.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Number of commits.
    pub commits: std::sync::atomic::AtomicU64,
    /// Entries committed.
    pub entries: std::sync::atomic::AtomicU64,
    /// Total time spent in the durability point, microseconds.
    pub sync_micros: std::sync::atomic::AtomicU64,
    /// Commits by the time their durability point took: `sync_buckets[i]` counts
    /// those within [`SYNC_BUCKETS_MICROS`]`[i]` and above the bound before it; the
    /// slower ones are the rest of `commits`.
    pub sync_buckets: [std::sync::atomic::AtomicU64; SYNC_BUCKETS_MICROS.len()],
    /// Commits by their number of entries: `group_buckets[i]` counts those of at
    /// most [`GROUP_BUCKETS`]`[i]` entries and more than the bound before it; the
    /// larger ones are the rest of `commits`.
    pub group_buckets: [std::sync::atomic::AtomicU64; GROUP_BUCKETS.len()],
    /// Write-ahead round ends: the round's index lists into sled, the flat files
    /// and sled made durable, the file started over. Commits wait meanwhile.
    pub round_ends: std::sync::atomic::AtomicU64,
    /// Total time spent in round ends, microseconds.
    pub round_end_micros: std::sync::atomic::AtomicU64,
    /// The longest round end so far, microseconds.
    pub round_end_max_micros: std::sync::atomic::AtomicU64,
}

/// Upper bounds, microseconds, of [`CommitStats::sync_buckets`].
pub const SYNC_BUCKETS_MICROS: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

/// Upper bounds, entries, of [`CommitStats::group_buckets`].
pub const GROUP_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

impl CommitStats {
    /// Counts a commit of `entries` whose durability point took `took`.
    pub(crate) fn synced(&self, entries: usize, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let micros = took.as_micros() as u64;
        self.commits.fetch_add(1, Relaxed);
        self.entries.fetch_add(entries as u64, Relaxed);
        self.sync_micros.fetch_add(micros, Relaxed);
        if let Some(i) = SYNC_BUCKETS_MICROS.iter().position(|&b| micros <= b) {
            self.sync_buckets[i].fetch_add(1, Relaxed);
        }
        if let Some(i) = GROUP_BUCKETS.iter().position(|&b| entries as u64 <= b) {
            self.group_buckets[i].fetch_add(1, Relaxed);
        }
    }

    fn round_ended(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let micros = took.as_micros() as u64;
        self.round_ends.fetch_add(1, Relaxed);
        self.round_end_micros.fetch_add(micros, Relaxed);
        self.round_end_max_micros.fetch_max(micros, Relaxed);
    }
}

/// The outcome of a checkpoint asked for in a batch.
type CheckpointResult = Result<SignedCheckpoint, AuditError>;

enum Command {
    Append(Box<NewEntry>, oneshot::Sender<Result<Durable, AuditError>>),
    Checkpoint(oneshot::Sender<Result<SignedCheckpoint, AuditError>>),
    /// Make everything durable, let go of the database, and stop.
    Close(oneshot::Sender<()>),
}

/// The handle every capability appends through. Cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Command>,
    log: AuditLog,
    stats: Arc<CommitStats>,
}

/// The default of [`AuditSettings::wal_bytes`]: 32 MiB.
pub const DEFAULT_WAL_BYTES: u64 = wal::DEFAULT_CAPACITY;

/// Settings of the audit store.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// The folder of the audit sled database.
    pub dir: PathBuf,
    /// The checkpoints' origin name.
    pub log_id: String,
    /// The most entries in one commit.
    pub max_batch: usize,
    /// sled's page cache, bytes.
    pub cache_bytes: u64,
    /// Bytes of write-ahead records after which sled is synced and the file
    /// starts over ([`DEFAULT_WAL_BYTES`]).
    pub wal_bytes: u64,
}

impl Auditor {
    /// Opens (creating) the log and starts its writer thread.
    pub fn open(
        mut settings: AuditSettings,
        keys: Arc<Keys>,
        clock: Arc<dyn Clock>,
    ) -> Result<Auditor, AuditError> {
        let store = Store::open(&settings)?;
        // The origin is fixed when the log is made: old checkpoints sign it.
        match log::stored_origin(&store.tree)? {
            Some(origin) => {
                if origin != settings.log_id {
                    tracing::warn!(stored = %origin, configured = %settings.log_id, "audit log_id differs from the log's origin; keeping the origin");
                    settings.log_id = origin;
                }
            }
            None => {
                store.tree.insert(log::ORIGIN, settings.log_id.as_bytes())?;
                store.sync_sled()?;
            }
        }
        let (size, last_time, edge) = store.state(&keys)?;
        let (health_tx, health_rx) = watch::channel(LogHealth {
            writable: true,
            size,
        });
        let open = Arc::new(OpenLog::new(
            store.tree.clone(),
            store.tiles.clone(),
            store.entries.clone(),
            store.postings.clone(),
            edge.clone(),
        ));
        let shared = Arc::new(ArcSwapOption::new(Some(open.clone())));
        let log = AuditLog {
            open: shared.clone(),
            keys: keys.clone(),
            health: health_rx,
            log_id: settings.log_id.clone(),
        };
        let (tx, rx) = mpsc::channel(settings.max_batch.max(1) * 4);
        let stats = Arc::new(CommitStats::default());
        let writer = Writer {
            settings,
            store: Some(store),
            shared,
            open: Some(open),
            keys,
            clock,
            size,
            last_time,
            edge,
            health: health_tx,
            rx,
            stats: stats.clone(),
            dispatcher: Dispatcher::start(),
        };
        std::thread::Builder::new()
            .name("sgw-audit-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::Unavailable(format!("cannot start the audit writer: {e}")))?;
        Ok(Auditor { tx, log, stats })
    }

    /// Appends `entry`; returns once it is durable. Fails with
    /// [`AuditError::Unavailable`] when the log cannot be written: the caller must
    /// then not disclose anything.
    pub async fn append(&self, entry: NewEntry) -> Result<Durable, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Append(Box::new(entry), reply))
            .await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }

    /// Signs and stores a checkpoint of everything committed so far (and anything
    /// committed with it).
    pub async fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Checkpoint(reply))
            .await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| AuditError::Unavailable("the audit writer has stopped".into()))?
    }

    /// Syncs, releases the database (its file lock) and stops the writer; appends
    /// after this fail with `Unavailable`. Called once the last call has finished.
    pub async fn close(&self) {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Close(reply)).await.is_ok() {
            let _ = answer.await;
        }
    }

    /// The read side.
    pub fn log(&self) -> &AuditLog {
        &self.log
    }

    /// Commit statistics.
    pub fn stats(&self) -> &Arc<CommitStats> {
        &self.stats
    }

    /// Changes in writability and size.
    pub fn health(&self) -> watch::Receiver<LogHealth> {
        self.log.health.clone()
    }
}

/// The open database, its file, and the write-ahead file in front of it.
struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// The tree size alone ([`log::SIZE_TREE`]).
    sizes: sled::Tree,
    data_file: File,
    tiles: Arc<TileFiles>,
    entries: Arc<EntryFile>,
    /// Where the next chunk goes in the entry file.
    entries_end: u64,
    /// Syncs the entry and tile files while the round fills.
    early_sync: EarlySync,
    /// The index lists of the current round, shared with readers.
    postings: Arc<ArcSwap<RoundPostings>>,
    wal: Wal,
}

impl Store {
    /// Opens sled and replays the write-ahead file into it: after a crash, sled
    /// may lack the last commits, which only the write-ahead file holds.
    fn open(settings: &AuditSettings) -> Result<Store, AuditError> {
        let db = sled::Config::new()
            .path(&settings.dir)
            .cache_capacity(settings.cache_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let tree = db.open_tree(log::TREE)?;
        let sizes = db.open_tree(log::SIZE_TREE)?;
        let data_file = File::open(db_file(&settings.dir)).map_err(|e| {
            AuditError::Unavailable(format!("cannot open the audit database file: {e}"))
        })?;
        let tiles = Arc::new(TileFiles::open(&settings.dir));
        let adopted = tiles.adopt(&tree)?;
        // The removals from sled are made durable with everything else below; if
        // they are lost, the next open moves the same tiles again.
        if adopted > 0 {
            tracing::info!(
                tiles = adopted,
                "Merkle tiles moved from sled to tile files"
            );
        }
        let entries = Arc::new(EntryFile::open(&settings.dir)?);
        let round = Arc::new(RoundPostings::new(log::stored_size(&sizes, &tree)?));
        let (wal, replayed) = Wal::open(&settings.dir, settings.wal_bytes, |inserts| {
            apply(&tree, &sizes, &tiles, &entries, &round, inserts)
        })?;
        if replayed > 0 {
            tracing::info!(
                records = replayed,
                "audit commits replayed from the write-ahead file"
            );
        }
        let entries_end = log::stored_entries_end(&tree)?;
        let early_sync = EarlySync::start(entries.clone(), tiles.clone(), entries_end);
        let mut store = Store {
            db,
            tree,
            sizes,
            data_file,
            tiles,
            entries,
            entries_end,
            early_sync,
            postings: Arc::new(ArcSwap::new(round)),
            wal,
        };
        store.start_round()?;
        Ok(store)
    }

    /// The stored size, the time of the last entry, and the Merkle tree's edge.
    fn state(&self, keys: &Keys) -> Result<(u64, i64, Edge), AuditError> {
        let size = log::stored_size(&self.sizes, &self.tree)?;
        let last_time = if size == 0 {
            i64::MIN
        } else {
            log::read_entry(&self.tree, &self.entries, keys, size - 1)?
                .time
                .as_ref()
                .map(super::entry::micros_from_timestamp)
                .unwrap_or(i64::MIN)
        };
        Ok((
            size,
            last_time,
            log::stored_edge(&self.tree, &self.tiles, &self.entries, keys, size)?,
        ))
    }

    /// Makes what sled holds durable: its flush, then fdatasync of its file.
    fn sync_sled(&self) -> Result<(), AuditError> {
        self.db.flush()?;
        self.data_file
            .sync_data()
            .map_err(|e| AuditError::Unavailable(format!("fdatasync: {e}")))
    }

    /// Puts the round's index lists into sled, makes sled, the tile files and the
    /// entry file durable, then starts the write-ahead file over: nothing in it is
    /// needed any more. Readers move to the new round only once sled holds the old
    /// one's lists.
    fn start_round(&mut self) -> Result<(), AuditError> {
        self.postings.load().write_to(&self.tree)?;
        self.early_sync.sync_now()?;
        self.sync_sled()?;
        self.wal.start_over()?;
        let size = log::stored_size(&self.sizes, &self.tree)?;
        self.postings.store(Arc::new(RoundPostings::new(size)));
        Ok(())
    }

    /// The durability point of a commit, then the commit itself: the batch goes to
    /// the write-ahead file (synced), then to sled and the flat files. Each entry
    /// chunk is given its place at the end of the entry file first, so that a
    /// replay writes it at the same place.
    /// Returns the time the durability point took.
    fn commit(&mut self, mut inserts: Vec<wal::Insert>) -> Result<Duration, AuditError> {
        let mut end = self.entries_end;
        for (key, value) in inserts.iter_mut() {
            if log::is_entry_key(key) {
                let placed = entry_file::placed_chunk(end, value);
                end += value.len() as u64;
                *value = placed;
            }
        }
        let t = Instant::now();
        self.wal.append(&inserts)?;
        let synced = t.elapsed();
        self.entries_end = end;
        apply(
            &self.tree,
            &self.sizes,
            &self.tiles,
            &self.entries,
            &self.postings.load(),
            inserts,
        )?;
        self.early_sync.written_to(end);
        Ok(synced)
    }
}

/// The audit database as [`open_database`] gives it: sled's tree, and the flat
/// files beside it. sled's file lock is held until the tree is dropped.
pub(crate) struct Database {
    pub tree: sled::Tree,
    pub sizes: sled::Tree,
    pub tiles: Arc<TileFiles>,
    pub entries: Arc<EntryFile>,
}

/// Opens the audit database in `dir` for a reader that has no writer (the offline
/// verifier): as the writer would, with the write-ahead file replayed into it.
pub(crate) fn open_database(dir: &Path, cache_bytes: u64) -> Result<Database, AuditError> {
    let store = Store::open(&AuditSettings {
        dir: dir.to_owned(),
        log_id: String::new(),
        max_batch: 1,
        cache_bytes,
        wal_bytes: DEFAULT_WAL_BYTES,
    })?;
    Ok(Database {
        tree: store.tree,
        sizes: store.sizes,
        tiles: store.tiles,
        entries: store.entries,
    })
}

/// Applies one commit's inserts to sled, in order.
///
/// Key by key, not as a `sled::Batch`: sled 0.34's `apply_batch` writes out its
/// log buffer (pwrite and `sync_file_range`) twice per batch and takes a
/// process-wide lock exclusively, stalling every sled read in the gateway, which
/// made the write-ahead file cost more than it saved. Atomicity comes from the
/// write-ahead file instead: a crash can leave sled with part of a commit only
/// while the file still holds the whole of it, and the replay writes it again.
/// Readers never see part of one: they read below the size the writer publishes
/// after this returns.
///
/// Full Merkle tiles go to their [`TileFiles`] instead, entry chunks to the
/// [`EntryFile`] (sled keeps where each is), index lists to the round's
/// [`RoundPostings`], and the size to its own tree.
fn apply(
    tree: &sled::Tree,
    sizes: &sled::Tree,
    tiles: &TileFiles,
    entries: &EntryFile,
    round: &RoundPostings,
    inserts: Vec<wal::Insert>,
) -> Result<(), AuditError> {
    for (key, value) in inserts {
        if let Some(id) = tiles::tile_id_of_key(&key) {
            tiles.write(id, &value)?;
        } else if let Some(placed) = log::is_entry_key(&key)
            .then(|| entry_file::split_placed(&value))
            .flatten()
        {
            // A chunk from a write-ahead file of an earlier version is inline
            // instead, and goes to sled as it is.
            let (at, bytes) = placed?;
            entries.write(at, bytes)?;
            tree.insert(key, &at.encode()[..])?;
        } else if key == log::SIZE {
            sizes.insert(key, value)?;
        } else if log::is_posting_key(&key) {
            round.add(&key, &value)?;
        } else {
            tree.insert(key, value)?;
        }
    }
    Ok(())
}

/// sled 0.34 keeps its log in one file, `db`, under its folder.
pub(crate) fn db_file(dir: &Path) -> PathBuf {
    dir.join("db")
}

struct Writer {
    settings: AuditSettings,
    store: Option<Store>,
    /// What readers load: `None` while the store is failing.
    shared: Arc<ArcSwapOption<OpenLog>>,
    /// The open store as readers see it, whose edge each commit publishes. Let
    /// go with the store when it fails (its tree keeps the database open).
    open: Option<Arc<OpenLog>>,
    keys: Arc<Keys>,
    clock: Arc<dyn Clock>,
    size: u64,
    last_time: i64,
    /// The right edge of the Merkle tree at `size` (its partial tiles).
    edge: Edge,
    health: watch::Sender<LogHealth>,
    rx: mpsc::Receiver<Command>,
    stats: Arc<CommitStats>,
    /// Hands a commit's receipts to a task on the async runtime; see [`Dispatcher`].
    dispatcher: Option<Dispatcher>,
}

/// A commit's receipts, sent on by a task on the runtime rather than by the writer
/// thread. Each wake from outside the runtime is a cross-thread wake-up (a futex
/// call, often a context switch); from a task on a worker, waking a waiter only
/// queues it there. So a commit of n entries costs one remote wake, not n
/// (profiled at 64 callers: ~2.6 futex calls per disclosure before).
///
/// The task runs on the runtime that was current when the log was opened; the
/// gateway opens and uses its auditor on one runtime, which outlives both.
struct Dispatcher(mpsc::UnboundedSender<Answer>);

/// What the writer hands to the [`Dispatcher`], answered in the order sent.
enum Answer {
    /// The receipts of one commit.
    Receipts(Vec<Receipt>),
    /// The writer has let go of the store: answered after every receipt before it,
    /// so that `close` never returns ahead of a receipt for an entry on disk.
    Closed(oneshot::Sender<()>),
}

/// One waiter and its answer.
struct Receipt {
    waiter: oneshot::Sender<Result<Durable, AuditError>>,
    durable: Durable,
}

impl Answer {
    fn deliver(self) {
        match self {
            Answer::Receipts(receipts) => {
                for Receipt { waiter, durable } in receipts {
                    let _ = waiter.send(Ok(durable));
                }
            }
            Answer::Closed(reply) => {
                let _ = reply.send(());
            }
        }
    }
}

impl Dispatcher {
    /// Starts the forwarding task on the current runtime, if there is one.
    fn start() -> Option<Dispatcher> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
        runtime.spawn(async move {
            while let Some(answer) = rx.recv().await {
                answer.deliver();
            }
        });
        Some(Dispatcher(tx))
    }
}

impl Writer {
    /// Answers through the dispatcher, or from this thread if there is none or its
    /// task has gone with its runtime. (Answers queued to a task that is then
    /// dropped are lost with it: those calls fail as if the writer had stopped, and
    /// disclose nothing.)
    fn answer(&self, answer: Answer) {
        let answer = match &self.dispatcher {
            Some(d) => match d.0.send(answer) {
                Ok(()) => return,
                Err(mpsc::error::SendError(answer)) => answer,
            },
            None => answer,
        };
        answer.deliver();
    }

    fn run(mut self) {
        let mut commands = Vec::with_capacity(self.settings.max_batch);
        loop {
            if self.store.is_none() && !self.recover() {
                break;
            }
            let Some(first) = self.rx.blocking_recv() else {
                break;
            };
            commands.push(first);
            while commands.len() < self.settings.max_batch {
                match self.rx.try_recv() {
                    Ok(c) => commands.push(c),
                    Err(_) => break,
                }
            }
            let closing: Vec<oneshot::Sender<()>> = {
                let (close, rest): (Vec<_>, Vec<_>) = commands
                    .drain(..)
                    .partition(|c| matches!(c, Command::Close(_)));
                commands = rest;
                close
                    .into_iter()
                    .filter_map(|c| match c {
                        Command::Close(reply) => Some(reply),
                        _ => None,
                    })
                    .collect()
            };
            if !commands.is_empty() {
                self.commit(&mut commands);
            }
            if !closing.is_empty() {
                self.release();
                for reply in closing {
                    self.answer(Answer::Closed(reply));
                }
                return;
            }
        }
        if let Some(store) = &mut self.store {
            let _ = store.start_round();
        }
    }

    fn commit(&mut self, commands: &mut Vec<Command>) {
        let Some(mut store) = self.store.take() else {
            return;
        };
        let started_size = self.size;
        let started_time = self.last_time;
        let result = self.write(&mut store, commands);
        self.store = Some(store);
        match result {
            Ok((durable, checkpoint)) => {
                // Publish the edge, then the new size, before answering: a caller
                // holding its receipt must be able to read its own entry and prove
                // it at once, and a reader that sees a size sees an edge at least
                // as new.
                if let Some(open) = &self.open {
                    open.edge.store(Arc::new(self.edge.clone()));
                }
                self.health.send_replace(LogHealth {
                    writable: true,
                    size: self.size,
                });
                let mut di = durable.into_iter();
                let mut receipts = Vec::with_capacity(commands.len());
                for c in commands.drain(..) {
                    match c {
                        Command::Append(_, reply) => {
                            if let Some(d) = di.next() {
                                receipts.push(Receipt {
                                    waiter: reply,
                                    durable: d,
                                });
                            }
                        }
                        Command::Checkpoint(reply) => {
                            let made = checkpoint.clone().unwrap_or_else(|| {
                                Err(AuditError::Unavailable("checkpoint not made".into()))
                            });
                            let _ = reply.send(made);
                        }
                        // Taken out of the batch before it is committed.
                        Command::Close(reply) => {
                            let _ = reply.send(());
                        }
                    }
                }
                self.answer(Answer::Receipts(receipts));
                // Answered first: their entries are durable in the write-ahead file.
                if let Some(store) = self.store.as_mut().filter(|s| s.wal.is_full()) {
                    let started = Instant::now();
                    match store.start_round() {
                        Ok(()) => self.stats.round_ended(started.elapsed()),
                        Err(e) => {
                            tracing::error!(error = %e, "audit store sync failed: failing closed until the store recovers");
                            self.fail();
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit commit failed: failing closed until the store recovers");
                self.size = started_size;
                self.last_time = started_time;
                for c in commands.drain(..) {
                    answer_err(c, &AuditError::Unavailable(e.to_string()));
                }
                self.fail();
            }
        }
    }

    /// Lets go of a failing store: every append fails fast until [`Writer::recover`]
    /// has reopened it.
    fn fail(&mut self) {
        // Said first: letting go of the store waits for its early sync thread,
        // which a hanging disk may keep in `fdatasync`.
        self.shared.store(None);
        self.health.send_replace(LogHealth {
            writable: false,
            size: self.size,
        });
        self.open = None;
        self.store = None;
    }

    /// Writes one batch durably. Returns each append's receipt, in order, and the
    /// checkpoint if one was asked for.
    fn write(
        &mut self,
        store: &mut Store,
        commands: &mut [Command],
    ) -> Result<(Vec<Durable>, Option<CheckpointResult>), AuditError> {
        let mut batch: Vec<wal::Insert> = Vec::new();
        // One posting list per index value per commit, not one key per entry; the
        // round's in-memory lists take them (see `super::postings`).
        let mut postings: std::collections::BTreeMap<Vec<u8>, Vec<u64>> = Default::default();
        let mut full_tiles = Vec::new();
        // The entries go in chunks of consecutive seqs (one per commit, unless
        // it holds more than `CHUNK_BYTES`), each entry sealed on its own.
        let mut chunk = Vec::new();
        let mut chunk_first = self.size;
        let mut receipts = Vec::with_capacity(commands.len());
        let mut wants_checkpoint = false;
        let now = micros(&*self.clock);
        let appends = commands
            .iter()
            .filter(|c| matches!(c, Command::Append(..)))
            .count();
        let mut nonces = self
            .keys
            .audit_seal
            .nonces(appends)
            .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        for c in commands.iter_mut() {
            let entry = match c {
                Command::Append(entry, _) => std::mem::replace(entry.as_mut(), placeholder()),
                Command::Checkpoint(_) => {
                    wants_checkpoint = true;
                    continue;
                }
                Command::Close(_) => continue,
            };
            let seq = self.size;
            let time = now.max(self.last_time);
            let record = entry.into_record(seq, time);
            let canonical = canonical_bytes(&record);
            let leaf = merkle::leaf_hash(&canonical);
            // Every left sibling is in the edge's partial tiles.
            let nodes = merkle::nodes_completed_by_append(seq, leaf, &self.edge)?;
            self.edge.push(&nodes, &mut full_tiles)?;
            let sealed = self
                .keys
                .audit_seal
                .seal_next(&mut nonces, &log::seal_context(seq), &canonical)
                .map_err(|e| AuditError::Unavailable(e.to_string()))?;
            if !chunk.is_empty() && chunk.len() + 4 + sealed.len() > log::CHUNK_BYTES {
                batch.push((
                    log::entry_key(chunk_first).to_vec(),
                    std::mem::take(&mut chunk),
                ));
                chunk_first = seq;
            }
            log::push_to_chunk(&mut chunk, &sealed);
            for prefix in log::index_prefixes(&record).into_iter().flatten() {
                postings.entry(prefix).or_default().push(seq);
            }
            receipts.push(Durable {
                seq,
                time_micros: time,
            });
            self.size += 1;
            self.last_time = time;
        }
        if !chunk.is_empty() {
            batch.push((log::entry_key(chunk_first).to_vec(), chunk));
        }
        // Tiles above the bottom tier are few (one per 256 entries) and every
        // proof reads one per tier: they go into the readers' cache as they are
        // made, so that no proof pays for reading them back from the file.
        let upper_tiles: Vec<(tiles::TileId, Vec<u8>)> = full_tiles
            .iter()
            .filter(|(id, _)| id.tier > 0)
            .cloned()
            .collect();
        for (id, tile) in full_tiles {
            batch.push((tiles::tile_key(id).to_vec(), tile));
        }
        for (prefix, seqs) in postings {
            let key = log::posting_key(prefix, seqs[0]);
            batch.push((key, log::encode_postings(&seqs)?));
        }
        batch.push((log::SIZE.to_vec(), self.size.to_be_bytes().to_vec()));

        let checkpoint = if wants_checkpoint {
            // The root of the edge's own size needs no stored tile.
            let root = merkle::root(self.size, &self.edge)?;
            let checkpoint = Checkpoint {
                log_id: self.settings.log_id.clone(),
                tree_size: self.size,
                root_hash: root,
                timestamp: (now.max(0) / 1_000_000) as u64,
            };
            match checkpoint.sign(&self.keys.checkpoint) {
                Ok(signed) => {
                    batch.push((
                        log::checkpoint_key(self.size).to_vec(),
                        log::encode_checkpoint(&signed),
                    ));
                    Some(Ok(signed))
                }
                Err(e) => Some(Err(AuditError::Unavailable(format!(
                    "cannot sign a checkpoint: {e}"
                )))),
            }
        } else {
            None
        };

        let synced = store.commit(batch)?;
        if let Some(open) = &self.open {
            for (id, tile) in upper_tiles {
                open.tiles.insert(id, &tile);
            }
        }
        self.stats.synced(receipts.len(), synced);
        Ok((receipts, checkpoint))
    }

    /// Syncs and drops the database so its file lock is free.
    fn release(&mut self) {
        if let Some(mut store) = self.store.take() {
            if let Err(e) = store.start_round() {
                tracing::error!(error = %e, "final audit sync failed");
            }
        }
        self.open = None;
        self.shared.store(None);
    }

    /// While the store is failing: try to reopen it every half second, answering
    /// every command that arrives meanwhile with `Unavailable` (fail fast, never
    /// queue disclosures behind a broken disk). Returns false when every handle to
    /// the writer is gone.
    fn recover(&mut self) -> bool {
        let err = AuditError::Unavailable("the audit store is failing; recovering".into());
        loop {
            // Everything is read again: the failed batch may or may not be on disk.
            match Store::open(&self.settings).and_then(|s| s.state(&self.keys).map(|t| (s, t))) {
                Ok((store, (size, last_time, edge))) => {
                    let open = Arc::new(OpenLog::new(
                        store.tree.clone(),
                        store.tiles.clone(),
                        store.entries.clone(),
                        store.postings.clone(),
                        edge.clone(),
                    ));
                    self.shared.store(Some(open.clone()));
                    self.open = Some(open);
                    self.size = size;
                    self.last_time = last_time;
                    self.edge = edge;
                    self.store = Some(store);
                    tracing::warn!(size, "audit store reopened: accepting writes again");
                    self.health.send_replace(LogHealth {
                        writable: true,
                        size,
                    });
                    return true;
                }
                Err(e) => tracing::error!(error = %e, "audit store still failing"),
            }
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                match self.rx.try_recv() {
                    Ok(Command::Close(reply)) => {
                        self.release();
                        let _ = reply.send(());
                        return false;
                    }
                    Ok(c) => answer_err(c, &err),
                    Err(mpsc::error::TryRecvError::Empty) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => return false,
                }
            }
        }
    }
}

fn answer_err(c: Command, err: &AuditError) {
    match c {
        Command::Append(_, reply) => {
            let _ = reply.send(Err(err.clone()));
        }
        Command::Checkpoint(reply) => {
            let _ = reply.send(Err(err.clone()));
        }
        Command::Close(reply) => {
            let _ = reply.send(());
        }
    }
}

fn placeholder() -> NewEntry {
    NewEntry::new(
        super::Actor::system(),
        crate::proto::v1::AuditAction::Unspecified,
        crate::proto::v1::AuditOutcome::Unspecified,
        "",
    )
}

fn micros(clock: &dyn Clock) -> i64 {
    let t = clock.now();
    (t.unix_timestamp_nanos() / 1000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, NewEntry};
    use crate::domain::SystemClock;
    use crate::proto::v1::{AuditAction, AuditOutcome};

    fn settings(dir: &Path) -> AuditSettings {
        AuditSettings {
            dir: dir.join("audit"),
            log_id: "test.example/sgw/audit".into(),
            max_batch: 64,
            cache_bytes: 8 << 20,
            wal_bytes: DEFAULT_WAL_BYTES,
        }
    }

    /// Opens the log, retrying while sled still holds the file lock of a log just
    /// dropped (the writer thread lets go a little after the last handle).
    async fn open(settings: AuditSettings, keys: &Arc<Keys>) -> Auditor {
        for _ in 0..100 {
            let (s, k) = (settings.clone(), keys.clone());
            let opened =
                tokio::task::spawn_blocking(move || Auditor::open(s, k, Arc::new(SystemClock)))
                    .await
                    .unwrap();
            if let Ok(a) = opened {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the log does not reopen");
    }

    fn entry(request_id: &str) -> NewEntry {
        NewEntry::new(
            Actor::system(),
            AuditAction::TlsReloaded,
            AuditOutcome::Allowed,
            request_id,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_are_durable_and_numbered_from_zero_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        let auditor = open(settings(dir.path()), &keys).await;
        let mut handles = Vec::new();
        for i in 0..50 {
            let a = auditor.clone();
            handles.push(tokio::spawn(async move {
                a.append(entry(&format!("r{i}"))).await.unwrap().seq()
            }));
        }
        let mut seqs = Vec::new();
        for h in handles {
            seqs.push(h.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (0..50).collect::<Vec<_>>());
        let cp = auditor.checkpoint().await.unwrap();
        assert_eq!(cp.checkpoint.tree_size, 50);
        drop(auditor);
        let auditor = open(settings(dir.path()), &keys).await;
        assert_eq!(auditor.log().size(), 50);
        assert_eq!(auditor.log().latest_checkpoint().unwrap().unwrap(), cp);
        let next = auditor.append(entry("x")).await.unwrap();
        assert_eq!(next.seq(), 50);
    }

    /// Every proof reads one tile per tier: the writer puts each tile above the
    /// bottom tier into the readers' cache as it completes it, and opening the log
    /// reads them back, so no proof reads one from its file, even the first after
    /// a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_upper_tiles_are_cached_as_the_writer_completes_them_and_when_the_log_opens() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        let auditor = open(settings(dir.path()), &keys).await;
        let appends: Vec<_> = (0..600)
            .map(|i| {
                let a = auditor.clone();
                tokio::spawn(async move { a.append(entry(&format!("r{i}"))).await.unwrap() })
            })
            .collect();
        for a in appends {
            a.await.unwrap();
        }
        let live = auditor.log().open.load_full().expect("open");
        // Tier 1 tiles cover 256 entries each: two are complete, the third is not.
        for index in 0..2 {
            let id = tiles::TileId { tier: 1, index };
            let cached = live.tiles.get(id).expect("cached by the writer");
            let stored = tiles::read_full_tile(&*live.files, id).unwrap();
            assert_eq!(cached, &stored[..]);
        }
        assert!(live
            .tiles
            .get(tiles::TileId { tier: 1, index: 2 })
            .is_none());
        auditor.close().await;
        drop((auditor, live));

        let auditor = open(settings(dir.path()), &keys).await;
        let live = auditor.log().open.load_full().expect("open");
        for index in 0..2 {
            let id = tiles::TileId { tier: 1, index };
            let cached = live.tiles.get(id).expect("read back when the log opened");
            assert_eq!(
                cached,
                &tiles::read_full_tile(&*live.files, id).unwrap()[..]
            );
        }
        assert!(live
            .tiles
            .get(tiles::TileId { tier: 1, index: 2 })
            .is_none());
        // No tile of the bottom tier is taken into the cache.
        assert!(live
            .tiles
            .get(tiles::TileId { tier: 0, index: 0 })
            .is_none());
        auditor.close().await;
    }

    /// A closed log of ten entries, request ids `r0` to `r9`: its folder and keys.
    async fn closed_log_of_ten() -> (tempfile::TempDir, Arc<Keys>) {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        let auditor = open(settings(dir.path()), &keys).await;
        for i in 0..10 {
            auditor.append(entry(&format!("r{i}"))).await.unwrap();
        }
        auditor.close().await;
        (dir, keys)
    }

    /// Opens the database of a log just closed, retrying while sled still holds
    /// its file lock.
    async fn open_closed_database(audit: &Path) -> Database {
        for _ in 0..100 {
            if let Ok(opened) = open_database(audit, 1 << 20) {
                return opened;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the closed log's database does not open");
    }

    /// A log written before the entry file holds its chunks inline in sled, and
    /// its size in the main tree. It still reads and verifies; the commits after
    /// it go on from its size, with their chunks in the file, and the whole log
    /// verifies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_with_its_chunks_in_sled_reads_and_grows_in_the_entry_file() {
        let (dir, keys) = closed_log_of_ten().await;
        let audit = dir.path().join("audit");
        {
            // The chunks and the size back where the earlier layouts kept them.
            let opened = open_closed_database(&audit).await;
            let mut moved = 0;
            for kv in opened.tree.scan_prefix([log::ENTRY]) {
                let (key, value) = kv.unwrap();
                assert!(entry_file::ChunkPointer::decode(&value).is_some());
                let chunk = log::chunk_bytes(value, &opened.entries).unwrap();
                opened.tree.insert(key, chunk).unwrap();
                moved += 1;
            }
            assert!(moved >= 1);
            let size = opened.sizes.remove(log::SIZE).unwrap().expect("a size");
            assert_eq!(log::read_u64(&size), Some(10));
            opened.tree.insert(log::SIZE, size).unwrap();
            opened.tree.flush().unwrap();
            std::fs::remove_file(audit.join(entry_file::FILE_NAME)).unwrap();
        }
        let auditor = open(settings(dir.path()), &keys).await;
        for i in 10..20 {
            auditor.append(entry(&format!("r{i}"))).await.unwrap();
        }
        let log = auditor.log().clone();
        for seq in 0..20 {
            assert_eq!(log.entry(seq).unwrap().request_id, format!("r{seq}"));
        }
        auditor.close().await;
        drop((auditor, log));
        let mut verified = crate::audit::verify::verify_data_dir(dir.path(), None, None);
        for _ in 0..100 {
            match &verified {
                Err(f) if f.cannot_check => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    verified = crate::audit::verify::verify_data_dir(dir.path(), None, None);
                }
                _ => break,
            }
        }
        assert_eq!(verified.unwrap().entries, 20);
        let (first, last) = {
            let opened = open_database(&audit, 1 << 20).unwrap();
            let mut values = opened
                .tree
                .scan_prefix([log::ENTRY])
                .map(|kv| kv.unwrap().1);
            (values.next().unwrap(), values.next_back().unwrap())
        };
        assert!(entry_file::ChunkPointer::decode(&first).is_none(), "inline");
        assert!(
            entry_file::ChunkPointer::decode(&last).is_some(),
            "in the file"
        );
        assert!(
            std::fs::metadata(audit.join(entry_file::FILE_NAME))
                .unwrap()
                .len()
                > 0
        );
    }

    /// A log written before the round's lists were merged has one list per
    /// commit in sled, 8 bytes a seq; the merged list of the same seqs may sit
    /// beside them after an upgrade replays its last round. Each seq still comes
    /// once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_lists_from_an_older_layout_give_each_seq_once() {
        let (dir, keys) = closed_log_of_ten().await;
        let prefix = log::action_index_prefix(AuditAction::TlsReloaded as i32);
        {
            let audit = dir.path().join("audit");
            let opened = open_closed_database(&audit).await;
            let eight_bytes_a_seq: Vec<u8> =
                [3u64, 4].iter().flat_map(|s| s.to_be_bytes()).collect();
            opened
                .tree
                .insert(log::posting_key(prefix.clone(), 3), eight_bytes_a_seq)
                .unwrap();
            opened.tree.flush().unwrap();
        }
        let auditor = open(settings(dir.path()), &keys).await;
        let got: Vec<u64> = auditor
            .log()
            .index_seqs(prefix, 0, 10)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    /// What each index (child, actor, target, action) gives for every value the
    /// entries use, against a scan of every entry: the index must give exactly the
    /// seqs whose entries carry the value, from seq 0 and from a seq part-way.
    fn check_indexes(log: &AuditLog) {
        let size = log.size();
        let mut expected: std::collections::BTreeMap<Vec<u8>, Vec<u64>> = Default::default();
        for seq in 0..size {
            let e = log.entry(seq).unwrap();
            let mut add = |prefix: Vec<u8>| expected.entry(prefix).or_default().push(seq);
            if !e.subject_ref.is_empty() {
                add(log::subject_index_prefix(&e.subject_ref));
            }
            add(log::text_index_prefix(log::BY_ACTOR, &e.actor_id));
            if !e.target_agency_id.is_empty() {
                add(log::text_index_prefix(log::BY_TARGET, &e.target_agency_id));
            }
            add(log::action_index_prefix(e.action));
        }
        assert!(expected.len() >= 8, "the entries use several index values");
        for (prefix, seqs) in expected {
            let got: Vec<u64> = log
                .index_seqs(prefix.clone(), 0, size)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got, seqs, "index {:?}", String::from_utf8_lossy(&prefix));
            let from = size / 3;
            let got: Vec<u64> = log
                .index_seqs(prefix.clone(), from, size)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let want: Vec<u64> = seqs.into_iter().filter(|&s| s >= from).collect();
            assert_eq!(
                got,
                want,
                "index {:?} from {from}",
                String::from_utf8_lossy(&prefix)
            );
        }
    }

    /// A small write-ahead file starts over many times under load; what it held
    /// each time must already be in sled and the tile files, so a reopen (which
    /// replays only the current round) finds the same log, the same root and
    /// proofs that verify against it, and the same answers from every index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_rounds_of_the_write_ahead_file_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(Keys::load_or_create(dir.path(), None).unwrap());
        let small = AuditSettings {
            wal_bytes: 64 * 1024,
            ..settings(dir.path())
        };
        // Entries of over 200 bytes, so 3,200 of them are many times 64 KiB, about
        // 7 children, by 3 actors, 2 targets or none, with 2 actions.
        let long_entry = |id: &str| {
            let mut e = entry(id);
            e.reason = "x".repeat(200);
            let n = id.bytes().map(usize::from).sum::<usize>();
            e.subject = Some(crate::store::keys::SubjectRef::from_hex(format!(
                "{:064x}",
                n % 7
            )));
            e.actor.id = format!("agency-{}", n % 3);
            e.target_agency_id = ["", "school", "police"][n % 3].to_owned();
            if n % 2 == 0 {
                e.action = AuditAction::RecordDisclosed;
            }
            e
        };
        let auditor = open(small.clone(), &keys).await;
        let mut tasks = Vec::new();
        for w in 0..16 {
            let a = auditor.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200 {
                    a.append(long_entry(&format!("r{w}-{i}"))).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(auditor.log().size(), 3200);
        // Indexes span many rounds in sled and the current one in memory.
        check_indexes(auditor.log());
        // Each round end is counted and timed for the metrics.
        use std::sync::atomic::Ordering::Relaxed;
        let stats = auditor.stats();
        let rounds = stats.round_ends.load(Relaxed);
        assert!(
            rounds >= 5,
            "3,200 long entries fill 64 KiB many times: {rounds} round ends"
        );
        let (total, max) = (
            stats.round_end_micros.load(Relaxed),
            stats.round_end_max_micros.load(Relaxed),
        );
        assert!(max > 0 && max <= total, "longest {max} µs of {total} µs");
        // The file has started over: its round no longer begins at the first commit.
        let live = dir.path().join("audit");
        let first_lsn = || {
            use std::os::unix::fs::FileExt;
            let mut lsn = [0u8; 8];
            std::fs::File::open(wal::path(&live))
                .unwrap()
                .read_exact_at(&mut lsn, 8)
                .unwrap();
            u64::from_be_bytes(lsn)
        };
        let started = first_lsn();
        assert!(started > 0, "the write-ahead file never started over");
        // Then one entry at a time until the file starts over once more, and no
        // further: the last commits are then only in sled (and the tile files),
        // which must have been made durable before the file let go of them.
        let mut n = 0;
        while first_lsn() == started {
            auditor.append(long_entry(&format!("s{n}"))).await.unwrap();
            n += 1;
            assert!(n < 10_000, "the file never started over again");
        }
        // A copy taken now, with the writer still running, is what a crash would
        // leave: only what reached the files (sled's own buffers in memory are
        // lost). Taken once right after the file started over (the last commits
        // are then only in sled), and once a few commits into the new round (which
        // only the write-ahead file holds).
        let crash_copy = || {
            let copy = tempfile::tempdir().unwrap();
            for file in std::fs::read_dir(&live).unwrap() {
                let file = file.unwrap();
                if file.file_type().unwrap().is_file() {
                    std::fs::copy(file.path(), copy.path().join(file.file_name())).unwrap();
                }
            }
            std::fs::create_dir_all(copy.path().join("blobs")).unwrap();
            (copy, auditor.log().size())
        };
        let mut copies = vec![crash_copy()];
        for i in 0..5 {
            auditor.append(long_entry(&format!("t{i}"))).await.unwrap();
        }
        copies.push(crash_copy());
        check_indexes(auditor.log());

        for (copy, size) in copies {
            let root = auditor.log().root(size).unwrap();
            let crashed = AuditSettings {
                dir: copy.path().to_owned(),
                ..small.clone()
            };
            let reopened = open(crashed, &keys).await;
            let log = reopened.log();
            assert_eq!(log.size(), size);
            assert_eq!(log.root(size).unwrap(), root);
            for seq in [0, 1, 17, 255, 256, 1000, 3071, 3199, size - 1] {
                let (leaf, path) = log.inclusion_proof(seq, size).unwrap();
                merkle::verify_inclusion(seq, size, &leaf, &path, &root).unwrap();
            }
            check_indexes(log);
        }
        drop(auditor);
    }
}
