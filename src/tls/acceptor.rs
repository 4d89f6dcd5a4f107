//! Accepts TCP connections, runs each TLS handshake in its own task (so a slow or
//! silent client cannot hold up anyone else), and hands finished connections to tonic
//! with the peer's certificate attached.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::coalesce::Coalesced;
use super::{PeerCert, PeerInfo, TlsState};

/// Transport limits applied before any request is read.
#[derive(Debug, Clone, Copy)]
pub struct AcceptorLimits {
    /// Connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// How long a client has to complete its TLS handshake.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once from one address; a connection beyond
    /// it is closed at once, so that one host sending nothing cannot take every
    /// connection slot for `handshake_timeout` at a time.
    pub max_handshakes_per_ip: usize,
}

/// A listening socket that yields authenticated TLS connections.
pub struct Acceptor {
    listener: TcpListener,
    tls: Arc<TlsState>,
    limits: AcceptorLimits,
}

impl Acceptor {
    /// Wraps a bound listener.
    pub fn new(listener: TcpListener, tls: Arc<TlsState>, limits: AcceptorLimits) -> Self {
        Acceptor {
            listener,
            tls,
            limits,
        }
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts accepting. The stream ends when `stop` is cancelled.
    pub fn incoming(self, stop: CancellationToken) -> ReceiverStream<Result<TlsConn, io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let handshaking = Arc::new(Handshaking::new(self.limits.max_handshakes_per_ip));
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
                let Some(turn) = handshaking.start(remote.ip()) else {
                    tracing::info!(%remote, "too many TLS handshakes in progress from this address; connection closed");
                    continue;
                };
                let acceptor = TlsAcceptor::from(self.tls.current().server_config.clone());
                let timeout = self.limits.handshake_timeout;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let conn = handshake(acceptor, tcp, remote, timeout, permit).await;
                    drop(turn);
                    if let Some(conn) = conn {
                        let _ = tx.send(Ok(conn)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Handshakes in progress, by the peer's address.
struct Handshaking {
    by_ip: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
    max: usize,
}

/// One handshake in progress; it ends when this is dropped.
struct Turn {
    ip: IpAddr,
    of: Arc<Handshaking>,
}

impl Handshaking {
    fn new(max: usize) -> Self {
        Handshaking {
            by_ip: Default::default(),
            max,
        }
    }

    /// A turn for `ip`, unless it has `max` handshakes in progress already.
    fn start(self: &Arc<Self>, ip: IpAddr) -> Option<Turn> {
        let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = by_ip.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Turn {
            ip,
            of: self.clone(),
        })
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut by_ip = self.of.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut n) = by_ip.entry(self.ip) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    timeout: Duration,
    permit: OwnedSemaphorePermit,
) -> Option<TlsConn> {
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
        Ok(peer) => Some(TlsConn {
            inner: Coalesced::new(stream),
            peer: PeerInfo(Arc::new(peer)),
            _permit: permit,
        }),
        Err(e) => {
            tracing::info!(%remote, error = %e, "client certificate unusable");
            None
        }
    }
}

/// One established mutual-TLS connection. Its writes are coalesced
/// ([`super::coalesce`]).
pub struct TlsConn {
    inner: Coalesced<TlsStream<TcpStream>>,
    peer: PeerInfo,
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
        Pin::new(self.inner.get_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
