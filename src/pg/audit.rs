//! The audit log in PostgreSQL, appended to by any number of replicas at once.
//!
//! # Tables (migration 1)
//! | table | rows |
//! | --- | --- |
//! | `audit_head` | one row: the committed `size`, the time of the last entry, the origin (`log_id`) |
//! | `audit_entries` | one per seq: the canonical bytes sealed (AES-256-GCM, the seq as associated data, exactly as in the sled store) and the index columns |
//! | `audit_tiles` | Merkle nodes, C2SP tlog-tiles shape: `(level, tile_index)` holds the hashes of up to 64 consecutive complete subtrees of one level |
//! | `audit_checkpoints` | signed checkpoints, by tree size |
//!
//! # One group commit = one transaction
//! [`PgAuditLog::append_batch`] runs at READ COMMITTED:
//! 1. `SELECT size, last_time_micros FROM audit_head ... FOR UPDATE`: from here on
//!    this replica is the only writer until it commits or rolls back, and every
//!    later statement sees everything the previous holder committed;
//! 2. one query for the tiles the batch touches (the frontier: at most two per
//!    level, plus the ones the batch fills);
//! 3. in memory: each entry gets the next seq and the time `max(now, last_time)`
//!    (so time never decreases with seq, whichever replica's clock is ahead), its
//!    leaf and the nodes it completes ([`merkle::nodes_completed_by_append`]), and
//!    its sealed bytes;
//! 4. three pipelined statements: insert the entries (one `unnest` insert), upsert
//!    the tiles (a tile may only grow: the stored hashes must be a prefix of the new
//!    ones), set the new size and time;
//! 5. COMMIT, with `synchronous_commit=on` (set on every session, see
//!    [`super::config`]): when it returns the batch is durable.
//!
//! Seqs are dense and unique across replicas because they come from the locked
//! head and the head moves only in the same transaction as the rows; a replica that
//! dies mid-transaction rolls back (the server aborts the transaction when the
//! connection drops, or after `idle_in_transaction_session_timeout`).
//!
//! # Reads
//! Which nodes a root or proof needs depends only on sizes and indexes, so a read
//! first runs the [`merkle`] function against a recorder that answers zeros, fetches
//! every tile the recorder saw in **one** query, and runs the function again over
//! those tiles: O(log n) rows, two round trips with the size check.
//!
//! Auditors' queries ([`PgAuditLog::query`]) have the sled log's semantics
//! (`crate::audit::query::run`) and page tokens: the same driving index (the first
//! of subject, target, actor, action that the filter sets, read in seq order from
//! its `(column, seq)` index, or the primary key with none: `ScanBy`), the same
//! scan bound counted in rows of that index, the other filters checked on the
//! opened entry. Time bounds become a seq range by searching the opened entries'
//! times (never decreasing with seq), 16 probes per round trip.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::{GenericClient, Pool};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::IsolationLevel;

use super::config::{PgConfig, PgError};
use super::describe;
use crate::audit::checkpoint::{self, Checkpoint, SignedCheckpoint};
use crate::audit::entry::{canonical_bytes, micros_from_timestamp, NewEntry};
use crate::audit::log::seal_context;
use crate::audit::merkle::{self, Hash, MemoryTree, NodeSource};
use crate::audit::query::{self, Filter, Page};
use crate::audit::AuditError;
use crate::domain::Clock;
use crate::proto::v1::AuditEntry;
use crate::store::Keys;

/// Hashes per tile: one level each, 64 wide (the C2SP tlog-tiles width). Not the
/// sled store's layout, which uses tall tiles (four levels of 16 + 8 + 4 + 2 nodes,
/// full tiles only, see `crate::audit::tiles`): the two stores hold the same node
/// hashes, so roots and proofs agree, but their tiles are not interchangeable.
pub const TILE_WIDTH: u64 = 64;

/// Entries read per query when verifying.
const VERIFY_PAGE: i64 = 5_000;

const LOCK_HEAD: &str = "SELECT size, last_time_micros FROM audit_head WHERE id = 1 FOR UPDATE";
const SELECT_TILES: &str = "SELECT level, tile_index, hashes FROM audit_tiles \
     WHERE (level, tile_index) IN (SELECT * FROM unnest($1::int2[], $2::int8[]))";
const INSERT_ENTRIES: &str = "INSERT INTO audit_entries \
     (seq, time_micros, sealed, subject_ref, actor_id, target_agency_id, action) \
     SELECT * FROM unnest($1::int8[], $2::int8[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::int4[])";
const UPSERT_TILES: &str = "INSERT INTO audit_tiles AS t (level, tile_index, hashes) \
     SELECT * FROM unnest($1::int2[], $2::int8[], $3::bytea[]) \
     ON CONFLICT (level, tile_index) DO UPDATE SET hashes = EXCLUDED.hashes \
     WHERE length(EXCLUDED.hashes) > length(t.hashes) \
       AND substring(EXCLUDED.hashes FROM 1 FOR length(t.hashes)) = t.hashes";
const UPDATE_HEAD: &str = "UPDATE audit_head SET size = $1, last_time_micros = $2 WHERE id = 1";
const SELECT_SIZE: &str = "SELECT size FROM audit_head WHERE id = 1";
const SELECT_ENTRY: &str = "SELECT h.size, e.sealed FROM audit_head h \
     LEFT JOIN audit_entries e ON e.seq = $1 WHERE h.id = 1";
/// Entries `[$1, $2)` with the size read in the same statement (one snapshot): one
/// row with a NULL seq when the range holds none.
const SELECT_RANGE: &str = "SELECT h.size, e.seq, e.sealed FROM audit_head h \
     LEFT JOIN audit_entries e ON e.seq >= $1 AND e.seq < $2 WHERE h.id = 1 ORDER BY e.seq";
const SELECT_SEQS: &str =
    "SELECT seq, sealed FROM audit_entries WHERE seq = ANY($1::int8[]) ORDER BY seq";

/// Rows one query of a page's scan reads at most (the page's `max_scan` bounds the
/// rows of all its queries together).
const SCAN_CHUNK: usize = 1_024;
/// Seqs probed per round trip when a time bound is turned into a seq.
const TIME_PROBES: u64 = 16;

/// Where an appended entry went: its seq (Merkle leaf index) and time. Returned only
/// after the transaction that wrote it has committed durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The entry's sequence number.
    pub seq: u64,
    /// The entry's time, microseconds since the epoch.
    pub time_micros: i64,
}

/// Settings of the log.
#[derive(Debug, Clone)]
pub struct PgAuditSettings {
    /// The checkpoints' origin name; the first replica to open the log fixes it.
    pub log_id: String,
    /// The most entries in one transaction.
    pub max_batch: usize,
}

impl Default for PgAuditSettings {
    fn default() -> Self {
        PgAuditSettings {
            log_id: "sgw".to_owned(),
            max_batch: 512,
        }
    }
}

/// Group-commit statistics of this replica: the sled writer's [`CommitStats`], with
/// `sync_micros` the time from taking a connection to COMMIT returning.
pub type PgCommitStats = crate::audit::writer::CommitStats;

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Entries verified.
    pub entries: u64,
    /// The root of the whole log, recomputed from the entries.
    pub root: Hash,
    /// Stored checkpoints verified.
    pub checkpoints: usize,
    /// The log's origin name.
    pub log_id: String,
}

type Reply = oneshot::Sender<Result<Appended, AuditError>>;

/// The audit log in PostgreSQL. Cheap to clone; every clone shares one group-commit
/// writer task (per replica) and one pool.
#[derive(Clone)]
pub struct PgAuditLog {
    inner: Arc<Inner>,
    tx: mpsc::Sender<(NewEntry, Reply)>,
}

struct Inner {
    pool: Pool,
    keys: Arc<Keys>,
    clock: Arc<dyn Clock>,
    log_id: String,
    stats: Arc<PgCommitStats>,
}

impl PgAuditLog {
    /// Connects, applies migrations, fixes the origin name if the log is new, and
    /// starts this replica's group-commit writer task.
    pub async fn open(
        config: &PgConfig,
        settings: PgAuditSettings,
        keys: Arc<Keys>,
        clock: Arc<dyn Clock>,
    ) -> Result<PgAuditLog, PgError> {
        let pool = config.pool()?;
        Self::open_pool(pool, settings, keys, clock).await
    }

    /// [`PgAuditLog::open`] over an existing pool.
    pub async fn open_pool(
        pool: Pool,
        settings: PgAuditSettings,
        keys: Arc<Keys>,
        clock: Arc<dyn Clock>,
    ) -> Result<PgAuditLog, PgError> {
        super::migrate::migrate(&pool).await?;
        let client = pool
            .get()
            .await
            .map_err(|e| PgError::Connect(e.to_string()))?;
        let pg = |e: tokio_postgres::Error| PgError::Connect(describe(&e));
        client
            .execute(
                "UPDATE audit_head SET origin = $1 WHERE id = 1 AND origin IS NULL",
                &[&settings.log_id],
            )
            .await
            .map_err(pg)?;
        let origin: String = client
            .query_one("SELECT origin FROM audit_head WHERE id = 1", &[])
            .await
            .map_err(pg)?
            .get(0);
        if origin != settings.log_id {
            tracing::warn!(stored = %origin, configured = %settings.log_id, "audit log_id differs from the log's origin; keeping the origin");
        }
        drop(client);
        let inner = Arc::new(Inner {
            pool,
            keys,
            clock,
            log_id: origin,
            stats: Arc::new(PgCommitStats::default()),
        });
        let max_batch = settings.max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch * 4);
        tokio::spawn(writer(inner.clone(), rx, max_batch));
        Ok(PgAuditLog { inner, tx })
    }

    /// Appends `entry` through this replica's group-commit writer; returns once the
    /// transaction holding it has committed. On [`AuditError::Unavailable`] the
    /// caller must not disclose anything (the entry may or may not be in the log when
    /// the failure was the COMMIT's answer being lost).
    pub async fn append(&self, entry: NewEntry) -> Result<Appended, AuditError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || AuditError::Unavailable("the audit writer has stopped".into());
        self.tx.send((entry, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Appends `entries` in one transaction (see the module documentation); returns
    /// each entry's seq and time, in order, once COMMIT has returned.
    pub async fn append_batch(&self, entries: Vec<NewEntry>) -> Result<Vec<Appended>, AuditError> {
        self.inner.append_batch(entries).await
    }

    /// The log's origin name in checkpoints.
    pub fn log_id(&self) -> &str {
        &self.inner.log_id
    }

    /// The pool (shared with the rest of this replica's PostgreSQL storage).
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// This replica's group-commit statistics.
    pub fn stats(&self) -> &Arc<PgCommitStats> {
        &self.inner.stats
    }

    /// The number of committed entries (all replicas').
    pub async fn size(&self) -> Result<u64, AuditError> {
        let client = self.inner.client().await?;
        let row = client
            .query_one(&prepare(&client, SELECT_SIZE).await?, &[])
            .await
            .map_err(unavailable)?;
        to_u64(row.get(0), "tree size")
    }

    /// Entry `seq`, opened and decoded, with `canonical` filled in.
    pub async fn entry(&self, seq: u64) -> Result<AuditEntry, AuditError> {
        let client = self.inner.client().await?;
        let row = client
            .query_one(&prepare(&client, SELECT_ENTRY).await?, &[&to_i64(seq)?])
            .await
            .map_err(unavailable)?;
        let size = to_u64(row.get(0), "tree size")?;
        if seq >= size {
            return Err(AuditError::OutOfRange(format!(
                "seq {seq} is beyond the log's {size} entries"
            )));
        }
        let sealed: Option<Vec<u8>> = row.get(1);
        let sealed =
            sealed.ok_or_else(|| AuditError::Corrupt(format!("seq {seq}: entry missing")))?;
        open_entry(&self.inner.keys, seq, &sealed)
    }

    /// Entries `[from, to)`, oldest first, each opened and checked as
    /// [`PgAuditLog::entry`] does, read in one statement (so meant for ranges of a few
    /// hundred: the whole range is held in memory). `OutOfRange` when `to` is beyond
    /// the log's size or `from > to`.
    pub async fn entries(&self, from: u64, to: u64) -> Result<Vec<AuditEntry>, AuditError> {
        if from > to {
            return Err(AuditError::OutOfRange(format!(
                "from {from} is greater than to {to}"
            )));
        }
        let client = self.inner.client().await?;
        let rows = client
            .query(
                &prepare(&client, SELECT_RANGE).await?,
                &[&to_i64(from)?, &to_i64(to)?],
            )
            .await
            .map_err(unavailable)?;
        let size = match rows.first() {
            Some(row) => to_u64(row.get(0), "tree size")?,
            None => return Err(AuditError::Corrupt("the audit head row is missing".into())),
        };
        if to > size {
            return Err(AuditError::OutOfRange(format!(
                "to {to} is beyond the log's {size} entries"
            )));
        }
        let mut entries = Vec::with_capacity(((to - from) as usize).min(4_096));
        let mut next = from;
        for row in &rows {
            let (Some(seq), Some(sealed)) =
                (row.get::<_, Option<i64>>(1), row.get::<_, Option<&[u8]>>(2))
            else {
                continue;
            };
            if to_u64(seq, "seq")? != next {
                return Err(corrupt(next, "entry missing"));
            }
            entries.push(open_entry(&self.inner.keys, next, sealed)?);
            next += 1;
        }
        if next != to {
            return Err(corrupt(next, "entry missing"));
        }
        Ok(entries)
    }

    /// One page of an auditor's query, with exactly the semantics and page tokens of
    /// the sled log's `crate::audit::query::run` (see the module documentation): the
    /// matching entries, oldest first, at most `page_size` of them, examining at most
    /// `max_scan` rows of the driving index (a short, even empty, page with a token
    /// when that bound is hit), and a token only when there may be more below the
    /// size read at the start. Every entry is opened and checked as
    /// [`PgAuditLog::entry`] does and must pass `filter` itself, so an altered index
    /// column can hide an entry but never bring in one that does not match.
    pub async fn query(
        &self,
        filter: &Filter,
        page_token: &str,
        page_size: usize,
        max_scan: usize,
    ) -> Result<Page, AuditError> {
        let client = self.inner.client().await?;
        let size = to_u64(
            client
                .query_one(&prepare(&client, SELECT_SIZE).await?, &[])
                .await
                .map_err(unavailable)?
                .get(0),
            "tree size",
        )?;
        let mut lo = if page_token.is_empty() {
            0
        } else {
            query::decode_token(page_token, filter)?
        };
        if let Some(since) = filter.since_micros {
            lo = lo.max(first_seq_at_or_after(&client, &self.inner.keys, since, size).await?);
        }
        let hi = match filter.until_micros {
            Some(until) => first_seq_at_or_after(&client, &self.inner.keys, until, size).await?,
            None => size,
        };
        if lo >= hi {
            return Ok(Page {
                entries: Vec::new(),
                next_page_token: None,
            });
        }
        let by = ScanBy::for_filter(filter);
        let stmt = prepare(&client, by.sql()).await?;
        let hi_param = to_i64(hi)?;
        let mut entries = Vec::with_capacity(page_size.min(1024));
        let mut scanned = 0usize;
        let mut from = lo;
        // The first query asks for as many rows as the page holds (each matches
        // unless another filter or an altered column rejects it); later ones for
        // twice the last, up to SCAN_CHUNK.
        let mut chunk = page_size.clamp(1, SCAN_CHUNK);
        loop {
            let want = chunk.min(max_scan.saturating_sub(scanned).max(1));
            let (from_param, limit) = (to_i64(from)?, want as i64);
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&from_param, &hi_param, &limit];
            params.extend(by.value());
            let rows = client.query(&stmt, &params).await.map_err(unavailable)?;
            let got = rows.len();
            for row in rows {
                let seq = to_u64(row.get(0), "seq")?;
                if matches!(by, ScanBy::Seq) && seq != from {
                    // Without an index every seq of the range is read, as the sled
                    // log reads them: a gap is damage.
                    return Err(corrupt(from, "entry missing"));
                }
                let entry = open_entry(&self.inner.keys, seq, row.get(1))?;
                if filter.matches(&entry) {
                    entries.push(entry);
                }
                scanned += 1;
                if entries.len() >= page_size || scanned >= max_scan {
                    let next = seq + 1;
                    return Ok(Page {
                        entries,
                        next_page_token: (next < hi).then(|| query::encode_token(next, filter)),
                    });
                }
                from = seq + 1;
            }
            if got < want {
                if matches!(by, ScanBy::Seq) && from < hi {
                    return Err(corrupt(from, "entry missing"));
                }
                return Ok(Page {
                    entries,
                    next_page_token: None,
                });
            }
            chunk = chunk.saturating_mul(2).min(SCAN_CHUNK);
        }
    }

    /// The root of the first `size` entries.
    pub async fn root(&self, size: u64) -> Result<Hash, AuditError> {
        let client = self.inner.client().await?;
        check_size(&client, "tree_size", size).await?;
        let rec = Recorder::default();
        let _ = merkle::root(size, &rec);
        let tiles = fetch_tiles(&client, rec.tiles()).await?;
        merkle::root(size, &tiles)
    }

    /// Leaf hash and audit path of entry `seq` in the tree of `tree_size`.
    pub async fn inclusion_proof(
        &self,
        seq: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AuditError> {
        let client = self.inner.client().await?;
        check_size(&client, "tree_size", tree_size).await?;
        if seq >= tree_size {
            return Err(AuditError::OutOfRange(format!(
                "seq {seq} is not below tree_size {tree_size}"
            )));
        }
        let rec = Recorder::default();
        let _ = rec.node(0, seq);
        let _ = merkle::inclusion_proof(seq, tree_size, &rec);
        let tiles = fetch_tiles(&client, rec.tiles()).await?;
        let leaf = tiles.node(0, seq)?;
        let proof = merkle::inclusion_proof(seq, tree_size, &tiles).map_err(tree_error)?;
        Ok((leaf, proof))
    }

    /// Consistency proof between two sizes.
    pub async fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, AuditError> {
        let client = self.inner.client().await?;
        check_size(&client, "to_size", to).await?;
        if from > to {
            return Err(AuditError::OutOfRange(format!(
                "from_size {from} is greater than to_size {to}"
            )));
        }
        if from == 0 && to > 0 {
            return Err(AuditError::OutOfRange(
                merkle::ProofError::FromEmptyTree { to }.to_string(),
            ));
        }
        let rec = Recorder::default();
        let _ = merkle::consistency_proof(from, to, &rec);
        let tiles = fetch_tiles(&client, rec.tiles()).await?;
        merkle::consistency_proof(from, to, &tiles).map_err(tree_error)
    }

    /// Signs a checkpoint of the current size and stores it, if `lease` is held by
    /// its holder now (checked, and kept locked, in the same transaction as the
    /// insert, so two replicas never both sign: the one without the lease gets
    /// `None`). All replicas serve stored checkpoints.
    pub async fn checkpoint_if_holder(
        &self,
        lease: &super::lease::Lease,
    ) -> Result<Option<SignedCheckpoint>, AuditError> {
        let mut client = self.inner.client().await?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(unavailable)?;
        if !lease.held_in(&tx).await.map_err(unavailable)? {
            tx.rollback().await.map_err(unavailable)?;
            return Ok(None);
        }
        let size = to_u64(
            tx.query_one(SELECT_SIZE, &[])
                .await
                .map_err(unavailable)?
                .get(0),
            "tree size",
        )?;
        let rec = Recorder::default();
        let _ = merkle::root(size, &rec);
        let tiles = fetch_tiles(&tx, rec.tiles()).await?;
        let root = merkle::root(size, &tiles)?;
        let now = self.inner.clock.now().unix_timestamp().max(0) as u64;
        let signed = Checkpoint {
            log_id: self.inner.log_id.clone(),
            tree_size: size,
            root_hash: root,
            timestamp: now,
        }
        .sign(&self.inner.keys.checkpoint)
        .map_err(|e| AuditError::Unavailable(e.to_string()))?;
        tx.execute(
            "INSERT INTO audit_checkpoints (tree_size, timestamp_secs, root_hash, signature, public_key) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tree_size) DO NOTHING",
            &[
                &to_i64(size)?,
                &to_i64(now)?,
                &root.as_slice(),
                &signed.signature.as_slice(),
                &signed.public_key.as_slice(),
            ],
        )
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(signed))
    }

    /// The newest stored checkpoint, if any.
    pub async fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, AuditError> {
        Ok(self.read_checkpoints(true).await?.pop())
    }

    /// Every stored checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<SignedCheckpoint>, AuditError> {
        self.read_checkpoints(false).await
    }

    async fn read_checkpoints(&self, latest: bool) -> Result<Vec<SignedCheckpoint>, AuditError> {
        let client = self.inner.client().await?;
        read_checkpoints(&client, &self.inner.log_id, latest).await
    }

    /// Verifies the whole log from the rows: every entry opens under its seq,
    /// decodes to that seq, agrees with its index columns, and times never decrease;
    /// there is no gap and nothing past the head; the tree rebuilt from the entries
    /// equals every stored tile; every stored checkpoint is signed by this log's key
    /// and has the rebuilt root at its size. The first problem is the error
    /// ([`AuditError::Corrupt`], naming the seq where there is one).
    ///
    /// Reads everything inside one read-only REPEATABLE READ transaction: one
    /// snapshot, so it can run while replicas append (it checks the log as it was
    /// when it started).
    pub async fn verify(&self) -> Result<VerifySummary, AuditError> {
        let mut conn = self.inner.client().await?;
        let client = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(unavailable)?;
        let head = client
            .query_one(
                "SELECT size, last_time_micros, origin FROM audit_head WHERE id = 1",
                &[],
            )
            .await
            .map_err(unavailable)?;
        let size = to_u64(head.get(0), "tree size")?;
        let head_time: i64 = head.get(1);
        let mut tree = MemoryTree::new();
        let mut last_time = i64::MIN;
        loop {
            let from = tree.size();
            let rows = client
                .query(
                    "SELECT seq, time_micros, sealed, subject_ref, actor_id, target_agency_id, action \
                     FROM audit_entries WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    &[&to_i64(from)?, &VERIFY_PAGE],
                )
                .await
                .map_err(unavailable)?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let expected = tree.size();
                let seq = r.get::<_, i64>(0);
                if seq != expected as i64 {
                    return Err(corrupt(
                        expected,
                        "entry missing (the next stored seq is later)",
                    ));
                }
                if expected >= size {
                    return Err(corrupt(
                        expected,
                        format!("entry stored past the head's size {size}"),
                    ));
                }
                let entry = open_entry(&self.inner.keys, expected, r.get(2))?;
                let time = entry
                    .time
                    .as_ref()
                    .map(micros_from_timestamp)
                    .unwrap_or(i64::MIN);
                if time < last_time {
                    return Err(corrupt(expected, "time goes backwards"));
                }
                last_time = time;
                let columns_agree = r.get::<_, i64>(1) == time
                    && r.get::<_, Option<&str>>(3) == non_empty(&entry.subject_ref)
                    && r.get::<_, &str>(4) == entry.actor_id
                    && r.get::<_, Option<&str>>(5) == non_empty(&entry.target_agency_id)
                    && r.get::<_, i32>(6) == entry.action;
                if !columns_agree {
                    return Err(corrupt(expected, "index columns do not match the entry"));
                }
                tree.append(merkle::leaf_hash(&entry.canonical));
            }
        }
        if tree.size() != size {
            return Err(corrupt(
                tree.size(),
                format!("entry missing below the head's size {size}"),
            ));
        }
        if size > 0 && head_time != last_time {
            return Err(AuditError::Corrupt(
                "the head's last time is not the last entry's".into(),
            ));
        }
        // Every stored tile must hold exactly the nodes the rebuilt tree has.
        let tiles = client
            .query(
                "SELECT level, tile_index, hashes FROM audit_tiles ORDER BY level, tile_index",
                &[],
            )
            .await
            .map_err(unavailable)?;
        let mut seen = 0u64;
        for r in &tiles {
            let level = u8::try_from(r.get::<_, i16>(0))
                .map_err(|_| AuditError::Corrupt("tile level out of range".into()))?;
            let tile = to_u64(r.get(1), "tile index")?;
            let hashes: &[u8] = r.get(2);
            let nodes = if level < 64 { size >> level } else { 0 };
            let expected_len = nodes
                .saturating_sub(tile.saturating_mul(TILE_WIDTH))
                .min(TILE_WIDTH);
            if expected_len == 0 || hashes.len() as u64 != expected_len * 32 {
                return Err(AuditError::Corrupt(format!(
                    "Merkle tile {level}/{tile} holds {} hashes, expected {expected_len}",
                    hashes.len() / 32
                )));
            }
            for (slot, stored) in hashes.chunks_exact(32).enumerate() {
                let index = tile * TILE_WIDTH + slot as u64;
                let rebuilt = tree
                    .node(level, index)
                    .map_err(|e| AuditError::Corrupt(e.to_string()))?;
                if !merkle::hashes_equal(&rebuilt, stored.try_into().expect("32-byte chunk")) {
                    let first = index << level;
                    return Err(corrupt(
                        first,
                        format!("stored Merkle node {level}/{index} differs from the entries (leaves from seq {first})"),
                    ));
                }
            }
            seen += 1;
        }
        let expected_tiles: u64 = (0..64u32).map(|l| (size >> l).div_ceil(TILE_WIDTH)).sum();
        if seen != expected_tiles {
            return Err(AuditError::Corrupt(format!(
                "{seen} Merkle tiles stored, expected {expected_tiles}"
            )));
        }
        let root = tree.root();
        let public_key = checkpoint::public_key_of(&self.inner.keys.checkpoint);
        let checkpoints = read_checkpoints(&client, &self.inner.log_id, false).await?;
        for cp in &checkpoints {
            let n = cp.checkpoint.tree_size;
            checkpoint::verify(&public_key, cp)
                .map_err(|e| AuditError::Corrupt(format!("checkpoint at size {n}: {e}")))?;
            if n > size {
                return Err(AuditError::Corrupt(format!(
                    "checkpoint at size {n} is past the log's {size} entries (rolled back?)"
                )));
            }
            let at = merkle::root(n, &tree).map_err(|e| AuditError::Corrupt(e.to_string()))?;
            if !merkle::hashes_equal(&at, &cp.checkpoint.root_hash) {
                return Err(AuditError::Corrupt(format!(
                    "checkpoint at size {n}: its root is not the entries' root"
                )));
            }
        }
        Ok(VerifySummary {
            entries: size,
            root,
            checkpoints: checkpoints.len(),
            log_id: self.inner.log_id.clone(),
        })
    }
}

impl Inner {
    async fn client(&self) -> Result<deadpool_postgres::Object, AuditError> {
        self.pool
            .get()
            .await
            .map_err(|e| AuditError::Unavailable(format!("postgres: {e}")))
    }

    async fn append_batch(&self, entries: Vec<NewEntry>) -> Result<Vec<Appended>, AuditError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let mut client = self.client().await?;
        let (lock_head, select_tiles, insert_entries, upsert_tiles, update_head) =
            tokio::try_join!(
                client.prepare_cached(LOCK_HEAD),
                client.prepare_cached(SELECT_TILES),
                client.prepare_cached(INSERT_ENTRIES),
                client.prepare_cached(UPSERT_TILES),
                client.prepare_cached(UPDATE_HEAD),
            )
            .map_err(unavailable)?;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(unavailable)?;
        let head = tx.query_one(&lock_head, &[]).await.map_err(unavailable)?;
        let size = to_u64(head.get(0), "tree size")?;
        let last_time: i64 = head.get(1);
        let n = entries.len() as u64;

        // The tiles this batch reads (left siblings) or extends.
        let rec = Recorder::default();
        for seq in size..size + n {
            let Ok(nodes) = merkle::nodes_completed_by_append(seq, [0; 32], &rec);
            for (level, index, _) in nodes {
                rec.saw(level, index);
            }
        }
        let (levels, indexes) = split_keys(rec.tiles());
        let mut tiles = Tiles::from_rows(
            tx.query(&select_tiles, &[&levels, &indexes])
                .await
                .map_err(unavailable)?,
        )?;

        let time = micros(&*self.clock).max(last_time);
        let mut seqs = Vec::with_capacity(entries.len());
        let mut times = Vec::with_capacity(entries.len());
        let mut sealed = Vec::with_capacity(entries.len());
        let mut subjects = Vec::with_capacity(entries.len());
        let mut actors = Vec::with_capacity(entries.len());
        let mut targets = Vec::with_capacity(entries.len());
        let mut actions = Vec::with_capacity(entries.len());
        let mut appended = Vec::with_capacity(entries.len());
        for (seq, entry) in (size..).zip(entries) {
            let record = entry.into_record(seq, time);
            let canonical = canonical_bytes(&record);
            let leaf = merkle::leaf_hash(&canonical);
            for (level, index, hash) in merkle::nodes_completed_by_append(seq, leaf, &tiles)? {
                tiles.put(level, index, hash)?;
            }
            sealed.push(
                self.keys
                    .audit_seal
                    .seal(&seal_context(seq), &canonical)
                    .map_err(|e| AuditError::Unavailable(e.to_string()))?,
            );
            seqs.push(to_i64(seq)?);
            times.push(time);
            subjects.push(non_empty(&record.subject_ref).map(str::to_owned));
            actors.push(record.actor_id);
            targets.push(non_empty(&record.target_agency_id).map(str::to_owned));
            actions.push(record.action);
            appended.push(Appended {
                seq,
                time_micros: time,
            });
        }
        let (tile_levels, tile_indexes, tile_hashes) = tiles.dirty_rows();
        let new_size = to_i64(size + n)?;
        let entry_params: [&(dyn ToSql + Sync); 7] = [
            &seqs, &times, &sealed, &subjects, &actors, &targets, &actions,
        ];
        let tile_params: [&(dyn ToSql + Sync); 3] = [&tile_levels, &tile_indexes, &tile_hashes];
        let head_params: [&(dyn ToSql + Sync); 2] = [&new_size, &time];
        let (_, upserted, _) = tokio::try_join!(
            tx.execute(&insert_entries, &entry_params),
            tx.execute(&upsert_tiles, &tile_params),
            tx.execute(&update_head, &head_params),
        )
        .map_err(unavailable)?;
        if upserted != tile_levels.len() as u64 {
            return Err(AuditError::Corrupt(format!(
                "a stored Merkle tile was not a prefix of its extension ({upserted} of {} tiles written)",
                tile_levels.len()
            )));
        }
        tx.commit().await.map_err(|e| {
            AuditError::Unavailable(format!("COMMIT failed (outcome unknown): {}", describe(&e)))
        })?;
        self.stats.synced(n as usize, started.elapsed());
        Ok(appended)
    }
}

/// The group-commit writer of one replica: takes whatever has queued (up to
/// `max_batch`), commits it as one transaction, then answers every caller.
async fn writer(inner: Arc<Inner>, mut rx: mpsc::Receiver<(NewEntry, Reply)>, max_batch: usize) {
    let mut queued = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut queued, max_batch).await > 0 {
        let (entries, replies): (Vec<NewEntry>, Vec<Reply>) = queued.drain(..).unzip();
        match inner.append_batch(entries).await {
            Ok(appended) => {
                for (reply, a) in replies.into_iter().zip(appended) {
                    let _ = reply.send(Ok(a));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "postgres audit commit failed");
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The index a query's scan reads: the sled log's choice (`query::run`), in the
/// same order, so both count the same rows against `max_scan`.
enum ScanBy<'a> {
    Subject(&'a str),
    Target(&'a str),
    Actor(&'a str),
    Action(i32),
    /// No column filter: every seq, by the primary key.
    Seq,
}

impl<'a> ScanBy<'a> {
    fn for_filter(filter: &'a Filter) -> ScanBy<'a> {
        if let Some(s) = &filter.subject {
            ScanBy::Subject(s.as_str())
        } else if let Some(t) = &filter.target_agency_id {
            ScanBy::Target(t)
        } else if let Some(a) = &filter.actor_id {
            ScanBy::Actor(a)
        } else if let Some(a) = filter.action {
            ScanBy::Action(a)
        } else {
            ScanBy::Seq
        }
    }

    /// The column's value, `$4` of [`ScanBy::sql`].
    fn value(&self) -> Option<&(dyn ToSql + Sync)> {
        match self {
            ScanBy::Subject(v) | ScanBy::Target(v) | ScanBy::Actor(v) => Some(v),
            ScanBy::Action(a) => Some(a),
            ScanBy::Seq => None,
        }
    }

    /// Parameters: `$1` the first seq, `$2` the end seq (exclusive), `$3` the most
    /// rows, `$4` the column's value (none for [`ScanBy::Seq`]).
    ///
    /// `(col, seq) >= ($4, $1) AND (col, seq) < ($4, $2)` is `col = $4 AND seq >= $1
    /// AND seq < $2` (false for a NULL column), written so that only the
    /// `(col, seq)` index can serve it: with `col = $4` a prepared statement's
    /// generic plan may walk the primary key over the whole seq range and filter,
    /// unbounded work for a rare value. The `IS NOT NULL` lets the partial indexes
    /// serve it.
    fn sql(&self) -> &'static str {
        match self {
            ScanBy::Subject(_) => {
                "SELECT seq, sealed FROM audit_entries WHERE subject_ref IS NOT NULL \
                 AND (subject_ref, seq) >= ($4, $1) AND (subject_ref, seq) < ($4, $2) \
                 ORDER BY subject_ref, seq LIMIT $3"
            }
            ScanBy::Target(_) => {
                "SELECT seq, sealed FROM audit_entries WHERE target_agency_id IS NOT NULL \
                 AND (target_agency_id, seq) >= ($4, $1) AND (target_agency_id, seq) < ($4, $2) \
                 ORDER BY target_agency_id, seq LIMIT $3"
            }
            ScanBy::Actor(_) => {
                "SELECT seq, sealed FROM audit_entries \
                 WHERE (actor_id, seq) >= ($4, $1) AND (actor_id, seq) < ($4, $2) \
                 ORDER BY actor_id, seq LIMIT $3"
            }
            ScanBy::Action(_) => {
                "SELECT seq, sealed FROM audit_entries \
                 WHERE (action, seq) >= ($4, $1) AND (action, seq) < ($4, $2) \
                 ORDER BY action, seq LIMIT $3"
            }
            ScanBy::Seq => {
                "SELECT seq, sealed FROM audit_entries \
                 WHERE seq >= $1 AND seq < $2 ORDER BY seq LIMIT $3"
            }
        }
    }
}

/// The first seq below `size` whose entry's time is at or after `micros` (`size` if
/// none), as the sled log's `first_seq_at_or_after` finds it: times never decrease
/// with seq, and the time read is the opened entry's, not the `time_micros` column.
/// Each round trip reads [`TIME_PROBES`] evenly spaced entries of the range left.
async fn first_seq_at_or_after(
    client: &deadpool_postgres::Object,
    keys: &Keys,
    micros: i64,
    size: u64,
) -> Result<u64, AuditError> {
    let stmt = prepare(client, SELECT_SEQS).await?;
    let (mut lo, mut hi) = (0u64, size);
    while lo < hi {
        let probes = time_probes(lo, hi);
        let params = probes
            .iter()
            .map(|&p| to_i64(p))
            .collect::<Result<Vec<i64>, _>>()?;
        let rows = client.query(&stmt, &[&params]).await.map_err(unavailable)?;
        let mut rows = rows.iter();
        let (mut new_lo, mut new_hi) = (lo, hi);
        for &probe in &probes {
            let row = rows
                .next()
                .filter(|r| r.get::<_, i64>(0) == probe as i64)
                .ok_or_else(|| corrupt(probe, "entry missing"))?;
            let t = open_entry(keys, probe, row.get(1))?
                .time
                .as_ref()
                .map(micros_from_timestamp)
                .unwrap_or(i64::MIN);
            if t < micros {
                new_lo = probe + 1;
            } else {
                new_hi = probe;
                break;
            }
        }
        (lo, hi) = (new_lo, new_hi);
    }
    Ok(lo)
}

/// Up to [`TIME_PROBES`] distinct seqs in `[lo, hi)`, ascending and evenly spaced
/// (all of them when the range is that small).
fn time_probes(lo: u64, hi: u64) -> Vec<u64> {
    let n = hi - lo;
    if n <= TIME_PROBES {
        return (lo..hi).collect();
    }
    // Steps of at least one, since n > TIME_PROBES; u128 so that n * i cannot overflow.
    (1..=TIME_PROBES)
        .map(|i| lo + (u128::from(n) * u128::from(i) / u128::from(TIME_PROBES + 1)) as u64)
        .collect()
}

/// Records which nodes a [`merkle`] function reads, answering zeros.
#[derive(Default)]
struct Recorder(RefCell<BTreeSet<(u8, u64)>>);

impl Recorder {
    fn saw(&self, level: u8, index: u64) {
        self.0.borrow_mut().insert((level, index / TILE_WIDTH));
    }

    /// The tiles of every node seen.
    fn tiles(&self) -> BTreeSet<(u8, u64)> {
        self.0.borrow().clone()
    }
}

impl NodeSource for Recorder {
    type Error = Infallible;

    fn node(&self, level: u8, index: u64) -> Result<Hash, Infallible> {
        self.saw(level, index);
        Ok([0; 32])
    }
}

/// Tiles read from the database, and those a batch extended.
#[derive(Default)]
struct Tiles {
    map: HashMap<(u8, u64), Vec<u8>>,
    dirty: BTreeSet<(u8, u64)>,
}

impl Tiles {
    fn from_rows(rows: Vec<tokio_postgres::Row>) -> Result<Tiles, AuditError> {
        let mut map = HashMap::with_capacity(rows.len());
        for r in rows {
            let level = u8::try_from(r.get::<_, i16>(0))
                .map_err(|_| AuditError::Corrupt("tile level out of range".into()))?;
            map.insert((level, to_u64(r.get(1), "tile index")?), r.get(2));
        }
        Ok(Tiles {
            map,
            dirty: BTreeSet::new(),
        })
    }

    /// Stores a node completed by an append: nodes of a level complete in order, so
    /// it lands at its tile's end.
    fn put(&mut self, level: u8, index: u64, hash: Hash) -> Result<(), AuditError> {
        let key = (level, index / TILE_WIDTH);
        let tile = self.map.entry(key).or_default();
        let slot = (index % TILE_WIDTH) as usize * 32;
        if tile.len() != slot {
            return Err(AuditError::Corrupt(format!(
                "Merkle tile for node {level}/{index} holds {} bytes, expected {slot}",
                tile.len()
            )));
        }
        tile.extend_from_slice(&hash);
        self.dirty.insert(key);
        Ok(())
    }

    fn dirty_rows(&self) -> (Vec<i16>, Vec<i64>, Vec<&[u8]>) {
        let mut levels = Vec::with_capacity(self.dirty.len());
        let mut indexes = Vec::with_capacity(self.dirty.len());
        let mut hashes = Vec::with_capacity(self.dirty.len());
        for key in &self.dirty {
            levels.push(i16::from(key.0));
            indexes.push(key.1 as i64);
            hashes.push(self.map[key].as_slice());
        }
        (levels, indexes, hashes)
    }
}

impl NodeSource for Tiles {
    type Error = AuditError;

    fn node(&self, level: u8, index: u64) -> Result<Hash, AuditError> {
        let missing = || AuditError::Corrupt(format!("missing Merkle node {level}/{index}"));
        let tile = self
            .map
            .get(&(level, index / TILE_WIDTH))
            .ok_or_else(missing)?;
        let slot = (index % TILE_WIDTH) as usize * 32;
        tile.get(slot..slot + 32)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(missing)
    }
}

async fn read_checkpoints<C: GenericClient>(
    client: &C,
    log_id: &str,
    latest: bool,
) -> Result<Vec<SignedCheckpoint>, AuditError> {
    let sql = if latest {
        "SELECT tree_size, timestamp_secs, root_hash, signature, public_key \
         FROM audit_checkpoints ORDER BY tree_size DESC LIMIT 1"
    } else {
        "SELECT tree_size, timestamp_secs, root_hash, signature, public_key \
         FROM audit_checkpoints ORDER BY tree_size"
    };
    let rows = client.query(sql, &[]).await.map_err(unavailable)?;
    let bad = || AuditError::Corrupt("malformed stored checkpoint".into());
    rows.iter()
        .map(|r| {
            Ok(SignedCheckpoint {
                checkpoint: Checkpoint {
                    log_id: log_id.to_owned(),
                    tree_size: to_u64(r.get(0), "checkpoint size")?,
                    timestamp: to_u64(r.get(1), "checkpoint time")?,
                    root_hash: r.get::<_, &[u8]>(2).try_into().map_err(|_| bad())?,
                },
                signature: r.get::<_, &[u8]>(3).try_into().map_err(|_| bad())?,
                public_key: r.get::<_, &[u8]>(4).try_into().map_err(|_| bad())?,
            })
        })
        .collect()
}

fn split_keys(keys: BTreeSet<(u8, u64)>) -> (Vec<i16>, Vec<i64>) {
    keys.into_iter()
        .map(|(l, t)| (i16::from(l), t as i64))
        .unzip()
}

async fn fetch_tiles<C: GenericClient>(
    client: &C,
    keys: BTreeSet<(u8, u64)>,
) -> Result<Tiles, AuditError> {
    let (levels, indexes) = split_keys(keys);
    let stmt = client
        .prepare_cached(SELECT_TILES)
        .await
        .map_err(unavailable)?;
    Tiles::from_rows(
        client
            .query(&stmt, &[&levels, &indexes])
            .await
            .map_err(unavailable)?,
    )
}

async fn prepare(
    client: &deadpool_postgres::Object,
    sql: &str,
) -> Result<tokio_postgres::Statement, AuditError> {
    client.prepare_cached(sql).await.map_err(unavailable)
}

async fn check_size(
    client: &deadpool_postgres::Object,
    name: &str,
    size: u64,
) -> Result<(), AuditError> {
    let row = client
        .query_one(&prepare(client, SELECT_SIZE).await?, &[])
        .await
        .map_err(unavailable)?;
    let current = to_u64(row.get(0), "tree size")?;
    if size > current {
        return Err(AuditError::OutOfRange(format!(
            "{name} {size} is beyond the log's {current} entries"
        )));
    }
    Ok(())
}

/// Opens, decodes and checks entry `seq`.
fn open_entry(keys: &Keys, seq: u64, sealed: &[u8]) -> Result<AuditEntry, AuditError> {
    let canonical = keys
        .audit_seal
        .open(&seal_context(seq), sealed)
        .map_err(|_| corrupt(seq, "entry altered (does not open)"))?;
    let mut entry = AuditEntry::decode(canonical.as_slice())
        .map_err(|_| corrupt(seq, "entry does not decode"))?;
    if entry.seq != seq {
        return Err(corrupt(
            seq,
            format!("holds the entry of seq {}", entry.seq),
        ));
    }
    entry.canonical = canonical;
    Ok(entry)
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn corrupt(seq: u64, problem: impl std::fmt::Display) -> AuditError {
    AuditError::Corrupt(format!("seq {seq}: {problem}"))
}

fn unavailable(e: tokio_postgres::Error) -> AuditError {
    AuditError::Unavailable(format!("postgres: {}", describe(&e)))
}

fn tree_error(e: merkle::TreeError<AuditError>) -> AuditError {
    match e {
        merkle::TreeError::Range(r) => AuditError::OutOfRange(r.to_string()),
        merkle::TreeError::Source(s) => s,
    }
}

fn to_u64(v: i64, what: &str) -> Result<u64, AuditError> {
    u64::try_from(v).map_err(|_| AuditError::Corrupt(format!("negative {what}")))
}

fn to_i64(v: u64) -> Result<i64, AuditError> {
    i64::try_from(v).map_err(|_| AuditError::OutOfRange(format!("{v} is too large")))
}

fn micros(clock: &dyn Clock) -> i64 {
    (clock.now().unix_timestamp_nanos() / 1000) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_sees_one_tile_per_level_for_a_root() {
        let rec = Recorder::default();
        let _ = merkle::root(1_000_000, &rec);
        // 1_000_000 has 7 set bits: one node per set bit.
        assert_eq!(rec.tiles().len(), 7);
        let rec = Recorder::default();
        let _ = merkle::inclusion_proof(123_456, 1_000_000, &rec);
        assert!(rec.tiles().len() <= 2 * 20, "{}", rec.tiles().len());
    }

    #[test]
    fn time_probes_are_distinct_ascending_and_inside_the_range() {
        for (lo, hi) in [
            (0, 1),
            (0, 16),
            (0, 17),
            (5, 40),
            (0, 1_000_000),
            (u64::MAX - 100, u64::MAX),
        ] {
            let p = time_probes(lo, hi);
            assert_eq!(p.len() as u64, (hi - lo).min(TIME_PROBES), "[{lo}, {hi})");
            assert!(p.windows(2).all(|w| w[0] < w[1]), "[{lo}, {hi}): {p:?}");
            assert!(p.iter().all(|&s| lo <= s && s < hi), "[{lo}, {hi}): {p:?}");
        }
    }

    #[test]
    fn tiles_grow_in_order_and_answer_like_a_memory_tree() {
        let leaves: Vec<Hash> = (0u32..300)
            .map(|i| merkle::leaf_hash(&i.to_be_bytes()))
            .collect();
        let mut tiles = Tiles::default();
        for (seq, leaf) in leaves.iter().enumerate() {
            for (l, i, h) in merkle::nodes_completed_by_append(seq as u64, *leaf, &tiles).unwrap() {
                tiles.put(l, i, h).unwrap();
            }
        }
        let mem: MemoryTree = leaves.iter().copied().collect();
        assert_eq!(merkle::root(300, &tiles).unwrap(), mem.root());
        assert!(
            tiles.put(0, 5, [0; 32]).is_err(),
            "a node may not be written twice"
        );
        let (levels, _, hashes) = tiles.dirty_rows();
        assert!(hashes.iter().all(|h| h.len() <= 64 * 32));
        assert_eq!(levels.iter().filter(|l| **l == 0).count(), 5); // 300 leaves: 5 tiles
    }
}
