//! The storage the records capability needs, as a trait: [`RecordRepo`]. The sled
//! [`RecordStore`] is the embedded default; [`crate::pg::PgRecordStore`] lets several
//! gateway replicas share one PostgreSQL database. The flows in this module's parent
//! call nothing else, so both backends keep the same rules.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::model::{Consent, ConsentId, Record, RecordId};
use super::store::{Due, RecordStore, StoreError};
use crate::store::keys::SubjectRef;

/// What keeps a child's disclosures and consent changes in order until it is
/// dropped: a shared hold for a disclosure, an exclusive one for a consent change
/// (see the ordering rule in [`crate::records`]). Backends decide how: an
/// in-process lock stripe for sled, a row lock in an open transaction for
/// PostgreSQL, which orders replicas too.
pub struct SubjectHold(#[allow(dead_code)] Box<dyn Send + Sync>);

impl SubjectHold {
    /// Wraps whatever releases the hold when dropped.
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        SubjectHold(Box::new(guard))
    }
}

/// Records, their content, consent statements, and the ordering of disclosures
/// against consent changes about one child. Every write is durable when it returns.
#[async_trait]
pub trait RecordRepo: Send + Sync + 'static {
    /// Stores a record: metadata and sealed content. Storing an id again replaces it.
    async fn put_record(&self, record: &Record, content: &[u8]) -> Result<(), StoreError>;
    /// A record's metadata.
    async fn record(&self, id: &RecordId) -> Result<Option<Record>, StoreError>;
    /// Every record about `subject`.
    async fn records_about(&self, subject: &SubjectRef) -> Result<Vec<Record>, StoreError>;
    /// A record's content, opened.
    async fn content(&self, id: &RecordId) -> Result<Vec<u8>, StoreError>;
    /// The records whose retention ended at or before `now`, soonest first, at most
    /// `limit`.
    async fn expired_by(&self, now: OffsetDateTime, limit: usize) -> Result<Vec<Due>, StoreError>;
    /// Drops a retention entry whose record is gone.
    async fn forget(&self, due: &Due) -> Result<(), StoreError>;
    /// Deletes a record and its content. Deleting what is gone is not an error.
    async fn purge(&self, record: &Record) -> Result<(), StoreError>;
    /// Stores a consent statement, new or changed.
    async fn put_consent(&self, consent: &Consent) -> Result<(), StoreError>;
    /// One consent statement.
    async fn consent(&self, id: &ConsentId) -> Result<Option<Consent>, StoreError>;
    /// Every consent statement about `subject`, as stored now: a change that
    /// [`RecordRepo::put_consent`] has answered is in what any later call returns.
    async fn consents_about(&self, subject: &SubjectRef) -> Result<Vec<Consent>, StoreError>;
    /// Holds `subject` shared for a disclosure: from before its consent is read
    /// until its audit entry is durable.
    async fn disclosing(&self, subject: &SubjectRef) -> Result<SubjectHold, StoreError>;
    /// Holds `subject` exclusively for a consent change: from before its audit
    /// entry until the change is stored.
    async fn changing_consent(&self, subject: &SubjectRef) -> Result<SubjectHold, StoreError>;
    /// Makes everything durable and lets go of the store.
    async fn close(&self) -> Result<(), StoreError>;
}

/// The sled store with the in-process lock stripes that order one gateway's
/// disclosures and consent changes, and its consent cache.
pub struct SledRecords {
    store: RecordStore,
    locks: SubjectLocks,
    consents: Arc<ConsentCache>,
}

impl SledRecords {
    /// Wraps an open store.
    pub fn new(store: RecordStore) -> Self {
        SledRecords {
            store,
            locks: SubjectLocks::new(256),
            consents: Arc::default(),
        }
    }

    /// The store (read access for tools and tests).
    pub fn store(&self) -> &RecordStore {
        &self.store
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&RecordStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Io(format!("store task: {e}")))?
    }
}

// sled reads answer from its page cache: they run on the calling task, because a
// hop to the blocking pool costs more than the read (profiled: about a third of a
// GetRecord's server CPU). Writes and file reads go to the blocking pool, so a cold
// or busy disk never stalls a worker.
#[async_trait]
impl RecordRepo for SledRecords {
    async fn put_record(&self, record: &Record, content: &[u8]) -> Result<(), StoreError> {
        let (record, content) = (record.clone(), content.to_vec());
        self.blocking(move |s| s.put_record(&record, &content))
            .await
    }

    async fn record(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.store.record(id)
    }

    async fn records_about(&self, subject: &SubjectRef) -> Result<Vec<Record>, StoreError> {
        self.store.records_about(subject)
    }

    async fn content(&self, id: &RecordId) -> Result<Vec<u8>, StoreError> {
        if let Some(content) = self.store.cached_content(id)? {
            return Ok(content);
        }
        let id = id.clone();
        self.blocking(move |s| s.content(&id)).await
    }

    async fn expired_by(&self, now: OffsetDateTime, limit: usize) -> Result<Vec<Due>, StoreError> {
        self.blocking(move |s| s.expired_by(now, limit)).await
    }

    async fn forget(&self, due: &Due) -> Result<(), StoreError> {
        let due = due.clone();
        self.blocking(move |s| s.forget(&due)).await
    }

    async fn purge(&self, record: &Record) -> Result<(), StoreError> {
        let record = record.clone();
        self.blocking(move |s| s.purge(&record)).await
    }

    async fn put_consent(&self, consent: &Consent) -> Result<(), StoreError> {
        let (consent, cache) = (consent.clone(), self.consents.clone());
        self.blocking(move |s| {
            let stored = s.put_consent(&consent);
            // Here, not after the await: the write completes even if the call is
            // cancelled meanwhile. Whether or not it went through, the cache may
            // no longer match the store.
            cache.forget(&consent.subject_ref());
            stored
        })
        .await
    }

    async fn consent(&self, id: &ConsentId) -> Result<Option<Consent>, StoreError> {
        self.store.consent(id)
    }

    async fn consents_about(&self, subject: &SubjectRef) -> Result<Vec<Consent>, StoreError> {
        if let Some(consents) = self.consents.get(subject) {
            return Ok(consents);
        }
        let generation = self.consents.generation();
        let consents = self.store.consents_about(subject)?;
        self.consents.keep(subject, generation, &consents);
        Ok(consents)
    }

    async fn disclosing(&self, subject: &SubjectRef) -> Result<SubjectHold, StoreError> {
        Ok(SubjectHold::new(
            self.locks.stripe(subject).clone().read_owned().await,
        ))
    }

    async fn changing_consent(&self, subject: &SubjectRef) -> Result<SubjectHold, StoreError> {
        Ok(SubjectHold::new(
            self.locks.stripe(subject).clone().write_owned().await,
        ))
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.blocking(|s| s.close()).await
    }
}

/// Each child's consent statements as last read from the store, so that a
/// disclosure need not scan, open and decode them again (profiled: about a tenth of
/// a GetRecord's server CPU).
///
/// A withdrawal still binds the very next call: every consent write goes through
/// [`SledRecords::put_consent`], which drops the child's entry once the store has
/// the change and before the change is answered; a consent change holds the
/// child's hold exclusively meanwhile, so no disclosure reads between the write and
/// the drop. A read that raced a write never fills the cache with what it read
/// before the write: every drop moves the generation on, and a read keeps what it
/// read only if the generation has not moved since it started.
#[derive(Default)]
struct ConsentCache(std::sync::Mutex<CachedConsents>);

#[derive(Default)]
struct CachedConsents {
    generation: u64,
    by_subject: std::collections::HashMap<SubjectRef, Vec<Consent>>,
}

impl ConsentCache {
    /// Children whose statements are kept; the cache starts over when full.
    const CAPACITY: usize = 4096;

    fn lock(&self) -> std::sync::MutexGuard<'_, CachedConsents> {
        // Nothing that panics runs under the lock; a poisoned one is still whole.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, subject: &SubjectRef) -> Option<Vec<Consent>> {
        self.lock().by_subject.get(subject).cloned()
    }

    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps `consents`, read from the store after `generation` was current, unless
    /// a write has dropped anything since.
    fn keep(&self, subject: &SubjectRef, generation: u64, consents: &[Consent]) {
        let mut cache = self.lock();
        if cache.generation != generation {
            return;
        }
        if cache.by_subject.len() >= Self::CAPACITY {
            cache.by_subject.clear();
        }
        cache.by_subject.insert(subject.clone(), consents.to_vec());
    }

    fn forget(&self, subject: &SubjectRef) {
        let mut cache = self.lock();
        cache.generation += 1;
        cache.by_subject.remove(subject);
    }
}

/// Read-write locks picked by a child's keyed hash: disclosures of the child's
/// records share one, consent changes about the child take it alone. Striped, so
/// there is no lock per child; a holder never takes a second stripe. Held across
/// awaits on purpose: the ordering they give is between an audit append and a store
/// read or write.
struct SubjectLocks(Vec<Arc<tokio::sync::RwLock<()>>>);

impl SubjectLocks {
    fn new(n: usize) -> Self {
        SubjectLocks(
            (0..n.max(1))
                .map(|_| Arc::new(tokio::sync::RwLock::new(())))
                .collect(),
        )
    }

    fn stripe(&self, subject: &SubjectRef) -> &Arc<tokio::sync::RwLock<()>> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        subject.as_str().hash(&mut h);
        &self.0[(h.finish() % self.0.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::ConsentCache;
    use crate::store::keys::SubjectRef;

    /// A read that started before a write must not fill the cache after the write
    /// dropped the child's entry.
    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let cache = ConsentCache::default();
        let child = SubjectRef::from_hex("ab".repeat(32));
        let before = cache.generation();
        cache.forget(&child);
        cache.keep(&child, before, &[]);
        assert!(cache.get(&child).is_none());
        let after = cache.generation();
        cache.keep(&child, after, &[]);
        assert_eq!(cache.get(&child), Some(vec![]));
        cache.forget(&child);
        assert!(cache.get(&child).is_none());
    }
}
