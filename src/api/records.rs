//! RecordService: translate protobuf to the records capability
//! ([`crate::records`]) and back. The rules (the decision, consent, auditing,
//! retention) live there and in [`crate::domain::policy`]; errors become `Status` in
//! [`super::status`]. The enum conversions here are shared with ConsentService.

use std::sync::Arc;

use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use super::{request_context, App};
use crate::api::status::ApiError;
use crate::domain::policy::{Basis, DenyReason, OverrideRequest, RecordAccess as Access};
use crate::domain::{self, NhsNumber};
use crate::proto::v1::record_service_server::RecordService;
use crate::proto::v1::*;
use crate::records::{DiscloseRequest, NewRecord, Record, RecordError, RecordId};

/// The RecordService adapter.
#[derive(Clone)]
pub struct RecordApi {
    app: Arc<App>,
}

impl RecordApi {
    /// Wraps the shared state.
    pub fn new(app: Arc<App>) -> Self {
        RecordApi { app }
    }
}

impl From<RecordError> for ApiError {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::Invalid(m) => ApiError::Invalid(m),
            RecordError::NotFound(m) => ApiError::NotFound(m),
            RecordError::Denied(m) => ApiError::Denied(m),
            RecordError::Precondition(m) => ApiError::Precondition(m),
            RecordError::TooLarge(m) => ApiError::Exhausted(m),
            RecordError::Refused(denied) => match denied.reason {
                DenyReason::Expired => ApiError::NotFound(denied.message),
                DenyReason::NoAgreement | DenyReason::OverrideNotAllowed => {
                    ApiError::Denied(denied.message)
                }
                DenyReason::ConsentNeeded { .. }
                | DenyReason::ConsentRefused { .. }
                | DenyReason::ConsentWithdrawn { .. } => ApiError::Precondition(denied.message),
                DenyReason::JustificationTooShort { .. } | DenyReason::LawfulBasisMissing => {
                    ApiError::Invalid(denied.message)
                }
            },
            RecordError::Audit(e) => ApiError::Audit(e),
            e @ RecordError::Store(_) => ApiError::Internal(e.to_string()),
            e @ RecordError::Notice(_) => ApiError::Internal(e.to_string()),
            RecordError::Internal(m) => ApiError::Internal(m),
        }
    }
}

#[tonic::async_trait]
impl RecordService for RecordApi {
    async fn share_record(
        &self,
        req: Request<ShareRecordRequest>,
    ) -> Result<Response<ShareRecordResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let new = NewRecord {
                subject: subject(req.subject.as_ref())?,
                category: category(req.category, "category")?,
                summary: req.summary,
                content: req.content,
                media_type: req.media_type,
                retain_until: req
                    .retain_until
                    .as_ref()
                    .map(|t| time_in(t, "retain_until"))
                    .transpose()?,
            };
            let record = self
                .app
                .records
                .share(&ctx.caller, new, &ctx.request_id)
                .await?;
            Ok(ShareRecordResponse {
                record: Some(record_ref(&record, Some(Access::Owner))),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn find_records(
        &self,
        req: Request<FindRecordsRequest>,
    ) -> Result<Response<FindRecordsResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let subject = subject(req.subject.as_ref())?;
            let purpose = purpose(req.purpose, "purpose")?;
            let page = crate::records::Page {
                size: req.page_size as usize,
                token: &req.page_token,
            };
            let page = self
                .app
                .records
                .find(&ctx.caller, &subject, purpose, page, &ctx.request_id)
                .await?;
            Ok(FindRecordsResponse {
                records: page
                    .found
                    .iter()
                    .map(|f| record_ref(&f.record, Some(f.access)))
                    .collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn get_record(
        &self,
        req: Request<GetRecordRequest>,
    ) -> Result<Response<GetRecordResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let request = DiscloseRequest {
                record_id: RecordId::parse(&req.record_id).map_err(ApiError::Invalid)?,
                purpose: purpose(req.purpose, "purpose")?,
                r#override: req.r#override.map(|o| OverrideRequest {
                    lawful_basis: o.lawful_basis,
                    justification: o.justification,
                }),
            };
            let disclosure = self
                .app
                .records
                .disclose(&ctx.caller, request, &ctx.request_id)
                .await?;
            Ok(GetRecordResponse {
                record: Some(record_ref(&disclosure.record, None)),
                media_type: disclosure.record.media_type.clone(),
                content: disclosure.content,
                basis: basis_message(disclosure.basis) as i32,
                audit_seq: disclosure.audit_seq,
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }
}

// === protobuf → domain ===

/// A request's subject: required, and a valid NHS number.
pub(super) fn subject(s: Option<&Subject>) -> Result<NhsNumber, ApiError> {
    let s = s.ok_or_else(|| ApiError::Invalid("subject is required".into()))?;
    NhsNumber::parse(&s.nhs_number).map_err(|e| ApiError::Invalid(e.to_string()))
}

pub(super) fn purpose(value: i32, field: &str) -> Result<domain::Purpose, ApiError> {
    Ok(match Purpose::try_from(value) {
        Ok(Purpose::Unspecified) => {
            return Err(ApiError::Invalid(format!(
                "{field} is required (PURPOSE_UNSPECIFIED given)"
            )))
        }
        Ok(Purpose::Safeguarding) => domain::Purpose::Safeguarding,
        Ok(Purpose::EarlyHelp) => domain::Purpose::EarlyHelp,
        Ok(Purpose::HealthCare) => domain::Purpose::HealthCare,
        Ok(Purpose::EducationSupport) => domain::Purpose::EducationSupport,
        Ok(Purpose::CrimePrevention) => domain::Purpose::CrimePrevention,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "{field} {value} is not a Purpose"
            )))
        }
    })
}

pub(super) fn category(value: i32, field: &str) -> Result<domain::RecordCategory, ApiError> {
    use domain::RecordCategory as C;
    Ok(match RecordCategory::try_from(value) {
        Ok(RecordCategory::Unspecified) => {
            return Err(ApiError::Invalid(format!(
                "{field} is required (RECORD_CATEGORY_UNSPECIFIED given)"
            )))
        }
        Ok(RecordCategory::ChildProtectionPlan) => C::ChildProtectionPlan,
        Ok(RecordCategory::LookedAfterStatus) => C::LookedAfterStatus,
        Ok(RecordCategory::SchoolAttendance) => C::SchoolAttendance,
        Ok(RecordCategory::UnscheduledCareAttendance) => C::UnscheduledCareAttendance,
        Ok(RecordCategory::PoliceIncident) => C::PoliceIncident,
        Ok(RecordCategory::EarlyHelpAssessment) => C::EarlyHelpAssessment,
        Ok(RecordCategory::Other) => C::Other,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "{field} {value} is not a RecordCategory"
            )))
        }
    })
}

pub(super) fn sector(value: i32, field: &str) -> Result<domain::Sector, ApiError> {
    use domain::Sector as S;
    Ok(match Sector::try_from(value) {
        Ok(Sector::Unspecified) => {
            return Err(ApiError::Invalid(format!(
                "{field} holds SECTOR_UNSPECIFIED"
            )))
        }
        Ok(Sector::Health) => S::Health,
        Ok(Sector::Police) => S::Police,
        Ok(Sector::Education) => S::Education,
        Ok(Sector::ChildrensSocialCare) => S::ChildrensSocialCare,
        Ok(Sector::Probation) => S::Probation,
        Ok(Sector::Housing) => S::Housing,
        Ok(Sector::Other) => S::Other,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "{field} {value} is not a Sector"
            )))
        }
    })
}

/// A timestamp field; out-of-range values are INVALID_ARGUMENT.
pub(super) fn time_in(t: &prost_types::Timestamp, field: &str) -> Result<OffsetDateTime, ApiError> {
    let bad = || ApiError::Invalid(format!("{field} is not a valid timestamp"));
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(bad());
    }
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .map(|s| s + time::Duration::nanoseconds(i64::from(t.nanos)))
        .map_err(|_| bad())
}

// === domain → protobuf ===

pub(super) fn time_out(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

fn record_ref(r: &Record, access: Option<Access>) -> RecordRef {
    RecordRef {
        record_id: r.id.to_string(),
        owner_agency_id: r.owner.to_string(),
        category: category_message(r.category) as i32,
        summary: r.summary.clone(),
        shared_at: Some(time_out(r.shared_at)),
        access: access
            .map(access_message)
            .unwrap_or(RecordAccess::Unspecified) as i32,
    }
}

pub(super) fn purpose_message(p: domain::Purpose) -> Purpose {
    match p {
        domain::Purpose::Safeguarding => Purpose::Safeguarding,
        domain::Purpose::EarlyHelp => Purpose::EarlyHelp,
        domain::Purpose::HealthCare => Purpose::HealthCare,
        domain::Purpose::EducationSupport => Purpose::EducationSupport,
        domain::Purpose::CrimePrevention => Purpose::CrimePrevention,
    }
}

pub(super) fn category_message(c: domain::RecordCategory) -> RecordCategory {
    use domain::RecordCategory as C;
    match c {
        C::ChildProtectionPlan => RecordCategory::ChildProtectionPlan,
        C::LookedAfterStatus => RecordCategory::LookedAfterStatus,
        C::SchoolAttendance => RecordCategory::SchoolAttendance,
        C::UnscheduledCareAttendance => RecordCategory::UnscheduledCareAttendance,
        C::PoliceIncident => RecordCategory::PoliceIncident,
        C::EarlyHelpAssessment => RecordCategory::EarlyHelpAssessment,
        C::Other => RecordCategory::Other,
    }
}

pub(super) fn sector_message(s: domain::Sector) -> Sector {
    use domain::Sector as S;
    match s {
        S::Health => Sector::Health,
        S::Police => Sector::Police,
        S::Education => Sector::Education,
        S::ChildrensSocialCare => Sector::ChildrensSocialCare,
        S::Probation => Sector::Probation,
        S::Housing => Sector::Housing,
        S::Other => Sector::Other,
    }
}

fn access_message(a: Access) -> RecordAccess {
    match a {
        Access::Owner => RecordAccess::Owner,
        Access::Readable => RecordAccess::Readable,
        Access::NeedsConsent => RecordAccess::NeedsConsent,
        Access::OverrideOnly => RecordAccess::OverrideOnly,
    }
}

fn basis_message(b: Basis) -> DisclosureBasis {
    match b {
        Basis::Owner => DisclosureBasis::Owner,
        Basis::Consent => DisclosureBasis::Consent,
        Basis::AgreementNoConsentNeeded => DisclosureBasis::AgreementNoConsentNeeded,
        Basis::SafeguardingOverride => DisclosureBasis::SafeguardingOverride,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enum_round_trips_and_unspecified_is_refused() {
        for p in domain::Purpose::ALL {
            assert_eq!(purpose(purpose_message(*p) as i32, "p").unwrap(), *p);
        }
        for c in domain::RecordCategory::ALL {
            assert_eq!(category(category_message(*c) as i32, "c").unwrap(), *c);
        }
        for s in domain::Sector::ALL {
            assert_eq!(sector(sector_message(*s) as i32, "s").unwrap(), *s);
        }
        assert!(purpose(0, "p").is_err() && purpose(99, "p").is_err());
        assert!(category(0, "c").is_err() && category(-1, "c").is_err());
        assert!(sector(0, "s").is_err() && sector(8, "s").is_err());
    }

    #[test]
    fn timestamps_out_of_range_are_refused() {
        let ok = prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 5,
        };
        assert_eq!(time_out(time_in(&ok, "t").unwrap()), ok);
        for bad in [(0, -1), (0, 1_000_000_000), (i64::MAX, 0)] {
            let t = prost_types::Timestamp {
                seconds: bad.0,
                nanos: bad.1,
            };
            assert!(time_in(&t, "t").is_err(), "{bad:?}");
        }
    }
}
