//! ConsentService: placeholder until the records capability lands.

use tonic::{Request, Response, Status};

use crate::proto::v1::consent_service_server::ConsentService;
use crate::proto::v1::*;

/// The ConsentService adapter.
#[derive(Debug, Clone, Copy)]
pub struct Consents;

#[tonic::async_trait]
impl ConsentService for Consents {
    async fn record_consent(
        &self,
        _req: Request<RecordConsentRequest>,
    ) -> Result<Response<RecordConsentResponse>, Status> {
        Err(super::not_yet("ConsentService.RecordConsent", "records"))
    }

    async fn withdraw_consent(
        &self,
        _req: Request<WithdrawConsentRequest>,
    ) -> Result<Response<WithdrawConsentResponse>, Status> {
        Err(super::not_yet("ConsentService.WithdrawConsent", "records"))
    }

    async fn list_consents(
        &self,
        _req: Request<ListConsentsRequest>,
    ) -> Result<Response<ListConsentsResponse>, Status> {
        Err(super::not_yet("ConsentService.ListConsents", "records"))
    }
}
