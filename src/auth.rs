//! The one layer every call passes through: it authenticates the caller from the
//! connection's certificate, enforces which role may use which service, gives the
//! handler a typed [`Caller`], and writes one structured log line per call.
//!
//! It fails closed: a request without a verified peer, from a revoked certificate, an
//! unregistered identity or the wrong role never reaches a handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use http_body::Frame;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::config::Config;
use crate::domain::{Clock, Role};
use crate::identity::{identify, Caller};
use crate::tls::{PeerCert, PeerInfo, Revocations};

/// The metadata key that carries a request id in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A request's correlation id: the caller's `x-request-id` when it sent a sane one,
/// otherwise one the gateway made. Returned in the response's `x-request-id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

/// Which role may call a gRPC service, by its full name. `None`: any registered
/// caller (health and reflection).
pub fn role_for_service(service: &str) -> Option<Role> {
    match service {
        "safeguard.v1.ConcernService"
        | "safeguard.v1.ConsentService"
        | "safeguard.v1.RecordService" => Some(Role::Agency),
        "safeguard.v1.AuditService" => Some(Role::Auditor),
        "safeguard.v1.OperationsService" => Some(Role::Operator),
        _ => None,
    }
}

/// Shared state of the layer.
#[derive(Debug)]
pub struct AuthContext {
    config: Arc<Config>,
    revocations: Arc<Revocations>,
    ids: RequestIds,
    draining: tokio_util::sync::CancellationToken,
    metrics: Arc<crate::metrics::Metrics>,
    clock: Arc<dyn Clock>,
}

impl AuthContext {
    /// Builds the context from the registry and the live revocation set.
    /// `draining` is cancelled when the gateway starts shutting down: open response
    /// streams then end with UNAVAILABLE so clients reconnect elsewhere or later.
    pub fn new(
        config: Arc<Config>,
        revocations: Arc<Revocations>,
        draining: tokio_util::sync::CancellationToken,
        metrics: Arc<crate::metrics::Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        AuthContext {
            config,
            revocations,
            ids: RequestIds::new(),
            draining,
            metrics,
            clock,
        }
    }

    /// Who the peer is, when it is a registered identity (for log lines).
    fn identify(&self, peer: Option<&PeerInfo>) -> Option<Caller> {
        identify(&peer?.0, &self.config).ok()
    }

    /// Decides whether the peer may call `path`, and who it is.
    pub fn authorise(&self, peer: Option<&PeerInfo>, path: &str) -> Result<Caller, Status> {
        let Some(PeerInfo(peer)) = peer else {
            return Err(Status::unauthenticated("a client certificate is required"));
        };
        if let Some(status) = refusal(&self.revocations, peer, unix(&*self.clock)) {
            return Err(status);
        }
        let caller =
            identify(peer, &self.config).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let service = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default();
        if let Some(required) = role_for_service(service) {
            if caller.role != required {
                return Err(Status::permission_denied(format!(
                    "{} {:?} may not call {service}; it is for the {required} role",
                    caller.role,
                    caller.id.as_str()
                )));
            }
        }
        Ok(caller)
    }
}

/// Why a verified peer may no longer call, if it may not: its certificate, or an
/// intermediate it presented, has been revoked since, or its certificate has
/// expired since the handshake (a long-lived connection, or a resumed session).
fn refusal(revocations: &Revocations, peer: &PeerCert, now: i64) -> Option<Status> {
    if let Some(serial) = revocations.revoked_in(peer) {
        return Some(Status::unauthenticated(if serial == peer.serial_hex {
            format!("client certificate serial {serial} has been revoked")
        } else {
            format!(
                "client certificate serial {} was issued under intermediate serial {serial}, which has been revoked",
                peer.serial_hex
            )
        }));
    }
    if now >= peer.not_after {
        let at = time::OffsetDateTime::from_unix_timestamp(peer.not_after)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| peer.not_after.to_string());
        return Some(Status::unauthenticated(format!(
            "client certificate serial {} expired at {at}; reconnect with a current one",
            peer.serial_hex
        )));
    }
    None
}

fn unix(clock: &dyn Clock) -> i64 {
    clock.now().unix_timestamp()
}

/// Makes request ids: a per-process random prefix and a counter, so they are unique
/// without a syscall per call.
#[derive(Debug)]
struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut bytes = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
        RequestIds {
            prefix: crate::tls::hex(&bytes),
            next: AtomicU64::new(1),
        }
    }

    fn make(&self) -> Arc<str> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n:x}", self.prefix).into()
    }
}

/// A caller's request id is kept when it is short and printable.
fn caller_request_id(req: &Request<Body>) -> Option<Arc<str>> {
    let v = req.headers().get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let ok = !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| v.into())
}

/// The tower layer.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    ctx: Arc<AuthContext>,
}

impl AuthLayer {
    /// Wraps a context.
    pub fn new(ctx: Arc<AuthContext>) -> Self {
        AuthLayer { ctx }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            ctx: self.ctx.clone(),
        }
    }
}

/// The service the layer produces.
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    ctx: Arc<AuthContext>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for Auth<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let request_id = caller_request_id(&req).unwrap_or_else(|| self.ctx.ids.make());
        let method: Arc<str> = req.uri().path().into();
        let decision = self
            .ctx
            .authorise(req.extensions().get::<PeerInfo>(), &method);
        let caller_id: Arc<str> = match &decision {
            Ok(caller) => caller.id.as_str().into(),
            // A wrong-role refusal still knows who asked; keep it for the log.
            Err(_) => self
                .ctx
                .identify(req.extensions().get::<PeerInfo>())
                .map(|c| c.id.as_str().into())
                .unwrap_or_else(|| "-".into()),
        };
        let log = CallLog {
            method,
            caller_id,
            request_id: request_id.clone(),
            started,
            metrics: self.ctx.metrics.clone(),
            finished: false,
        };
        let header = HeaderValue::from_str(&request_id).ok();
        match decision {
            Err(status) => {
                let mut resp = status.into_http::<Body>();
                if let Some(h) = header {
                    resp.headers_mut().insert(REQUEST_ID_HEADER, h);
                }
                log.finish(status_code(resp.headers()).unwrap_or(Code::Unknown));
                Box::pin(async move { Ok(resp) })
            }
            Ok(caller) => {
                let revocations = self.ctx.revocations.clone();
                let draining = self.ctx.draining.clone();
                let clock = self.ctx.clock.clone();
                let limits = Limits::of(&self.ctx.config);
                // authorise() found it.
                let peer = req.extensions().get::<PeerInfo>().map(|p| p.0.clone());
                req.extensions_mut().insert(caller);
                req.extensions_mut().insert(RequestId(request_id));
                // The clone is ready-polled by the next poll_ready; take the ready one.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move {
                    // The handler's future is dropped when the time is up; what it
                    // must finish (an audited change and its store write) runs to
                    // its end in a task of its own (`domain::Sections`).
                    let mut resp =
                        match tokio::time::timeout(limits.request_timeout, inner.call(req)).await {
                            Ok(resp) => limits.name_a_size_refusal(resp?),
                            Err(_) => limits.timed_out().into_http::<Body>(),
                        };
                    if let Some(h) = header {
                        resp.headers_mut().insert(REQUEST_ID_HEADER, h);
                    }
                    if let Some(code) = status_code(resp.headers()) {
                        // Trailers-only response: the call is over.
                        log.finish(code);
                        return Ok(resp);
                    }
                    let guard = match peer {
                        Some(peer) => Guard::Unarmed {
                            revocations,
                            peer,
                            draining,
                            clock,
                        },
                        None => Guard::Done,
                    };
                    log.metrics.stream(1);
                    Ok(resp.map(|body| {
                        Body::new(LoggedBody {
                            inner: body,
                            metrics: log.metrics.clone(),
                            log: Some(log),
                            guard,
                            sent_a_message: false,
                            limits,
                        })
                    }))
                })
            }
        }
    }
}

fn status_code(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(Code::from_i32(v))
}

/// The limits the layer enforces, or names when tonic enforced them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    request_timeout: std::time::Duration,
    max_message_bytes: usize,
}

impl Limits {
    fn of(config: &Config) -> Limits {
        Limits {
            request_timeout: config.limits.request_timeout,
            max_message_bytes: config.limits.max_message_bytes,
        }
    }

    /// A call that did not answer within `limits.request_timeout`. (A deadline the
    /// client set is enforced by tonic around this layer, which answers CANCELLED:
    /// by then the client has stopped waiting.)
    fn timed_out(&self) -> Status {
        Status::deadline_exceeded(format!(
            "the call did not finish within limits.request_timeout ({}); what it started may still complete",
            crate::config::format_duration(self.request_timeout)
        ))
    }

    /// tonic refuses a request larger than `limits.max_message_bytes` as
    /// OUT_OF_RANGE, naming neither the limit nor its key; gRPC's own servers say
    /// RESOURCE_EXHAUSTED, as every other limit here does.
    fn name_a_size_refusal(&self, resp: Response<Body>) -> Response<Body> {
        match too_large(resp.headers(), "Error, decoded message length too large") {
            Some(()) => Status::resource_exhausted(format!(
                "the request is larger than limits.max_message_bytes ({} bytes)",
                self.max_message_bytes
            ))
            .into_http(),
            None => resp,
        }
    }

    /// The same for an answer larger than `limits.max_message_bytes`, which tonic
    /// reports in the trailers.
    fn name_an_answer_too_large(&self, trailers: &mut http::HeaderMap) {
        if too_large(trailers, "Error, encoded message length too large").is_some() {
            let status = Status::resource_exhausted(format!(
                "the answer is larger than limits.max_message_bytes ({} bytes); ask for less",
                self.max_message_bytes
            ));
            trailers.remove("grpc-message");
            trailers.remove("grpc-status-details-bin");
            // Only fails for a message that is not a valid header; this one is.
            let _ = status.add_header(trailers);
        }
    }
}

/// `Some` when `headers` carry tonic's OUT_OF_RANGE whose message starts with
/// `prefix`.
fn too_large(headers: &http::HeaderMap, prefix: &str) -> Option<()> {
    if status_code(headers)? != Code::OutOfRange {
        return None;
    }
    // The message is percent-encoded in the header.
    Status::from_header_map(headers)?
        .message()
        .starts_with(prefix)
        .then_some(())
}

/// What the per-call log line needs: never content, narratives or NHS numbers.
/// Dropped unfinished (the call's future was dropped: the client reset the
/// stream, or its deadline passed), it logs the call as CANCELLED: every call has
/// its line and its count.
#[derive(Debug)]
struct CallLog {
    method: Arc<str>,
    caller_id: Arc<str>,
    request_id: Arc<str>,
    started: Instant,
    metrics: Arc<crate::metrics::Metrics>,
    finished: bool,
}

impl Drop for CallLog {
    fn drop(&mut self) {
        if !self.finished {
            self.emit(Code::Cancelled);
        }
    }
}

impl CallLog {
    fn finish(mut self, code: Code) {
        self.emit(code);
        self.finished = true;
    }

    fn emit(&self, code: Code) {
        let elapsed = self.started.elapsed();
        self.metrics.call(&self.method, code, elapsed);
        let latency_us = elapsed.as_micros() as u64;
        tracing::info!(
            target: "sgw::call",
            method = %self.method,
            caller = %self.caller_id,
            code = ?code,
            latency_us,
            request_id = %self.request_id,
            "call"
        );
    }
}

/// Ends a response stream with UNAUTHENTICATED as soon as the caller's certificate
/// (or an intermediate it presented) is revoked, by an operator or a newly loaded
/// CRL, or the certificate expires, whatever the stream is doing.
/// It also ends the stream with UNAVAILABLE when the gateway starts to drain.
///
/// A response is watched only once it proves to be a stream: when its body is not
/// ready, or gives a second message. A unary response's body is a message then
/// its trailers, both ready at once, so it never pays for the watch.
enum Guard {
    /// Not watching yet: what watching needs.
    Unarmed {
        revocations: Arc<Revocations>,
        peer: Arc<PeerCert>,
        draining: tokio_util::sync::CancellationToken,
        clock: Arc<dyn Clock>,
    },
    Armed(RevocationGuard),
    /// The stream has been ended by the guard.
    Done,
}

struct RevocationGuard {
    changes: tokio_stream::wrappers::WatchStream<u64>,
    revocations: Arc<Revocations>,
    peer: Arc<PeerCert>,
    draining: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Fires at the certificate's expiry, or a year on when that is later (and is
    /// set again then).
    expiry: Pin<Box<tokio::time::Sleep>>,
    clock: Arc<dyn Clock>,
}

/// How long a timer waits at most: tokio's timer wheel reaches about two years.
const LONGEST_TIMER: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

fn until(not_after: i64, clock: &dyn Clock) -> tokio::time::Instant {
    let left = u64::try_from(not_after.saturating_sub(unix(clock))).unwrap_or(0);
    tokio::time::Instant::now() + std::time::Duration::from_secs(left).min(LONGEST_TIMER)
}

impl RevocationGuard {
    /// Starts watching. A revocation made before this is caught by the first
    /// [`RevocationGuard::poll_end`], which also checks the set as it is now.
    fn arm(
        revocations: Arc<Revocations>,
        peer: Arc<PeerCert>,
        draining: tokio_util::sync::CancellationToken,
        clock: Arc<dyn Clock>,
    ) -> RevocationGuard {
        RevocationGuard {
            changes: tokio_stream::wrappers::WatchStream::new(revocations.subscribe()),
            revocations,
            expiry: Box::pin(tokio::time::sleep_until(until(peer.not_after, &*clock))),
            peer,
            draining: Box::pin(draining.cancelled_owned()),
            clock,
        }
    }

    /// The status to end the stream with, once there is a reason to.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        use tokio_stream::Stream;
        while let Poll::Ready(Some(_)) = Pin::new(&mut self.changes).poll_next(cx) {
            if let Some(status) = refusal(&self.revocations, &self.peer, unix(&*self.clock)) {
                return Some(status);
            }
        }
        while self.expiry.as_mut().poll(cx).is_ready() {
            if let Some(status) = refusal(&self.revocations, &self.peer, unix(&*self.clock)) {
                return Some(status);
            }
            // A timer capped at a year, or a clock that ran slow: wait again.
            let next = until(self.peer.not_after, &*self.clock)
                .max(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
            self.expiry.as_mut().reset(next);
        }
        if self.draining.as_mut().poll(cx).is_ready() {
            return Some(Status::unavailable(
                "the gateway is shutting down; reconnect and resume from your last cursor",
            ));
        }
        None
    }
}

/// A response body that logs the call when its trailers pass (or when the client
/// goes away first), so streams are logged with their real outcome and duration,
/// and that cuts the stream off if the caller's certificate is revoked meanwhile.
struct LoggedBody {
    inner: Body,
    log: Option<CallLog>,
    guard: Guard,
    /// Whether a message has passed.
    sent_a_message: bool,
    metrics: Arc<crate::metrics::Metrics>,
    limits: Limits,
}

impl LoggedBody {
    /// Whether the stream must end now, arming the guard first if it is not yet.
    fn poll_guard(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        self.guard = match std::mem::replace(&mut self.guard, Guard::Done) {
            Guard::Unarmed {
                revocations,
                peer,
                draining,
                clock,
            } => Guard::Armed(RevocationGuard::arm(revocations, peer, draining, clock)),
            other => other,
        };
        let Guard::Armed(guard) = &mut self.guard else {
            return None;
        };
        guard.poll_end(cx)
    }

    /// Ends the stream with `status` in place of whatever the handler sends next.
    fn end(&mut self, status: Status) -> Frame<bytes::Bytes> {
        self.guard = Guard::Done;
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            trailers.insert(
                "grpc-status",
                HeaderValue::from(Code::Unauthenticated as i32),
            );
        }
        if let Some(log) = self.log.take() {
            log.finish(status.code());
        }
        // Replace the inner body so nothing more is sent after the trailers.
        self.inner = Body::empty();
        Frame::trailers(trailers)
    }
}

impl http_body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Guard::Armed(_) = self.guard {
            if let Some(status) = self.poll_guard(cx) {
                return Poll::Ready(Some(Ok(self.end(status))));
            }
        }
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Guard::Unarmed { .. } = self.guard {
            // A stream shows itself by waiting, or by a second message; a message
            // polled here is dropped if the stream must end instead.
            let is_stream = match &polled {
                Poll::Pending => true,
                Poll::Ready(Some(Ok(frame))) => frame.is_data() && self.sent_a_message,
                Poll::Ready(_) => false,
            };
            if is_stream {
                if let Some(status) = self.poll_guard(cx) {
                    return Poll::Ready(Some(Ok(self.end(status))));
                }
            }
        }
        match &mut polled {
            Poll::Ready(Some(Ok(frame))) => {
                if frame.is_data() {
                    self.sent_a_message = true;
                }
                if let Some(trailers) = frame.trailers_mut() {
                    self.limits.name_an_answer_too_large(trailers);
                    if let Some(log) = self.log.take() {
                        log.finish(status_code(trailers).unwrap_or(Code::Ok));
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(log) = self.log.take() {
                    log.finish(Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = self.log.take() {
                    log.finish(Code::Ok);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.guard, Guard::Done) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.metrics.stream(-1);
        if let Some(log) = self.log.take() {
            log.finish(Code::Cancelled);
        }
    }
}

/// The caller of a request that passed the auth layer. The layer guarantees it is
/// there; its absence means the service was mounted without the layer, which is a
/// server bug, so the call fails closed.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<&Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .ok_or_else(|| Status::internal("request reached a handler without authentication"))
}
