//! The downstream socket as hyper sees it: bytes already read while sniffing the protocol are
//! served first, and every read marks the connection active, so that the drain and the idle
//! timeout can tell an idle connection from one a client is sending on.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf, Bytes};
use shm_stats::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::runtime::context::WorkerContext;

/// What a connection has been doing, for the decision to close it while idle or while a
/// client takes too long to send a request's headers.
pub struct Activity {
    /// The last byte read, or the end of the last answer, whichever came later.
    last_active: Cell<Instant>,
    in_flight: Cell<u32>,
    /// Since when the connection has been waiting for the rest of a request's headers: from
    /// the accept for its first request, from the first byte after an answer for a later one.
    head_since: Cell<Option<Instant>>,
    /// Whether a byte of that request has arrived.
    head_bytes: Cell<bool>,
    /// The last write could not go out: the client is not reading.
    write_blocked: Cell<bool>,
    /// An answer was sent before the request body was read (413): close lingering, reading
    /// what the client still sends, so that the answer is not lost to a reset.
    pub linger: Cell<bool>,
}

impl Activity {
    /// A connection accepted now; `sent` if its client has already sent bytes.
    pub fn new(sent: bool) -> Self {
        let now = Instant::now();
        Activity {
            last_active: Cell::new(now),
            in_flight: Cell::new(0),
            head_since: Cell::new(Some(now)),
            head_bytes: Cell::new(sent),
            write_blocked: Cell::new(false),
            linger: Cell::new(false),
        }
    }

    /// Whether the last write to the client could not go out (it does not read).
    pub fn write_blocked(&self) -> bool {
        self.write_blocked.get()
    }

    /// The TLS handshake is done: the bytes read so far were not a request's.
    pub fn handshake_done(&self) {
        self.head_bytes.set(false);
    }

    /// While no request is in flight: since when the connection has been waiting for a
    /// request's headers (`None` if the next request has not begun), and whether any of its
    /// bytes arrived.
    pub fn head(&self) -> (Option<Instant>, bool) {
        (self.head_since.get(), self.head_bytes.get())
    }

    /// Since when the connection has been idle (if nothing is in flight): a connection is idle
    /// from the end of its last answer, not from the last byte it sent us.
    pub fn idle_since(&self) -> Instant {
        self.last_active.get()
    }

    /// Requests received and not yet fully answered.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.get()
    }

    /// Bytes of a next request are known to have come, before the end of the last answer
    /// (pipelined with it): its header time counts from that end.
    pub fn next_request_begun(&self) {
        if self.in_flight.get() == 0 && self.head_since.get().is_none() {
            self.head_since.set(Some(self.last_active.get()));
            self.head_bytes.set(true);
        }
    }

    pub fn request_started(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.head_since.set(None);
        self.head_bytes.set(false);
    }

    pub fn request_finished(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.last_active.set(Instant::now());
    }
}

/// Where a connection counts the bytes it moves.
pub struct ByteStats {
    pub worker: Rc<WorkerContext>,
    pub rx: Counter,
    pub tx: Counter,
}

/// A stream with a prefix of already-read bytes, recording when it last received data and
/// counting the bytes both ways.
pub struct ConnIo<S> {
    inner: S,
    prefix: Bytes,
    activity: Rc<Activity>,
    bytes: ByteStats,
}

impl<S> ConnIo<S> {
    pub fn new(inner: S, prefix: Bytes, activity: Rc<Activity>, bytes: ByteStats) -> Self {
        ConnIo {
            inner,
            prefix,
            activity,
            bytes,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether bytes already read wait to be read again.
    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// Bytes already read (and counted) to be served again before the socket's.
    pub fn set_prefix(&mut self, bytes: Bytes) {
        self.prefix = bytes;
    }

    /// Takes the bytes already read and not yet served, for whatever reads the socket itself.
    pub fn take_prefix(&mut self) -> Bytes {
        std::mem::take(&mut self.prefix)
    }

    fn sent(&self, n: usize) {
        self.bytes.worker.stats.shard.add(self.bytes.tx, n as u64);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            // Already counted when it was sniffed.
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Frees the sniffing buffer: an idle keep-alive connection should not hold it.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            let now = Instant::now();
            let activity = &self.activity;
            activity.last_active.set(now);
            if activity.in_flight.get() == 0 {
                // A new request begins (or, under TLS before the handshake ends, the handshake).
                if activity.head_since.get().is_none() {
                    activity.head_since.set(Some(now));
                }
                activity.head_bytes.set(true);
            }
            self.bytes.worker.stats.shard.add(self.bytes.rx, n as u64);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_blocked.set(polled.is_pending());
        let n = ready!(polled)?;
        self.sent(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_blocked.set(polled.is_pending());
        let n = ready!(polled)?;
        self.sent(n);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
