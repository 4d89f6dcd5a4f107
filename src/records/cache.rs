//! A bounded cache of what a disclosure reads about a record that never changes:
//! its metadata, decoded, and its content **as sealed on disk** (it is opened at each
//! read, so no content is kept in clear).
//!
//! Records are immutable from ShareRecord until the purge, so the only way an entry
//! goes stale is a purge. A purge bumps the cache's epoch after the record is gone
//! from the store, and a reader only fills the cache if the epoch it saw before its
//! own store read is still current: a read that raced a purge is served but never
//! cached. Even a stale entry could not disclose: retention is the first rule of the
//! decision, and a purged record is past its `retain_until`.
//!
//! Consents are not cached here: [`super::repo::SledRecords`] keeps them apart, in a
//! cache that every consent write empties for its child before it is answered, so a
//! withdrawal still applies to the very next call.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::model::{Record, RecordId};

/// Sealed contents larger than this are read from their file each time.
pub const MAX_CACHED_CONTENT_BYTES: usize = 64 * 1024;

/// The cache's limits.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most records' metadata held.
    pub records: usize,
    /// Most bytes of sealed content held.
    pub content_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            records: 16_384,
            content_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What a reader saw before reading the store; see the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Epoch(u64);

#[derive(Default)]
struct Inner {
    records: HashMap<RecordId, Arc<Record>>,
    contents: HashMap<RecordId, Arc<[u8]>>,
    content_bytes: usize,
    /// Ids in the order they were kept: the oldest goes first (FIFO). An id whose
    /// entry a purge removed stays here until it reaches the front.
    record_order: VecDeque<RecordId>,
    content_order: VecDeque<RecordId>,
}

impl Inner {
    /// Drops the oldest record still held.
    fn evict_record(&mut self) {
        while let Some(id) = self.record_order.pop_front() {
            if self.records.remove(&id).is_some() {
                return;
            }
        }
    }

    /// Drops the oldest content still held.
    fn evict_content(&mut self) {
        while let Some(id) = self.content_order.pop_front() {
            if let Some(gone) = self.contents.remove(&id) {
                self.content_bytes -= gone.len();
                return;
            }
        }
    }

    /// Keeps the order queues from growing with the ids of purged records.
    fn compact(&mut self) {
        if self.record_order.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.record_order.retain(|id| records.contains_key(id));
        }
        if self.content_order.len() > 2 * self.contents.len() + 64 {
            let contents = &self.contents;
            self.content_order.retain(|id| contents.contains_key(id));
        }
    }
}

/// The cache. Shared by the clones of a store.
pub struct RecordCache {
    limits: CacheLimits,
    epoch: AtomicU64,
    inner: Mutex<Inner>,
}

impl RecordCache {
    /// An empty cache.
    pub fn new(limits: CacheLimits) -> Self {
        RecordCache {
            limits,
            epoch: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Call before reading the store, and pass to the `keep_*` call after it.
    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Acquire))
    }

    /// The record's metadata, if cached.
    pub fn record(&self, id: &RecordId) -> Option<Arc<Record>> {
        self.lock().records.get(id).cloned()
    }

    /// The record's sealed content, if cached.
    pub fn content(&self, id: &RecordId) -> Option<Arc<[u8]>> {
        self.lock().contents.get(id).cloned()
    }

    /// Keeps metadata read from the store, unless a purge happened since `seen`.
    pub fn keep_record(&self, seen: Epoch, record: Arc<Record>) {
        if self.limits.records == 0 {
            return;
        }
        let mut inner = self.lock();
        if !self.current(seen) || inner.records.contains_key(&record.id) {
            return;
        }
        if inner.records.len() >= self.limits.records {
            inner.evict_record();
        }
        inner.record_order.push_back(record.id.clone());
        inner.records.insert(record.id.clone(), record);
    }

    /// Keeps sealed content read from the store, unless it is large or a purge
    /// happened since `seen`.
    pub fn keep_content(&self, seen: Epoch, id: &RecordId, sealed: Arc<[u8]>) {
        let len = sealed.len();
        if len > MAX_CACHED_CONTENT_BYTES || len > self.limits.content_bytes {
            return;
        }
        let mut inner = self.lock();
        if !self.current(seen) || inner.contents.contains_key(id) {
            return;
        }
        while inner.content_bytes + len > self.limits.content_bytes && !inner.contents.is_empty() {
            inner.evict_content();
        }
        inner.content_bytes += len;
        inner.content_order.push_back(id.clone());
        inner.contents.insert(id.clone(), sealed);
    }

    /// Forgets a record; called once it has been purged from the store.
    pub fn forget(&self, id: &RecordId) {
        let mut inner = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        inner.records.remove(id);
        if let Some(gone) = inner.contents.remove(id) {
            inner.content_bytes -= gone.len();
        }
        inner.compact();
    }

    fn current(&self, seen: Epoch) -> bool {
        self.epoch.load(Ordering::Acquire) == seen.0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The cache holds no invariant a panicking holder could break halfway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{AgencyId, NhsNumber, RecordCategory, Sector};
    use crate::store::keys::SubjectRef;
    use time::OffsetDateTime;

    fn record(n: u8) -> Arc<Record> {
        Arc::new(Record {
            id: RecordId::from_random([n; 16]),
            subject: NhsNumber::parse("9434765919").expect("valid"),
            subject_ref: SubjectRef::from_hex("ab".repeat(32)),
            owner: AgencyId::parse("nhs-guys").expect("valid"),
            owner_sector: Sector::Health,
            category: RecordCategory::Other,
            summary: "s".into(),
            media_type: "text/plain".into(),
            content_len: 1,
            shared_at: OffsetDateTime::UNIX_EPOCH,
            retain_until: OffsetDateTime::UNIX_EPOCH,
        })
    }

    #[test]
    fn a_read_that_raced_a_purge_is_not_kept() {
        let cache = RecordCache::new(CacheLimits::default());
        let r = record(1);
        let seen = cache.epoch();
        cache.forget(&r.id);
        cache.keep_record(seen, r.clone());
        cache.keep_content(seen, &r.id, Arc::from(&b"sealed"[..]));
        assert!(cache.record(&r.id).is_none());
        assert!(cache.content(&r.id).is_none());

        let seen = cache.epoch();
        cache.keep_record(seen, r.clone());
        cache.keep_content(seen, &r.id, Arc::from(&b"sealed"[..]));
        assert!(cache.record(&r.id).is_some());
        assert_eq!(cache.content(&r.id).as_deref(), Some(&b"sealed"[..]));
        cache.forget(&r.id);
        assert!(cache.record(&r.id).is_none());
        assert!(cache.content(&r.id).is_none());
    }

    #[test]
    fn limits_are_kept() {
        let cache = RecordCache::new(CacheLimits {
            records: 3,
            content_bytes: 10,
        });
        for n in 0..10 {
            let r = record(n);
            cache.keep_record(cache.epoch(), r.clone());
            cache.keep_content(cache.epoch(), &r.id, Arc::from(&[n; 4][..]));
        }
        let inner = cache.lock();
        assert_eq!(inner.records.len(), 3);
        assert!(
            inner.content_bytes <= 10,
            "{} bytes held",
            inner.content_bytes
        );
        assert_eq!(
            inner.content_bytes,
            inner.contents.values().map(|c| c.len()).sum::<usize>()
        );
        drop(inner);
        // The oldest go first: of records 0..10, 7, 8 and 9 are left.
        for n in 0..10 {
            assert_eq!(cache.record(&record(n).id).is_some(), n >= 7, "record {n}");
        }
        // Over the per-entry limit: never kept.
        let big = record(99);
        cache.keep_content(cache.epoch(), &big.id, Arc::from(vec![0u8; 11]));
        assert!(cache.content(&big.id).is_none());
    }

    #[test]
    fn purged_ids_do_not_pile_up_in_the_eviction_order() {
        let cache = RecordCache::new(CacheLimits::default());
        for _round in 0..4 {
            for n in 0..=255u8 {
                let r = record(n);
                cache.keep_record(cache.epoch(), r.clone());
                cache.keep_content(cache.epoch(), &r.id, Arc::from(&b"sealed"[..]));
                cache.forget(&r.id);
            }
        }
        let inner = cache.lock();
        assert!(inner.records.is_empty() && inner.contents.is_empty());
        assert_eq!(inner.content_bytes, 0);
        assert!(
            inner.record_order.len() <= 65,
            "{}",
            inner.record_order.len()
        );
        assert!(
            inner.content_order.len() <= 65,
            "{}",
            inner.content_order.len()
        );
    }
}
