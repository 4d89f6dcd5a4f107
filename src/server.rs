//! Assembles the gateway: TLS acceptor, the authentication layer, the gRPC services,
//! health and reflection; runs it until a shutdown signal, then drains.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::api;
use crate::auth::{AuthContext, AuthLayer};
use crate::config::Config;
use crate::tls::{Acceptor, AcceptorLimits, Revocations, TlsError, TlsPaths, TlsState};

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The application state could not be opened (data dir, keys, store).
    #[error(transparent)]
    App(#[from] api::AppError),
    /// The HTTP/2 server failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A gateway bound to its address, not yet serving.
pub struct Bound {
    acceptor: Acceptor,
    addr: SocketAddr,
    config: Arc<Config>,
    app: Arc<api::App>,
    auth: Arc<AuthContext>,
    stop: CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
    metrics_listener: Option<TcpListener>,
}

/// Binds the listen address and loads everything the gateway needs. Errors here are
/// start-up errors: nothing has been served yet.
pub async fn bind(config: Config) -> Result<Bound, ServeError> {
    let config = Arc::new(config);
    let app = api::App::open(config.clone()).await?;
    let revocations: Arc<Revocations> = app.revocations();
    let tls = Arc::new(TlsState::load(
        TlsPaths {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            client_ca: config.tls.client_ca.clone(),
            crl: config.tls.crl.clone(),
        },
        revocations.clone(),
    )?);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.listen,
        source,
    })?;
    let limits = AcceptorLimits::from(&config.limits);
    let acceptor = Acceptor::new(listener, tls.clone(), limits, app.clock.clone());
    let stop = CancellationToken::new();
    let metrics = Arc::new(crate::metrics::Metrics::default());
    metrics.watch_audit(app.auditor.stats());
    metrics.watch_inbox(app.concerns.inbox_lag());
    let metrics_listener = crate::metrics::bind(config.metrics.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.metrics.listen.unwrap_or(config.listen),
            source,
        })?;
    let auth = Arc::new(AuthContext::new(
        config.clone(),
        revocations,
        stop.clone(),
        metrics.clone(),
        app.clock.clone(),
    ));
    let app = Arc::new(app.with_tls(tls));
    Ok(Bound {
        acceptor,
        addr,
        config,
        app,
        auth,
        stop,
        metrics,
        metrics_listener,
    })
}

impl Bound {
    /// Where `/metrics` is served, when `[metrics] listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The address actually bound (the configured one, or the port the OS chose for
    /// port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight calls
    /// finish for up to `[shutdown] grace`, and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Bound {
            acceptor,
            config,
            app,
            auth,
            stop,
            metrics,
            metrics_listener,
            ..
        } = self;
        if let Some(listener) = metrics_listener {
            tokio::spawn(crate::metrics::serve(metrics, listener, stop.clone()));
        }
        let limits = &config.limits;
        let incoming = acceptor.incoming(stop.clone());

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(api::AppError::reflection)?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(api::AppError::reflection)?;

        let mut builder = Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            // `limits.request_timeout` is enforced by the auth layer, which answers
            // DEADLINE_EXCEEDED and logs the call; tonic's own says CANCELLED.
            .layer(AuthLayer::new(auth));
        let router = app
            .add_services(&mut builder, health_reporter.clone(), stop.clone())
            .await
            .add_service(
                health_service
                    .max_decoding_message_size(limits.max_message_bytes)
                    .max_encoding_message_size(limits.max_message_bytes),
            )
            .add_service(
                reflection_v1
                    .max_decoding_message_size(limits.max_message_bytes)
                    .max_encoding_message_size(limits.max_message_bytes),
            )
            .add_service(
                reflection_v1alpha
                    .max_decoding_message_size(limits.max_message_bytes)
                    .max_encoding_message_size(limits.max_message_bytes),
            );

        #[cfg(unix)]
        tokio::spawn(reload_on_sighup(app.clone(), stop.clone()));
        if config.tls.watch {
            tokio::spawn(reload_on_file_change(
                app.clone(),
                WATCH_INTERVAL,
                stop.clone(),
            ));
        }
        if let Some(tls) = app.tls() {
            api::warn_of_expiry(&tls.current(), app.clock.now().unix_timestamp());
        }

        let grace = config.shutdown.grace;
        let draining = stop.clone();
        let serving = router.serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            tracing::info!("shutdown requested: draining");
            draining.cancel();
        });
        tokio::pin!(serving);
        let bounded = async {
            stop.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            result = &mut serving => result?,
            _ = bounded => tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over: closing remaining connections"),
        }
        app.close().await;
        tracing::info!("sgw stopped");
        Ok(())
    }
}

/// How often `[tls] watch` compares the files' contents with the material in force.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reloads when a TLS file's content changes on disk (replaced in place, or a
/// Kubernetes secret volume swapping its symlink). A broken new file is reported
/// once and not retried until the files change again; a reload that fails for
/// another reason (its audit entry cannot be written) is retried at every tick.
async fn reload_on_file_change(
    app: Arc<api::App>,
    every: std::time::Duration,
    stop: CancellationToken,
) {
    let Some(tls) = app.tls() else { return };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refused: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let check = tls.clone();
        let Ok((changed, fingerprint)) =
            tokio::task::spawn_blocking(move || (check.files_changed(), check.disk_fingerprint()))
                .await
        else {
            continue;
        };
        if !changed || refused.as_ref() == Some(&fingerprint) {
            continue;
        }
        match app
            .reload_tls(crate::audit::Actor::system(), "file-watch")
            .await
        {
            Ok(()) => refused = None,
            // The files themselves are at fault: wait until they change again.
            Err(e @ api::status::ApiError::Precondition(_)) => {
                tracing::error!(error = %e, "TLS files changed but cannot be loaded; the running configuration is unchanged");
                refused = Some(fingerprint);
            }
            // The files are fine but the reload could not be audited (or failed
            // otherwise): try again at the next tick.
            Err(e) => {
                tracing::error!(error = %e, "TLS files changed but the reload failed; the running configuration is unchanged, retrying");
            }
        }
    }
}

/// SIGHUP re-reads the TLS files, as OperationsService.ReloadTls does.
#[cfg(unix)]
async fn reload_on_sighup(app: Arc<api::App>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; TLS reloads need a restart");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match app
            .reload_tls(crate::audit::Actor::system(), "sighup")
            .await
        {
            Ok(()) => {}
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: TLS reload refused; the running configuration is unchanged")
            }
        }
    }
}

/// The multi-threaded runtime the gateway (and the benchmark's echo baseline,
/// so that the two compare like with like) serves on.
///
/// Its workers do not keep a "LIFO slot". With one, a task woken by a task runs
/// next on the same worker: each handler that finishes wakes its connection's task,
/// which then runs at once and writes that one response to the socket. A group
/// commit answers a dozen or more callers at once, so the gateway made one TLS
/// write (and one `writev`) per response. Without the slot, the connection's task
/// runs after the handlers woken before it and writes their responses together.
/// Measured at 64 callers: 13% more disclosures per second, 15% less server CPU
/// per call (benches/README.md). The option is an unstable tokio API, compiled in
/// with `--cfg tokio_unstable` (set in `.cargo/config.toml`).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    builder.build()
}

/// Whether [`runtime`] runs without tokio's LIFO slot (false when built without
/// `--cfg tokio_unstable`).
pub fn lifo_slot_disabled() -> bool {
    cfg!(tokio_unstable)
}

/// Completes on SIGTERM or Ctrl-C (SIGINT). The handlers are installed when this
/// is called, not when the future is first polled, so a signal that arrives while
/// the server is still starting is not lost to the default action (which would kill
/// the process without draining). Call it from inside the runtime, before telling
/// anyone where the gateway listens.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {},
                _ = wait(int) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    /// `.cargo/config.toml` compiles tokio's unstable API in; without it the gateway
    /// silently loses the response coalescing measured in benches/README.md.
    #[test]
    fn the_gateway_runtime_is_built_without_the_lifo_slot() {
        assert!(
            super::lifo_slot_disabled(),
            "built without --cfg tokio_unstable: is .cargo/config.toml missing, or RUSTFLAGS set?"
        );
        let runtime = super::runtime().unwrap();
        assert_eq!(runtime.block_on(async { 40 + 2 }), 42);
    }
}
