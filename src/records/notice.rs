//! Telling a record's owner that its record was disclosed under a safeguarding
//! override (DESIGN.md invariant 5: "it is flagged, and the record's owner is told").
//!
//! The records capability does not know where notices go: it calls an
//! [`OverrideNotifier`] once the disclosure's audit entry is durable and before the
//! content is returned. The gateway wires one that puts an `OverrideNotice` in the
//! owner's concern inbox; [`NoNotifier`] drops them (tests, and builds without an
//! inbox). A notifier that fails makes the disclosure fail too: content is never
//! returned under an override the owner was not told of.

use std::future::Future;
use std::pin::Pin;

use super::model::RecordId;
use crate::domain::AgencyId;
use crate::store::keys::SubjectRef;

/// A disclosure under a safeguarding override, for the record's owner. Holds the
/// justification (which goes to the owner, and nowhere else outside the sealed audit
/// log), so it must never be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct OverrideNotice {
    /// The record disclosed.
    pub record_id: RecordId,
    /// The child, by keyed hash.
    pub subject_ref: SubjectRef,
    /// The record's owner: the agency to tell.
    pub owner: AgencyId,
    /// The agency that read the record.
    pub recipient: AgencyId,
    /// Why the recipient said it needed the record without consent.
    pub justification: String,
    /// The seq of the durable RECORD_DISCLOSED entry.
    pub audit_seq: u64,
}

impl std::fmt::Debug for OverrideNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverrideNotice")
            .field("record_id", &self.record_id)
            .field("owner", &self.owner)
            .field("recipient", &self.recipient)
            .field("justification", &"<redacted>")
            .field("audit_seq", &self.audit_seq)
            .finish()
    }
}

/// Why a notice could not be delivered; the text goes to the log, not to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("override notice not delivered: {0}")]
pub struct NoticeError(pub String);

/// What [`OverrideNotifier::notify`] returns.
pub type NoticeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), NoticeError>> + Send + 'a>>;

/// Delivers override notices to owners. `notify` must return only once the notice
/// is durable where the owner will find it (its inbox).
pub trait OverrideNotifier: Send + Sync + 'static {
    /// Delivers one notice.
    fn notify(&self, notice: OverrideNotice) -> NoticeFuture<'_>;
}

/// A notifier that delivers nothing: for tests and until an inbox is wired.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoNotifier;

impl OverrideNotifier for NoNotifier {
    fn notify(&self, notice: OverrideNotice) -> NoticeFuture<'_> {
        tracing::debug!(record = %notice.record_id, owner = %notice.owner, seq = notice.audit_seq, "override notice dropped: no notifier wired");
        Box::pin(async { Ok(()) })
    }
}
