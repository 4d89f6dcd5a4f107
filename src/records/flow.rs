//! ShareRecord, FindRecords, GetRecord.

use time::Duration;

use super::model::{
    DiscloseRequest, Disclosure, Found, NewRecord, Record, RecordId, MAX_LAWFUL_BASIS_CHARS,
    MAX_MEDIA_TYPE_BYTES,
};
use super::notice::OverrideNotice;
use super::page::{Page, Paging};
use super::store::{micros, stored_time};
use super::{
    agency_of, check_text, pb_basis, pb_purpose, reason_with_ids, rfc3339, RecordError, Records,
};
use crate::config::MAX_RETENTION_DAYS;
use crate::domain::consent::ConsentStatement;
use crate::domain::policy::{self, Basis, Decision, DenyReason, DisclosureRequest};
use crate::domain::{AgencyId, Purpose, Sector};
use crate::identity::Caller;
use crate::proto::v1::{AuditAction, AuditOutcome};

/// One answer of FindRecords.
#[derive(Debug, Clone)]
pub struct FoundPage {
    /// The records, newest first.
    pub found: Vec<Found>,
    /// The token of the next page, when there are more.
    pub next_page_token: Option<String>,
}

/// The order FindRecords lists records in, newest first: by this key, descending.
fn found_key(record: &Record) -> (i64, &str) {
    (micros(record.shared_at), record.id.as_str())
}

impl Records {
    /// ShareRecord: validates every field, audits (RECORD_SHARED), stores the record
    /// durably and returns it. The caller owns it.
    pub async fn share(
        &self,
        caller: &Caller,
        req: NewRecord,
        request_id: &str,
    ) -> Result<Record, RecordError> {
        let (owner, owner_sector) = agency_of(caller)?;
        let limits = &self.config.limits;
        check_text("summary", &req.summary, 1, limits.max_summary_chars)?;
        if req.content.is_empty() {
            return Err(RecordError::Invalid(
                "content is required (it is empty)".into(),
            ));
        }
        if req.content.len() > limits.max_content_bytes {
            return Err(RecordError::TooLarge(format!(
                "content is {} bytes, more than the limit of {} bytes (limits.max_content_bytes)",
                req.content.len(),
                limits.max_content_bytes
            )));
        }
        check_media_type(&req.media_type)?;
        let now = stored_time(self.clock.now());
        let retain_until =
            match req.retain_until {
                Some(t) if t <= now => return Err(RecordError::Invalid(
                    "retain_until must be in the future; leave it unset for the default retention"
                        .into(),
                )),
                // The longest retention the config may set by default, a century.
                Some(t) if t > now + Duration::days(i64::from(MAX_RETENTION_DAYS)) => {
                    return Err(RecordError::Invalid(format!(
                        "retain_until must be within {MAX_RETENTION_DAYS} days (a century) of now"
                    )))
                }
                Some(t) => stored_time(t),
                // Config keeps the default within a century, so this cannot overflow.
                None => now
                    .checked_add(Duration::days(i64::from(limits.default_retention_days)))
                    .ok_or_else(|| {
                        RecordError::Internal(
                            "limits.default_retention_days runs past the year 9999".into(),
                        )
                    })?,
            };
        let record = Record {
            id: RecordId::from_random(self.random_bytes()?),
            subject_ref: self.keys.subject_ref(&req.subject),
            subject: req.subject,
            owner,
            owner_sector,
            category: req.category,
            summary: req.summary,
            media_type: req.media_type,
            content_len: req.content.len() as u64,
            shared_at: now,
            retain_until,
        };

        let mut entry = Self::entry(
            caller,
            AuditAction::RecordShared,
            AuditOutcome::Allowed,
            &record.subject_ref,
            request_id,
        );
        entry.object_id = record.id.to_string();
        entry.reason = format!(
            "{}, {} bytes, retained until {}",
            record.category,
            record.content_len,
            rfc3339(retain_until)
        );
        // The entry and the record go in together, even if the call is dropped
        // between them: the log never names a record that was not stored.
        let (auditor, store) = (self.auditor.clone(), self.store.clone());
        let content = req.content;
        let record = self
            .to_the_end(async move {
                auditor.append(entry).await?;
                store.put_record(&record, &content).await?;
                Ok(record)
            })
            .await?;
        tracing::info!(record = %record.id, category = %record.category, "record shared");
        Ok(record)
    }

    /// FindRecords: the records about `subject` that some agreement lets the caller's
    /// sector receive for `purpose`, and the caller's own, newest first, each with
    /// what the caller may do with it now. Audited (RECORDS_FOUND) before it answers,
    /// even when nothing is found. With `page.size` 0, all of them in one answer
    /// (RESOURCE_EXHAUSTED if they do not fit); otherwise at most that many after
    /// `page.token`, fewer if more would not fit, with a token for the rest.
    pub async fn find(
        &self,
        caller: &Caller,
        subject: &crate::domain::NhsNumber,
        purpose: Purpose,
        page: Page<'_>,
        request_id: &str,
    ) -> Result<FoundPage, RecordError> {
        let (agency, sector) = agency_of(caller)?;
        let subject_ref = self.keys.subject_ref(subject);
        let paging = Paging::start(
            "found",
            &format!("{}/{purpose}", subject_ref.as_str()),
            page,
            self.config.limits.max_page_size as usize,
            |id| RecordId::parse(id).is_ok(),
        )?;
        let records = self.store.records_about(&subject_ref).await?;
        let consents = self.store.consents_about(&subject_ref).await?;
        let statements: Vec<ConsentStatement> = consents.into_iter().map(|c| c.statement).collect();
        let now = self.clock.now();
        let registry = self.config.registry();
        let mut found: Vec<Found> = records
            .into_iter()
            .filter_map(|record| {
                let req = disclosure_request(&record, &agency, sector, purpose, None);
                policy::access_for(
                    registry.agreements_for(record.owner_sector, sector),
                    &statements,
                    &req,
                    now,
                )
                .map(|access| Found { record, access })
            })
            .collect();
        let max = self.config.limits.max_message_bytes;
        let next_page_token = paging.page_of(
            &mut found,
            max,
            |f| found_key(&f.record),
            |f| answer_bytes(&f.record),
        );

        let mut entry = Self::entry(
            caller,
            AuditAction::RecordsFound,
            AuditOutcome::Allowed,
            &subject_ref,
            request_id,
        );
        entry.purpose = Some(pb_purpose(purpose));
        let bytes: usize = found.iter().map(|f| answer_bytes(&f.record)).sum();
        if bytes > max {
            let n = found.len();
            return Err(self
                .refuse_too_large(
                    entry,
                    n,
                    ("record found", "records found"),
                    bytes,
                    paging.is_paged(),
                )
                .await?);
        }
        entry.reason = found_reason(&found);
        if next_page_token.is_some() {
            entry.reason.push_str("; more on the next page");
        }
        self.auditor.append(entry).await?;
        Ok(FoundPage {
            found,
            next_page_token,
        })
    }

    /// GetRecord: decides at this moment, from the agreements and the consent in
    /// store, whether the caller may read the record for `req.purpose`; audits the
    /// disclosure (RECORD_DISCLOSED) or the refusal (DISCLOSURE_DENIED) durably;
    /// for an override, tells the owner; and only then returns the content.
    pub async fn disclose(
        &self,
        caller: &Caller,
        req: DiscloseRequest,
        request_id: &str,
    ) -> Result<Disclosure, RecordError> {
        let (agency, sector) = agency_of(caller)?;
        if let Some(o) = &req.r#override {
            check_text(
                "override.lawful_basis",
                &o.lawful_basis,
                0,
                MAX_LAWFUL_BASIS_CHARS,
            )?;
            check_text(
                "override.justification",
                &o.justification,
                0,
                self.config.limits.max_note_chars,
            )?;
            // Malformed is refused even where no override is needed: see
            // `policy::check_override`. An attempt to share without consent is
            // audited all the same, before the record is looked up, so the entry
            // tells nothing of whether it exists.
            if let Err(denied) = policy::check_override(o) {
                self.audit_attempt(
                    caller,
                    &req,
                    &format!(
                        "{}: malformed override (answered INVALID_ARGUMENT)",
                        denied.reason.as_str()
                    ),
                    request_id,
                )
                .await?;
                return Err(RecordError::Refused(denied));
            }
        }
        let Some(record) = self.store.record(&req.record_id).await? else {
            self.audit_attempt(caller, &req, "NOT_FOUND: no such record", request_id)
                .await?;
            return Err(not_found(&req.record_id));
        };
        let registry = self.config.registry();
        let owner = record.owner == agency;
        if !owner
            && !receivable(
                registry.agreements_for(record.owner_sector, sector),
                &record,
            )
        {
            // A record this sector could never receive is answered like an unknown
            // id: the caller may not learn that it exists.
            let mut entry = self.denied_entry(caller, &record, &req, request_id);
            entry.reason = format!(
                "{}: no agreement lets sector {sector} receive category {} for any purpose \
                 (answered NOT_FOUND)",
                DenyReason::NoAgreement.as_str(),
                record.category
            );
            self.auditor.append(entry).await?;
            return Err(not_found(&req.record_id));
        }

        let disclosing = self.store.disclosing(&record.subject_ref).await?;
        let consents = self.store.consents_about(&record.subject_ref).await?;
        let statements: Vec<ConsentStatement> = consents.into_iter().map(|c| c.statement).collect();
        let request = disclosure_request(
            &record,
            &agency,
            sector,
            req.purpose,
            req.r#override.clone(),
        );
        let decision = policy::decide(
            registry.agreements_for(record.owner_sector, sector),
            &statements,
            &request,
            self.clock.now(),
        );
        let allowed = match decision {
            Decision::Allow(allowed) => allowed,
            Decision::Deny(denied) => {
                let mut entry = self.denied_entry(caller, &record, &req, request_id);
                entry.reason = denied.reason.as_str().to_owned();
                if let DenyReason::ConsentRefused { consent_id, .. }
                | DenyReason::ConsentWithdrawn { consent_id, .. } = &denied.reason
                {
                    entry.consent_id = consent_id.clone();
                }
                self.auditor.append(entry).await?;
                return Err(RecordError::Refused(denied));
            }
        };

        let content = match self.store.content(&record.id).await {
            Ok(content) => content,
            // The sweeper may have purged the record since its metadata was read
            // (it purges only records past retention): answered as expired and
            // audited, as the decision would have refused it a moment later.
            Err(e) if !self.still_held(&record).await => {
                tracing::info!(record = %record.id, error = %e, "record purged while being disclosed");
                let mut entry = self.denied_entry(caller, &record, &req, request_id);
                entry.reason = format!(
                    "{}: purged at the end of its retention ({}) before its content was read",
                    DenyReason::Expired.as_str(),
                    rfc3339(record.retain_until)
                );
                self.auditor.append(entry).await?;
                return Err(RecordError::Refused(policy::Denied {
                    reason: DenyReason::Expired,
                    message: "the record is past its retention date and is no longer disclosed"
                        .into(),
                }));
            }
            Err(e) => return Err(e.into()),
        };
        let mut entry = Self::entry(
            caller,
            AuditAction::RecordDisclosed,
            AuditOutcome::Allowed,
            &record.subject_ref,
            request_id,
        );
        entry.target_agency_id = record.owner.to_string();
        entry.object_id = record.id.to_string();
        entry.purpose = Some(pb_purpose(req.purpose));
        entry.basis = pb_basis(allowed.basis);
        entry.lawful_basis = allowed.lawful_basis.clone();
        entry.consent_id = allowed.consent_id.clone().unwrap_or_default();
        entry.justification = allowed.justification.clone().unwrap_or_default();
        entry.reason = disclosed_reason(&allowed);
        // An override's owner is told before the content goes out (invariant 5).
        let overriding = (allowed.basis == Basis::SafeguardingOverride).then(|| {
            let notice = OverrideNotice {
                record_id: record.id.clone(),
                subject_ref: record.subject_ref.clone(),
                owner: record.owner.clone(),
                recipient: agency.clone(),
                justification: allowed.justification.clone().unwrap_or_default(),
                audit_seq: 0,
            };
            let denied = self.denied_entry(caller, &record, &req, request_id);
            (notice, denied, self.notifier.clone())
        });
        // One section that runs to its end even if this call is dropped meanwhile:
        // the hold is let go only once the entry is durable (a consent change about
        // the child that starts after it must take a later seq, on any replica),
        // and a disclosure under an override is never left without its notice, or
        // without the entry that withdraws it.
        let auditor = self.auditor.clone();
        let durable = self
            .to_the_end(async move {
                let durable = auditor.append(entry).await?;
                drop(disclosing);
                if let Some((mut notice, denied, notifier)) = overriding {
                    notice.audit_seq = durable.seq();
                    notify_or_withdraw(&*notifier, &auditor, notice, denied).await?;
                }
                Ok(durable)
            })
            .await?;
        if allowed.basis == Basis::SafeguardingOverride {
            tracing::warn!(record = %record.id, owner = %record.owner, recipient = %agency, seq = durable.seq(), "record disclosed under a safeguarding override");
        }
        Ok(Disclosure {
            record,
            content,
            basis: allowed.basis,
            audit_seq: durable.seq(),
            override_ignored: allowed.override_ignored,
        })
    }

    /// Whether `record` is still stored and within its retention, after a failure
    /// to read its content: if not, a purge came in between.
    async fn still_held(&self, record: &Record) -> bool {
        if self.clock.now() >= record.retain_until {
            return false;
        }
        !matches!(self.store.record(&record.id).await, Ok(None))
    }

    /// Audits a refused GetRecord by the record id as given, before or without
    /// reading the record (an id that names none, a malformed override): the
    /// entry names no child and tells nothing of whether the record exists.
    async fn audit_attempt(
        &self,
        caller: &Caller,
        req: &DiscloseRequest,
        reason: &str,
        request_id: &str,
    ) -> Result<(), RecordError> {
        let mut entry = crate::audit::NewEntry::new(
            crate::audit::Actor::from(caller),
            AuditAction::DisclosureDenied,
            AuditOutcome::Denied,
            request_id,
        );
        entry.object_id = req.record_id.to_string();
        entry.purpose = Some(pb_purpose(req.purpose));
        entry.reason = reason.to_owned();
        self.auditor.append(entry).await?;
        Ok(())
    }

    fn denied_entry(
        &self,
        caller: &Caller,
        record: &Record,
        req: &DiscloseRequest,
        request_id: &str,
    ) -> crate::audit::NewEntry {
        let mut entry = Self::entry(
            caller,
            AuditAction::DisclosureDenied,
            AuditOutcome::Denied,
            &record.subject_ref,
            request_id,
        );
        entry.target_agency_id = record.owner.to_string();
        entry.object_id = record.id.to_string();
        entry.purpose = Some(pb_purpose(req.purpose));
        entry
    }
}

/// The policy's view of one request for one record.
fn disclosure_request(
    record: &Record,
    recipient: &AgencyId,
    recipient_sector: Sector,
    purpose: Purpose,
    r#override: Option<policy::OverrideRequest>,
) -> DisclosureRequest {
    DisclosureRequest {
        owner_agency: record.owner.clone(),
        owner_sector: record.owner_sector,
        recipient_agency: recipient.clone(),
        recipient_sector,
        category: record.category,
        purpose,
        r#override,
        retain_until: record.retain_until,
    }
}

/// Whether any of the agreements from the owner's sector to the caller's covers the
/// record's category, for some purpose.
fn receivable<'a>(
    agreements: impl IntoIterator<Item = &'a crate::config::Agreement>,
    record: &Record,
) -> bool {
    agreements
        .into_iter()
        .any(|a| a.categories.contains(&record.category))
}

fn not_found(id: &RecordId) -> RecordError {
    RecordError::NotFound(format!("record {id} not found"))
}

/// The reason of a RECORDS_FOUND entry: how many, and which.
/// An upper bound on the bytes a record takes in an answer (FindRecords'
/// RecordRef): its summary and owner, and at most 128 bytes of id, category,
/// time, access and framing.
pub(super) fn answer_bytes(record: &Record) -> usize {
    record.summary.len() + record.owner.as_str().len() + 128
}

fn found_reason(found: &[Found]) -> String {
    reason_with_ids(
        format!("{} found", found.len()),
        found.iter().map(|f| f.record.id.as_str()),
    )
}

/// The reason of a RECORD_DISCLOSED entry: for an override, the agreement's lawful
/// basis (the entry's `lawful_basis` is the override's) and the statement set aside.
/// Tells the owner of an override. If the notice cannot be delivered the content is
/// withheld, and `denied` (a DISCLOSURE_DENIED entry for the same request) is
/// appended naming the RECORD_DISCLOSED entry, so the log does not claim a
/// disclosure that did not happen; if that append fails too, the call fails all the
/// same.
async fn notify_or_withdraw(
    notifier: &dyn super::notice::OverrideNotifier,
    auditor: &crate::audit::AuditHandle,
    notice: OverrideNotice,
    mut denied: crate::audit::NewEntry,
) -> Result<(), RecordError> {
    let disclosed_seq = notice.audit_seq;
    let Err(failed) = notifier.notify(notice).await else {
        return Ok(());
    };
    denied.reason = format!("OVERRIDE_NOTICE_FAILED: withheld; see seq {disclosed_seq}");
    if let Err(e) = auditor.append(denied).await {
        tracing::error!(error = %e, seq = disclosed_seq, "auditing an override withheld for want of its notice");
    }
    Err(failed.into())
}

fn disclosed_reason(allowed: &policy::Allowed) -> String {
    let mut reason = allowed.basis.as_str().to_owned();
    if allowed.basis == Basis::SafeguardingOverride {
        if let Some(agreement) = &allowed.agreement_lawful_basis {
            reason.push_str(&format!("; agreement lawful basis: {agreement}"));
        }
        if let Some(id) = &allowed.overridden_consent_id {
            reason.push_str(&format!("; consent set aside: {id}"));
        }
    }
    if allowed.override_ignored {
        reason.push_str("; override given but not needed, not relied on");
    }
    reason
}

/// Checks a media type: `type/subtype` of RFC 6838 restricted names, optionally
/// followed by `;` parameters of printable ASCII.
fn check_media_type(m: &str) -> Result<(), RecordError> {
    let bad = || {
        RecordError::Invalid(
            "media_type must be a media type such as \"application/pdf\" or \
             \"text/plain; charset=utf-8\""
                .into(),
        )
    };
    if m.trim().is_empty() {
        return Err(RecordError::Invalid("media_type is required".into()));
    }
    if m.len() > MAX_MEDIA_TYPE_BYTES {
        return Err(RecordError::Invalid(format!(
            "media_type is longer than {MAX_MEDIA_TYPE_BYTES} bytes"
        )));
    }
    let (essence, params) = m.split_once(';').unwrap_or((m, ""));
    let (kind, sub) = essence.split_once('/').ok_or_else(bad)?;
    let name = |s: &str| {
        let mut bytes = s.bytes();
        bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
            && s.len() <= 127
    };
    if !name(kind) || !name(sub) || !params.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_are_checked() {
        for ok in [
            "application/pdf",
            "text/plain; charset=utf-8",
            "application/vnd.oasis.opendocument.text",
            "image/svg+xml",
        ] {
            assert!(check_media_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            " ",
            "pdf",
            "/pdf",
            "text/",
            "text/plain\n",
            "te xt/plain",
            "text/plain;\u{7}",
        ] {
            assert!(check_media_type(bad).is_err(), "{bad:?}");
        }
        assert!(check_media_type(&format!("a/{}", "b".repeat(300))).is_err());
    }

    #[test]
    fn found_reason_names_count_and_ids() {
        assert_eq!(found_reason(&[]), "0 found");
        let ids: Vec<String> = (0..52).map(|i| format!("r{i}")).collect();
        let reason = reason_with_ids("52 found".into(), ids.iter().map(String::as_str));
        let named = ids[..50].join(" ");
        assert_eq!(reason, format!("52 found: {named} and 2 more"));
    }
}
