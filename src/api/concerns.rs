//! ConcernService: translate protobuf to the concerns capability
//! ([`crate::concerns`]) and back. The rules (routing, auditing, delivery,
//! deadlines) live there; errors become `Status` in [`super::status`].

use std::pin::Pin;
use std::sync::Arc;

use time::OffsetDateTime;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{request_context, App};
use crate::api::status::ApiError;
use crate::concerns::{self as domain, ConcernError, InboxItem, RaiseRequest};
use crate::domain::{ConcernCategory as Category, NhsNumber, Urgency as DomainUrgency};
use crate::proto::v1::concern_service_server::ConcernService;
use crate::proto::v1::*;

/// The ConcernService adapter.
#[derive(Clone)]
pub struct ConcernApi {
    app: Arc<App>,
    stop: CancellationToken,
}

impl ConcernApi {
    /// Wraps the shared state; `stop` ends open inbox streams at shutdown.
    pub fn new(app: Arc<App>, stop: CancellationToken) -> Self {
        ConcernApi { app, stop }
    }
}

impl From<ConcernError> for ApiError {
    fn from(e: ConcernError) -> Self {
        match e {
            ConcernError::Invalid(m) => ApiError::Invalid(m),
            e @ ConcernError::NotFound(_) => ApiError::NotFound(e.to_string()),
            ConcernError::Denied(m) => ApiError::Denied(m),
            ConcernError::Precondition(m) => ApiError::Precondition(m),
            ConcernError::Exhausted(m) => ApiError::Exhausted(m),
            ConcernError::OutOfRange(m) => ApiError::OutOfRange(m),
            ConcernError::Unavailable { message, detail } => ApiError::Unavailable {
                message,
                detail: detail.to_string(),
            },
            ConcernError::Audit(e) => ApiError::Audit(e),
            e @ ConcernError::Store(_) => ApiError::Internal(e.to_string()),
            ConcernError::Internal(m) => ApiError::Internal(m),
        }
    }
}

type InboxEvents = Pin<Box<dyn Stream<Item = Result<SubscribeInboxResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConcernService for ConcernApi {
    async fn raise_concern(
        &self,
        req: Request<RaiseConcernRequest>,
    ) -> Result<Response<RaiseConcernResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let subject = req
                .subject
                .as_ref()
                .ok_or_else(|| ApiError::Invalid("subject is required".into()))?;
            let raise = RaiseRequest {
                subject: NhsNumber::parse(&subject.nhs_number)
                    .map_err(|e| ApiError::Invalid(e.to_string()))?,
                category: category(req.category)?,
                urgency: urgency(req.urgency)?,
                narrative: req.narrative,
                recipients: req.recipient_agency_ids,
                request_id: req.request_id,
            };
            let concern = self
                .app
                .concerns
                .raise(&ctx.caller, raise, &ctx.request_id)
                .await?;
            Ok(RaiseConcernResponse {
                concern: Some(concern_message(&concern)),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn get_concern(
        &self,
        req: Request<GetConcernRequest>,
    ) -> Result<Response<GetConcernResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let concern = self
                .app
                .concerns
                .get(&ctx.caller, &req.concern_id, &ctx.request_id)
                .await?;
            Ok(GetConcernResponse {
                concern: Some(concern_message(&concern)),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn list_inbox(
        &self,
        req: Request<ListInboxRequest>,
    ) -> Result<Response<ListInboxResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let page_size = self.app.page_size(req.page_size)?;
            let status = status_filter(req.status)?;
            let page = self
                .app
                .concerns
                .list_inbox(
                    &ctx.caller,
                    page_size,
                    &req.page_token,
                    status,
                    &ctx.request_id,
                )
                .await?;
            Ok(ListInboxResponse {
                concerns: page.concerns.iter().map(concern_message).collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    type SubscribeInboxStream = InboxEvents;

    async fn subscribe_inbox(
        &self,
        req: Request<SubscribeInboxRequest>,
    ) -> Result<Response<Self::SubscribeInboxStream>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let events = self
            .app
            .concerns
            .subscribe(
                &ctx.caller,
                req.after_cursor,
                &ctx.request_id,
                self.stop.clone(),
            )
            .await
            .map_err(|e| ApiError::from(e).into_status(&ctx.request_id))?;
        let request_id = ctx.request_id.clone();
        let events = events.map(move |item| match item {
            Ok((cursor, item)) => Ok(SubscribeInboxResponse {
                cursor,
                event: Some(match item {
                    InboxItem::Concern(c) => {
                        subscribe_inbox_response::Event::Concern(concern_message(&c))
                    }
                    InboxItem::Escalation(e) => {
                        subscribe_inbox_response::Event::Escalation(Escalation {
                            concern_id: e.concern_id.to_string(),
                            reason: e.reason,
                            due_at: Some(timestamp(e.due_at)),
                        })
                    }
                    InboxItem::OverrideNotice(n) => {
                        subscribe_inbox_response::Event::OverrideNotice(OverrideNotice {
                            record_id: n.record_id,
                            recipient_agency_id: n.recipient.to_string(),
                            justification: n.justification,
                            audit_seq: n.audit_seq,
                        })
                    }
                }),
            }),
            Err(e) => Err(ApiError::from(e).into_status(&request_id)),
        });
        Ok(Response::new(Box::pin(events) as InboxEvents))
    }

    async fn acknowledge_concern(
        &self,
        req: Request<AcknowledgeConcernRequest>,
    ) -> Result<Response<AcknowledgeConcernResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let concern = self
                .app
                .concerns
                .acknowledge(&ctx.caller, &req.concern_id, &req.note, &ctx.request_id)
                .await?;
            Ok(AcknowledgeConcernResponse {
                concern: Some(concern_message(&concern)),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn record_decision(
        &self,
        req: Request<RecordDecisionRequest>,
    ) -> Result<Response<RecordDecisionResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let concern = self
                .app
                .concerns
                .decide(
                    &ctx.caller,
                    &req.concern_id,
                    decision(req.decision)?,
                    &req.lead_practitioner,
                    &req.note,
                    &ctx.request_id,
                )
                .await?;
            Ok(RecordDecisionResponse {
                concern: Some(concern_message(&concern)),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }
}

// === protobuf → domain ===

fn category(value: i32) -> Result<Category, ApiError> {
    Ok(match ConcernCategory::try_from(value) {
        Ok(ConcernCategory::Unspecified) => {
            return Err(ApiError::Invalid(
                "category is required (CONCERN_CATEGORY_UNSPECIFIED given)".into(),
            ))
        }
        Ok(ConcernCategory::Neglect) => Category::Neglect,
        Ok(ConcernCategory::PhysicalAbuse) => Category::PhysicalAbuse,
        Ok(ConcernCategory::SexualAbuse) => Category::SexualAbuse,
        Ok(ConcernCategory::EmotionalAbuse) => Category::EmotionalAbuse,
        Ok(ConcernCategory::DomesticAbuse) => Category::DomesticAbuse,
        Ok(ConcernCategory::Exploitation) => Category::Exploitation,
        Ok(ConcernCategory::MissingFromEducation) => Category::MissingFromEducation,
        Ok(ConcernCategory::OnlineHarm) => Category::OnlineHarm,
        Ok(ConcernCategory::Other) => Category::Other,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "category {value} is not a ConcernCategory"
            )))
        }
    })
}

fn urgency(value: i32) -> Result<DomainUrgency, ApiError> {
    Ok(match Urgency::try_from(value) {
        Ok(Urgency::Unspecified) => {
            return Err(ApiError::Invalid(
                "urgency is required (URGENCY_UNSPECIFIED given)".into(),
            ))
        }
        Ok(Urgency::ImmediateRisk) => DomainUrgency::ImmediateRisk,
        Ok(Urgency::Urgent) => DomainUrgency::Urgent,
        Ok(Urgency::Routine) => DomainUrgency::Routine,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "urgency {value} is not an Urgency"
            )))
        }
    })
}

fn decision(value: i32) -> Result<domain::Decision, ApiError> {
    Ok(match Decision::try_from(value) {
        Ok(Decision::Unspecified) => {
            return Err(ApiError::Invalid(
                "decision is required (DECISION_UNSPECIFIED given)".into(),
            ))
        }
        Ok(Decision::NoFurtherAction) => domain::Decision::NoFurtherAction,
        Ok(Decision::EarlyHelp) => domain::Decision::EarlyHelp,
        Ok(Decision::ChildInNeed) => domain::Decision::ChildInNeed,
        Ok(Decision::ChildProtectionEnquiry) => domain::Decision::ChildProtectionEnquiry,
        Ok(Decision::PoliceAction) => domain::Decision::PoliceAction,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "decision {value} is not a Decision"
            )))
        }
    })
}

/// ListInboxRequest.status: UNSPECIFIED means any status.
fn status_filter(value: i32) -> Result<Option<domain::ConcernStatus>, ApiError> {
    Ok(Some(match ConcernStatus::try_from(value) {
        Ok(ConcernStatus::Unspecified) => return Ok(None),
        Ok(ConcernStatus::Raised) => domain::ConcernStatus::Raised,
        Ok(ConcernStatus::Delivered) => domain::ConcernStatus::Delivered,
        Ok(ConcernStatus::Acknowledged) => domain::ConcernStatus::Acknowledged,
        Ok(ConcernStatus::Decided) => domain::ConcernStatus::Decided,
        Ok(ConcernStatus::Closed) => domain::ConcernStatus::Closed,
        Ok(ConcernStatus::Overdue) => domain::ConcernStatus::Overdue,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "status {value} is not a ConcernStatus"
            )))
        }
    }))
}

// === domain → protobuf ===

fn concern_message(c: &domain::Concern) -> Concern {
    Concern {
        concern_id: c.id.to_string(),
        subject: Some(Subject {
            nhs_number: c.subject.digits(),
        }),
        raised_by: c.raised_by.to_string(),
        category: category_message(c.category) as i32,
        urgency: urgency_message(c.urgency) as i32,
        narrative: c.narrative.clone(),
        recipients: c
            .recipients
            .iter()
            .map(|d| Delivery {
                agency_id: d.agency.to_string(),
                delivered_at: d.delivered_at.map(timestamp),
                acknowledged_at: d.acknowledged_at.map(timestamp),
            })
            .collect(),
        status: status_message(c.status()) as i32,
        ack_due_at: Some(timestamp(c.ack_due_at())),
        decision: c
            .decision
            .as_ref()
            .map(|d| decision_message(d.decision))
            .unwrap_or(Decision::Unspecified) as i32,
        lead_practitioner: c
            .decision
            .as_ref()
            .map(|d| d.lead_practitioner.clone())
            .unwrap_or_default(),
        raised_at: Some(timestamp(c.raised_at)),
        front_door: c
            .front_door
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    }
}

fn category_message(c: Category) -> ConcernCategory {
    match c {
        Category::Neglect => ConcernCategory::Neglect,
        Category::PhysicalAbuse => ConcernCategory::PhysicalAbuse,
        Category::SexualAbuse => ConcernCategory::SexualAbuse,
        Category::EmotionalAbuse => ConcernCategory::EmotionalAbuse,
        Category::DomesticAbuse => ConcernCategory::DomesticAbuse,
        Category::Exploitation => ConcernCategory::Exploitation,
        Category::MissingFromEducation => ConcernCategory::MissingFromEducation,
        Category::OnlineHarm => ConcernCategory::OnlineHarm,
        Category::Other => ConcernCategory::Other,
    }
}

fn urgency_message(u: DomainUrgency) -> Urgency {
    match u {
        DomainUrgency::ImmediateRisk => Urgency::ImmediateRisk,
        DomainUrgency::Urgent => Urgency::Urgent,
        DomainUrgency::Routine => Urgency::Routine,
    }
}

fn status_message(s: domain::ConcernStatus) -> ConcernStatus {
    match s {
        domain::ConcernStatus::Raised => ConcernStatus::Raised,
        domain::ConcernStatus::Delivered => ConcernStatus::Delivered,
        domain::ConcernStatus::Acknowledged => ConcernStatus::Acknowledged,
        domain::ConcernStatus::Decided => ConcernStatus::Decided,
        domain::ConcernStatus::Closed => ConcernStatus::Closed,
        domain::ConcernStatus::Overdue => ConcernStatus::Overdue,
    }
}

fn decision_message(d: domain::Decision) -> Decision {
    match d {
        domain::Decision::NoFurtherAction => Decision::NoFurtherAction,
        domain::Decision::EarlyHelp => Decision::EarlyHelp,
        domain::Decision::ChildInNeed => Decision::ChildInNeed,
        domain::Decision::ChildProtectionEnquiry => Decision::ChildProtectionEnquiry,
        domain::Decision::PoliceAction => Decision::PoliceAction,
    }
}

fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: t.nanosecond() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enum_round_trips_and_unspecified_is_refused() {
        for c in Category::ALL {
            assert_eq!(category(category_message(*c) as i32).unwrap(), *c);
        }
        for u in DomainUrgency::ALL {
            assert_eq!(urgency(urgency_message(*u) as i32).unwrap(), *u);
        }
        for d in domain::Decision::ALL {
            assert_eq!(decision(decision_message(*d) as i32).unwrap(), *d);
        }
        assert!(category(0).is_err() && category(99).is_err());
        assert!(urgency(0).is_err() && urgency(-1).is_err());
        assert!(decision(0).is_err() && decision(6).is_err());
        assert_eq!(status_filter(0).unwrap(), None);
        assert_eq!(
            status_filter(ConcernStatus::Overdue as i32).unwrap(),
            Some(domain::ConcernStatus::Overdue)
        );
        assert!(status_filter(7).is_err());
    }
}
