//! ConcernService: placeholder until the concerns capability lands.

use tonic::{Request, Response, Status};

use crate::proto::v1::concern_service_server::ConcernService;
use crate::proto::v1::*;

/// The ConcernService adapter.
#[derive(Debug, Clone, Copy)]
pub struct Concerns;

#[tonic::async_trait]
impl ConcernService for Concerns {
    async fn raise_concern(
        &self,
        _req: Request<RaiseConcernRequest>,
    ) -> Result<Response<RaiseConcernResponse>, Status> {
        Err(super::not_yet("ConcernService.RaiseConcern", "concerns"))
    }

    async fn get_concern(
        &self,
        _req: Request<GetConcernRequest>,
    ) -> Result<Response<GetConcernResponse>, Status> {
        Err(super::not_yet("ConcernService.GetConcern", "concerns"))
    }

    async fn list_inbox(
        &self,
        _req: Request<ListInboxRequest>,
    ) -> Result<Response<ListInboxResponse>, Status> {
        Err(super::not_yet("ConcernService.ListInbox", "concerns"))
    }

    type SubscribeInboxStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<SubscribeInboxResponse, Status>> + Send>,
    >;

    async fn subscribe_inbox(
        &self,
        _req: Request<SubscribeInboxRequest>,
    ) -> Result<Response<Self::SubscribeInboxStream>, Status> {
        Err(super::not_yet("ConcernService.SubscribeInbox", "concerns"))
    }

    async fn acknowledge_concern(
        &self,
        _req: Request<AcknowledgeConcernRequest>,
    ) -> Result<Response<AcknowledgeConcernResponse>, Status> {
        Err(super::not_yet(
            "ConcernService.AcknowledgeConcern",
            "concerns",
        ))
    }

    async fn record_decision(
        &self,
        _req: Request<RecordDecisionRequest>,
    ) -> Result<Response<RecordDecisionResponse>, Status> {
        Err(super::not_yet("ConcernService.RecordDecision", "concerns"))
    }
}
