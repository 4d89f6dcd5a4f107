//! AuditService: placeholder until the audit capability lands.

use tonic::{Request, Response, Status};

use crate::proto::v1::audit_service_server::AuditService;
use crate::proto::v1::*;

/// The AuditService adapter.
#[derive(Debug, Clone, Copy)]
pub struct Audit;

#[tonic::async_trait]
impl AuditService for Audit {
    async fn query_disclosures(&self, _req: Request<QueryDisclosuresRequest>) -> Result<Response<QueryDisclosuresResponse>, Status> {
        Err(super::not_yet("AuditService.QueryDisclosures", "audit"))
    }

    async fn subject_access_report(&self, _req: Request<SubjectAccessReportRequest>) -> Result<Response<SubjectAccessReportResponse>, Status> {
        Err(super::not_yet("AuditService.SubjectAccessReport", "audit"))
    }

    async fn get_checkpoint(&self, _req: Request<GetCheckpointRequest>) -> Result<Response<GetCheckpointResponse>, Status> {
        Err(super::not_yet("AuditService.GetCheckpoint", "audit"))
    }

    async fn get_inclusion_proof(&self, _req: Request<GetInclusionProofRequest>) -> Result<Response<GetInclusionProofResponse>, Status> {
        Err(super::not_yet("AuditService.GetInclusionProof", "audit"))
    }

    async fn get_consistency_proof(&self, _req: Request<GetConsistencyProofRequest>) -> Result<Response<GetConsistencyProofResponse>, Status> {
        Err(super::not_yet("AuditService.GetConsistencyProof", "audit"))
    }

    type ExportEntriesStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ExportEntriesResponse, Status>> + Send>>;

    async fn export_entries(&self, _req: Request<ExportEntriesRequest>) -> Result<Response<Self::ExportEntriesStream>, Status> {
        Err(super::not_yet("AuditService.ExportEntries", "audit"))
    }

}
