//! The storage the concerns capability needs, as a trait: [`ConcernRepo`]. The sled
//! [`ConcernStore`] is the embedded default; [`crate::pg::PgConcernStore`] lets
//! several gateway replicas share one PostgreSQL database, with inbox cursors that
//! mean the same on every replica.

use async_trait::async_trait;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::model::{Concern, ConcernId, InboxEvent};
use super::store::{ConcernStore, Edit, IdempotencyKey, Raised, StoreError};
use crate::domain::AgencyId;

/// A change to one concern, decided from the concern as stored (under the store's
/// lock on it), returning what else to write with it.
pub type EditFn = Box<dyn FnOnce(&mut Concern) -> Edit + Send>;

/// Concerns, inboxes, idempotency keys and deadlines. Every write is durable when
/// it returns, and a new inbox event is announced on its agency's
/// [`ConcernRepo::durable_cursor`] only then.
#[async_trait]
pub trait ConcernRepo: Send + Sync + 'static {
    /// One concern.
    async fn get(&self, id: &ConcernId) -> Result<Option<Concern>, StoreError>;
    /// Several concerns, in the order asked, skipping any that are gone.
    async fn get_many(&self, ids: &[ConcernId]) -> Result<Vec<Concern>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(c) = self.get(id).await? {
                found.push(c);
            }
        }
        Ok(found)
    }
    /// The concern an idempotency key raised, if any.
    async fn raised_by_key(&self, key: &IdempotencyKey) -> Result<Option<ConcernId>, StoreError>;
    /// Stores a new concern, its key, its deadlines and its recipients' inbox
    /// events at once; or, if `key` raised one already, names that one.
    async fn raise(
        &self,
        concern: &Concern,
        key: Option<&IdempotencyKey>,
    ) -> Result<Raised, StoreError>;
    /// Changes a concern with `edit`, atomically with the events and deadline
    /// changes it returns. `None` if there is no such concern.
    async fn update(&self, id: &ConcernId, edit: EditFn) -> Result<Option<Concern>, StoreError>;
    /// Drops a concern's deadlines up to `until`.
    async fn settle(&self, id: &ConcernId, until: OffsetDateTime) -> Result<(), StoreError>;
    /// Concerns with a deadline at or before `now`.
    async fn due_by(&self, now: OffsetDateTime) -> Result<Vec<ConcernId>, StoreError>;
    /// Up to `limit` events of `agency`'s inbox with cursors in `after+1..=upto`.
    async fn events(
        &self,
        agency: &AgencyId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEvent)>, StoreError>;
    /// Appends one event to `agency`'s inbox; returns its cursor.
    async fn append_event(&self, agency: &AgencyId, event: InboxEvent) -> Result<u64, StoreError>;
    /// A watch on `agency`'s newest durable cursor.
    fn durable_cursor(&self, agency: &AgencyId) -> Option<watch::Receiver<u64>>;
    /// Reads `agency`'s newest durable cursor from the store itself and raises its
    /// [`ConcernRepo::durable_cursor`] to it: for a reader that must not answer with
    /// less than another replica has committed (its announcement reaches this
    /// replica's watch later), such as a listing or a refusal of a cursor.
    async fn catch_up(&self, agency: &AgencyId) -> Result<(), StoreError>;
    /// Makes everything durable and lets go of the store.
    async fn close(&self) -> Result<(), StoreError>;
}

impl ConcernStore {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ConcernStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Io(format!("store task: {e}")))?
    }
}

// Reads and writes run on the blocking pool: writes wait for an fdatasync, and a
// concern read is followed by more work than the hop costs.
#[async_trait]
impl ConcernRepo for ConcernStore {
    async fn get(&self, id: &ConcernId) -> Result<Option<Concern>, StoreError> {
        let id = id.clone();
        self.blocking(move |s| s.get(&id)).await
    }

    async fn get_many(&self, ids: &[ConcernId]) -> Result<Vec<Concern>, StoreError> {
        let ids = ids.to_vec();
        self.blocking(move |s| {
            let mut found = Vec::with_capacity(ids.len());
            for id in &ids {
                if let Some(c) = s.get(id)? {
                    found.push(c);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn raised_by_key(&self, key: &IdempotencyKey) -> Result<Option<ConcernId>, StoreError> {
        let key = key.clone();
        self.blocking(move |s| s.raised_by_key(&key)).await
    }

    async fn raise(
        &self,
        concern: &Concern,
        key: Option<&IdempotencyKey>,
    ) -> Result<Raised, StoreError> {
        let (concern, key) = (concern.clone(), key.cloned());
        self.blocking(move |s| s.raise(&concern, key.as_ref()))
            .await
    }

    async fn update(&self, id: &ConcernId, edit: EditFn) -> Result<Option<Concern>, StoreError> {
        let id = id.clone();
        self.blocking(move |s| s.update(&id, edit)).await
    }

    async fn settle(&self, id: &ConcernId, until: OffsetDateTime) -> Result<(), StoreError> {
        let id = id.clone();
        self.blocking(move |s| s.settle(&id, until)).await
    }

    async fn due_by(&self, now: OffsetDateTime) -> Result<Vec<ConcernId>, StoreError> {
        self.blocking(move |s| s.due_by(now)).await
    }

    async fn events(
        &self,
        agency: &AgencyId,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, InboxEvent)>, StoreError> {
        let agency = agency.clone();
        self.blocking(move |s| s.events(&agency, after, upto, limit))
            .await
    }

    async fn append_event(&self, agency: &AgencyId, event: InboxEvent) -> Result<u64, StoreError> {
        let agency = agency.clone();
        self.blocking(move |s| s.append_event(&agency, event)).await
    }

    fn durable_cursor(&self, agency: &AgencyId) -> Option<watch::Receiver<u64>> {
        ConcernStore::durable_cursor(self, agency)
    }

    // Only this process writes the sled store, and every write raises the watch
    // when it is durable: the watch is never behind.
    async fn catch_up(&self, _agency: &AgencyId) -> Result<(), StoreError> {
        Ok(())
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.blocking(|s| s.close()).await
    }
}
