//! Write coalescing for a server connection.
//!
//! HTTP/2 flushes once per pass over its ready frames. When a group commit answers
//! many callers at once, their responses become ready one handler task after
//! another; flushed as each arrives, every response would be its own TLS record and
//! its own `writev`. [`Coalesced`] takes the bytes HTTP/2 writes, and on a flush
//! hands the task back to the scheduler (it is woken at once, behind the tasks
//! already queued) for as long as each pass brings more, a few times at most. The
//! handlers queued meanwhile add their frames, and the flush then writes them all
//! at once: as few TLS records as fit (16 KiB each) and one system call. Nothing
//! waits on a timer: when no other task adds anything, the next poll writes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;

/// Bytes held for one write. Past this, writes go through before more are taken,
/// so a connection never holds more than this unsent.
pub(crate) const COALESCE_BYTES: usize = 64 * 1024;

/// How many times one flush gives way while other tasks keep adding bytes.
pub(crate) const GIVE_WAY_TIMES: u8 = 4;

/// A writer that coalesces the writes between flushes; see the module docs.
#[derive(Debug)]
pub(crate) struct Coalesced<W> {
    inner: W,
    /// Written, not yet handed to `inner`.
    pending: BytesMut,
    /// How many times this flush has given way.
    gave_way: u8,
    /// How much was pending when it last gave way.
    pending_when_gave_way: usize,
}

impl<W> Coalesced<W> {
    pub(crate) fn new(inner: W) -> Self {
        Coalesced {
            inner,
            pending: BytesMut::new(),
            gave_way: 0,
            pending_when_gave_way: 0,
        }
    }

    pub(crate) fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: AsyncWrite + Unpin> Coalesced<W> {
    /// Hands every pending byte to `inner`.
    fn poll_write_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Takes what fits of `bufs`, first writing out what is pending if it is full.
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.pending.len() >= COALESCE_BYTES {
            ready!(self.poll_write_pending(cx))?;
        }
        let mut room = COALESCE_BYTES - self.pending.len();
        let mut taken = 0;
        for buf in bufs {
            let n = buf.len().min(room);
            self.pending.extend_from_slice(&buf[..n]);
            taken += n;
            room -= n;
            if room == 0 {
                break;
            }
        }
        Poll::Ready(Ok(taken))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Coalesced<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_take(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_take(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let more = this.pending.len() > this.pending_when_gave_way;
        if more && this.gave_way < GIVE_WAY_TIMES {
            this.gave_way += 1;
            this.pending_when_gave_way = this.pending.len();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_write_pending(cx))?;
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        this.gave_way = 0;
        this.pending_when_gave_way = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Waker;
    use tokio::io::AsyncWriteExt;

    /// Records each write it is given; accepts at most `max_write` bytes at a time.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        shut: bool,
        max_write: Option<usize>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = self.max_write.map_or(buf.len(), |m| m.min(buf.len()));
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    /// Counts its wakes.
    struct Count(AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn flush_once(w: &mut Coalesced<Recorder>, waker: &Waker) -> Poll<io::Result<()>> {
        Pin::new(w).poll_flush(&mut Context::from_waker(waker))
    }

    #[test]
    fn writes_between_passes_go_out_as_one_and_the_task_is_woken_each_time_it_gives_way() {
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut w = Coalesced::new(Recorder::default());
        assert!(matches!(
            Pin::new(&mut w).poll_write(&mut cx, b"one "),
            Poll::Ready(Ok(4))
        ));
        assert!(flush_once(&mut w, &waker).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(
            w.inner.writes.is_empty(),
            "nothing written while giving way"
        );
        // Another task's response arrives meanwhile: give way again.
        let _ = Pin::new(&mut w).poll_write(&mut cx, b"two ");
        assert!(flush_once(&mut w, &waker).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        // Nothing new since: write it all, once, and flush.
        assert!(matches!(flush_once(&mut w, &waker), Poll::Ready(Ok(()))));
        assert_eq!(w.inner.writes, vec![b"one two ".to_vec()]);
        assert_eq!(w.inner.flushes, 1);
        // A flush with nothing pending goes straight through.
        assert!(matches!(flush_once(&mut w, &waker), Poll::Ready(Ok(()))));
        assert_eq!(w.inner.flushes, 2);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_flush_gives_way_a_bounded_number_of_times() {
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        let mut w = Coalesced::new(Recorder::default());
        let mut passes = 0;
        loop {
            let _ = Pin::new(&mut w).poll_write(&mut cx, b"x");
            passes += 1;
            if flush_once(&mut w, &waker).is_ready() {
                break;
            }
            assert!(passes <= GIVE_WAY_TIMES as usize, "gave way without end");
        }
        assert_eq!(passes, GIVE_WAY_TIMES as usize + 1);
        assert_eq!(w.inner.writes.concat(), vec![b'x'; passes]);
    }

    #[tokio::test]
    async fn more_than_the_limit_is_written_in_full_and_in_order_and_shutdown_writes_what_is_pending(
    ) {
        let data: Vec<u8> = (0..3 * COALESCE_BYTES + 17).map(|i| i as u8).collect();
        let mut w = Coalesced::new(Recorder {
            max_write: Some(1000),
            ..Recorder::default()
        });
        w.write_all(&data).await.unwrap();
        let held = w.pending.len();
        assert!(
            held > 0 && held <= COALESCE_BYTES,
            "holds at most the limit"
        );
        assert!(!w.inner.shut);
        w.shutdown().await.unwrap();
        assert!(w.inner.shut);
        assert_eq!(w.inner.writes.concat(), data);

        let mut w = Coalesced::new(Recorder::default());
        let slices = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
        let n = poll_fn(|cx| Pin::new(&mut w).poll_write_vectored(cx, &slices))
            .await
            .unwrap();
        assert_eq!(n, 4);
        w.flush().await.unwrap();
        assert_eq!(w.inner.writes, vec![b"abcd".to_vec()]);
    }
}
