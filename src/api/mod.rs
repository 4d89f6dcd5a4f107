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

use crate::audit::writer::AuditSettings;
use crate::audit::{Actor, AuditError, AuditHandle, Auditor, LogHealth, NewEntry};
use crate::auth::AuthLayer;
use crate::auth::RequestId;
use crate::config::Config;
use crate::domain::{Clock, NhsNumber, SystemClock};
use crate::identity::Caller;
use crate::proto::v1::audit_service_server::AuditServiceServer;
use crate::proto::v1::concern_service_server::ConcernServiceServer;
use crate::proto::v1::consent_service_server::ConsentServiceServer;
use crate::proto::v1::operations_service_server::OperationsServiceServer;
use crate::proto::v1::record_service_server::RecordServiceServer;
use crate::proto::v1::{AuditAction, AuditOutcome};
use crate::store::keys::SubjectRef;
use crate::store::Keys;
use crate::tls::{Revocations, TlsState};
use status::ApiError;
use tonic::{Request, Status};
use tonic_health::ServingStatus;

/// How long [`App::close`] waits for sections that run to their end.
const SECTIONS_AT_CLOSE: std::time::Duration = std::time::Duration::from_secs(30);

/// Longest RevokeCertificate reason, in characters.
pub const MAX_REVOKE_REASON_CHARS: usize = 500;

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
    /// A key file could not be read or created.
    #[error(transparent)]
    Keys(#[from] crate::store::KeyError),
    /// The audit store could not be opened.
    #[error("audit store: {0}")]
    Audit(#[from] AuditError),
    /// The concern store could not be opened.
    #[error("concern store: {0}")]
    Concerns(#[from] crate::concerns::StoreError),
    /// The record store could not be opened.
    #[error("record store: {0}")]
    Records(#[from] crate::records::StoreError),
    /// The PostgreSQL storage could not be reached or set up.
    #[error(transparent)]
    Postgres(#[from] crate::pg::PgError),
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

/// Everything the services share: configuration, keys, the audit writer, TLS.
pub struct App {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Secret keys.
    pub keys: Arc<Keys>,
    /// The audit log: appends and reads.
    pub auditor: AuditHandle,
    /// The clock every capability reads.
    pub clock: Arc<dyn Clock>,
    /// Concern notifications: store, inboxes, deadlines.
    pub concerns: Arc<crate::concerns::Concerns>,
    /// Consent-bound records and consent statements.
    pub records: Arc<crate::records::Records>,
    revocations: Arc<Revocations>,
    /// The log size up to which CERTIFICATE_REVOKED entries have been applied.
    revoked_upto: std::sync::atomic::AtomicU64,
    tls: Option<Arc<TlsState>>,
    /// Held for the whole of a TLS reload, from reading the files to putting them in
    /// force: reloads (SIGHUP, the file watch, ReloadTls, another replica's) come
    /// one at a time, so an older one never lands over a newer one.
    reloading: Arc<tokio::sync::Mutex<()>>,
    /// Whose turn it is to sweep.
    turns: Arc<dyn crate::store::Turns>,
    /// With PostgreSQL: the other replicas.
    replicas: Option<Replicas>,
    /// Every section that runs to its end ([`crate::domain::Sections`]): the
    /// concern flows, records' audited writes, revocations. [`App::close`] waits
    /// for them before it closes the stores and the audit log.
    sections: crate::domain::Sections,
}

/// What a replica over PostgreSQL runs beside the services.
struct Replicas {
    audit: Arc<crate::pg::PgAudit>,
    cluster: Arc<crate::pg::cluster::PgCluster>,
}

/// Who is calling and the request's id, taken from what the auth layer attached.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The authenticated caller.
    pub caller: Caller,
    /// The correlation id.
    pub request_id: String,
}

/// Reads the caller and request id the auth layer attached to a request.
pub fn request_context<T>(req: &Request<T>) -> Result<Ctx, Status> {
    let caller = crate::auth::caller(req)?.clone();
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.to_string())
        .unwrap_or_default();
    Ok(Ctx { caller, request_id })
}

impl App {
    /// Opens (creating where needed) the data directory and everything in it.
    pub async fn open(config: Arc<Config>) -> Result<App, AppError> {
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`App::open`], with a given clock (tests).
    pub async fn open_with_clock(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
    ) -> Result<App, AppError> {
        create_private_dir(&config.data_dir).map_err(|source| AppError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let keys = Arc::new(Keys::load_or_create(
            &config.data_dir,
            config.audit.signing_key.as_deref(),
        )?);
        let mut replicas = None;
        let mut turns: Arc<dyn crate::store::Turns> = Arc::new(crate::store::AlwaysMine);
        let (auditor, concern_store, record_store) = match &config.storage {
            crate::config::Storage::Sled => open_sled(&config, &keys, &clock).await?,
            crate::config::Storage::Postgres(pg) => {
                let backend =
                    crate::pg::backend::open(pg, &config, keys.clone(), clock.clone()).await?;
                tracing::info!(replica = %pg.replica, "storage: postgres");
                turns = Arc::new(crate::pg::backend::PgTurns::new(
                    backend.pool.clone(),
                    &pg.replica,
                ));
                replicas = Some(Replicas {
                    audit: backend.audit.clone(),
                    cluster: Arc::new(crate::pg::cluster::PgCluster::new(
                        backend.pool.clone(),
                        &pg.replica,
                    )),
                });
                let auditor: AuditHandle = backend.audit.clone();
                (
                    auditor,
                    backend.concerns as Arc<dyn crate::concerns::ConcernRepo>,
                    backend.records as Arc<dyn crate::records::RecordRepo>,
                )
            }
        };
        // Operator revocations persist as CERTIFICATE_REVOKED entries of the audit
        // log: the log is their durable record, read back at every start.
        let (revoked, revoked_upto) = revoked_serials(&*auditor, 0).await?;
        let sections = crate::domain::Sections::default();
        let concerns = crate::concerns::Concerns::new(
            config.clone(),
            keys.clone(),
            auditor.clone(),
            clock.clone(),
            concern_store,
        )
        .with_sections(sections.clone());
        let records = crate::records::Records::new(
            config.clone(),
            keys.clone(),
            auditor.clone(),
            clock.clone(),
            record_store,
        )
        .with_sections(sections.clone());
        // A disclosure under a safeguarding override tells the record's owner through
        // its concern inbox (DESIGN.md invariant 5).
        let concerns = Arc::new(concerns);
        let records = records.with_notifier(Arc::new(OverrideToInbox(concerns.clone())));
        Ok(App {
            config,
            keys,
            auditor,
            clock,
            concerns,
            records: Arc::new(records),
            revocations: Arc::new(Revocations::new(revoked)),
            revoked_upto: std::sync::atomic::AtomicU64::new(revoked_upto),
            tls: None,
            reloading: Arc::new(tokio::sync::Mutex::new(())),
            turns,
            replicas,
            sections,
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

    /// Revokes a certificate serial: audited (CERTIFICATE_REVOKED) durably first, which
    /// is also what makes it survive a restart, then applied to every later handshake
    /// and call and to open streams. Revoking a revoked serial again changes nothing.
    pub async fn revoke(&self, ctx: &Ctx, serial_hex: &str, reason: &str) -> Result<(), ApiError> {
        let serial = crate::tls::normalise_serial(serial_hex).ok_or_else(|| {
            ApiError::Invalid(format!(
                "serial_hex {:?} is not a certificate serial: give hex digits, colons allowed",
                crate::domain::ids::shown(serial_hex)
            ))
        })?;
        crate::domain::check_text("reason", reason, 1, MAX_REVOKE_REASON_CHARS)
            .map_err(ApiError::Invalid)?;
        let reason = reason.trim();
        // Only an operator's own revocation makes this one redundant: a serial a
        // CRL lists is still recorded, so that it stays revoked when the CRL changes.
        if self.revocations.is_revoked_by_operator(&serial) {
            return Ok(());
        }
        let mut entry = NewEntry::new(
            Actor::from(&ctx.caller),
            AuditAction::CertificateRevoked,
            AuditOutcome::Allowed,
            &ctx.request_id,
        );
        entry.object_id = serial.clone();
        entry.reason = reason.to_owned();
        // In force as soon as its entry is durable, even if the call is dropped
        // meanwhile: the log never records a revocation that is not in force.
        let (auditor, revocations) = (self.auditor.clone(), self.revocations.clone());
        let revoked = serial.clone();
        let durable = self
            .sections
            .to_the_end(
                async move {
                    let durable = auditor.append(entry).await?;
                    revocations.revoke(&revoked);
                    Ok(durable)
                },
                ApiError::Internal,
            )
            .await?;
        tracing::warn!(serial = %serial, operator = %ctx.caller.id, "certificate revoked");
        if let Some(replicas) = &self.replicas {
            // In force on every live replica before the operator is answered.
            if let Err(e) = replicas.cluster.await_revocation(durable.seq()).await {
                tracing::error!(serial = %serial, problem = %e, "revocation recorded and in force here, but not yet confirmed by every replica");
            }
        }
        Ok(())
    }

    /// The live TLS state.
    pub fn tls(&self) -> Option<Arc<TlsState>> {
        self.tls.clone()
    }

    /// OperationsService.ReloadTls: reloads here and, over PostgreSQL, on every
    /// replica, answering once each live replica has reloaded (or refused its new
    /// files, which is FAILED_PRECONDITION naming the replicas and why).
    pub async fn reload_tls_everywhere(
        &self,
        actor: Actor,
        request_id: &str,
    ) -> Result<(), ApiError> {
        let Some(replicas) = &self.replicas else {
            return self.reload_tls(actor, request_id).await;
        };
        let generation = replicas
            .cluster
            .start_tls_reload()
            .await
            .map_err(ApiError::Internal)?;
        self.reload_tls(actor, request_id).await?;
        let refused = replicas
            .cluster
            .await_tls_reload(generation)
            .await
            .map_err(|e| ApiError::Internal(format!("reloaded here; {e}")))?;
        if !refused.is_empty() {
            let which: Vec<String> = refused
                .into_iter()
                .map(|(replica, why)| format!("{replica}: {why}"))
                .collect();
            return Err(ApiError::Precondition(format!(
                "reloaded here, refused by replicas (they keep their running configuration): {}",
                which.join("; ")
            )));
        }
        Ok(())
    }

    /// Re-reads this gateway's TLS files. When they are valid the reload is
    /// audited (TLS_RELOADED, with old and new fingerprints) and only then put in
    /// force: new handshakes use the new material, and its CRLs apply to every
    /// later call. When they are not, or the audit entry cannot be written, the
    /// running configuration is untouched, and a file error names the file.
    pub async fn reload_tls(&self, actor: Actor, request_id: &str) -> Result<(), ApiError> {
        let Some(tls) = &self.tls else {
            return Err(ApiError::Internal("TLS state not attached".into()));
        };
        let one_at_a_time = self.reloading.clone().lock_owned().await;
        let reading = tls.clone();
        let loaded = tokio::task::spawn_blocking(move || reading.load_fresh())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let (old, new) = match loaded {
            Ok(new) => (tls.current(), new),
            Err(e) => {
                let mut entry = NewEntry::new(
                    actor,
                    AuditAction::TlsReloaded,
                    AuditOutcome::Denied,
                    request_id,
                );
                entry.reason = format!("refused, running configuration unchanged: {e}");
                self.auditor.append(entry).await?;
                return Err(ApiError::Precondition(e.to_string()));
            }
        };
        let mut entry = NewEntry::new(
            actor,
            AuditAction::TlsReloaded,
            AuditOutcome::Allowed,
            request_id,
        );
        entry.object_id = new.server_cert.serial_hex.clone();
        entry.reason = format!(
            "server certificate {} -> {}; client CAs [{}] -> [{}]; {} CRL serials",
            old.server_cert.sha256_hex,
            new.server_cert.sha256_hex,
            old.client_cas
                .iter()
                .map(|c| c.sha256_hex.as_str())
                .collect::<Vec<_>>()
                .join(","),
            new.client_cas
                .iter()
                .map(|c| c.sha256_hex.as_str())
                .collect::<Vec<_>>()
                .join(","),
            new.crl_serials.len(),
        );
        // In force as soon as its entry is durable, even if the call is dropped
        // meanwhile; the next reload waits until it is.
        let (auditor, installing, installed) = (self.auditor.clone(), tls.clone(), new.clone());
        self.sections
            .to_the_end(
                async move {
                    auditor.append(entry).await?;
                    installing.install(installed);
                    drop(one_at_a_time);
                    Ok(())
                },
                ApiError::Internal,
            )
            .await?;
        tracing::info!(server_cert = %new.server_cert.sha256_hex, serial = %new.server_cert.serial_hex, "TLS material reloaded");
        warn_of_expiry(&new, self.clock.now().unix_timestamp());
        Ok(())
    }

    /// The keyed hash of a request's subject, or INVALID_ARGUMENT.
    pub fn subject_ref(&self, subject: &crate::proto::v1::Subject) -> Result<SubjectRef, ApiError> {
        let nhs =
            NhsNumber::parse(&subject.nhs_number).map_err(|e| ApiError::Invalid(e.to_string()))?;
        Ok(self.keys.subject_ref(&nhs))
    }

    /// A request's page size: 0 means the default; above the maximum is refused.
    pub fn page_size(&self, requested: u32) -> Result<usize, ApiError> {
        let limits = &self.config.limits;
        match requested {
            0 => Ok(limits.default_page_size as usize),
            n if n <= limits.max_page_size => Ok(n as usize),
            n => Err(ApiError::Invalid(format!(
                "page_size {n} is above the maximum of {}",
                limits.max_page_size
            ))),
        }
    }

    /// Applies CERTIFICATE_REVOKED entries appended since the last look, by this
    /// replica or another sharing the log. Returns how many serials were new.
    pub async fn refresh_revocations(&self) -> Result<(usize, u64), AuditError> {
        use std::sync::atomic::Ordering;
        let from = self.revoked_upto.load(Ordering::Acquire);
        let (serials, upto) = revoked_serials(&*self.auditor, from).await?;
        let mut new = 0;
        for serial in serials {
            if !self.revocations.is_revoked_by_operator(&serial) {
                self.revocations.revoke(&serial);
                tracing::warn!(serial = %serial, "certificate revoked through another replica");
                new += 1;
            }
        }
        let upto = self
            .revoked_upto
            .fetch_max(upto, Ordering::AcqRel)
            .max(upto);
        Ok((new, upto))
    }

    /// Mounts every gateway service on `server`, limits applied, and keeps health
    /// in step with the audit log (NOT_SERVING while it cannot be written).
    pub async fn add_services(
        self: &Arc<Self>,
        server: &mut GatewayServer,
        health: HealthReporter,
        stop: CancellationToken,
    ) -> GatewayRouter {
        let max = self.config.limits.max_message_bytes;
        tokio::spawn(track_audit_health(
            self.auditor.health(),
            health,
            stop.clone(),
        ));
        tokio::spawn(checkpoint_periodically(
            self.auditor.clone(),
            self.config.audit.checkpoint_interval,
            stop.clone(),
        ));
        tokio::spawn(crate::concerns::sweep_periodically(
            self.concerns.clone(),
            crate::concerns::sweep_interval(&self.config.deadlines),
            self.turns.clone(),
            stop.clone(),
        ));
        tokio::spawn(crate::records::purge_periodically(
            self.records.clone(),
            crate::records::PURGE_INTERVAL,
            self.turns.clone(),
            stop.clone(),
        ));
        if let Some(replicas) = &self.replicas {
            tokio::spawn(replicas.audit.clone().watch_health(stop.clone()));
            tokio::spawn(
                replicas
                    .cluster
                    .clone()
                    .run(Arc::new(AsMember(self.clone())), stop.clone()),
            );
        }
        server
            .add_service(
                ConcernServiceServer::new(concerns::ConcernApi::new(self.clone(), stop))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                ConsentServiceServer::new(consents::ConsentApi::new(self.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                RecordServiceServer::new(records::RecordApi::new(self.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                AuditServiceServer::new(audit::Audit::new(self.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
            .add_service(
                OperationsServiceServer::new(operations::Operations::new(self.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
            )
    }

    /// Flushes and closes stores after the last call, releasing their file locks.
    pub async fn close(&self) {
        // A section whose caller has gone may still be writing: it finishes first,
        // within a bound, so that a hung disk or database cannot hang the exit.
        let running = self.sections.finish(SECTIONS_AT_CLOSE).await;
        if running > 0 {
            tracing::error!(
                running,
                "closing with sections still running after 30 s: an audited change may lack its store write"
            );
        }
        self.concerns.close().await;
        self.records.close().await;
        self.auditor.close().await;
    }
}

/// Opens the embedded sled stores under `data_dir`.
async fn open_sled(
    config: &Arc<Config>,
    keys: &Arc<Keys>,
    clock: &Arc<dyn Clock>,
) -> Result<
    (
        AuditHandle,
        Arc<dyn crate::concerns::ConcernRepo>,
        Arc<dyn crate::records::RecordRepo>,
    ),
    AppError,
> {
    let settings = AuditSettings {
        dir: config.data_dir.join("audit"),
        log_id: config.audit.log_id.clone(),
        max_batch: config.audit.max_batch,
        cache_bytes: 64 * 1024 * 1024,
        wal_bytes: config.audit.wal_bytes,
    };
    let (config, keys, clock) = (config.clone(), keys.clone(), clock.clone());
    let opened = tokio::task::spawn_blocking(move || -> Result<_, AppError> {
        let auditor = Auditor::open(settings, keys.clone(), clock)?;
        let concerns = crate::concerns::ConcernStore::open(
            &config.data_dir.join("store"),
            keys.clone(),
            config.agencies.iter().map(|a| a.id.clone()),
        )?;
        let records = crate::records::RecordStore::open(
            &config.data_dir.join("records"),
            &config.data_dir.join("record-content"),
            keys,
        )?;
        Ok((auditor, concerns, records))
    })
    .await
    .map_err(|e| AuditError::Unavailable(e.to_string()))??;
    let (auditor, concerns, records) = opened;
    Ok((
        Arc::new(auditor),
        Arc::new(concerns),
        Arc::new(crate::records::SledRecords::new(records)),
    ))
}

/// The gateway as a member of a cluster of replicas.
struct AsMember(Arc<App>);

#[async_trait::async_trait]
impl crate::pg::cluster::Member for AsMember {
    async fn apply_revocations(&self) -> Result<u64, String> {
        self.0
            .refresh_revocations()
            .await
            .map(|(_, upto)| upto)
            .map_err(|e| e.to_string())
    }

    async fn reload_tls(&self) -> Result<(), String> {
        self.0
            .reload_tls(Actor::system(), "cluster-reload")
            .await
            .map_err(|e| e.to_string())
    }
}

/// Delivers override notices from the records capability to the owner's concern
/// inbox. Neither capability knows the other; this is the one place they meet.
struct OverrideToInbox(Arc<crate::concerns::Concerns>);

impl crate::records::OverrideNotifier for OverrideToInbox {
    fn notify(&self, notice: crate::records::OverrideNotice) -> crate::records::NoticeFuture<'_> {
        Box::pin(async move {
            let event = crate::concerns::OverrideNoticeEvent {
                record_id: notice.record_id.to_string(),
                recipient: notice.recipient,
                justification: notice.justification,
                audit_seq: notice.audit_seq,
            };
            self.0
                .notify_override(&notice.owner, event)
                .await
                .map(|_| ())
                .map_err(|e| crate::records::NoticeError(e.to_string()))
        })
    }
}

/// The serials revoked by operators, from the audit log.
/// The serials revoked by CERTIFICATE_REVOKED entries at or after seq `from`, and
/// the log size they were read up to.
async fn revoked_serials(
    log: &dyn crate::audit::AuditStore,
    from: u64,
) -> Result<(std::collections::HashSet<String>, u64), AuditError> {
    let filter = crate::audit::query::Filter {
        action: Some(AuditAction::CertificateRevoked as i32),
        ..Default::default()
    };
    let upto = log.size().await?;
    let mut serials = std::collections::HashSet::new();
    if from >= upto {
        return Ok((serials, upto));
    }
    let mut token = if from == 0 {
        String::new()
    } else {
        crate::audit::query::encode_token(from, &filter)
    };
    loop {
        let page = log.query(&filter, &token, 1000, usize::MAX).await?;
        serials.extend(
            page.entries
                .into_iter()
                .filter(|e| e.outcome == AuditOutcome::Allowed as i32)
                .map(|e| e.object_id),
        );
        match page.next_page_token {
            Some(t) => token = t,
            None => return Ok((serials, upto)),
        }
    }
}

/// Logs a warning for a server certificate or client CA that expires within 30 days.
pub fn warn_of_expiry(material: &crate::tls::TlsMaterial, now: i64) {
    const WARN_DAYS: i64 = 30;
    let days = operations::days_until(material.server_cert.not_after, now);
    if days < WARN_DAYS {
        tracing::warn!(days, serial = %material.server_cert.serial_hex, "the server certificate expires soon: renew it (sgw certs renew-server, then reload)");
    }
    for ca in &material.client_cas {
        let days = operations::days_until(ca.not_after, now);
        if days < WARN_DAYS {
            tracing::warn!(days, ca = %ca.sha256_hex, subject = %ca.subject, "a trusted client CA expires soon: roll over to its successor");
        }
    }
}

/// The service names whose health follows the audit log.
const SERVICES: &[&str] = &[
    "",
    "safeguard.v1.ConcernService",
    "safeguard.v1.ConsentService",
    "safeguard.v1.RecordService",
    "safeguard.v1.AuditService",
    "safeguard.v1.OperationsService",
];

/// Signs a checkpoint every `interval` while entries are being appended, so an
/// auditor always finds a recent one and old ones stay provable.
async fn checkpoint_periodically(
    auditor: AuditHandle,
    interval: std::time::Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut signed_at = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Ok(size) = auditor.size().await else {
            continue;
        };
        if size == 0 || signed_at == Some(size) {
            continue;
        }
        match auditor.checkpoint().await {
            Ok(cp) => signed_at = Some(cp.checkpoint.tree_size),
            Err(e) => tracing::warn!(error = %e, "periodic checkpoint failed"),
        }
    }
}

async fn track_audit_health(
    mut log: tokio::sync::watch::Receiver<LogHealth>,
    reporter: HealthReporter,
    stop: CancellationToken,
) {
    let mut reported = None;
    loop {
        let writable = log.borrow_and_update().writable;
        // The log's size changes with every commit; health only when writability does.
        if reported != Some(writable) {
            let status = if writable {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in SERVICES {
                reporter.set_service_status(*name, status).await;
            }
            reported = Some(writable);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = log.changed() => if changed.is_err() { break },
        }
    }
    for name in SERVICES {
        reporter
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
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
