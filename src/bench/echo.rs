//! The baseline: a bare echo service behind the gateway's own mutual-TLS acceptor
//! (same certificates, same TLS settings, TCP_NODELAY), with no authentication
//! layer, no audit and no storage.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::Config;
use crate::proto::bench::echo_service_server::{EchoService, EchoServiceServer};
use crate::proto::bench::{EchoRequest, EchoResponse};
use crate::tls::{Acceptor, AcceptorLimits, Revocations, TlsPaths, TlsState};

/// The echo.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, req: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            payload: req.into_inner().payload,
        }))
    }
}

/// Serves the echo on `addr` with the TLS configuration of `config` until `stop`.
/// Prints `sgw: listening on ADDR` like the gateway.
pub async fn serve(
    config: &Config,
    addr: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let tls = Arc::new(TlsState::load(
        TlsPaths {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            client_ca: config.tls.client_ca.clone(),
            crl: config.tls.crl.clone(),
        },
        Arc::new(Revocations::default()),
    )?);
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "sgw: listening on {} (echo baseline, mutual TLS)",
        listener.local_addr()?
    );
    let limits = AcceptorLimits::from(&config.limits);
    let clock = Arc::new(crate::domain::SystemClock);
    let incoming = Acceptor::new(listener, tls, limits, clock).incoming(stop.clone());
    let max = config.limits.max_message_bytes;
    tonic::transport::Server::builder()
        .max_concurrent_streams(config.limits.max_concurrent_streams)
        .add_service(
            EchoServiceServer::new(Echo)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}
