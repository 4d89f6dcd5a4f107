//! OperationsService: placeholder until the certificate rotation capability lands.

use tonic::{Request, Response, Status};

use crate::proto::v1::operations_service_server::OperationsService;
use crate::proto::v1::*;

/// The OperationsService adapter.
#[derive(Debug, Clone, Copy)]
pub struct Operations;

#[tonic::async_trait]
impl OperationsService for Operations {
    async fn get_tls_status(
        &self,
        _req: Request<GetTlsStatusRequest>,
    ) -> Result<Response<GetTlsStatusResponse>, Status> {
        Err(super::not_yet(
            "OperationsService.GetTlsStatus",
            "certificate rotation",
        ))
    }

    async fn reload_tls(
        &self,
        _req: Request<ReloadTlsRequest>,
    ) -> Result<Response<ReloadTlsResponse>, Status> {
        Err(super::not_yet(
            "OperationsService.ReloadTls",
            "certificate rotation",
        ))
    }

    async fn revoke_certificate(
        &self,
        _req: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokeCertificateResponse>, Status> {
        Err(super::not_yet(
            "OperationsService.RevokeCertificate",
            "certificate rotation",
        ))
    }
}
