//! ConsentService: translate protobuf to the records capability's consent calls
//! ([`crate::records`]) and back. Errors become `Status` in [`super::status`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::records::{
    category, category_message, purpose, purpose_message, sector, sector_message, subject, time_in,
    time_out,
};
use super::{request_context, App};
use crate::api::status::ApiError;
use crate::domain::consent::{ConsentGiver as Giver, ConsentState as State};
use crate::proto::v1::consent_service_server::ConsentService;
use crate::proto::v1::*;
use crate::records::{self, ConsentId, NewConsent};

/// The ConsentService adapter.
#[derive(Clone)]
pub struct ConsentApi {
    app: Arc<App>,
}

impl ConsentApi {
    /// Wraps the shared state.
    pub fn new(app: Arc<App>) -> Self {
        ConsentApi { app }
    }
}

#[tonic::async_trait]
impl ConsentService for ConsentApi {
    async fn record_consent(
        &self,
        req: Request<RecordConsentRequest>,
    ) -> Result<Response<RecordConsentResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let new = NewConsent {
                subject: subject(req.subject.as_ref())?,
                state: state(req.state)?,
                given_by: giver(req.given_by)?,
                purposes: each(&req.purposes, "purposes", purpose)?,
                recipient_sectors: each(&req.recipient_sectors, "recipient_sectors", sector)?,
                recipient_agency_ids: req.recipient_agency_ids,
                categories: each(&req.categories, "categories", category)?,
                valid_until: req
                    .valid_until
                    .as_ref()
                    .map(|t| time_in(t, "valid_until"))
                    .transpose()?,
                note: req.note,
            };
            let consent = self
                .app
                .records
                .record_consent(&ctx.caller, new, &ctx.request_id)
                .await?;
            Ok(RecordConsentResponse {
                consent: Some(consent_message(&consent)),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn withdraw_consent(
        &self,
        req: Request<WithdrawConsentRequest>,
    ) -> Result<Response<WithdrawConsentResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let id = ConsentId::parse(&req.consent_id).map_err(ApiError::Invalid)?;
            let consent = self
                .app
                .records
                .withdraw_consent(&ctx.caller, &id, &req.note, &ctx.request_id)
                .await?;
            Ok(WithdrawConsentResponse {
                consent: Some(consent_message(&consent)),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }

    async fn list_consents(
        &self,
        req: Request<ListConsentsRequest>,
    ) -> Result<Response<ListConsentsResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        let result = async {
            let subject = subject(req.subject.as_ref())?;
            let page = records::Page {
                size: req.page_size as usize,
                token: &req.page_token,
            };
            let page = self
                .app
                .records
                .list_consents(&ctx.caller, &subject, page, &ctx.request_id)
                .await?;
            Ok(ListConsentsResponse {
                consents: page.consents.iter().map(consent_message).collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            })
        }
        .await;
        result
            .map(Response::new)
            .map_err(|e: ApiError| e.into_status(&ctx.request_id))
    }
}

// === protobuf → domain ===

/// Converts every value of a repeated enum field, naming the index of a bad one.
fn each<T>(
    values: &[i32],
    name: &str,
    convert: fn(i32, &str) -> Result<T, ApiError>,
) -> Result<Vec<T>, ApiError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| convert(*v, &format!("{name}[{i}]")))
        .collect()
}

/// RecordConsentRequest.state. WITHDRAWN passes through, for the domain to refuse
/// with its message (use WithdrawConsent).
fn state(value: i32) -> Result<State, ApiError> {
    Ok(match ConsentState::try_from(value) {
        Ok(ConsentState::Unspecified) => {
            return Err(ApiError::Invalid(
                "state is required: GIVEN or REFUSED (CONSENT_STATE_UNSPECIFIED given)".into(),
            ))
        }
        Ok(ConsentState::Given) => State::Given,
        Ok(ConsentState::Refused) => State::Refused,
        Ok(ConsentState::Withdrawn) => State::Withdrawn,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "state {value} is not a ConsentState"
            )))
        }
    })
}

fn giver(value: i32) -> Result<Giver, ApiError> {
    Ok(match ConsentGiver::try_from(value) {
        Ok(ConsentGiver::Unspecified) => {
            return Err(ApiError::Invalid(
                "given_by is required (CONSENT_GIVER_UNSPECIFIED given)".into(),
            ))
        }
        Ok(ConsentGiver::Child) => Giver::Child,
        Ok(ConsentGiver::Parent) => Giver::Parent,
        Ok(ConsentGiver::Carer) => Giver::Carer,
        Err(_) => {
            return Err(ApiError::Invalid(format!(
                "given_by {value} is not a ConsentGiver"
            )))
        }
    })
}

// === domain → protobuf ===

fn state_message(s: State) -> ConsentState {
    match s {
        State::Given => ConsentState::Given,
        State::Refused => ConsentState::Refused,
        State::Withdrawn => ConsentState::Withdrawn,
    }
}

fn giver_message(g: Giver) -> ConsentGiver {
    match g {
        Giver::Child => ConsentGiver::Child,
        Giver::Parent => ConsentGiver::Parent,
        Giver::Carer => ConsentGiver::Carer,
    }
}

fn consent_message(c: &records::Consent) -> Consent {
    let s = &c.statement;
    Consent {
        consent_id: s.consent_id.clone(),
        subject: Some(Subject {
            nhs_number: c.subject.digits(),
        }),
        state: state_message(s.state) as i32,
        given_by: giver_message(s.given_by) as i32,
        purposes: s
            .scope
            .purposes()
            .iter()
            .map(|p| purpose_message(*p) as i32)
            .collect(),
        recipient_sectors: s
            .scope
            .recipient_sectors()
            .iter()
            .map(|x| sector_message(*x) as i32)
            .collect(),
        recipient_agency_ids: s
            .scope
            .recipient_agency_ids()
            .iter()
            .map(|a| a.to_string())
            .collect(),
        categories: s
            .scope
            .categories()
            .iter()
            .map(|x| category_message(*x) as i32)
            .collect(),
        valid_until: s.scope.valid_until().map(time_out),
        note: c.note.clone(),
        recorded_by: s.recorded_by.to_string(),
        recorded_at: Some(time_out(s.recorded_at)),
        withdrawal_note: c.withdrawal_note.clone(),
        withdrawn_at: s.withdrawn_at.map(time_out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consent_enums_round_trip_and_unspecified_is_refused() {
        for s in State::ALL {
            assert_eq!(state(state_message(*s) as i32).unwrap(), *s);
        }
        for g in Giver::ALL {
            assert_eq!(giver(giver_message(*g) as i32).unwrap(), *g);
        }
        assert!(state(0).is_err() && state(4).is_err());
        assert!(giver(0).is_err() && giver(-2).is_err());
    }
}
