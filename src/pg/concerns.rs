//! Concerns and the per-agency inboxes in PostgreSQL: what
//! [`crate::concerns::ConcernStore`] keeps in sled, as rows that every replica reads
//! and writes. The same operations with the same meaning, as async methods; the
//! gateway does not use it yet.
//!
//! # Tables (migration 3)
//! | table | row |
//! | --- | --- |
//! | `concerns` | `id`, `sealed` (the sled store's concern JSON, sealed with AES-256-GCM under the data key, the concern id as associated data) |
//! | `inbox_heads` | `agency_id`, `last_cursor`: the agency's newest cursor |
//! | `inbox_events` | `agency_id`, `seq` (the cursor), `kind`, `concern_id`, `event` (the sled store's event JSON) |
//! | `concern_idempotency` | `key` (SHA-256 of sender and request id), `concern_id` |
//! | `concern_deadlines` | `due_micros`, `concern_id`, indexed by due time |
//!
//! Nothing is in clear but ids, agency ids, times and event kinds: the NHS number,
//! narrative, notes and decision live only in the sealed concern, an override
//! notice's justification only sealed inside its event (as in sled).
//!
//! # Cursors across replicas
//! Every write that appends events is one transaction that, for each agency it
//! touches (in agency id order, so two writers never wait on each other in a
//! cycle), takes the agency's `inbox_heads` row with `INSERT ... ON CONFLICT DO
//! UPDATE ... RETURNING` — a row lock held until COMMIT — and numbers its events
//! from the value it read. So
//! an agency's cursors are dense (1, 2, 3, ...), never repeat, and are committed in
//! cursor order: the next writer cannot take the row before the previous one has
//! committed (or rolled back, which gives its numbers back). A committed
//! `last_cursor = n` therefore means every event `1..=n` is committed and visible,
//! which is what the sled store's *durable cursor* means; readers never look past
//! it. No sequences, no advisory locks: row locks only (portable SQL).
//!
//! # Waking subscribers on every replica
//! The transaction also sends `pg_notify('sgw_inbox', <agency id>)` (the function
//! form of `NOTIFY`, taking the agency id as a parameter), which PostgreSQL
//! delivers only if and when it commits. Each replica keeps one dedicated
//! connection that `LISTEN`s on `sgw_inbox`; a notification makes it read the named
//! agencies' `last_cursor` and raise their watches ([`PgConcernStore::durable_cursor`]),
//! which the inbox streams wait on. The tables are the truth; a notification only
//! says "look". After every (re)connection the listener reads every watched head
//! once, so nothing committed while it was away is missed; while it is down (or
//! when [`PgInboxSettings::listen`] is off) every head is read every
//! [`PgInboxSettings::poll_interval`]. A replica's own commits raise its watches at
//! once, and [`PgConcernStore::catch_up`] raises one agency's on demand (a
//! subscriber resuming from a cursor it read on another replica).
//!
//! # Differences from the sled store
//! - The sled store serialises writers with a process-wide lock; here `update`
//!   locks the concern's row (`SELECT ... FOR UPDATE`) and the appended agencies'
//!   head rows, so two replicas changing one concern take turns, and `raise` with an
//!   idempotency key inserts the key first (`ON CONFLICT DO NOTHING`): of two
//!   replicas raising with the same key at once, the second waits for the first to
//!   commit, then finds its concern and writes nothing.
//! - Every transaction commits with `synchronous_commit=on` (set on every session,
//!   see [`super::config`]): a change is durable when the method returns, as after
//!   the sled store's flush and fdatasync.
//! - `NOTIFY` serialises committing transactions that notified behind one lock in
//!   PostgreSQL; that bounds inbox appends per second cluster-wide (not measured
//!   yet).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{GenericClient, Pool};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, IsolationLevel, NoTls};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::config::{PgConfig, PgError};
use super::describe;
use crate::concerns::model::{Concern, ConcernId, InboxEvent};
use crate::concerns::store::{
    decode_event, encode_event, micros, open_concern, seal_concern, Edit, IdempotencyKey, Raised,
    StoreError,
};
use crate::domain::AgencyId;
use crate::store::Keys;

/// The notification channel of inbox appends; the payload is the agency id.
pub const INBOX_CHANNEL: &str = "sgw_inbox";

/// The `application_name` of each replica's listening connection.
pub const LISTENER_APPLICATION_NAME: &str = "sgw-inbox-listener";

const SELECT_CONCERN: &str = "SELECT sealed FROM concerns WHERE id = $1";
const SELECT_CONCERN_FOR_UPDATE: &str = "SELECT sealed FROM concerns WHERE id = $1 FOR UPDATE";
const INSERT_CONCERN: &str = "INSERT INTO concerns (id, sealed) VALUES ($1, $2)";
const UPDATE_CONCERN: &str = "UPDATE concerns SET sealed = $2 WHERE id = $1";
const CLAIM_KEY: &str = "INSERT INTO concern_idempotency (key, concern_id) VALUES ($1, $2) \
     ON CONFLICT (key) DO NOTHING RETURNING concern_id";
const SELECT_KEY: &str = "SELECT concern_id FROM concern_idempotency WHERE key = $1";
const INSERT_DEADLINES: &str = "INSERT INTO concern_deadlines (due_micros, concern_id) \
     SELECT due, $2 FROM unnest($1::bigint[]) AS due ON CONFLICT DO NOTHING";
const DELETE_DEADLINES: &str =
    "DELETE FROM concern_deadlines WHERE concern_id = $1 AND due_micros <= $2";
const SELECT_DUE: &str = "SELECT concern_id, min(due_micros) FROM concern_deadlines \
     WHERE due_micros <= $1 GROUP BY concern_id ORDER BY 2, concern_id COLLATE \"C\"";
/// Takes `$2` cursors of agency `$1`: creates its head row or locks it (the row
/// lock of `ON CONFLICT DO UPDATE`, held until COMMIT) and returns the last one.
const TAKE_CURSORS: &str = "INSERT INTO inbox_heads (agency_id, last_cursor) VALUES ($1, $2) \
     ON CONFLICT (agency_id) DO UPDATE SET last_cursor = inbox_heads.last_cursor + EXCLUDED.last_cursor \
     RETURNING last_cursor";
const INSERT_EVENTS: &str = "INSERT INTO inbox_events (agency_id, seq, kind, concern_id, event) \
     SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bytea[])";
const NOTIFY: &str =
    "SELECT count(pg_notify('sgw_inbox', agency)) FROM unnest($1::text[]) AS agency";
const SELECT_EVENTS: &str = "SELECT seq, event FROM inbox_events \
     WHERE agency_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4";
const SELECT_HEADS: &str =
    "SELECT agency_id, last_cursor FROM inbox_heads WHERE agency_id = ANY($1)";

/// The shortest [`PgInboxSettings::poll_interval`] honoured.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How many poll intervals the listening connection may leave a ping unanswered
/// before it is dropped and reconnected (polling takes over much sooner: see
/// [`PgInboxSettings::poll_interval`]).
const PING_PATIENCE: u32 = 10;

/// How a replica learns of events appended by the others.
#[derive(Debug, Clone)]
pub struct PgInboxSettings {
    /// Keep a `LISTEN sgw_inbox` connection (on by default). Off, the replica only
    /// polls.
    pub listen: bool,
    /// How often every watched head is read while the listener cannot be relied
    /// on (not connected, or its connection has not answered a ping for two
    /// intervals: a half-open connection), how long to wait before reconnecting
    /// it, and how often the listening connection is pinged. 1 s by default.
    pub poll_interval: Duration,
}

impl Default for PgInboxSettings {
    fn default() -> Self {
        PgInboxSettings {
            listen: true,
            poll_interval: Duration::from_secs(1),
        }
    }
}

/// Concerns and inboxes in PostgreSQL. Cheap to clone; clones share the pool and
/// the watches. The listener and the poller stop when the last clone is dropped.
#[derive(Clone)]
pub struct PgConcernStore {
    pool: Pool,
    keys: Arc<Keys>,
    heads: Arc<Heads>,
    _tasks: Arc<DropGuard>,
}

/// This replica's view of the watched agencies' committed cursors.
struct Heads {
    /// By agency id.
    durable: HashMap<String, watch::Sender<u64>>,
    /// Whether the listener is connected and listening.
    listening: AtomicBool,
    /// When the listening connection last answered (LISTEN or a ping).
    answered: Mutex<Instant>,
    /// A notification could not be followed up: poll at the next tick.
    missed: AtomicBool,
}

impl Heads {
    fn raise(&self, agency: &str, cursor: u64) {
        let Some(tx) = self.durable.get(agency) else {
            return;
        };
        tx.send_if_modified(|v| {
            let newer = cursor > *v;
            if newer {
                *v = cursor;
            }
            newer
        });
    }

    fn watched(&self) -> Vec<String> {
        self.durable.keys().cloned().collect()
    }

    fn answered_now(&self) {
        *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Whether the listener can be relied on: listening, and its connection
    /// answered within `within`.
    fn trusted(&self, within: Duration) -> bool {
        self.listening.load(Ordering::SeqCst)
            && self
                .answered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                <= within
    }
}

// === impl PgConcernStore ===

impl PgConcernStore {
    /// Connects, applies migrations and starts following the inboxes of `agencies`
    /// (the registered agencies) with the default [`PgInboxSettings`].
    pub async fn open(
        config: &PgConfig,
        keys: Arc<Keys>,
        agencies: impl IntoIterator<Item = AgencyId>,
    ) -> Result<PgConcernStore, PgError> {
        Self::open_with(
            config.pool()?,
            config,
            keys,
            agencies,
            PgInboxSettings::default(),
        )
        .await
    }

    /// [`PgConcernStore::open`] over an existing pool (shared with the rest of this
    /// replica's PostgreSQL storage); `config` is used for the listening connection.
    pub async fn open_with(
        pool: Pool,
        config: &PgConfig,
        keys: Arc<Keys>,
        agencies: impl IntoIterator<Item = AgencyId>,
        settings: PgInboxSettings,
    ) -> Result<PgConcernStore, PgError> {
        super::migrate::migrate(&pool).await?;
        let mut listener = config.driver_config()?;
        listener.application_name(LISTENER_APPLICATION_NAME);
        let heads = Arc::new(Heads {
            durable: agencies
                .into_iter()
                .map(|a| (a.as_str().to_owned(), watch::channel(0).0))
                .collect(),
            listening: AtomicBool::new(false),
            answered: Mutex::new(Instant::now()),
            missed: AtomicBool::new(false),
        });
        refresh(&pool, &heads, heads.watched())
            .await
            .map_err(PgError::Connect)?;
        let stop = CancellationToken::new();
        let interval = settings.poll_interval.max(MIN_POLL_INTERVAL);
        if settings.listen {
            tokio::spawn(listen(
                listener,
                pool.clone(),
                heads.clone(),
                interval,
                stop.clone(),
            ));
        }
        tokio::spawn(poll(pool.clone(), heads.clone(), interval, stop.clone()));
        Ok(PgConcernStore {
            pool,
            keys,
            heads,
            _tasks: Arc::new(stop.drop_guard()),
        })
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether this replica's listener is connected and listening now.
    pub fn listening(&self) -> bool {
        self.heads.listening.load(Ordering::SeqCst)
    }

    /// The concern with this id.
    pub async fn get(&self, id: &ConcernId) -> Result<Option<Concern>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_CONCERN).await.map_err(pg)?;
        match client.query_opt(&stmt, &[&id.as_str()]).await.map_err(pg)? {
            Some(row) => open_concern(&self.keys, id, row.get(0)).map(Some),
            None => Ok(None),
        }
    }

    /// The concern an idempotency key raised, if any.
    pub async fn raised_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<ConcernId>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_KEY).await.map_err(pg)?;
        match client
            .query_opt(&stmt, &[&key.0.as_slice()])
            .await
            .map_err(pg)?
        {
            Some(row) => parse_concern_id(row.get(0)).map(Some),
            None => Ok(None),
        }
    }

    /// Stores a new concern with its idempotency key, its deadlines, and a Concern
    /// event in every recipient's inbox, atomically and durably. If the key has
    /// already raised a concern (through any replica, even one still committing),
    /// writes nothing and names it.
    pub async fn raise(
        &self,
        concern: &Concern,
        key: Option<&IdempotencyKey>,
    ) -> Result<Raised, StoreError> {
        let sealed = seal_concern(&self.keys, concern)?;
        let events: Vec<(AgencyId, InboxEvent)> = concern
            .recipients
            .iter()
            .map(|d| (d.agency.clone(), InboxEvent::Concern(concern.id.clone())))
            .collect();
        let encoded = self.encode_all(&events)?;
        let id = concern.id.as_str();
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        if let Some(key) = key {
            let stmt = tx.prepare_cached(CLAIM_KEY).await.map_err(pg)?;
            let claimed = tx
                .query_opt(&stmt, &[&key.0.as_slice(), &id])
                .await
                .map_err(pg)?
                .is_some();
            if !claimed {
                // Another raise holds the key and has committed (the insert waited
                // for it): its concern is the answer.
                let stmt = tx.prepare_cached(SELECT_KEY).await.map_err(pg)?;
                let row = tx
                    .query_one(&stmt, &[&key.0.as_slice()])
                    .await
                    .map_err(pg)?;
                let existing = parse_concern_id(row.get(0))?;
                tx.rollback().await.map_err(pg)?;
                return Ok(Raised::Existing(existing));
            }
        }
        let stmt = tx.prepare_cached(INSERT_CONCERN).await.map_err(pg)?;
        tx.execute(&stmt, &[&id, &sealed]).await.map_err(pg)?;
        let due: Vec<i64> = concern
            .recipients
            .iter()
            .map(|d| micros(d.due_at))
            .collect();
        let stmt = tx.prepare_cached(INSERT_DEADLINES).await.map_err(pg)?;
        tx.execute(&stmt, &[&due, &id]).await.map_err(pg)?;
        let appended = append(&tx, &encoded).await?;
        tx.commit().await.map_err(pg)?;
        self.publish(&appended);
        Ok(Raised::New)
    }

    /// Changes a concern: `edit` may modify it and says what else to write. The
    /// concern's row is locked while `edit` runs and until the change commits, so
    /// replicas changing one concern take turns. The record, the events and the
    /// deadline removals are one transaction, durable before this returns the
    /// concern as it now stands. `None` when there is no such concern.
    pub async fn update(
        &self,
        id: &ConcernId,
        edit: impl FnOnce(&mut Concern) -> Edit + Send,
    ) -> Result<Option<Concern>, StoreError> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let stmt = tx
            .prepare_cached(SELECT_CONCERN_FOR_UPDATE)
            .await
            .map_err(pg)?;
        let Some(row) = tx.query_opt(&stmt, &[&id.as_str()]).await.map_err(pg)? else {
            tx.rollback().await.map_err(pg)?;
            return Ok(None);
        };
        let mut concern = open_concern(&self.keys, id, row.get(0))?;
        let edit = edit(&mut concern);
        if !edit.record && edit.events.is_empty() && edit.settle_until.is_none() {
            tx.rollback().await.map_err(pg)?;
            return Ok(Some(concern));
        }
        if edit.record {
            let sealed = seal_concern(&self.keys, &concern)?;
            let stmt = tx.prepare_cached(UPDATE_CONCERN).await.map_err(pg)?;
            tx.execute(&stmt, &[&id.as_str(), &sealed])
                .await
                .map_err(pg)?;
        }
        if let Some(until) = edit.settle_until {
            let stmt = tx.prepare_cached(DELETE_DEADLINES).await.map_err(pg)?;
            tx.execute(&stmt, &[&id.as_str(), &micros(until)])
                .await
                .map_err(pg)?;
        }
        let encoded = self.encode_all(&edit.events)?;
        let appended = append(&tx, &encoded).await?;
        tx.commit().await.map_err(pg)?;
        self.publish(&appended);
        Ok(Some(concern))
    }

    /// Removes a concern's deadline entries due at or before `until` (its recipients
    /// have acknowledged, so there is nothing to escalate).
    pub async fn settle(&self, id: &ConcernId, until: OffsetDateTime) -> Result<(), StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(DELETE_DEADLINES).await.map_err(pg)?;
        client
            .execute(&stmt, &[&id.as_str(), &micros(until)])
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// The concerns with a deadline at or before `now`, each once, earliest first
    /// (then by id, as the sled store's keys sort).
    pub async fn due_by(&self, now: OffsetDateTime) -> Result<Vec<ConcernId>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_DUE).await.map_err(pg)?;
        let rows = client.query(&stmt, &[&micros(now)]).await.map_err(pg)?;
        rows.iter().map(|r| parse_concern_id(r.get(0))).collect()
    }

    /// Up to `limit` events of `agency`'s inbox with cursors in `after+1..=upto`.
    pub async fn events(
        &self,
        agency: &AgencyId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEvent)>, StoreError> {
        if after >= upto {
            return Ok(Vec::new());
        }
        let bound = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let stmt = client.prepare_cached(SELECT_EVENTS).await.map_err(pg)?;
        let rows = client
            .query(
                &stmt,
                &[&agency.as_str(), &bound(after), &bound(upto), &limit],
            )
            .await
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                let seq: i64 = r.get(0);
                let cursor = u64::try_from(seq)
                    .map_err(|_| StoreError::Corrupt("negative inbox cursor".into()))?;
                Ok((cursor, decode_event(&self.keys, r.get(1))?))
            })
            .collect()
    }

    /// Appends one event to `agency`'s inbox durably and announces it to
    /// subscribers on every replica. Returns its cursor.
    pub async fn append_event(
        &self,
        agency: &AgencyId,
        event: InboxEvent,
    ) -> Result<u64, StoreError> {
        let encoded = self.encode_all(&[(agency.clone(), event)])?;
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let appended = append(&tx, &encoded).await?;
        tx.commit().await.map_err(pg)?;
        self.publish(&appended);
        appended
            .first()
            .map(|(_, cursor)| *cursor)
            .ok_or_else(|| StoreError::Corrupt("event not appended".into()))
    }

    /// A watch on `agency`'s committed cursor as this replica knows it: the newest
    /// event a reader may see. Raised by this replica's own commits at once, by the
    /// others' through the listener (or the poller).
    pub fn durable_cursor(&self, agency: &AgencyId) -> Option<watch::Receiver<u64>> {
        self.heads
            .durable
            .get(agency.as_str())
            .map(|s| s.subscribe())
    }

    /// Reads `agency`'s committed head and raises its watch
    /// ([`PgConcernStore::durable_cursor`]) at once, without waiting for the
    /// listener or the poller: for a cursor another replica has committed that this
    /// one may not have heard of yet.
    pub async fn catch_up(&self, agency: &AgencyId) -> Result<(), StoreError> {
        refresh(&self.pool, &self.heads, vec![agency.as_str().to_owned()])
            .await
            .map_err(StoreError::Io)
    }

    /// Nothing to flush: every change is durable when its method returns.
    pub async fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }

    // --- helpers ---

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Io(format!("postgres: {e}")))
    }

    fn publish(&self, appended: &[(AgencyId, u64)]) {
        for (agency, cursor) in appended {
            self.heads.raise(agency.as_str(), *cursor);
        }
    }

    fn encode_all(&self, events: &[(AgencyId, InboxEvent)]) -> Result<Vec<Encoded>, StoreError> {
        events
            .iter()
            .map(|(agency, event)| {
                let (kind, concern_id) = match event {
                    InboxEvent::Concern(id) => ("concern", Some(id.as_str().to_owned())),
                    InboxEvent::Escalation(e) => {
                        ("escalation", Some(e.concern_id.as_str().to_owned()))
                    }
                    InboxEvent::OverrideNotice(_) => ("override_notice", None),
                };
                Ok(Encoded {
                    agency: agency.clone(),
                    kind,
                    concern_id,
                    bytes: encode_event(&self.keys, event)?,
                })
            })
            .collect()
    }
}

/// An event ready to insert.
struct Encoded {
    agency: AgencyId,
    kind: &'static str,
    concern_id: Option<String>,
    bytes: Vec<u8>,
}

async fn begin(
    client: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(pg)
}

/// Inside the caller's transaction: numbers `events` with the next cursors of their
/// agencies (each agency's head row locked until the transaction ends, agencies in
/// id order), inserts them, and notifies each agency once. Returns each event's
/// agency and cursor, in the order given.
async fn append<C: GenericClient>(
    tx: &C,
    events: &[Encoded],
) -> Result<Vec<(AgencyId, u64)>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for e in events {
        *counts.entry(e.agency.as_str()).or_default() += 1;
    }
    let take = tx.prepare_cached(TAKE_CURSORS).await.map_err(pg)?;
    // The first cursor of each agency's run.
    let mut next: BTreeMap<&str, i64> = BTreeMap::new();
    for (agency, n) in &counts {
        let last: i64 = tx.query_one(&take, &[agency, n]).await.map_err(pg)?.get(0);
        next.insert(agency, last - n + 1);
    }
    let mut appended = Vec::with_capacity(events.len());
    let (mut agencies, mut seqs, mut kinds, mut concern_ids, mut bytes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in events {
        let slot = next
            .get_mut(e.agency.as_str())
            .ok_or_else(|| StoreError::Corrupt("cursor not taken".into()))?;
        let seq = *slot;
        *slot += 1;
        let cursor =
            u64::try_from(seq).map_err(|_| StoreError::Corrupt("negative inbox cursor".into()))?;
        appended.push((e.agency.clone(), cursor));
        agencies.push(e.agency.as_str());
        seqs.push(seq);
        kinds.push(e.kind);
        concern_ids.push(e.concern_id.as_deref());
        bytes.push(e.bytes.as_slice());
    }
    let insert = tx.prepare_cached(INSERT_EVENTS).await.map_err(pg)?;
    tx.execute(&insert, &[&agencies, &seqs, &kinds, &concern_ids, &bytes])
        .await
        .map_err(pg)?;
    let notify = tx.prepare_cached(NOTIFY).await.map_err(pg)?;
    let notified: Vec<&str> = counts.keys().copied().collect();
    tx.query_one(&notify, &[&notified]).await.map_err(pg)?;
    Ok(appended)
}

/// Reads the committed heads of `agencies` and raises their watches.
async fn refresh(pool: &Pool, heads: &Heads, agencies: Vec<String>) -> Result<(), String> {
    let client = pool.get().await.map_err(|e| format!("postgres: {e}"))?;
    let stmt = client
        .prepare_cached(SELECT_HEADS)
        .await
        .map_err(|e| describe(&e))?;
    let rows = client
        .query(&stmt, &[&agencies])
        .await
        .map_err(|e| describe(&e))?;
    for row in rows {
        let agency: &str = row.get(0);
        let last: i64 = row.get(1);
        heads.raise(agency, u64::try_from(last).unwrap_or(0));
    }
    Ok(())
}

/// Every `interval`, reads every watched head when the listener cannot be relied on
/// (not listening, silent for two intervals, or a follow-up failed).
async fn poll(pool: Pool, heads: Arc<Heads>, interval: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Clear the flag on every tick, listening or not.
        let missed = heads.missed.swap(false, Ordering::SeqCst);
        if missed || !heads.trusted(2 * interval) {
            if let Err(e) = refresh(&pool, &heads, heads.watched()).await {
                heads.missed.store(true, Ordering::SeqCst);
                tracing::warn!(error = %e, "inbox poll failed");
            }
        }
    }
}

/// Keeps a `LISTEN sgw_inbox` connection, reconnecting after `retry` when it drops
/// or leaves a ping (sent every `retry`) unanswered for `PING_PATIENCE` times
/// `retry`.
async fn listen(
    config: tokio_postgres::Config,
    pool: Pool,
    heads: Arc<Heads>,
    retry: Duration,
    stop: CancellationToken,
) {
    loop {
        let ended = listen_once(&config, &pool, &heads, retry, &stop).await;
        heads.listening.store(false, Ordering::SeqCst);
        match ended {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "inbox listener down; polling until it is back"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

/// One listening connection's life: `Ok` when stopped, `Err` when it dropped.
async fn listen_once(
    config: &tokio_postgres::Config,
    pool: &Pool,
    heads: &Arc<Heads>,
    ping: Duration,
    stop: &CancellationToken,
) -> Result<(), String> {
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("connect: {}", describe(&e)))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    // Drives the connection and forwards notifications; ends when the connection
    // does (the server went away, or `client` was dropped).
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if n.channel() == INBOX_CHANNEL && tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    let _abort = AbortOnDrop(driver);
    client
        .batch_execute("LISTEN sgw_inbox")
        .await
        .map_err(|e| format!("LISTEN: {}", describe(&e)))?;
    heads.answered_now();
    heads.listening.store(true, Ordering::SeqCst);
    // Anything committed before LISTEN took effect.
    refresh(pool, heads, heads.watched())
        .await
        .map_err(|e| format!("reading the inbox heads: {e}"))?;
    // A connection can die without closing (a half-open TCP connection). A pinger
    // records each answer (the poller stops trusting a listener that has not
    // answered for two intervals) and gives up on the connection when a ping goes
    // unanswered for PING_PATIENCE intervals; notifications are handled meanwhile.
    let client = Arc::new(client);
    let (failed_tx, mut failed) = tokio::sync::oneshot::channel::<String>();
    let pinger = {
        let client = client.clone();
        let patience = ping * PING_PATIENCE;
        let heads = heads.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ping);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let why = match tokio::time::timeout(patience, client.simple_query("")).await {
                    Ok(Ok(_)) => {
                        heads.answered_now();
                        continue;
                    }
                    Ok(Err(e)) => format!("ping: {}", describe(&e)),
                    Err(_) => format!("ping: no answer within {patience:?}"),
                };
                let _ = failed_tx.send(why);
                return;
            }
        })
    };
    let _abort_pinger = AbortOnDrop(pinger);
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            got = rx.recv() => got.ok_or_else(|| "the listening connection closed".to_owned())?,
            why = &mut failed => return Err(why.unwrap_or_else(|_| "the pinger stopped".to_owned())),
        };
        let mut agencies = BTreeSet::from([first]);
        while let Ok(more) = rx.try_recv() {
            agencies.insert(more);
        }
        if let Err(e) = refresh(pool, heads, agencies.into_iter().collect()).await {
            heads.missed.store(true, Ordering::SeqCst);
            tracing::warn!(error = %e, "inbox refresh after a notification failed");
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn parse_concern_id(text: &str) -> Result<ConcernId, StoreError> {
    ConcernId::parse(text).map_err(|_| StoreError::Corrupt("malformed concern id".into()))
}

fn pg(e: tokio_postgres::Error) -> StoreError {
    StoreError::Io(format!("postgres: {}", describe(&e)))
}
