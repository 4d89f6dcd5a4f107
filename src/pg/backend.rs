//! The PostgreSQL stores behind the gateway's storage traits: [`PgAudit`] for
//! [`AuditStore`], [`PgRecordStore`] for [`RecordRepo`], [`PgConcernStore`] for
//! [`ConcernRepo`], and [`open`], which connects, migrates and builds all three over
//! one pool for `serve`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Object, Pool};
use time::OffsetDateTime;
use tokio::sync::watch;

use super::{Lease, PgAuditLog, PgAuditSettings, PgConcernStore, PgError, PgRecordStore};
use crate::audit::checkpoint::SignedCheckpoint;
use crate::audit::merkle::Hash;
use crate::audit::query::{Filter, Page};
use crate::audit::writer::{CommitStats, Durable, LogHealth};
use crate::audit::{AuditError, AuditStore, NewEntry};
use crate::concerns::model::{Concern, ConcernId, InboxEvent};
use crate::concerns::store::{IdempotencyKey, Raised};
use crate::concerns::{ConcernRepo, EditFn};
use crate::config::{Config, PostgresStorage};
use crate::domain::{AgencyId, Clock};
use crate::proto::v1::AuditEntry;
use crate::records::model::{Consent, ConsentId, Record, RecordId};
use crate::records::{Due, RecordRepo, SubjectHold};
use crate::store::keys::SubjectRef;
use crate::store::Keys;

/// The stores of one replica.
pub struct Backend {
    /// The audit log.
    pub audit: Arc<PgAudit>,
    /// Records and consents.
    pub records: Arc<PgRecords>,
    /// Concerns and inboxes.
    pub concerns: Arc<PgConcernStore>,
    /// A small pool for leases and the replicas table.
    pub pool: Pool,
}

/// Connections of the audit pool: the group-commit writer takes one per commit;
/// checkpoints, proofs and auditors' queries share the rest.
const AUDIT_CONNECTIONS: usize = 4;

/// Connects, applies migrations and opens every store for this replica.
///
/// Each store has its own pool, so no pool can be emptied by callers that wait on
/// another: a disclosure holds a connection of the lock pool (its child's row lock)
/// while it waits for the audit pool's writer and reads through the records pool.
/// With `pool_size` = n a replica opens at most n (locks) + n/2 (records) + n/2
/// (concerns) + 4 (audit) + 2 (leases, replicas) + 1 (the inbox listener)
/// connections.
pub async fn open(
    storage: &PostgresStorage,
    config: &Config,
    keys: Arc<Keys>,
    clock: Arc<dyn Clock>,
) -> Result<Backend, PgError> {
    let n = storage.connection.pool_size.max(2);
    let sized = |size: usize| {
        let mut c = storage.connection.clone();
        c.pool_size = size;
        c
    };
    let pool = sized(2).pool()?;
    super::migrate::migrate(&pool).await?;
    check_keys(&pool, &keys).await?;
    let log = PgAuditLog::open(
        &sized(AUDIT_CONNECTIONS),
        PgAuditSettings {
            log_id: config.audit.log_id.clone(),
            max_batch: config.audit.max_batch,
        },
        keys.clone(),
        clock,
    )
    .await?;
    let lease_ttl = (config.audit.checkpoint_interval * 3).max(Duration::from_secs(10));
    let audit = Arc::new(PgAudit::new(
        log,
        Lease::new(
            pool.clone(),
            "audit-checkpoint",
            &storage.replica,
            lease_ttl,
        ),
    ));
    let records = Arc::new(PgRecords {
        store: PgRecordStore::open(&sized((n / 2).max(2)), keys.clone()).await?,
        locks: sized(n).pool()?,
    });
    let concerns = Arc::new(
        PgConcernStore::open(
            &sized((n / 2).max(2)),
            keys,
            config.agencies.iter().map(|a| a.id.clone()),
        )
        .await?,
    );
    Ok(Backend {
        audit,
        records,
        concerns,
        pool,
    })
}

/// What the key check seals and hashes.
const CANARY: &[u8] = b"sgw key check";
const CANARY_CONTEXT: &[u8] = b"key-check";
const CANARY_CHILD: &str = "9434765919";

/// Records what this replica's keys make of fixed inputs if no replica has yet, and
/// otherwise refuses to go on when they make something else: every replica must
/// seal, hash and sign with the same key files.
async fn check_keys(pool: &Pool, keys: &Keys) -> Result<(), PgError> {
    let pg = |e: tokio_postgres::Error| PgError::Connect(super::describe(&e));
    let subject = keys
        .subject_ref(
            &crate::domain::NhsNumber::parse(CANARY_CHILD)
                .map_err(|e| PgError::Config(e.to_string()))?,
        )
        .as_str()
        .to_owned();
    let public_key = crate::audit::checkpoint::public_key_of(&keys.checkpoint).to_vec();
    let sealed = |sealer: &crate::store::Sealer| {
        sealer
            .seal(CANARY_CONTEXT, CANARY)
            .map_err(|e| PgError::Config(format!("sealing the key check: {e}")))
    };
    let client = pool
        .get()
        .await
        .map_err(|e| PgError::Connect(e.to_string()))?;
    client
        .execute(
            "INSERT INTO key_check (id, audit_canary, data_canary, subject_ref, public_key) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
            &[
                &sealed(&keys.audit_seal)?,
                &sealed(&keys.data_seal)?,
                &subject,
                &public_key,
            ],
        )
        .await
        .map_err(pg)?;
    let row = client
        .query_one(
            "SELECT audit_canary, data_canary, subject_ref, public_key FROM key_check WHERE id = 1",
            &[],
        )
        .await
        .map_err(pg)?;
    let opens = |sealer: &crate::store::Sealer, sealed: &[u8]| {
        sealer
            .open(CANARY_CONTEXT, sealed)
            .is_ok_and(|plain| plain == CANARY)
    };
    let mut differ = Vec::new();
    if !opens(&keys.audit_seal, row.get(0)) {
        differ.push("the audit sealing key");
    }
    if !opens(&keys.data_seal, row.get(1)) {
        differ.push("the data sealing key");
    }
    if row.get::<_, &str>(2) != subject {
        differ.push("the subject key");
    }
    if row.get::<_, &[u8]>(3) != public_key.as_slice() {
        differ.push("the checkpoint signing key");
    }
    if differ.is_empty() {
        Ok(())
    } else {
        Err(PgError::Config(format!(
            "this replica's keys differ from those the database was written with ({}): \
             every replica needs the same key files (data_dir/keys, audit.signing_key); \
             copy them from a replica that works",
            differ.join(", ")
        )))
    }
}

// === turns ===

/// Turns for cluster-wide chores, decided by lease rows: one replica holds a chore's
/// lease (renewed at each of its runs, for three intervals or at least 10 s) and
/// runs it; the others skip it until the lease lapses (its holder stopped or died).
pub struct PgTurns {
    pool: Pool,
    replica: String,
    leases: std::sync::Mutex<std::collections::HashMap<&'static str, Lease>>,
}

impl PgTurns {
    /// Turns taken as `replica`.
    pub fn new(pool: Pool, replica: &str) -> Self {
        PgTurns {
            pool,
            replica: replica.to_owned(),
            leases: Default::default(),
        }
    }
}

#[async_trait]
impl crate::store::Turns for PgTurns {
    async fn mine(&self, chore: &'static str, every: Duration) -> bool {
        let lease = {
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            leases
                .entry(chore)
                .or_insert_with(|| {
                    let ttl = (every * 3).max(Duration::from_secs(10));
                    Lease::new(self.pool.clone(), chore, &self.replica, ttl)
                })
                .clone()
        };
        match lease.try_acquire().await {
            Ok(mine) => mine,
            Err(e) => {
                tracing::warn!(chore, error = %e, "cannot take the chore's lease; skipping this run");
                false
            }
        }
    }
}

// === audit ===

/// The PostgreSQL audit log as an [`AuditStore`]: appends through this replica's
/// group-commit writer; checkpoints signed only by the replica holding the
/// `audit-checkpoint` lease, and served by all.
pub struct PgAudit {
    log: PgAuditLog,
    lease: Lease,
    health: watch::Sender<LogHealth>,
    stats: Arc<CommitStats>,
}

impl PgAudit {
    /// Wraps an open log; `lease` decides who signs checkpoints.
    pub fn new(log: PgAuditLog, lease: Lease) -> Self {
        let (health, _) = watch::channel(LogHealth {
            writable: true,
            size: 0,
        });
        PgAudit {
            lease,
            stats: log.stats().clone(),
            log,
            health,
        }
    }

    /// The log itself.
    pub fn log(&self) -> &PgAuditLog {
        &self.log
    }

    fn healthy(&self, writable: bool, size: Option<u64>) {
        self.health.send_if_modified(|h| {
            let size = size.unwrap_or(h.size).max(h.size);
            let changed = h.writable != writable || h.size != size;
            *h = LogHealth { writable, size };
            changed
        });
    }

    /// Probes the database while the log is marked unwritable, so health comes back
    /// once PostgreSQL does (calls are refused by load balancers meanwhile, so no
    /// append would find out).
    pub async fn watch_health(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(2));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if self.health.borrow().writable {
                continue;
            }
            if let Ok(size) = self.log.size().await {
                self.healthy(true, Some(size));
            }
        }
    }
}

#[async_trait]
impl AuditStore for PgAudit {
    async fn append(&self, entry: NewEntry) -> Result<Durable, AuditError> {
        match self.log.append(entry).await {
            Ok(appended) => {
                self.healthy(true, Some(appended.seq + 1));
                Ok(Durable::new(appended.seq, appended.time_micros))
            }
            Err(e) => {
                if matches!(e, AuditError::Unavailable(_)) {
                    self.healthy(false, None);
                }
                Err(e)
            }
        }
    }

    async fn checkpoint(&self) -> Result<SignedCheckpoint, AuditError> {
        if self.lease.try_acquire().await? {
            if let Some(signed) = self.log.checkpoint_if_holder(&self.lease).await? {
                return Ok(signed);
            }
        }
        self.log.latest_checkpoint().await?.ok_or_else(|| {
            AuditError::Unavailable(
                "no checkpoint has been signed yet; the replica holding the audit-checkpoint \
                 lease signs one within audit.checkpoint_interval"
                    .into(),
            )
        })
    }

    async fn size(&self) -> Result<u64, AuditError> {
        self.log.size().await
    }

    async fn entries(&self, from: u64, to: u64) -> Result<Vec<AuditEntry>, AuditError> {
        self.log.entries(from, to).await
    }

    async fn inclusion_proof(
        &self,
        seq: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AuditError> {
        self.log.inclusion_proof(seq, tree_size).await
    }

    async fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, AuditError> {
        self.log.consistency_proof(from, to).await
    }

    async fn query(
        &self,
        filter: &Filter,
        page_token: &str,
        page_size: usize,
        max_scan: usize,
    ) -> Result<Page, AuditError> {
        self.log
            .query(filter, page_token, page_size, max_scan)
            .await
    }

    fn health(&self) -> watch::Receiver<LogHealth> {
        self.health.subscribe()
    }

    fn stats(&self) -> Arc<CommitStats> {
        self.stats.clone()
    }

    async fn close(&self) {
        // Every append was committed before it was answered; the lease is given up
        // so another replica signs checkpoints at once.
        if let Err(e) = self.lease.release().await {
            tracing::warn!(error = %e, "releasing the checkpoint lease");
        }
    }
}

// === records ===

/// A row lock on `subject_locks` held in an open transaction on its own
/// connection: `FOR KEY SHARE` for a disclosure, `FOR UPDATE` for a consent change, so
/// the ordering rule of [`crate::records`] holds across replicas. Released by
/// ROLLBACK when dropped (the transaction wrote nothing).
struct RowHold {
    client: Option<Object>,
}

impl Drop for RowHold {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let end = async move {
                if client.batch_execute("ROLLBACK").await.is_err() {
                    // Never hand a connection in an unknown state back to the pool.
                    drop(Object::take(client));
                }
            };
            // Without a runtime (process exit) the connection closes with the
            // process, which ends the transaction.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(end);
            }
        }
    }
}

// A child's disclosures share its `subject_locks` row (FOR KEY SHARE, the lightest
// lock a FOR UPDATE still waits for); a consent change takes it alone (FOR UPDATE).
// PostgreSQL lets new sharers in while an exclusive locker waits, so a steady stream
// of disclosures could starve a withdrawal. The `subject_gates` row is a turnstile:
// a disclosure passes through it (locks it in a savepoint, rolled back at once,
// which releases it) before sharing the child's row; a consent change holds the
// gate, so disclosures that start after it queue behind it while those already
// sharing the row finish. Each hold is one round trip (a simple-query batch, the
// child's keyed hash inlined: it is checked to be hex first).
const DISCLOSING: &str = "BEGIN; SAVEPOINT gate; \
     SELECT 1 FROM subject_gates WHERE subject_ref = '{s}' FOR UPDATE; \
     ROLLBACK TO SAVEPOINT gate; \
     SELECT 1 FROM subject_locks WHERE subject_ref = '{s}' FOR KEY SHARE";
const CHANGING: &str = "BEGIN; \
     SELECT 1 FROM subject_gates WHERE subject_ref = '{s}' FOR UPDATE; \
     SELECT 1 FROM subject_locks WHERE subject_ref = '{s}' FOR UPDATE";
const ENSURE_SUBJECT: &str = "INSERT INTO subject_gates (subject_ref) VALUES ('{s}') \
     ON CONFLICT (subject_ref) DO NOTHING; \
     INSERT INTO subject_locks (subject_ref) VALUES ('{s}') \
     ON CONFLICT (subject_ref) DO NOTHING";

/// Records and consents in PostgreSQL with the row locks that order a child's
/// disclosures and consent changes, taken on connections of their own pool.
pub struct PgRecords {
    store: PgRecordStore,
    locks: Pool,
}

impl PgRecords {
    async fn hold(
        &self,
        subject: &SubjectRef,
        batch: &str,
    ) -> Result<SubjectHold, crate::records::StoreError> {
        let io = |e: tokio_postgres::Error| {
            crate::records::StoreError::Io(format!("postgres: {}", super::describe(&e)))
        };
        let hex = subject.as_str();
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(crate::records::StoreError::Corrupt(
                "a child's keyed hash is not hex".into(),
            ));
        }
        let client = self
            .locks
            .get()
            .await
            .map_err(|e| crate::records::StoreError::Io(format!("postgres: {e}")))?;
        let mut hold = RowHold {
            client: Some(client),
        };
        let client = hold.client.as_mut().expect("just set");
        let batch = batch.replace("{s}", hex);
        let rows = |messages: Vec<tokio_postgres::SimpleQueryMessage>| {
            messages
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count()
        };
        if rows(client.simple_query(&batch).await.map_err(io)?) < 2 {
            // The child's first disclosure or consent change: its rows are made
            // and committed on their own (made inside this transaction, they would
            // vanish with the ROLLBACK that ends every hold), then locked as asked.
            client.batch_execute("ROLLBACK").await.map_err(io)?;
            client
                .batch_execute(&ENSURE_SUBJECT.replace("{s}", hex))
                .await
                .map_err(io)?;
            if rows(client.simple_query(&batch).await.map_err(io)?) < 2 {
                return Err(crate::records::StoreError::Corrupt(
                    "a child's lock rows are missing after they were made".into(),
                ));
            }
        }
        Ok(SubjectHold::new(hold))
    }
}

#[async_trait]
impl RecordRepo for PgRecords {
    async fn put_record(
        &self,
        record: &Record,
        content: &[u8],
    ) -> Result<(), crate::records::StoreError> {
        self.store.put_record(record, content).await
    }

    async fn record(&self, id: &RecordId) -> Result<Option<Record>, crate::records::StoreError> {
        self.store.record(id).await
    }

    async fn records_about(
        &self,
        subject: &SubjectRef,
    ) -> Result<Vec<Record>, crate::records::StoreError> {
        self.store.records_about(subject).await
    }

    async fn content(&self, id: &RecordId) -> Result<Vec<u8>, crate::records::StoreError> {
        self.store.content(id).await
    }

    async fn expired_by(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<Due>, crate::records::StoreError> {
        Ok(self
            .store
            .expired_by(now, limit)
            .await?
            .into_iter()
            .map(|d| Due {
                id: d.id,
                key: Vec::new(),
            })
            .collect())
    }

    async fn forget(&self, _due: &Due) -> Result<(), crate::records::StoreError> {
        // The retention date is a column of the record's row: nothing to drop.
        Ok(())
    }

    async fn purge(&self, record: &Record) -> Result<(), crate::records::StoreError> {
        self.store.purge(record).await
    }

    async fn put_consent(&self, consent: &Consent) -> Result<(), crate::records::StoreError> {
        self.store.put_consent(consent).await
    }

    async fn consent(&self, id: &ConsentId) -> Result<Option<Consent>, crate::records::StoreError> {
        self.store.consent(id).await
    }

    async fn consents_about(
        &self,
        subject: &SubjectRef,
    ) -> Result<Vec<Consent>, crate::records::StoreError> {
        self.store.consents_about(subject).await
    }

    async fn disclosing(
        &self,
        subject: &SubjectRef,
    ) -> Result<SubjectHold, crate::records::StoreError> {
        self.hold(subject, DISCLOSING).await
    }

    async fn changing_consent(
        &self,
        subject: &SubjectRef,
    ) -> Result<SubjectHold, crate::records::StoreError> {
        self.hold(subject, CHANGING).await
    }

    async fn close(&self) -> Result<(), crate::records::StoreError> {
        Ok(())
    }
}

// === concerns ===

#[async_trait]
impl ConcernRepo for PgConcernStore {
    async fn get(&self, id: &ConcernId) -> Result<Option<Concern>, crate::concerns::StoreError> {
        PgConcernStore::get(self, id).await
    }

    async fn raised_by_key(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<ConcernId>, crate::concerns::StoreError> {
        PgConcernStore::raised_by_key(self, key).await
    }

    async fn raise(
        &self,
        concern: &Concern,
        key: Option<&IdempotencyKey>,
    ) -> Result<Raised, crate::concerns::StoreError> {
        PgConcernStore::raise(self, concern, key).await
    }

    async fn update(
        &self,
        id: &ConcernId,
        edit: EditFn,
    ) -> Result<Option<Concern>, crate::concerns::StoreError> {
        PgConcernStore::update(self, id, edit).await
    }

    async fn settle(
        &self,
        id: &ConcernId,
        until: OffsetDateTime,
    ) -> Result<(), crate::concerns::StoreError> {
        PgConcernStore::settle(self, id, until).await
    }

    async fn due_by(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<ConcernId>, crate::concerns::StoreError> {
        PgConcernStore::due_by(self, now).await
    }

    async fn events(
        &self,
        agency: &AgencyId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEvent)>, crate::concerns::StoreError> {
        PgConcernStore::events(self, agency, after, upto, limit).await
    }

    async fn append_event(
        &self,
        agency: &AgencyId,
        event: InboxEvent,
    ) -> Result<u64, crate::concerns::StoreError> {
        PgConcernStore::append_event(self, agency, event).await
    }

    fn durable_cursor(&self, agency: &AgencyId) -> Option<watch::Receiver<u64>> {
        PgConcernStore::durable_cursor(self, agency)
    }

    async fn catch_up(&self, agency: &AgencyId) -> Result<(), crate::concerns::StoreError> {
        PgConcernStore::catch_up(self, agency).await
    }

    async fn close(&self) -> Result<(), crate::concerns::StoreError> {
        PgConcernStore::close(self).await
    }
}
