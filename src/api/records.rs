//! RecordService: placeholder until the records capability lands.

use tonic::{Request, Response, Status};

use crate::proto::v1::record_service_server::RecordService;
use crate::proto::v1::*;

/// The RecordService adapter.
#[derive(Debug, Clone, Copy)]
pub struct Records;

#[tonic::async_trait]
impl RecordService for Records {
    async fn share_record(
        &self,
        _req: Request<ShareRecordRequest>,
    ) -> Result<Response<ShareRecordResponse>, Status> {
        Err(super::not_yet("RecordService.ShareRecord", "records"))
    }

    async fn find_records(
        &self,
        _req: Request<FindRecordsRequest>,
    ) -> Result<Response<FindRecordsResponse>, Status> {
        Err(super::not_yet("RecordService.FindRecords", "records"))
    }

    async fn get_record(
        &self,
        _req: Request<GetRecordRequest>,
    ) -> Result<Response<GetRecordResponse>, Status> {
        Err(super::not_yet("RecordService.GetRecord", "records"))
    }
}
