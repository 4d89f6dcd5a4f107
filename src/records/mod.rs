//! Consent-bound records: sharing, finding and disclosing records about a child,
//! consent statements, the safeguarding override, and purging at the end of
//! retention.
//!
//! - [`model`]: what a record and a consent are here, and the requests.
//! - [`store`]: the sled database `data_dir/records` (sealed metadata and consents,
//!   indexes) and the sealed content files in `data_dir/record-content`.
//! - `flow`: ShareRecord, FindRecords, GetRecord.
//! - `consents`: RecordConsent, WithdrawConsent, ListConsents.
//! - `page`: the pages of FindRecords and ListConsents, and their tokens.
//! - [`notice`]: the [`OverrideNotifier`] that tells an owner of an override.
//! - `purge`: the retention sweeper.
//!
//! The decision itself is [`crate::domain::policy::decide`], and which consent is in
//! force is [`crate::domain::consent::consent_in_force`]: this module loads what they
//! need, calls them, audits, and stores.
//!
//! # Rules this capability keeps
//! - **Audit first.** Sharing (RECORD_SHARED), finding (RECORDS_FOUND: that a record
//!   about a child exists is itself a disclosure), disclosing (RECORD_DISCLOSED, with
//!   basis, lawful basis, consent id, and for an override its justification, which is
//!   sealed with the entry), refusing (DISCLOSURE_DENIED, with the reason),
//!   recording, withdrawing and listing consent (CONSENT_RECORDED, CONSENT_WITHDRAWN,
//!   CONSENTS_LISTED: who holds consent about a child tells of their involvement) and
//!   purging (RECORD_PURGED, actor `system`) are each durably audited before the
//!   change is stored or the answer is built. A crash between the two leaves an entry
//!   for something that did not happen, never the reverse.
//! - **Consent at the moment of disclosure.** Each GetRecord reads the consent
//!   statements from the store (no cache). Disclosures of a child's records hold a
//!   shared lock on that child from reading consent until their RECORD_DISCLOSED
//!   entry is durable; recording or withdrawing consent about the child holds it
//!   exclusively from its audit entry until the store is durable. So every
//!   disclosure that relied on a consent has an audit seq below that of the
//!   consent's withdrawal, and every request that starts after a withdrawal returns
//!   sees it. Each of these holds is kept by a task that runs to its end
//!   (`Sections::to_the_end`), not by the call's future: a call cancelled by its client or by
//!   the server's request timeout cannot release the child while a write it began
//!   (audit entry, store, consent cache) is unfinished.
//! - **Who learns what.** FindRecords lists only the records some agreement lets the
//!   caller's sector receive for the purpose given, and the caller's own. GetRecord
//!   answers NOT_FOUND, with the message of an unknown id, for a record of a category
//!   that no agreement lets the caller's sector receive for any purpose, so its
//!   existence is not revealed; for a receivable record asked for the wrong purpose
//!   it answers PERMISSION_DENIED. Past `retain_until` a record is disclosed to no
//!   one, its owner included (NOT_FOUND), and is purged by the sweeper.
//! - **Safeguarding override.** Allowed where the agreement allows one; the
//!   disclosure is audited as SAFEGUARDING_OVERRIDE with the justification, then the
//!   owner is notified ([`OverrideNotifier`], with the audit seq) before the content
//!   is returned. If the notice cannot be delivered the call fails, and a
//!   DISCLOSURE_DENIED entry (`OVERRIDE_NOTICE_FAILED: withheld; see seq N`) follows
//!   the RECORD_DISCLOSED one, so the log does not claim the content went out.
//! - **Consent statements** may be withdrawn only by the agency that recorded them
//!   (another agency records a REFUSED statement instead: the newest statement in
//!   scope wins). Withdrawing one already withdrawn returns it unchanged. A note is
//!   shown only to the agency that recorded it.
//! - **Never logged or in clear at rest:** NHS numbers, summaries, content,
//!   justifications, notes.

pub mod cache;
pub mod model;
pub mod notice;
pub mod repo;
pub mod store;

mod consents;
mod flow;
mod page;
mod purge;

use std::sync::Arc;

use ring::rand::{SecureRandom, SystemRandom};

pub use consents::ListedPage;
pub use flow::FoundPage;
pub use model::{
    Consent, ConsentId, DiscloseRequest, Disclosure, Found, NewConsent, NewRecord, Record, RecordId,
};
pub use notice::{NoNotifier, NoticeError, NoticeFuture, OverrideNotice, OverrideNotifier};
pub use page::Page;
pub use purge::{purge_periodically, PURGE_INTERVAL};
pub use repo::{RecordRepo, SledRecords, SubjectHold};
pub use store::{Due, RecordStore, StoreError};

use crate::audit::{Actor, AuditError, AuditHandle, NewEntry};
use crate::config::Config;
use crate::domain::policy::{Basis, Denied};
use crate::domain::{AgencyId, Clock, Purpose, Sector};
use crate::identity::Caller;
use crate::proto::v1::{AuditAction, AuditOutcome, DisclosureBasis, Purpose as PbPurpose};
use crate::store::keys::SubjectRef;
use crate::store::Keys;

/// Why a records or consent call was refused or failed. Messages are safe to return
/// to the caller: they never hold content, a summary of a record the caller may not
/// see, a note, an NHS number or a justification (`Store`, `Notice` and `Internal`
/// detail is logged, not returned).
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A field is malformed: INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// No such record or consent, or one the caller may not learn of: NOT_FOUND.
    #[error("{0}")]
    NotFound(String),
    /// Not the caller's to change: PERMISSION_DENIED.
    #[error("{0}")]
    Denied(String),
    /// The state forbids it (withdrawing a refusal): FAILED_PRECONDITION.
    #[error("{0}")]
    Precondition(String),
    /// Content over `limits.max_content_bytes`: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    TooLarge(String),
    /// The disclosure decision refused; the code follows the reason (see
    /// [`crate::domain::policy::DenyReason`]).
    #[error(transparent)]
    Refused(Denied),
    /// The audit log could not be written; nothing was disclosed or changed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The record store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The owner could not be told of an override, so nothing was disclosed.
    #[error(transparent)]
    Notice(#[from] NoticeError),
    /// Anything else that is the gateway's fault.
    #[error("{0}")]
    Internal(String),
}

/// The records capability: configuration, keys, the audit log, the store, the
/// clock, and who to tell of overrides.
pub struct Records {
    config: Arc<Config>,
    keys: Arc<Keys>,
    auditor: AuditHandle,
    clock: Arc<dyn Clock>,
    store: Arc<dyn RecordRepo>,
    notifier: Arc<dyn OverrideNotifier>,
    rng: SystemRandom,
    /// The sections running to their end ([`Records::to_the_end`]).
    sections: crate::domain::Sections,
}

// === impl Records ===

impl Records {
    /// Opens the sled store in `data_dir/records` (content in
    /// `data_dir/record-content`). Blocking. Override notices go nowhere until
    /// [`Records::with_notifier`].
    pub fn open(
        config: Arc<Config>,
        keys: Arc<Keys>,
        auditor: AuditHandle,
        clock: Arc<dyn Clock>,
    ) -> Result<Records, StoreError> {
        let store = RecordStore::open(
            &config.data_dir.join("records"),
            &config.data_dir.join("record-content"),
            keys.clone(),
        )?;
        Ok(Self::new(
            config,
            keys,
            auditor,
            clock,
            Arc::new(SledRecords::new(store)),
        ))
    }

    /// The capability over any store.
    pub fn new(
        config: Arc<Config>,
        keys: Arc<Keys>,
        auditor: AuditHandle,
        clock: Arc<dyn Clock>,
        store: Arc<dyn RecordRepo>,
    ) -> Records {
        Records {
            config,
            keys,
            auditor,
            clock,
            store,
            notifier: Arc::new(NoNotifier),
            rng: SystemRandom::new(),
            sections: crate::domain::Sections::default(),
        }
    }

    /// Tracks the sections that run to their end in `sections` (the gateway's,
    /// which it waits on before closing the stores).
    pub fn with_sections(mut self, sections: crate::domain::Sections) -> Self {
        self.sections = sections;
        self
    }

    /// Sends override notices to `notifier` (the gateway: the owner's inbox).
    pub fn with_notifier(mut self, notifier: Arc<dyn OverrideNotifier>) -> Self {
        self.notifier = notifier;
        self
    }

    /// The store (read access for tools and tests).
    pub fn store(&self) -> &Arc<dyn RecordRepo> {
        &self.store
    }

    /// Makes everything durable; called once the last call has finished.
    pub async fn close(&self) {
        if let Err(e) = self.store.close().await {
            tracing::error!(error = %e, "closing the record store");
        }
    }

    fn random_bytes(&self) -> Result<[u8; 16], RecordError> {
        let mut bytes = [0u8; 16];
        self.rng.fill(&mut bytes).map_err(|_| {
            RecordError::Internal("the system random number generator failed".into())
        })?;
        Ok(bytes)
    }

    /// An audit entry by `caller` about `subject`.
    fn entry(
        caller: &Caller,
        action: AuditAction,
        outcome: AuditOutcome,
        subject: &SubjectRef,
        request_id: &str,
    ) -> NewEntry {
        let mut entry = NewEntry::new(Actor::from(caller), action, outcome, request_id);
        entry.subject = Some(subject.clone());
        entry
    }

    /// [`crate::domain::Sections::to_the_end`] for the records capability: the sections that
    /// hold a child while they audit and store, whose hold must outlast every write
    /// they start, and a share's audit entry and store write.
    async fn to_the_end<T: Send + 'static>(
        &self,
        section: impl std::future::Future<Output = Result<T, RecordError>> + Send + 'static,
    ) -> Result<T, RecordError> {
        self.sections
            .to_the_end(section, RecordError::Internal)
            .await
    }

    /// Refuses an answer about a child of about `bytes`, more than
    /// `limits.max_message_bytes`: before tonic would fail to send it. The refusal
    /// tells of records or consents about the child, so `entry` (the listing's own)
    /// is audited first, DENIED, reason `TOO_LARGE: <n noun>`. Returns the
    /// RESOURCE_EXHAUSTED to answer, naming the `n` `noun`s (singular, plural)
    /// listed; unless the caller asked for a page (`paged`: a page too large is one
    /// entry too large), it says to ask for pages.
    async fn refuse_too_large(
        &self,
        mut entry: NewEntry,
        n: usize,
        noun: (&str, &str),
        bytes: usize,
        paged: bool,
    ) -> Result<RecordError, RecordError> {
        let counted = counted(n, noun);
        entry.outcome = AuditOutcome::Denied;
        entry.reason =
            format!("TOO_LARGE: {counted}, about {bytes} bytes (answered RESOURCE_EXHAUSTED)");
        self.auditor.append(entry).await?;
        let (what, verb) = match n {
            1 => (format!("the {}", noun.0), "does"),
            _ => (format!("the {counted}"), "do"),
        };
        let hint = if paged {
            ""
        } else {
            "; ask for them in pages (page_size)"
        };
        Ok(RecordError::TooLarge(format!(
            "{what} about this child {verb} not fit in one answer of limits.max_message_bytes ({} bytes){hint}",
            self.config.limits.max_message_bytes
        )))
    }
}

/// `n` of a `noun` (singular, plural): "1 record found", "3 records found".
fn counted(n: usize, (one, many): (&str, &str)) -> String {
    match n {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    }
}

/// The most ids an audit reason names of what a listing disclosed.
const MAX_IDS_IN_REASON: usize = 50;

/// The reason of a listing's audit entry: `head`, then the ids of what it
/// disclosed, at most [`MAX_IDS_IN_REASON`] of them and how many more.
fn reason_with_ids<'a>(head: String, ids: impl ExactSizeIterator<Item = &'a str>) -> String {
    let more = ids.len().saturating_sub(MAX_IDS_IN_REASON);
    let named: Vec<&str> = ids.take(MAX_IDS_IN_REASON).collect();
    let mut reason = head;
    if !named.is_empty() {
        reason.push_str(": ");
        reason.push_str(&named.join(" "));
    }
    if more > 0 {
        reason.push_str(&format!(" and {more} more"));
    }
    reason
}

/// The calling agency and its sector; other roles never reach these services (the
/// auth layer refuses them), but are refused here too.
fn agency_of(caller: &Caller) -> Result<(AgencyId, Sector), RecordError> {
    caller.agency().ok_or_else(|| {
        RecordError::Denied("RecordService and ConsentService are for agencies".into())
    })
}

/// [`crate::domain::check_text`], as a [`RecordError::Invalid`].
fn check_text(field: &str, value: &str, min: usize, max: usize) -> Result<(), RecordError> {
    crate::domain::check_text(field, value, min, max).map_err(RecordError::Invalid)
}

/// A time as RFC 3339, for audit reasons and messages.
fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// The audit log's name for a purpose.
fn pb_purpose(p: Purpose) -> PbPurpose {
    match p {
        Purpose::Safeguarding => PbPurpose::Safeguarding,
        Purpose::EarlyHelp => PbPurpose::EarlyHelp,
        Purpose::HealthCare => PbPurpose::HealthCare,
        Purpose::EducationSupport => PbPurpose::EducationSupport,
        Purpose::CrimePrevention => PbPurpose::CrimePrevention,
    }
}

/// The audit log's name for a basis.
fn pb_basis(b: Basis) -> DisclosureBasis {
    match b {
        Basis::Owner => DisclosureBasis::Owner,
        Basis::Consent => DisclosureBasis::Consent,
        Basis::AgreementNoConsentNeeded => DisclosureBasis::AgreementNoConsentNeeded,
        Basis::SafeguardingOverride => DisclosureBasis::SafeguardingOverride,
    }
}

#[cfg(test)]
mod tests;
