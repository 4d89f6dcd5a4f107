//! The unary calls: raise, get, list, acknowledge, decide; and delivery, the
//! audited first disclosure of a narrative to a recipient.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::model::{
    check_text, rfc3339, route, Concern, ConcernId, ConcernStatus, Decision, DecisionRecord,
    Delivery, InboxEvent, MAX_LEAD_PRACTITIONER_CHARS,
};
use super::store::{from_micros, micros, Edit, IdempotencyKey, Raised};
use super::{agency_of, ConcernError, Concerns};
use crate::audit::{Actor, NewEntry};
use crate::config::MESSAGE_HEADROOM_BYTES;
use crate::domain::deadline::is_encompass;
use crate::domain::{AgencyId, ConcernCategory, NhsNumber, Urgency};
use crate::identity::Caller;
use crate::proto::v1::{AuditAction, AuditOutcome};
use base64::Engine;

/// Longest idempotency key (`RaiseConcernRequest.request_id`), in characters.
pub const MAX_REQUEST_ID_CHARS: usize = 128;

/// A RaiseConcern request, its enums and NHS number already parsed.
#[derive(Debug, Clone)]
pub struct RaiseRequest {
    /// The child.
    pub subject: NhsNumber,
    /// The kind of harm.
    pub category: ConcernCategory,
    /// How soon it must be acknowledged.
    pub urgency: Urgency,
    /// The account, checked here against `limits.max_narrative_chars`.
    pub narrative: String,
    /// The requested recipients, as given.
    pub recipients: Vec<String>,
    /// The idempotency key; empty for none.
    pub request_id: String,
}

/// One page of ListInbox.
#[derive(Debug, Clone)]
pub struct InboxPage {
    /// The concerns, oldest first.
    pub concerns: Vec<Concern>,
    /// The token of the next page, when there may be one.
    pub next_page_token: Option<String>,
}

impl Concerns {
    /// RaiseConcern: validates, routes, audits (CONCERN_RAISED), stores the concern
    /// and an event in each recipient's inbox durably, and returns the concern. A
    /// repeated idempotency key with the same content returns the first concern
    /// instead; with different content (see [`raise_differences`]) it raises
    /// nothing and is FAILED_PRECONDITION, audited CONCERN_RAISED with outcome
    /// DENIED (REQUEST_ID_REUSED) before it is returned.
    pub async fn raise(
        self: &Arc<Self>,
        caller: &Caller,
        req: RaiseRequest,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        self.to_the_end(caller, request_id, |this, caller, request_id| async move {
            this.raise_flow(&caller, req, &request_id).await
        })
        .await
    }

    async fn raise_flow(
        self: &Arc<Self>,
        caller: &Caller,
        req: RaiseRequest,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let (sender, sender_sector) = agency_of(caller)?;
        check_text(
            "narrative",
            &req.narrative,
            1,
            self.config.limits.max_narrative_chars,
        )
        .map_err(ConcernError::Invalid)?;
        if req.request_id.chars().count() > MAX_REQUEST_ID_CHARS {
            return Err(ConcernError::Invalid(format!(
                "request_id is longer than {MAX_REQUEST_ID_CHARS} characters"
            )));
        }
        let registry = self.config.registry();
        let recipients = route(&sender, &req.recipients, &self.config.front_door, |id| {
            registry.agency(id).map(|a| a.sector)
        })
        .map_err(ConcernError::Invalid)?;

        let key =
            (!req.request_id.is_empty()).then(|| IdempotencyKey::new(&sender, &req.request_id));
        // One raise per key at a time, so a retry racing the first call neither
        // raises twice nor audits a raise that does not happen.
        let _one_at_a_time = match &key {
            Some(k) => Some(self.locks.lock(&format!("raise/{}", k.hex())).await),
            None => None,
        };
        if let Some(k) = &key {
            if let Some(id) = self.store.raised_by_key(k).await? {
                let first = self.existing(&id).await?;
                let differs = raise_differences(&first, &req, &self.config.front_door);
                if differs.is_empty() {
                    return Ok(first);
                }
                return Err(self
                    .refuse_reused_key(caller, &first, &req, &differs, None, request_id)
                    .await?);
            }
        }

        let raised_at = from_micros(micros(self.clock.now()));
        let deliveries: Vec<Delivery> = recipients
            .into_iter()
            .map(|(agency, sector)| Delivery {
                due_at: self.calendar.ack_due(
                    raised_at,
                    req.urgency,
                    is_encompass(sender_sector, sector, req.category),
                ),
                agency,
                delivered_at: None,
                acknowledged_at: None,
                note: String::new(),
                escalated: false,
            })
            .collect();
        let concern = Concern {
            id: self.new_id()?,
            subject_ref: self.keys.subject_ref(&req.subject),
            // Copies: `req` is compared with the concern found should another
            // process raise one with this key after the check above.
            subject: req.subject.clone(),
            raised_by: sender,
            category: req.category,
            urgency: req.urgency,
            narrative: req.narrative.clone(),
            recipients: deliveries,
            raised_at,
            decision: None,
            front_door: Some(self.config.front_door.clone()),
        };

        let reason = format!(
            "{} {} concern for {}; acknowledgement due {}",
            concern.urgency,
            concern.category,
            concern
                .recipients
                .iter()
                .map(|d| d.agency.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            rfc3339(concern.ack_due_at()),
        );
        self.audit_raise(
            caller,
            AuditOutcome::Allowed,
            &concern.subject_ref,
            &concern.id,
            reason,
            request_id,
        )
        .await?;

        match self.store.raise(&concern, key.as_ref()).await? {
            Raised::New => Ok(concern),
            // Only if another gateway process (a replica sharing the store) raised
            // a concern with this key since the check above (the lock is per
            // process). The same content is the retry answered with that concern;
            // different content is refused as above, and the ALLOWED entry just
            // appended, for a concern that was never stored, is answered in the log.
            Raised::Existing(id) => {
                let first = self.existing(&id).await?;
                let differs = raise_differences(&first, &req, &self.config.front_door);
                if differs.is_empty() {
                    // The retry: answered with the first concern, and the ALLOWED
                    // entry just appended, for a concern never stored, is answered
                    // in the log.
                    let reason = format!(
                        "NOT_STORED: request_id raised {} first (a retry, answered with it)",
                        first.id
                    );
                    self.audit_raise(
                        caller,
                        AuditOutcome::Denied,
                        &first.subject_ref,
                        &concern.id,
                        reason,
                        request_id,
                    )
                    .await?;
                    return Ok(first);
                }
                Err(self
                    .refuse_reused_key(
                        caller,
                        &first,
                        &req,
                        &differs,
                        Some(&concern.id),
                        request_id,
                    )
                    .await?)
            }
        }
    }

    /// Refuses a raise whose idempotency key already raised `first` with other
    /// content: appends CONCERN_RAISED with outcome DENIED and waits until it is
    /// durable, then returns the FAILED_PRECONDITION to answer. The entry's child
    /// is the one the refused request named (the referral that was not made), its
    /// object the concern the key belongs to, or `not_stored` when this call had
    /// already audited a raise of its own that the store then refused; its reason
    /// names the differing fields, never their values.
    async fn refuse_reused_key(
        &self,
        caller: &Caller,
        first: &Concern,
        asked: &RaiseRequest,
        differs: &[&str],
        not_stored: Option<&ConcernId>,
        request_id: &str,
    ) -> Result<ConcernError, ConcernError> {
        let fields = differs.join(", ");
        let (object, reason) = match not_stored {
            None => (
                &first.id,
                format!("REQUEST_ID_REUSED: different {fields} (answered FAILED_PRECONDITION)"),
            ),
            Some(id) => (
                id,
                format!(
                    "NOT_STORED: request_id raised {} first (REQUEST_ID_REUSED: different {fields}; answered FAILED_PRECONDITION)",
                    first.id
                ),
            ),
        };
        let subject = self.keys.subject_ref(&asked.subject);
        self.audit_raise(
            caller,
            AuditOutcome::Denied,
            &subject,
            object,
            reason,
            request_id,
        )
        .await?;
        Ok(ConcernError::Precondition(format!(
            "request_id was already used for concern {}, raised with different content (different {fields}); nothing was raised, and a new concern needs a new request_id",
            first.id
        )))
    }

    /// Appends a CONCERN_RAISED entry about `subject`'s concern `object` and waits
    /// until it is durable.
    async fn audit_raise(
        &self,
        caller: &Caller,
        outcome: AuditOutcome,
        subject: &crate::store::keys::SubjectRef,
        object: &ConcernId,
        reason: String,
        request_id: &str,
    ) -> Result<(), ConcernError> {
        let mut entry = NewEntry::new(
            Actor::from(caller),
            AuditAction::ConcernRaised,
            outcome,
            request_id,
        );
        entry.subject = Some(subject.clone());
        entry.object_id = object.to_string();
        entry.reason = reason;
        self.auditor.append(entry).await?;
        Ok(())
    }

    /// The concern an idempotency key raised before, as it stands now.
    async fn existing(&self, id: &ConcernId) -> Result<Concern, ConcernError> {
        self.load(id).await?.ok_or_else(|| {
            ConcernError::Internal(format!("idempotency key names missing concern {id}"))
        })
    }

    /// GetConcern: the concern, for its sender or a recipient (delivered first).
    /// Anyone else, and an unknown id, is audited (DISCLOSURE_DENIED) and answered
    /// NOT_FOUND.
    pub async fn get(
        self: &Arc<Self>,
        caller: &Caller,
        concern_id: &str,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let concern_id = concern_id.to_owned();
        self.to_the_end(caller, request_id, |this, caller, request_id| async move {
            this.get_flow(&caller, &concern_id, &request_id).await
        })
        .await
    }

    async fn get_flow(
        self: &Arc<Self>,
        caller: &Caller,
        concern_id: &str,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let (agency, _) = agency_of(caller)?;
        let id = ConcernId::parse(concern_id).map_err(ConcernError::Invalid)?;
        let concern = self
            .visible(caller, &agency, &id, Attempt::Read, request_id)
            .await?;
        self.deliver(caller, &agency, concern, request_id).await
    }

    /// ListInbox: the concerns delivered to the caller, oldest first, each delivered
    /// (and so audited) before it is returned.
    pub async fn list_inbox(
        self: &Arc<Self>,
        caller: &Caller,
        page_size: usize,
        page_token: &str,
        status: Option<ConcernStatus>,
        request_id: &str,
    ) -> Result<InboxPage, ConcernError> {
        let page_token = page_token.to_owned();
        self.to_the_end(caller, request_id, |this, caller, request_id| async move {
            this.list_inbox_flow(&caller, page_size, &page_token, status, &request_id)
                .await
        })
        .await
    }

    async fn list_inbox_flow(
        self: &Arc<Self>,
        caller: &Caller,
        page_size: usize,
        page_token: &str,
        status: Option<ConcernStatus>,
        request_id: &str,
    ) -> Result<InboxPage, ConcernError> {
        let (agency, _) = agency_of(caller)?;
        let after = parse_page_token(page_token, status)?;
        let durable = self
            .store
            .durable_cursor(&agency)
            .ok_or_else(|| ConcernError::Internal(format!("no inbox for {agency}")))?;
        // On a replica, events committed through another may not have reached
        // this one's watch yet: read the head, so that a listing never ends short
        // of what the caller may have seen elsewhere (one read; none for sled).
        self.store
            .catch_up(&agency)
            .await
            .map_err(|detail| ConcernError::Unavailable {
                message: "the head of this inbox could not be read".into(),
                detail,
            })?;
        let upto = *durable.borrow();
        let now = self.clock.now();
        let page_size = page_size.max(1);
        let max_scan = page_size.saturating_mul(20).max(10_000);
        // A page must also fit in one response message.
        let budget = self
            .config
            .limits
            .max_message_bytes
            .saturating_sub(MESSAGE_HEADROOM_BYTES);
        let (found, next) = 'page: {
            let mut found = Vec::new();
            let mut bytes = 0usize;
            let mut scanned = 0usize;
            let mut last = after;
            loop {
                // Events in batches near the page size: each batch's concerns are
                // read (and opened) at once.
                let want = page_size.saturating_sub(found.len()).clamp(16, 256);
                let batch = self.store.events(&agency, last, upto, want).await?;
                if batch.is_empty() {
                    break 'page (found, None);
                }
                let ids: Vec<ConcernId> = batch
                    .iter()
                    .filter_map(|(_, event)| match event {
                        InboxEvent::Concern(id) => Some(id.clone()),
                        _ => None,
                    })
                    .collect();
                let mut loaded: std::collections::HashMap<ConcernId, Concern> = self
                    .store
                    .get_many(&ids)
                    .await?
                    .into_iter()
                    .map(|c| (c.id.clone(), c))
                    .collect();
                for (cursor, event) in batch {
                    if let InboxEvent::Concern(id) = event {
                        if let Some(c) = loaded.remove(&id) {
                            let shown = c.status_once_delivered_to(&agency, now);
                            if status.is_none_or(|want| want == shown) {
                                let size = encoded_size_bound(&c);
                                if !found.is_empty() && bytes + size > budget {
                                    // Full: the next page starts with this event.
                                    break 'page (found, Some(last));
                                }
                                bytes += size;
                                found.push(c);
                            }
                        }
                    }
                    last = cursor;
                    scanned += 1;
                    if found.len() == page_size || scanned >= max_scan {
                        break 'page (found, (last < upto).then_some(last));
                    }
                }
            }
        };
        let concerns = self.deliver_all(caller, &agency, found, request_id).await?;
        Ok(InboxPage {
            concerns,
            next_page_token: next.map(|cursor| page_token_for(cursor, status)),
        })
    }

    /// AcknowledgeConcern: records the recipient's acknowledgement (audited
    /// CONCERN_ACKNOWLEDGED); acknowledging again changes nothing. A refusal (not a
    /// party: NOT_FOUND; the sender: PERMISSION_DENIED) is audited
    /// CONCERN_ACKNOWLEDGED with outcome DENIED before it is returned. If another
    /// replica stores an acknowledgement between this call's check and its write,
    /// the answer is the stored one and a DENIED entry (NOT_STORED) follows the
    /// ALLOWED one, whose note was not kept.
    pub async fn acknowledge(
        self: &Arc<Self>,
        caller: &Caller,
        concern_id: &str,
        note: &str,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let (concern_id, note) = (concern_id.to_owned(), note.to_owned());
        self.to_the_end(caller, request_id, |this, caller, request_id| async move {
            this.acknowledge_flow(&caller, &concern_id, &note, &request_id)
                .await
        })
        .await
    }

    async fn acknowledge_flow(
        self: &Arc<Self>,
        caller: &Caller,
        concern_id: &str,
        note: &str,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let (agency, _) = agency_of(caller)?;
        let id = ConcernId::parse(concern_id).map_err(ConcernError::Invalid)?;
        check_text("note", note, 0, self.config.limits.max_note_chars)
            .map_err(ConcernError::Invalid)?;
        let concern = self
            .visible(caller, &agency, &id, Attempt::Acknowledge, request_id)
            .await?;
        if concern.delivery(&agency).is_none() {
            self.audit_refusal(
                caller,
                Attempt::Acknowledge,
                &id,
                Some(&concern),
                "NOT_RECIPIENT: only recipients acknowledge (answered PERMISSION_DENIED)",
                request_id,
            )
            .await?;
            return Err(ConcernError::Denied(format!(
                "{agency} sent concern {id} and is not one of its recipients; only recipients acknowledge a concern"
            )));
        }
        // The answer carries the narrative: deliver first.
        let concern = self.deliver(caller, &agency, concern, request_id).await?;
        if acknowledged(&concern, &agency) {
            return Ok(concern);
        }
        let _one_at_a_time = self.lock_changes(&id).await;
        let concern = self.existing(&id).await?;
        if acknowledged(&concern, &agency) {
            return Ok(concern);
        }
        let mut entry = NewEntry::new(
            Actor::from(caller),
            AuditAction::ConcernAcknowledged,
            AuditOutcome::Allowed,
            request_id,
        );
        entry.subject = Some(concern.subject_ref.clone());
        entry.target_agency_id = concern.raised_by.to_string();
        entry.object_id = id.to_string();
        entry.reason = format!("acknowledged by {agency}");
        entry.justification = note.to_owned();
        let at = from_micros(self.auditor.append(entry).await?.time_micros());
        let stored = Arc::new(AtomicBool::new(false));
        let stored_in_edit = stored.clone();
        let note = note.to_owned();
        let after = self
            .store
            .update(
                &id,
                Box::new(move |c| {
                    let first = c.acknowledge(&agency, at, &note);
                    stored_in_edit.store(first, Ordering::SeqCst);
                    Edit {
                        record: first,
                        ..Edit::default()
                    }
                }),
            )
            .await?
            .ok_or_else(|| ConcernError::Internal("acknowledged concern vanished".into()))?;
        if !stored.load(Ordering::SeqCst) {
            // Another replica stored an acknowledgement first (the lock is per
            // process). Acknowledging again changes nothing, but the entry above
            // holds a note that was not kept: say so in the log.
            self.audit_refusal(
                caller,
                Attempt::Acknowledge,
                &id,
                Some(&after),
                "NOT_STORED: already acknowledged; this acknowledgement and its note were not kept (answered with the first)",
                request_id,
            )
            .await?;
        }
        Ok(after)
    }

    /// RecordDecision: the front door's decision and lead practitioner (audited
    /// CONCERN_DECIDED). Recording the same decision, lead practitioner and note
    /// again changes nothing; anything different is FAILED_PRECONDITION
    /// (ALREADY_DECIDED), its message naming what differs. A refusal (not a party:
    /// NOT_FOUND; a party other than the front door: PERMISSION_DENIED; already
    /// decided otherwise: FAILED_PRECONDITION) is audited
    /// CONCERN_DECIDED with outcome DENIED before it is returned. If another
    /// replica stores a different decision between this call's check and its
    /// write, the answer is FAILED_PRECONDITION too, and a DENIED entry
    /// (NOT_STORED) follows the ALLOWED one.
    pub async fn decide(
        self: &Arc<Self>,
        caller: &Caller,
        concern_id: &str,
        decision: Decision,
        lead_practitioner: &str,
        note: &str,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let (concern_id, lead_practitioner, note) = (
            concern_id.to_owned(),
            lead_practitioner.to_owned(),
            note.to_owned(),
        );
        self.to_the_end(caller, request_id, |this, caller, request_id| async move {
            this.decide_flow(
                &caller,
                &concern_id,
                decision,
                &lead_practitioner,
                &note,
                &request_id,
            )
            .await
        })
        .await
    }

    async fn decide_flow(
        self: &Arc<Self>,
        caller: &Caller,
        concern_id: &str,
        decision: Decision,
        lead_practitioner: &str,
        note: &str,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let (agency, _) = agency_of(caller)?;
        let id = ConcernId::parse(concern_id).map_err(ConcernError::Invalid)?;
        check_text(
            "lead_practitioner",
            lead_practitioner,
            1,
            MAX_LEAD_PRACTITIONER_CHARS,
        )
        .map_err(ConcernError::Invalid)?;
        check_text("note", note, 0, self.config.limits.max_note_chars)
            .map_err(ConcernError::Invalid)?;
        let concern = self
            .visible(caller, &agency, &id, Attempt::Decide, request_id)
            .await?;
        let front_door = concern.front_door(&self.config.front_door);
        if &agency != front_door {
            self.audit_refusal(
                caller,
                Attempt::Decide,
                &id,
                Some(&concern),
                "NOT_FRONT_DOOR: only the front door decides (answered PERMISSION_DENIED)",
                request_id,
            )
            .await?;
            return Err(ConcernError::Denied(format!(
                "only the front door ({front_door}) records decisions on concerns"
            )));
        }
        // The answer carries the narrative: deliver first (the front door is
        // usually a recipient).
        self.deliver(caller, &agency, concern, request_id).await?;
        let _one_at_a_time = self.lock_changes(&id).await;
        let concern = self.existing(&id).await?;
        if let Some(made) = &concern.decision {
            let differs = decision_differences(made, decision, lead_practitioner, note);
            if differs.is_empty() {
                return Ok(concern);
            }
            let refused = already_decided(&id, made, decision, lead_practitioner, note);
            self.audit_refusal(
                caller,
                Attempt::Decide,
                &id,
                Some(&concern),
                &format!(
                    "ALREADY_DECIDED: different {} (answered FAILED_PRECONDITION)",
                    differs.join(", ")
                ),
                request_id,
            )
            .await?;
            return Err(refused);
        }
        let mut entry = NewEntry::new(
            Actor::from(caller),
            AuditAction::ConcernDecided,
            AuditOutcome::Allowed,
            request_id,
        );
        entry.subject = Some(concern.subject_ref.clone());
        entry.target_agency_id = concern.raised_by.to_string();
        entry.object_id = id.to_string();
        entry.reason = format!(
            "decision {}; lead practitioner {lead_practitioner}",
            decision.as_str()
        );
        entry.justification = note.to_owned();
        let at = from_micros(self.auditor.append(entry).await?.time_micros());
        let record = DecisionRecord {
            decision,
            lead_practitioner: lead_practitioner.to_owned(),
            note: note.to_owned(),
            decided_at: at,
            decided_by: agency,
        };
        let stored = Arc::new(AtomicBool::new(false));
        let stored_in_edit = stored.clone();
        let after = self
            .store
            .update(
                &id,
                Box::new(move |c| {
                    let first = c.decision.is_none();
                    if first {
                        c.decision = Some(record);
                    }
                    stored_in_edit.store(first, Ordering::SeqCst);
                    Edit {
                        record: first,
                        ..Edit::default()
                    }
                }),
            )
            .await?
            .ok_or_else(|| ConcernError::Internal("decided concern vanished".into()))?;
        if stored.load(Ordering::SeqCst) {
            return Ok(after);
        }
        // Another replica stored a decision after the check above (the lock is per
        // process). The same decision again changes nothing; a different one is
        // refused as above, and the entry appended for it is answered in the log.
        match &after.decision {
            Some(made)
                if decision_differences(made, decision, lead_practitioner, note).is_empty() =>
            {
                Ok(after)
            }
            Some(made) => {
                let refused = already_decided(&id, made, decision, lead_practitioner, note);
                self.audit_refusal(
                    caller,
                    Attempt::Decide,
                    &id,
                    Some(&after),
                    "NOT_STORED: a different decision was recorded first (answered FAILED_PRECONDITION)",
                    request_id,
                )
                .await?;
                Err(refused)
            }
            None => Err(ConcernError::Internal(
                "a decision was neither stored nor found".into(),
            )),
        }
    }

    /// The concern, if `agency` is a party to it. Otherwise the refusal is audited
    /// (durably, before the answer) and the answer is NOT_FOUND, exactly as for an
    /// id that does not exist: only the audit entry's reason tells the two apart.
    async fn visible(
        &self,
        caller: &Caller,
        agency: &AgencyId,
        id: &ConcernId,
        attempt: Attempt,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        let (found, reason) = match self.load(id).await? {
            Some(c) if c.is_party(agency) => return Ok(c),
            Some(c) => (
                Some(c),
                "NOT_PARTY: neither sender nor recipient (answered NOT_FOUND)",
            ),
            None => (None, "NOT_FOUND: no such concern"),
        };
        self.audit_refusal(caller, attempt, id, found.as_ref(), reason, request_id)
            .await?;
        Err(ConcernError::NotFound(id.to_string()))
    }

    /// Appends the DENIED entry of a refused call and waits until it is durable. The
    /// entry names the concern (as given), its child and its sender when it exists,
    /// and `reason`: a short fixed text, never a narrative, note or NHS number.
    async fn audit_refusal(
        &self,
        caller: &Caller,
        attempt: Attempt,
        id: &ConcernId,
        concern: Option<&Concern>,
        reason: &str,
        request_id: &str,
    ) -> Result<(), ConcernError> {
        let mut entry = NewEntry::new(
            Actor::from(caller),
            attempt.action(),
            AuditOutcome::Denied,
            request_id,
        );
        entry.object_id = id.to_string();
        if let Some(c) = concern {
            entry.subject = Some(c.subject_ref.clone());
            entry.target_agency_id = c.raised_by.to_string();
        }
        entry.reason = reason.to_owned();
        self.auditor.append(entry).await?;
        Ok(())
    }

    /// Makes sure `agency` has been delivered `concern` before its narrative is sent
    /// to it: the first time, appends CONCERN_DELIVERED and waits until it is durable,
    /// then records `delivered_at`. The sender and later deliveries pass straight
    /// through. Returns the concern as it now stands.
    pub(super) async fn deliver(
        &self,
        caller: &Caller,
        agency: &AgencyId,
        concern: Concern,
        request_id: &str,
    ) -> Result<Concern, ConcernError> {
        if !undelivered(&concern, agency) {
            return Ok(concern);
        }
        let id = concern.id.clone();
        let _one_at_a_time = self.locks.lock(&format!("deliver/{id}/{agency}")).await;
        let concern = self.existing(&id).await?;
        if !undelivered(&concern, agency) {
            return Ok(concern);
        }
        let mut entry = NewEntry::new(
            Actor::from(caller),
            AuditAction::ConcernDelivered,
            AuditOutcome::Allowed,
            request_id,
        );
        entry.subject = Some(concern.subject_ref.clone());
        entry.target_agency_id = agency.to_string();
        entry.object_id = id.to_string();
        entry.reason = format!(
            "narrative delivered to {agency}; raised by {}",
            concern.raised_by
        );
        let at = from_micros(self.auditor.append(entry).await?.time_micros());
        let agency = agency.clone();
        self.store
            .update(
                &id,
                Box::new(move |c| Edit {
                    record: c.mark_delivered(&agency, at),
                    ..Edit::default()
                }),
            )
            .await?
            .ok_or_else(|| ConcernError::Internal("delivered concern vanished".into()))
    }

    /// Delivers several concerns to `agency` at once (their audit entries share
    /// group commits), keeping their order.
    pub(super) async fn deliver_all(
        self: &Arc<Self>,
        caller: &Caller,
        agency: &AgencyId,
        concerns: Vec<Concern>,
        request_id: &str,
    ) -> Result<Vec<Concern>, ConcernError> {
        let mut out: Vec<Option<Concern>> = vec![None; concerns.len()];
        // Each delivery audits and then stores: in a task of its own, tracked for
        // shutdown, that neither an error of another nor a dropped caller (a
        // stream that goes away) cuts short. A JoinSet would abort them.
        let mut deliveries = Vec::new();
        for (i, concern) in concerns.into_iter().enumerate() {
            if !undelivered(&concern, agency) {
                out[i] = Some(concern);
                continue;
            }
            let (this, caller, agency, request_id) = (
                self.clone(),
                caller.clone(),
                agency.clone(),
                request_id.to_owned(),
            );
            let delivery =
                async move { this.deliver(&caller, &agency, concern, &request_id).await };
            deliveries.push((i, self.sections.spawn_part(delivery)));
        }
        let mut failed = None;
        for (i, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(delivered)) => out[i] = Some(delivered),
                Ok(Err(e)) => {
                    failed.get_or_insert(e);
                }
                Err(e) => {
                    failed.get_or_insert(ConcernError::Internal(format!("delivery task: {e}")));
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out.into_iter().flatten().collect()),
        }
    }
}

/// What a refused call tried to do: the action of its DENIED audit entry.
#[derive(Debug, Clone, Copy)]
enum Attempt {
    /// GetConcern: a refused read of the concern.
    Read,
    /// AcknowledgeConcern.
    Acknowledge,
    /// RecordDecision.
    Decide,
}

impl Attempt {
    fn action(self) -> AuditAction {
        match self {
            Attempt::Read => AuditAction::DisclosureDenied,
            Attempt::Acknowledge => AuditAction::ConcernAcknowledged,
            Attempt::Decide => AuditAction::ConcernDecided,
        }
    }
}

/// The fields of a RaiseConcern request, by their names in the request, in which
/// `asked` differs from `first`, the concern its idempotency key already raised
/// (never their values): empty for a retry of the same raise. The NHS number is
/// compared parsed (spacing is no difference) and the narrative exactly. The
/// recipients are compared as a set after routing's normalisation (duplicates
/// removed, the front door added), against `first`'s own front door, so that
/// naming the front door, repeating or reordering agencies, or a front door
/// changed in config since, is no difference. `asked.recipients` has passed
/// [`route`].
fn raise_differences(
    first: &Concern,
    asked: &RaiseRequest,
    configured_front_door: &AgencyId,
) -> Vec<&'static str> {
    let mut routed: BTreeSet<&str> = asked.recipients.iter().map(String::as_str).collect();
    let front_door = first.front_door(configured_front_door);
    if front_door != &first.raised_by {
        routed.insert(front_door.as_str());
    }
    let stored: BTreeSet<&str> = first.recipients.iter().map(|d| d.agency.as_str()).collect();
    [
        ("subject", first.subject == asked.subject),
        ("category", first.category == asked.category),
        ("urgency", first.urgency == asked.urgency),
        ("narrative", first.narrative == asked.narrative),
        ("recipient_agency_ids", stored == routed),
    ]
    .into_iter()
    .filter_map(|(field, same)| (!same).then_some(field))
    .collect()
}

/// An upper bound on a concern's size in a response: its narrative (up to 4 bytes
/// a character), and generously for every other field.
fn encoded_size_bound(concern: &Concern) -> usize {
    concern.narrative.len() + 1024 + 128 * concern.recipients.len()
}

/// The fields of a RecordDecision request, by their names in the request, in
/// which it differs from `made`: empty for a repeat of the recorded decision.
fn decision_differences(
    made: &DecisionRecord,
    decision: Decision,
    lead_practitioner: &str,
    note: &str,
) -> Vec<&'static str> {
    [
        ("decision", made.decision == decision),
        (
            "lead_practitioner",
            made.lead_practitioner == lead_practitioner,
        ),
        ("note", made.note == note),
    ]
    .into_iter()
    .filter_map(|(field, same)| (!same).then_some(field))
    .collect()
}

/// FAILED_PRECONDITION for a decision on concern `id`, which already has `made`
/// and differs from it (see [`decision_differences`]): the message says how,
/// naming the fields and never quoting a note or a lead practitioner.
fn already_decided(
    id: &ConcernId,
    made: &DecisionRecord,
    decision: Decision,
    lead_practitioner: &str,
    note: &str,
) -> ConcernError {
    let recorded = format!(
        "concern {id} already has a decision ({}, recorded {})",
        made.decision.as_str(),
        rfc3339(made.decided_at)
    );
    let mut how = Vec::new();
    if made.decision != decision {
        how.push(format!("this request's decision is {}", decision.as_str()));
    }
    if made.lead_practitioner != lead_practitioner {
        how.push("this request's lead_practitioner differs from the recorded one".to_owned());
    }
    match (made.note.is_empty(), note.is_empty()) {
        _ if made.note == note => {}
        (false, true) => {
            how.push("this request has no note and the recorded decision has one".into())
        }
        (true, false) => {
            how.push("this request has a note and the recorded decision has none".into())
        }
        _ => how.push("this request's note differs from the recorded one".into()),
    }
    ConcernError::Precondition(format!(
        "{recorded}; {}; a recorded decision is not changed",
        how.join("; ")
    ))
}

fn undelivered(concern: &Concern, agency: &AgencyId) -> bool {
    concern
        .delivery(agency)
        .is_some_and(|d| d.delivered_at.is_none())
}

fn acknowledged(concern: &Concern, agency: &AgencyId) -> bool {
    concern
        .delivery(agency)
        .is_some_and(|d| d.acknowledged_at.is_some())
}

// === page tokens ===

/// A ListInbox token: the last cursor looked at, bound to the status filter.
fn page_token_for(cursor: u64, status: Option<ConcernStatus>) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("inbox.{}.{cursor}", status_name(status)))
}

fn parse_page_token(token: &str, status: Option<ConcernStatus>) -> Result<u64, ConcernError> {
    if token.is_empty() {
        return Ok(0);
    }
    let bad = || ConcernError::Invalid("page_token is not valid for this query".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let rest = text
        .strip_prefix("inbox.")
        .and_then(|r| r.strip_prefix(status_name(status)))
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(bad)?;
    let cursor: u64 = rest.parse().map_err(|_| bad())?;
    if cursor == 0 || rest != cursor.to_string() {
        return Err(bad());
    }
    Ok(cursor)
}

fn status_name(status: Option<ConcernStatus>) -> &'static str {
    match status {
        None => "any",
        Some(ConcernStatus::Raised) => "raised",
        Some(ConcernStatus::Delivered) => "delivered",
        Some(ConcernStatus::Acknowledged) => "acknowledged",
        Some(ConcernStatus::Decided) => "decided",
        Some(ConcernStatus::Closed) => "closed",
        Some(ConcernStatus::Overdue) => "overdue",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_bound_to_their_filter() {
        let t = page_token_for(42, Some(ConcernStatus::Delivered));
        assert_eq!(
            parse_page_token(&t, Some(ConcernStatus::Delivered)).unwrap(),
            42
        );
        assert!(parse_page_token(&t, None).is_err());
        assert!(parse_page_token(&t, Some(ConcernStatus::Raised)).is_err());
        assert_eq!(parse_page_token("", None).unwrap(), 0);
        for bad in ["x", "aW5ib3guYW55LjA", "aW5ib3guYW55LjAx", "!!"] {
            assert!(parse_page_token(bad, None).is_err(), "{bad:?} accepted");
        }
        let any = page_token_for(7, None);
        assert_eq!(parse_page_token(&any, None).unwrap(), 7);
    }
}
