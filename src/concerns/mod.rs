//! Concern notifications: raising, routing to the recipients and the front door,
//! durable per-agency inboxes with cursors, delivery, acknowledgement, the front
//! door's decision, and escalation of missed acknowledgement deadlines.
//!
//! - [`model`]: what a concern is and the pure rules (routing, status, [`overdue`]).
//! - [`store`]: the sled database `data_dir/store` (sealed concerns, inboxes,
//!   idempotency keys, deadlines), every change durable before it is reported.
//! - `flow`: RaiseConcern, GetConcern, ListInbox, AcknowledgeConcern, RecordDecision.
//! - `inbox`: SubscribeInbox streams.
//! - `sweeper`: the deadline sweeper.
//!
//! # Rules this capability keeps
//! - **Audit first.** Raising, acknowledging, deciding and escalating are each
//!   audited (CONCERN_RAISED, _ACKNOWLEDGED, _DECIDED, _ESCALATED) before the change
//!   is stored. The first time a concern's narrative goes to a recipient, on its
//!   stream, in ListInbox or in any other response, that disclosure is audited
//!   (CONCERN_DELIVERED, actor the recipient, target the recipient) and durable
//!   before the response leaves, and the delivery's `delivered_at` is set to the
//!   audit entry's time. Later reads by the same recipient are not audited again;
//!   the sender reading its own concern is not a disclosure. A crash between an
//!   audit entry and the store's write leaves an entry for a change that did not
//!   happen (never the reverse); a retry then makes it again.
//! - **Who sees what.** Only the sender and the recipients know a concern exists:
//!   anyone else gets NOT_FOUND, with the message an unknown id gets. Only
//!   recipients acknowledge (the sender gets PERMISSION_DENIED); only the front
//!   door decides (other parties get PERMISSION_DENIED). Each refusal is audited
//!   durably before it is answered (GetConcern: DISCLOSURE_DENIED; otherwise the
//!   attempted CONCERN_ACKNOWLEDGED or _DECIDED with outcome DENIED), an unknown id
//!   like a concern the caller may not see; a short fixed reason tells them apart
//!   in the log only. A decision that differs from the one recorded is refused
//!   (FAILED_PRECONDITION, the message naming what differs) and audited the same
//!   way (CONCERN_DECIDED, DENIED, ALREADY_DECIDED).
//! - **Routing.** The requested recipients, duplicates removed, plus the front door
//!   unless it is the sender (a concern is never sent to its own sender, so the front
//!   door raising one must name someone else).
//! - **Deadlines.** Each recipient has its own deadline from the
//!   [`AckCalendar`]: the urgency's, tightened
//!   to 08:30 on the next school day for an Operation Encompass recipient (a police
//!   DOMESTIC_ABUSE concern to a school). The Concern's `ack_due_at` is the earliest.
//!   A recipient that has not acknowledged by its deadline is escalated once: a
//!   CONCERN_ESCALATED entry per late recipient, then one Escalation event to the
//!   sender and one to the front door (one when they are the same agency).
//! - **Status** is derived, never stored: see [`Concern::status`].
//! - **ListInbox** lists the concerns delivered to the caller as a recipient,
//!   oldest first; a sender's own concerns are not in its inbox (it has their ids
//!   from RaiseConcern and its Escalation events).
//! - **Idempotency.** A RaiseConcern with a non-empty `request_id` that the same
//!   sender used before, with the same content (child, category, urgency,
//!   narrative, and the recipients after routing), returns the concern the first
//!   call raised, as it stands now, even after a restart; nothing new is audited,
//!   stored or sent. With different content it is a new concern under a used key:
//!   nothing is raised, and the refusal (FAILED_PRECONDITION, naming the concern
//!   the key raised) is audited CONCERN_RAISED with outcome DENIED
//!   (REQUEST_ID_REUSED), so that a referral is never silently dropped.
//! - **Never logged:** narratives, notes and NHS numbers. Error messages name fields
//!   and ids, never another agency's data.

pub mod model;
pub mod repo;
pub mod store;

mod flow;
mod inbox;
mod sweeper;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};

pub use flow::{InboxPage, RaiseRequest};
pub use inbox::{InboxItem, InboxLag, InboxLagReport, InboxStream};
pub use model::{
    overdue, Concern, ConcernId, ConcernStatus, Decision, DecisionRecord, Delivery, Escalation,
    InboxEvent, Overdue, OverrideNoticeEvent,
};
pub use repo::{ConcernRepo, EditFn};
pub use store::{ConcernStore, StoreError};
pub use sweeper::{sweep_interval, sweep_periodically};

use crate::audit::{AuditError, AuditHandle};
use crate::config::Config;
use crate::domain::deadline::AckCalendar;
use crate::domain::{AgencyId, Clock, Sector};
use crate::identity::Caller;
use crate::store::Keys;

/// Why a concern call was refused or failed. Messages are safe to return to the
/// caller: they never hold a narrative, a note, an NHS number or another agency's
/// data (`Store` and `Internal` detail is logged, not returned).
#[derive(Debug, thiserror::Error)]
pub enum ConcernError {
    /// A field is malformed: INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// No such concern, or the caller is not a party to it: NOT_FOUND.
    #[error("concern {0} not found")]
    NotFound(String),
    /// The caller is a party but may not do this: PERMISSION_DENIED.
    #[error("{0}")]
    Denied(String),
    /// The concern's state forbids it (a different decision already recorded):
    /// FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// A limit was reached (subscriptions, a stalled stream): RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Exhausted(String),
    /// A cursor beyond the inbox: OUT_OF_RANGE.
    #[error("{0}")]
    OutOfRange(String),
    /// The store could not be read to answer, so nothing was refused or changed and
    /// the call may be retried: UNAVAILABLE. `message` is for the caller, `detail`
    /// for the log.
    #[error("{message}")]
    Unavailable {
        /// What could not be done, safe to return.
        message: String,
        /// Why.
        detail: StoreError,
    },
    /// The audit log could not be written; nothing was disclosed or changed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The concern store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else that is the gateway's fault.
    #[error("{0}")]
    Internal(String),
}

/// How long a subscriber may leave an event untaken before its stream is ended with
/// RESOURCE_EXHAUSTED (it resumes from its cursor).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(30);

/// The concerns capability: configuration, the audit log, the store, the clock.
pub struct Concerns {
    config: Arc<Config>,
    keys: Arc<Keys>,
    auditor: AuditHandle,
    clock: Arc<dyn Clock>,
    calendar: AckCalendar,
    store: Arc<dyn ConcernRepo>,
    rng: SystemRandom,
    locks: Stripes,
    subscribers: Arc<inbox::Subscribers>,
    stall_after: Duration,
    /// The flows running to their end ([`crate::domain::Sections`]).
    sections: crate::domain::Sections,
}

// === impl Concerns ===

impl Concerns {
    /// Opens the sled store in `data_dir/store`. Blocking.
    pub fn open(
        config: Arc<Config>,
        keys: Arc<Keys>,
        auditor: AuditHandle,
        clock: Arc<dyn Clock>,
    ) -> Result<Concerns, StoreError> {
        let dir = config.data_dir.join("store");
        let store = ConcernStore::open(
            &dir,
            keys.clone(),
            config.agencies.iter().map(|a| a.id.clone()),
        )?;
        Ok(Self::new(config, keys, auditor, clock, Arc::new(store)))
    }

    /// The capability over any store.
    pub fn new(
        config: Arc<Config>,
        keys: Arc<Keys>,
        auditor: AuditHandle,
        clock: Arc<dyn Clock>,
        store: Arc<dyn ConcernRepo>,
    ) -> Concerns {
        Concerns {
            calendar: AckCalendar::from_config(&config.deadlines),
            subscribers: Arc::new(inbox::Subscribers::new(
                config.limits.max_subscribers_per_agency,
            )),
            config,
            keys,
            auditor,
            clock,
            store,
            rng: SystemRandom::new(),
            locks: Stripes::new(64),
            stall_after: DEFAULT_STALL_AFTER,
            sections: crate::domain::Sections::default(),
        }
    }

    /// Tracks the flows that run to their end in `sections` (the gateway's, which
    /// it waits on before closing the stores).
    pub fn with_sections(mut self, sections: crate::domain::Sections) -> Self {
        self.sections = sections;
        self
    }

    /// Sets how long a stream may stall before it is ended (tests).
    pub fn with_stall_after(mut self, stall_after: Duration) -> Self {
        self.stall_after = stall_after;
        self
    }

    /// The store (read access for tools and tests).
    pub fn store(&self) -> &Arc<dyn ConcernRepo> {
        &self.store
    }

    /// Makes everything durable; called once the last call has finished.
    pub async fn close(&self) {
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "closing the concern store");
        }
    }

    /// Puts an override notice in `owner`'s inbox, durably; subscribers get it at
    /// once. Returns only when it is on disk.
    pub async fn notify_override(
        &self,
        owner: &AgencyId,
        notice: OverrideNoticeEvent,
    ) -> Result<u64, ConcernError> {
        Ok(self
            .store
            .append_event(owner, InboxEvent::OverrideNotice(notice))
            .await?)
    }

    /// Runs a call's whole flow in a task of its own ([`crate::domain::Sections`]):
    /// each flow appends audit entries and then stores what they record (a raise,
    /// a delivery, an acknowledgement, a decision), and a call dropped between the
    /// two (client gone, request timeout) must not leave an entry for a change that
    /// was never stored.
    async fn to_the_end<T, F>(
        self: &Arc<Self>,
        caller: &Caller,
        request_id: &str,
        flow: impl FnOnce(Arc<Self>, Caller, String) -> F,
    ) -> Result<T, ConcernError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ConcernError>> + Send + 'static,
    {
        let section = flow(self.clone(), caller.clone(), request_id.to_owned());
        self.sections
            .to_the_end(section, ConcernError::Internal)
            .await
    }

    /// The lock that serialises, within this process, the changes to one concern
    /// that depend on its current state: acknowledgements, decisions and the
    /// sweeper's escalations.
    async fn lock_changes(&self, id: &ConcernId) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks.lock(&format!("change/{id}")).await
    }

    async fn load(&self, id: &ConcernId) -> Result<Option<Concern>, ConcernError> {
        Ok(self.store.get(id).await?)
    }

    fn new_id(&self) -> Result<ConcernId, ConcernError> {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes).map_err(|_| {
            ConcernError::Internal("the system random number generator failed".into())
        })?;
        Ok(ConcernId::from_random(bytes))
    }
}

/// The calling agency and its sector; other roles never reach ConcernService (the
/// auth layer refuses them), but are refused here too.
fn agency_of(caller: &Caller) -> Result<(AgencyId, Sector), ConcernError> {
    caller
        .agency()
        .ok_or_else(|| ConcernError::Denied("ConcernService is for agencies".into()))
}

/// A fixed set of async locks picked by a key's hash: serialises work on one key
/// (a delivery, an acknowledgement, an idempotency key) without a lock per key.
/// A holder must not take a second stripe (two keys may share one).
struct Stripes(Vec<tokio::sync::Mutex<()>>);

impl Stripes {
    fn new(n: usize) -> Self {
        Stripes((0..n.max(1)).map(|_| tokio::sync::Mutex::new(())).collect())
    }

    async fn lock(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let i = (h.finish() % self.0.len() as u64) as usize;
        self.0[i].lock().await
    }
}
