//! OperationsService: the operator's view of the gateway's TLS, reloads and
//! revocations. Operators never read records or audit entries.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{request_context, App};
use crate::audit::Actor;
use crate::proto::v1::operations_service_server::OperationsService;
use crate::proto::v1::*;
use crate::tls::{CertSummary, TlsMaterial};

/// The OperationsService adapter.
#[derive(Clone)]
pub struct Operations {
    app: Arc<App>,
}

impl Operations {
    /// Wraps the shared application state.
    pub fn new(app: Arc<App>) -> Self {
        Operations { app }
    }

    fn status(&self) -> Result<TlsStatus, Status> {
        let tls = self
            .app
            .tls()
            .ok_or_else(|| Status::internal("TLS state not attached"))?;
        let now = self.app.clock.now().unix_timestamp();
        Ok(tls_status(&tls.current(), tls.revocations().all(), now))
    }
}

fn ts(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

/// Whole days from `now` until `not_after` (negative once expired).
pub fn days_until(not_after: i64, now: i64) -> i64 {
    (not_after - now).div_euclid(86_400)
}

/// The status message for the material in force.
pub fn tls_status(material: &TlsMaterial, revoked: Vec<String>, now: i64) -> TlsStatus {
    let ca = |c: &CertSummary| CaStatus {
        sha256: c.sha256_hex.clone(),
        subject: c.subject.clone(),
        not_after: Some(ts(c.not_after)),
        days_until_expiry: days_until(c.not_after, now),
    };
    TlsStatus {
        server_cert_serial: material.server_cert.serial_hex.clone(),
        server_cert_sha256: material.server_cert.sha256_hex.clone(),
        server_not_after: Some(ts(material.server_cert.not_after)),
        client_ca_sha256: material
            .client_cas
            .iter()
            .map(|c| c.sha256_hex.clone())
            .collect(),
        revoked_serials: revoked,
        reloaded_at: Some(ts(material.loaded_at)),
        server_days_until_expiry: days_until(material.server_cert.not_after, now),
        client_cas: material.client_cas.iter().map(ca).collect(),
    }
}

#[tonic::async_trait]
impl OperationsService for Operations {
    async fn get_tls_status(
        &self,
        _req: Request<GetTlsStatusRequest>,
    ) -> Result<Response<GetTlsStatusResponse>, Status> {
        Ok(Response::new(GetTlsStatusResponse {
            status: Some(self.status()?),
        }))
    }

    async fn reload_tls(
        &self,
        req: Request<ReloadTlsRequest>,
    ) -> Result<Response<ReloadTlsResponse>, Status> {
        let ctx = request_context(&req)?;
        self.app
            .reload_tls_everywhere(Actor::from(&ctx.caller), &ctx.request_id)
            .await
            .map_err(|e| e.into_status(&ctx.request_id))?;
        Ok(Response::new(ReloadTlsResponse {
            status: Some(self.status()?),
        }))
    }

    async fn revoke_certificate(
        &self,
        req: Request<RevokeCertificateRequest>,
    ) -> Result<Response<RevokeCertificateResponse>, Status> {
        let ctx = request_context(&req)?;
        let req = req.into_inner();
        self.app
            .revoke(&ctx, &req.serial_hex, &req.reason)
            .await
            .map_err(|e| e.into_status(&ctx.request_id))?;
        Ok(Response::new(RevokeCertificateResponse {
            status: Some(self.status()?),
        }))
    }
}
