//! RecordConsent, WithdrawConsent, ListConsents.

use super::model::{Consent, ConsentId, NewConsent};
use super::page::{Page, Paging};
use super::repo::SubjectHold;
use super::store::{micros, stored_time};
use super::{agency_of, check_text, counted, reason_with_ids, RecordError, Records};
use crate::audit::NewEntry;
use crate::domain::consent::{recording_time, ConsentScope, ConsentState, ConsentStatement};
use crate::domain::{AgencyId, NhsNumber};
use crate::identity::Caller;
use crate::proto::v1::{AuditAction, AuditOutcome};

/// One answer of ListConsents.
#[derive(Debug, Clone)]
pub struct ListedPage {
    /// The statements, newest first.
    pub consents: Vec<Consent>,
    /// The token of the next page, when there are more.
    pub next_page_token: Option<String>,
}

/// What ListConsents counts, singular and plural.
const STATEMENT: (&str, &str) = ("consent statement", "consent statements");

/// The order ListConsents lists statements in, newest first: by this key,
/// descending.
fn listed_key(consent: &Consent) -> (i64, &str) {
    (micros(consent.statement.recorded_at), consent.id())
}

impl Records {
    /// RecordConsent: validates the statement (scope rules in
    /// [`crate::domain::consent`]; every recipient agency registered; at least one
    /// category), audits it (CONSENT_RECORDED, the note sealed with the entry) and
    /// stores it durably. From then on it counts for every disclosure.
    pub async fn record_consent(
        &self,
        caller: &Caller,
        req: NewConsent,
        request_id: &str,
    ) -> Result<Consent, RecordError> {
        let (recorder, _) = agency_of(caller)?;
        check_text("note", &req.note, 0, self.config.limits.max_note_chars)?;
        if req.categories.is_empty() {
            return Err(RecordError::Invalid(
                "categories must name at least one record category".into(),
            ));
        }
        let registry = self.config.registry();
        let mut agencies = std::collections::BTreeSet::new();
        for id in &req.recipient_agency_ids {
            let agency = AgencyId::parse(id)
                .ok()
                .filter(|a| registry.agency(a.as_str()).is_some())
                .ok_or_else(|| {
                    RecordError::Invalid(format!(
                        "recipient_agency_ids: {:?} is not a registered agency",
                        crate::domain::ids::shown(id)
                    ))
                })?;
            agencies.insert(agency);
        }
        let scope = ConsentScope::parse(
            req.purposes.into_iter().collect(),
            req.recipient_sectors.into_iter().collect(),
            agencies,
            req.categories.into_iter().collect(),
            req.valid_until.map(stored_time),
        )
        .map_err(|e| RecordError::Invalid(e.to_string()))?;
        let subject_ref = self.keys.subject_ref(&req.subject);
        let id = ConsentId::from_random(self.random_bytes()?);
        let statement = |recorded_at| {
            ConsentStatement::record(
                id.to_string(),
                subject_ref.as_str().to_owned(),
                req.state,
                req.given_by,
                scope.clone(),
                recorder.clone(),
                recorded_at,
            )
            .map_err(|e| RecordError::Invalid(e.to_string()))
        };
        // Checked before the child is held, so a bad request waits for nothing.
        let now = stored_time(self.clock.now());
        statement(now)?;

        // A new statement may be a refusal, which must bind the very next request
        // as a withdrawal does.
        let changing = self.store.changing_consent(&subject_ref).await?;
        // The newest statement wins, so the one recorded last must be the newest
        // whatever this replica's clock says: stamped after every statement about
        // the child, read while none can be added.
        let existing = self.store.consents_about(&subject_ref).await?;
        let recorded_at = recording_time(now, existing.iter().map(|c| &c.statement));
        let consent = Consent {
            statement: statement(recorded_at)?,
            subject: req.subject,
            note: req.note,
            withdrawal_note: String::new(),
        };
        let mut entry = Self::entry(
            caller,
            AuditAction::ConsentRecorded,
            AuditOutcome::Allowed,
            &subject_ref,
            request_id,
        );
        entry.object_id = id.to_string();
        entry.consent_id = id.to_string();
        entry.reason = format!(
            "{} by {}",
            consent.statement.state, consent.statement.given_by
        );
        entry.justification = consent.note.clone();
        let consent = self.change_consent(changing, entry, consent).await?;
        tracing::info!(consent = %id, state = %consent.statement.state, "consent recorded");
        Ok(consent)
    }

    /// WithdrawConsent: only the agency that recorded a GIVEN statement may withdraw
    /// it; it is audited (CONSENT_WITHDRAWN) and stored durably while no disclosure
    /// about the child is between its consent check and its audit entry, so it
    /// applies to every later request. One already withdrawn is returned unchanged.
    pub async fn withdraw_consent(
        &self,
        caller: &Caller,
        id: &ConsentId,
        note: &str,
        request_id: &str,
    ) -> Result<Consent, RecordError> {
        let (agency, _) = agency_of(caller)?;
        check_text("note", note, 0, self.config.limits.max_note_chars)?;
        let Some(found) = self.load_consent(id).await? else {
            return Err(RecordError::NotFound(format!("consent {id} not found")));
        };
        let subject_ref = found.subject_ref();
        let changing = self.store.changing_consent(&subject_ref).await?;
        // Read again under the lock: another withdrawal may have come first.
        let Some(mut consent) = self.load_consent(id).await? else {
            return Err(RecordError::NotFound(format!("consent {id} not found")));
        };
        if consent.statement.recorded_by != agency {
            return Err(RecordError::Denied(format!(
                "consent {id} was recorded by another agency, which alone may withdraw it; \
                 to record that consent is no longer given, record a statement with state \
                 REFUSED (the newest statement in scope wins)"
            )));
        }
        match consent.statement.state {
            ConsentState::Withdrawn => return Ok(consent),
            ConsentState::Refused | ConsentState::Given => {}
        }
        consent
            .statement
            .withdraw(stored_time(self.clock.now()))
            .map_err(|e| RecordError::Precondition(e.to_string()))?;
        consent.withdrawal_note = note.to_owned();

        let mut entry = Self::entry(
            caller,
            AuditAction::ConsentWithdrawn,
            AuditOutcome::Allowed,
            &subject_ref,
            request_id,
        );
        entry.object_id = id.to_string();
        entry.consent_id = id.to_string();
        entry.reason = "WITHDRAWN".into();
        entry.justification = note.to_owned();
        let consent = self.change_consent(changing, entry, consent).await?;
        tracing::info!(consent = %id, "consent withdrawn");
        Ok(consent)
    }

    /// ListConsents: every statement about the child, newest first, withdrawn ones
    /// included, audited (CONSENTS_LISTED) before it is answered. Notes are returned
    /// only to the agency that wrote them. With `page.size` 0, all of them in one
    /// answer (RESOURCE_EXHAUSTED if they do not fit); otherwise at most that many
    /// after `page.token`, fewer if more would not fit, with a token for the rest.
    pub async fn list_consents(
        &self,
        caller: &Caller,
        subject: &NhsNumber,
        page: Page<'_>,
        request_id: &str,
    ) -> Result<ListedPage, RecordError> {
        let (agency, _) = agency_of(caller)?;
        let subject_ref = self.keys.subject_ref(subject);
        let paging = Paging::start(
            "consents",
            subject_ref.as_str(),
            page,
            self.config.limits.max_page_size as usize,
            |id| ConsentId::parse(id).is_ok(),
        )?;
        let mut consents = self.store.consents_about(&subject_ref).await?;
        // Notes go only to the agency that wrote them; what others are not sent
        // does not count against their answer's size.
        for c in &mut consents {
            if c.statement.recorded_by != agency {
                c.note.clear();
                c.withdrawal_note.clear();
            }
        }
        let max = self.config.limits.max_message_bytes;
        let next_page_token = paging.page_of(&mut consents, max, listed_key, consent_answer_bytes);
        // Which agencies hold consent about a child tells of their involvement:
        // audited (CONSENTS_LISTED) before it is answered, as RECORDS_FOUND is.
        let mut entry = Self::entry(
            caller,
            AuditAction::ConsentsListed,
            AuditOutcome::Allowed,
            &subject_ref,
            request_id,
        );
        let bytes: usize = consents.iter().map(consent_answer_bytes).sum();
        if bytes > max {
            return Err(self
                .refuse_too_large(entry, consents.len(), STATEMENT, bytes, paging.is_paged())
                .await?);
        }
        entry.reason = reason_with_ids(
            format!("{} listed", counted(consents.len(), STATEMENT)),
            consents.iter().map(|c| c.id()),
        );
        if next_page_token.is_some() {
            entry.reason.push_str("; more on the next page");
        }
        self.auditor.append(entry).await?;
        Ok(ListedPage {
            consents,
            next_page_token,
        })
    }

    /// The critical section of a consent change: audits it, then stores it (which
    /// also empties the child's consent cache), holding the child exclusively
    /// throughout. It runs to its end in a task that owns the hold, so dropping the
    /// call (the client went away, the server's request timeout) cannot release the
    /// child between a durable CONSENT_WITHDRAWN entry and the store having the
    /// change, nor leave an audited change unstored.
    async fn change_consent(
        &self,
        changing: SubjectHold,
        entry: NewEntry,
        consent: Consent,
    ) -> Result<Consent, RecordError> {
        let (auditor, store) = (self.auditor.clone(), self.store.clone());
        self.to_the_end(async move {
            auditor.append(entry).await?;
            store.put_consent(&consent).await?;
            drop(changing);
            Ok(consent)
        })
        .await
    }

    async fn load_consent(&self, id: &ConsentId) -> Result<Option<Consent>, RecordError> {
        Ok(self.store.consent(id).await?)
    }
}

/// An upper bound on the bytes a consent statement takes in ListConsents' answer:
/// its notes (those sent: withheld ones are cleared first), its agencies, its
/// lists of enums and at most 256 bytes of ids, times and framing.
fn consent_answer_bytes(c: &Consent) -> usize {
    let scope = &c.statement.scope;
    c.note.len()
        + c.withdrawal_note.len()
        + c.statement.recorded_by.as_str().len()
        + scope
            .recipient_agency_ids()
            .iter()
            .map(|a| a.as_str().len() + 2)
            .sum::<usize>()
        + 2 * (scope.purposes().len() + scope.recipient_sectors().len() + scope.categories().len())
        + 256
}
