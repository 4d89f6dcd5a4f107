//! Thin tonic adapters, one per service: translate protobuf to domain types, call the
//! domain, translate back. [`status`] is the single place where errors become
//! `tonic::Status`.

mod audit;
mod concerns;
mod consents;
mod operations;
mod records;
pub mod status;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::auth::AuthLayer;
use crate::config::Config;
use crate::proto::v1::audit_service_server::AuditServiceServer;
use crate::proto::v1::concern_service_server::ConcernServiceServer;
use crate::proto::v1::consent_service_server::ConsentServiceServer;
use crate::proto::v1::operations_service_server::OperationsServiceServer;
use crate::proto::v1::record_service_server::RecordServiceServer;
use crate::tls::{Revocations, TlsState};

/// The tonic server with the authentication layer applied.
pub type GatewayServer = Server<Stack<AuthLayer, Identity>>;
/// The router that server builds.
pub type GatewayRouter = Router<Stack<AuthLayer, Identity>>;

/// Why the application state could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The data directory could not be created or secured.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The folder.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Reflection could not be built from the descriptor set (a build problem).
    #[error("reflection: {0}")]
    Reflection(String),
}

impl AppError {
    /// Wraps a reflection build error.
    pub fn reflection(e: impl std::fmt::Display) -> Self {
        AppError::Reflection(e.to_string())
    }
}

/// Everything the services share: configuration, stores, the audit writer, TLS.
pub struct App {
    config: Arc<Config>,
    revocations: Arc<Revocations>,
    tls: Option<Arc<TlsState>>,
}

impl App {
    /// Opens (creating where needed) the data directory and everything in it.
    pub async fn open(config: Arc<Config>) -> Result<App, AppError> {
        create_private_dir(&config.data_dir).map_err(|source| AppError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        Ok(App {
            config,
            revocations: Arc::new(Revocations::default()),
            tls: None,
        })
    }

    /// The revocation set shared with the TLS layer.
    pub fn revocations(&self) -> Arc<Revocations> {
        self.revocations.clone()
    }

    /// Attaches the live TLS state (for the operations service).
    pub fn with_tls(mut self, tls: Arc<TlsState>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Mounts every gateway service on `server`, limits applied.
    pub async fn add_services(
        &self,
        server: &mut GatewayServer,
        health: HealthReporter,
        _stop: CancellationToken,
    ) -> GatewayRouter {
        let max = self.config.limits.max_message_bytes;
        health.set_serving::<ConcernServiceServer<concerns::Concerns>>().await;
        health.set_serving::<ConsentServiceServer<consents::Consents>>().await;
        health.set_serving::<RecordServiceServer<records::Records>>().await;
        health.set_serving::<AuditServiceServer<audit::Audit>>().await;
        health.set_serving::<OperationsServiceServer<operations::Operations>>().await;
        server
            .add_service(
                ConcernServiceServer::new(concerns::Concerns)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                ConsentServiceServer::new(consents::Consents)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                RecordServiceServer::new(records::Records)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                AuditServiceServer::new(audit::Audit)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                OperationsServiceServer::new(operations::Operations)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
    }

    /// Flushes and closes stores after the last call.
    pub async fn close(&self) {}
}

/// Creates a folder readable only by its owner.
fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The answer of a method whose capability has not landed in this build.
fn not_yet(method: &str, capability: &str) -> tonic::Status {
    tonic::Status::unimplemented(format!(
        "{method} is not available in this build of sgw: it arrives with the {capability} capability"
    ))
}
