//! Accepts TCP connections, runs each TLS handshake in its own task (so a slow or
//! silent client cannot hold up anyone else), waits there for the client's HTTP/2
//! preface, and hands finished connections to tonic with the peer's certificate
//! attached. The limits ([`AcceptorLimits`]) bound what clients that send nothing,
//! from one address, many addresses or one identity, can hold of the connection
//! slots. A connection whose certificate is revoked or expires is closed, a moment
//! after its streams have been told why ([`REVOKED_GRACE`]); one that resumes a TLS
//! session of such a certificate is refused.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::coalesce::Coalesced;
use super::{PeerCert, PeerInfo, TlsState};
use crate::domain::Clock;

/// Transport limits applied before any request is read.
#[derive(Debug, Clone, Copy)]
pub struct AcceptorLimits {
    /// Connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Connections open at once of one identity ([`PeerCert::identity`]), from
    /// the end of its handshake to its close; one more is closed right after its
    /// handshake, so that one caller (a misconfigured pool, a stolen key) cannot
    /// take every connection slot from everyone else.
    pub max_connections_per_identity: usize,
    /// How long a client has to complete its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a client has, once its handshake is done, to send the HTTP/2
    /// connection preface. HTTP/2 keepalive pings start only after the preface, so
    /// without this a client that sends nothing would hold its slot forever.
    pub preface_timeout: Duration,
    /// TLS handshakes in progress at once, from all addresses; a connection beyond
    /// it is closed at once, so that clients sending nothing from many addresses
    /// cannot take every connection slot for `handshake_timeout` at a time.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one address (an IPv6 address by its
    /// /64 prefix, an IPv4-mapped one as its IPv4 address; see `address_key`);
    /// a connection beyond it is closed at once, so that one host sending nothing
    /// cannot take every handshake turn.
    pub max_handshakes_per_ip: usize,
}

impl From<&crate::config::Limits> for AcceptorLimits {
    fn from(l: &crate::config::Limits) -> Self {
        AcceptorLimits {
            max_connections: l.max_connections,
            max_connections_per_identity: l.max_connections_per_identity,
            handshake_timeout: l.handshake_timeout,
            preface_timeout: l.preface_timeout,
            max_handshakes: l.max_handshakes,
            max_handshakes_per_ip: l.max_handshakes_per_ip,
        }
    }
}

/// A listening socket that yields authenticated TLS connections.
pub struct Acceptor {
    listener: TcpListener,
    tls: Arc<TlsState>,
    limits: AcceptorLimits,
    clock: Arc<dyn Clock>,
}

impl Acceptor {
    /// Wraps a bound listener; certificates expire by `clock`.
    pub fn new(
        listener: TcpListener,
        tls: Arc<TlsState>,
        limits: AcceptorLimits,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Acceptor {
            listener,
            tls,
            limits,
            clock,
        }
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts accepting. The stream ends when `stop` is cancelled.
    pub fn incoming(self, stop: CancellationToken) -> ReceiverStream<Result<TlsConn, io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let limits = self.limits;
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
        let by_address = Arc::new(Tally::new(limits.max_handshakes_per_ip));
        let by_identity = Arc::new(Seats::new(
            limits.max_connections_per_identity,
            self.tls.revocations().clone(),
            self.clock.clone(),
        ));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = stop.cancelled() => return,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let (tcp, remote) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = self.listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                // Both turns are taken here, in the order connections arrive, and
                // a connection refused one is dropped (closed) before the next is
                // accepted: its slot goes back at once.
                let Some(address_turn) = by_address.take(address_key(remote.ip())) else {
                    tracing::info!(%remote, "too many TLS handshakes in progress from this address; connection closed");
                    continue;
                };
                let Ok(turn) = handshakes.clone().try_acquire_owned() else {
                    tracing::info!(%remote, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                let acceptor = TlsAcceptor::from(self.tls.current().server_config.clone());
                let tx = tx.clone();
                let by_identity = by_identity.clone();
                tokio::spawn(async move {
                    let Some((stream, peer)) =
                        handshake(acceptor, tcp, remote, limits.handshake_timeout).await
                    else {
                        return;
                    };
                    drop((turn, address_turn));
                    let conn = establish(stream, peer, &by_identity, limits, permit).await;
                    if let Some(conn) = conn {
                        let _ = tx.send(Ok(conn)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// The address a handshake is counted against: an IPv4 address as it is; an IPv6
/// address by its /64 prefix, because one host is commonly given a whole /64 and
/// could otherwise take a turn from each of its 2^64 addresses; an IPv4-mapped IPv6
/// address (an IPv4 client of a dual-stack listener) as the IPv4 address it maps,
/// because all of those share the prefix `::ffff:0:0/96` and so one /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
}

/// How many things are counted against each key (handshakes by address, open
/// connections by identity), and the most one key may have.
struct Tally<K: Hash + Eq + Clone> {
    counts: Mutex<HashMap<K, usize>>,
    max: usize,
}

/// One thing counted against `key`; it stops counting when this is dropped.
struct Counted<K: Hash + Eq + Clone> {
    key: K,
    of: Arc<Tally<K>>,
}

// === impl Tally ===

impl<K: Hash + Eq + Clone> Tally<K> {
    fn new(max: usize) -> Self {
        Tally {
            counts: Default::default(),
            max,
        }
    }

    /// Counts one more against `key`, unless it has `max` already.
    fn take(self: &Arc<Self>, key: K) -> Option<Counted<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.get(&key).copied().unwrap_or(0);
        if n >= self.max {
            return None;
        }
        counts.insert(key.clone(), n + 1);
        Some(Counted {
            key,
            of: self.clone(),
        })
    }
}

impl<K: Hash + Eq + Clone> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut counts = self.of.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut n) = counts.entry(self.key.clone()) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

/// Runs the TLS handshake within `timeout`, and reads the peer's certificate.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
) -> Option<(TlsStream<TcpStream>, PeerCert)> {
    // gRPC is many small frames: Nagle's delay would dominate latency.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%remote, error = %e, "cannot set TCP_NODELAY");
    }
    let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!(%remote, "TLS handshake timed out");
            return None;
        }
    };
    let (_, session) = stream.get_ref();
    let (leaf, intermediates) = session.peer_certificates()?.split_first()?;
    match PeerCert::parse(remote, leaf, intermediates) {
        Ok(peer) => Some((stream, peer)),
        Err(e) => {
            tracing::info!(%remote, error = %e, "client certificate unusable");
            None
        }
    }
}

/// The open connections of each identity, against `limits.max_connections_per_identity`.
/// A connection whose certificate (or an intermediate it presented) has since been
/// revoked no longer counts: its calls are refused anyway, and a thief holding
/// connections of a stolen certificate must not keep the agency's new certificate
/// out.
struct Seats {
    /// Identity → its open connections' certificates, by seat number.
    by_identity: Mutex<HashMap<Arc<str>, Seated>>,
    next: std::sync::atomic::AtomicU64,
    max: usize,
    revocations: Arc<super::Revocations>,
    clock: Arc<dyn Clock>,
}

/// One identity's open connections: seat number → the connection's certificate.
type Seated = HashMap<u64, Arc<PeerCert>>;

/// One open connection's place among its identity's; given back when dropped.
struct Seat {
    identity: Arc<str>,
    id: u64,
    of: Arc<Seats>,
}

// === impl Seats ===

impl Seats {
    fn new(max: usize, revocations: Arc<super::Revocations>, clock: Arc<dyn Clock>) -> Self {
        Seats {
            by_identity: Default::default(),
            next: Default::default(),
            max,
            revocations,
            clock,
        }
    }

    /// Why a connection of `peer` may not be served, if it may not: its
    /// certificate, or an intermediate it presented, is revoked, or it has expired.
    fn unfit(&self, peer: &PeerCert) -> Option<&'static str> {
        if self.revocations.revoked_in(peer).is_some() {
            Some("certificate revoked")
        } else if expired(peer, &*self.clock) {
            Some("certificate expired")
        } else {
            None
        }
    }

    /// A seat for `peer`, unless `identity` has `max` connections open whose
    /// certificates are neither revoked nor expired.
    fn take(self: &Arc<Self>, identity: Arc<str>, peer: &Arc<PeerCert>) -> Option<Seat> {
        let mut by_identity = self.by_identity.lock().unwrap_or_else(|p| p.into_inner());
        let seated = by_identity.entry(identity.clone()).or_default();
        let live = seated.values().filter(|p| self.unfit(p).is_none()).count();
        if live >= self.max {
            return None;
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        seated.insert(id, peer.clone());
        Some(Seat {
            identity,
            id,
            of: self.clone(),
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut by_identity = self
            .of
            .by_identity
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut seated) =
            by_identity.entry(self.identity.clone())
        {
            seated.get_mut().remove(&self.id);
            if seated.get().is_empty() {
                seated.remove();
            }
        }
    }
}

/// Admits a connection whose handshake is done: counts it against its identity,
/// and waits for its HTTP/2 preface. `None` when it is closed instead.
async fn establish(
    mut stream: TlsStream<TcpStream>,
    peer: PeerCert,
    by_identity: &Arc<Seats>,
    limits: AcceptorLimits,
    permit: OwnedSemaphorePermit,
) -> Option<TlsConn> {
    let remote = peer.remote;
    let identity: Arc<str> = peer.identity().into();
    let peer = Arc::new(peer);
    // A resumed TLS session skips the certificate verifier, so a certificate
    // revoked (or expired) since its first handshake is refused here.
    if let Some(why) = by_identity.unfit(&peer) {
        tracing::info!(%remote, identity = ?identity, serial = %peer.serial_hex, "{why}; connection closed");
        return None;
    }
    let Some(seat) = by_identity.take(identity.clone(), &peer) else {
        tracing::info!(%remote, identity = ?identity, "too many connections open for this identity; connection closed");
        return None;
    };
    let preface = match read_preface(&mut stream, limits.preface_timeout).await {
        Ok(preface) => preface,
        Err(PrefaceError::TimedOut) => {
            tracing::info!(%remote, identity = ?identity, "no HTTP/2 preface in time; connection closed");
            return None;
        }
        Err(PrefaceError::Closed) => {
            tracing::debug!(%remote, identity = ?identity, "connection closed before its HTTP/2 preface");
            return None;
        }
        Err(PrefaceError::Io(e)) => {
            tracing::info!(%remote, identity = ?identity, error = %e, "connection failed before its HTTP/2 preface");
            return None;
        }
    };
    Some(TlsConn {
        inner: Coalesced::new(stream),
        preface,
        revocable: Revocable::new(by_identity.clone(), peer.clone()),
        peer: PeerInfo(peer),
        _seat: seat,
        _permit: permit,
    })
}

/// How long a connection stays open once its certificate is revoked or expires:
/// long enough for its open streams to end with UNAUTHENTICATED saying why (the
/// auth layer ends them at once) and for calls under way to be refused with it,
/// rather than all of them failing as a dropped connection.
pub const REVOKED_GRACE: Duration = Duration::from_secs(2);

/// The longest a connection's expiry timer is set for at once; it is set again
/// until the certificate's end.
const EXPIRY_CHECK: Duration = Duration::from_secs(24 * 60 * 60);

/// Whether `peer`'s certificate has expired by `clock`.
fn expired(peer: &PeerCert, clock: &dyn Clock) -> bool {
    clock.now().unix_timestamp() >= peer.not_after
}

/// How long until `peer`'s certificate expires by `clock`, at most [`EXPIRY_CHECK`].
fn until_expiry(peer: &PeerCert, clock: &dyn Clock) -> Duration {
    let left = peer.not_after.saturating_sub(clock.now().unix_timestamp());
    Duration::from_secs(u64::try_from(left).unwrap_or(0)).min(EXPIRY_CHECK)
}

/// Watches one connection's certificate: the revocations, and its expiry.
struct Revocable {
    changes: tokio_stream::wrappers::WatchStream<u64>,
    /// Whose [`Seats::unfit`] judges the certificate.
    seats: Arc<Seats>,
    peer: Arc<PeerCert>,
    /// Wakes the connection at the certificate's end, or [`EXPIRY_CHECK`] on.
    expiry: Pin<Box<tokio::time::Sleep>>,
    /// Set once the certificate is found revoked or expired: the end of the grace.
    closing: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Revocable {
    fn new(seats: Arc<Seats>, peer: Arc<PeerCert>) -> Self {
        Revocable {
            changes: tokio_stream::wrappers::WatchStream::new(seats.revocations.subscribe()),
            expiry: Box::pin(tokio::time::sleep(until_expiry(&peer, &*seats.clock))),
            seats,
            peer,
            closing: None,
        }
    }

    /// Ready with the error to fail the connection's reads and writes with once its
    /// certificate has been revoked or expired for [`REVOKED_GRACE`]; until then
    /// pending, with the task woken by the next revocation, the certificate's end
    /// or the end of the grace.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        use tokio_stream::Stream as _;
        if self.closing.is_none() {
            // Until both are pending (so both will wake the task), judge the
            // certificate whenever either has fired.
            loop {
                let changed = matches!(
                    Pin::new(&mut self.changes).poll_next(cx),
                    Poll::Ready(Some(_))
                );
                let due = self.expiry.as_mut().poll(cx).is_ready();
                if !changed && !due {
                    break;
                }
                if let Some(why) = self.seats.unfit(&self.peer) {
                    tracing::info!(remote = %self.peer.remote, identity = %self.peer.identity(), serial = %self.peer.serial_hex, "{why}; closing its connection");
                    self.closing = Some(Box::pin(tokio::time::sleep(REVOKED_GRACE)));
                    break;
                }
                if due {
                    // Not expired yet, so at least a second away.
                    let left = until_expiry(&self.peer, &*self.seats.clock);
                    self.expiry
                        .as_mut()
                        .reset(tokio::time::Instant::now() + left);
                }
            }
        }
        match self.closing.as_mut().map(|end| end.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer's certificate has been revoked or has expired",
            )),
            _ => Poll::Pending,
        }
    }
}

/// Length of the HTTP/2 client connection preface (RFC 9113, section 3.4), the
/// first bytes a client sends.
const PREFACE_LEN: usize = 24;

/// Why a connection gave no preface.
#[derive(Debug)]
enum PrefaceError {
    TimedOut,
    Closed,
    Io(io::Error),
}

/// Reads the preface's length in bytes within `within`. The whole length, not the
/// first byte, so that a client cannot hold its slot by sending one byte; what the
/// bytes say is left to the HTTP/2 server, which reads them next.
async fn read_preface(
    stream: &mut TlsStream<TcpStream>,
    within: Duration,
) -> Result<Bytes, PrefaceError> {
    let mut buf = [0u8; PREFACE_LEN];
    let mut filled = 0;
    let reading = async {
        while filled < PREFACE_LEN {
            match stream.read(&mut buf[filled..]).await {
                Ok(0) => return Err(PrefaceError::Closed),
                Ok(n) => filled += n,
                Err(e) => return Err(PrefaceError::Io(e)),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(within, reading).await {
        Ok(Ok(())) => Ok(Bytes::copy_from_slice(&buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(PrefaceError::TimedOut),
    }
}

/// One established mutual-TLS connection. Its writes are coalesced
/// ([`super::coalesce`]).
pub struct TlsConn {
    inner: Coalesced<TlsStream<TcpStream>>,
    /// The preface bytes already read by `read_preface`, given back first.
    preface: Bytes,
    /// Fails reads and writes once the certificate is revoked or expired, so the
    /// HTTP/2 server drops the connection and its slots.
    revocable: Revocable,
    peer: PeerInfo,
    /// Counts the connection against its identity while it is open.
    _seat: Seat,
    _permit: OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.revocable.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        if !self.preface.is_empty() {
            let n = self.preface.len().min(buf.remaining());
            let head = self.preface.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(self.inner.get_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.revocable.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.revocable.poll_closed(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_counted_by_ipv4_address_and_ipv6_slash_64() {
        let key = |s: &str| address_key(s.parse().expect("address"));
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        // One /64, many addresses: one key.
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_eq!(
            key("2001:db8:1:2:abcd::9"),
            "2001:db8:1:2::".parse::<IpAddr>().expect("address")
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        // An IPv4 client of a dual-stack listener counts as its IPv4 address, not
        // as the one /64 every mapped address shares.
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("::ffff:192.0.2.7"), key("::ffff:192.0.2.8"));
    }

    #[test]
    fn a_tally_refuses_beyond_its_max_and_forgets_what_is_dropped() {
        let tally = Arc::new(Tally::new(2));
        let a = tally.take("a");
        let b = tally.take("a");
        assert!(a.is_some() && b.is_some());
        assert!(tally.take("a").is_none());
        assert!(tally.take("b").is_some());
        drop(a);
        let again = tally.take("a");
        assert!(again.is_some());
        drop((b, again));
        assert!(tally.counts.lock().expect("lock").is_empty());
    }
}
