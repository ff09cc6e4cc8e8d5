//! Upstream connections: connecting with a timeout, the cluster's connection limit, and each
//! worker's pool of idle HTTP/1.1 connections per endpoint (spoken by `upstream_h1`).
//!
//! A pool belongs to one worker and is only touched from its thread, so it is a `RefCell`, not a
//! lock. Connections are taken most-recently-used first, which keeps a small hot set warm and lets
//! the rest reach their idle timeout and close.

use rustc_hash::FxHashMap;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::net::TcpStream;

use crate::cluster::ClusterHandle;
use crate::config::Cluster;
use crate::upstream_h1::Conn;
use crate::worker::Worker;

/// The body of a request sent upstream: the client's as it streams in, or one kept in memory
/// (empty, or buffered to be sent again by a retry or copied by a mirror).
pub type RequestBody = Either<TrackedBody, Full<Bytes>>;

/// How far a client's request body has come: when it last moved, and when it ended.
pub struct BodyProgress {
    last: Cell<Instant>,
    ended: Cell<Option<Instant>>,
    changed: tokio::sync::Notify,
    /// Set when the body went past the listener's `max_request_body`.
    too_large: Cell<bool>,
}

impl BodyProgress {
    pub fn new(already_ended: bool) -> Rc<Self> {
        let now = Instant::now();
        Rc::new(BodyProgress {
            last: Cell::new(now),
            ended: Cell::new(already_ended.then_some(now)),
            changed: tokio::sync::Notify::new(),
            too_large: Cell::new(false),
        })
    }

    /// Whether the body was cut off for going past `max_request_body`.
    pub fn too_large(&self) -> bool {
        self.too_large.get()
    }

    /// When the body ended; waits for it.
    pub async fn ended(&self) -> Instant {
        loop {
            if let Some(ended) = self.ended.get() {
                return ended;
            }
            self.changed.notified().await;
        }
    }

    fn end(&self) {
        if self.ended.get().is_none() {
            self.ended.set(Some(Instant::now()));
            self.changed.notify_waiters();
        }
    }

    /// Resolves when the request has taken too long: `Response` when the upstream has not
    /// answered within `response_timeout` of the end of the request body, `Body` when the body
    /// has not moved for `idle_timeout`.
    pub async fn timed_out(
        &self,
        response_timeout: Duration,
        idle_timeout: Duration,
    ) -> RequestTimeout {
        loop {
            if let Some(ended) = self.ended.get() {
                tokio::time::sleep_until((ended + response_timeout).into()).await;
                return RequestTimeout::Response;
            }
            let last = self.last.get();
            tokio::select! {
                _ = tokio::time::sleep_until((last + idle_timeout).into()) => {
                    if self.ended.get().is_none() && self.last.get() == last {
                        return RequestTimeout::Body;
                    }
                }
                _ = self.changed.notified() => {}
            }
        }
    }
}

/// Which timeout a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestTimeout {
    /// The upstream did not answer in time.
    Response,
    /// The client stopped sending its body.
    Body,
}

/// The client's request body on its way upstream, reporting its progress, so that the request
/// timeout starts when the upload is done (a slow upload is not a slow upstream), and cut off
/// past the listener's `max_request_body`.
pub struct TrackedBody {
    inner: Incoming,
    progress: Rc<BodyProgress>,
    /// Bytes the body may still bring.
    allowed: u64,
}

/// A request body went past `max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than max_request_body")]
pub struct BodyTooLarge;

impl TrackedBody {
    pub fn new(inner: Incoming, progress: Rc<BodyProgress>, max: Option<u64>) -> Self {
        TrackedBody {
            inner,
            progress,
            allowed: max.unwrap_or(u64::MAX),
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > self.allowed {
                    self.progress.too_large.set(true);
                    self.progress.end();
                    return std::task::Poll::Ready(Some(Err(BodyTooLarge.into())));
                }
                self.allowed -= len;
                self.progress.last.set(Instant::now());
                if self.inner.is_end_stream() {
                    self.progress.end();
                }
            }
            std::task::Poll::Ready(_) => self.progress.end(),
            std::task::Poll::Pending => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
/// Why no connection to an endpoint could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The endpoint refused or the network failed: the endpoint is down or wrong.
    #[error("connect to {addr} failed: {source}")]
    Failed {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// No answer within the cluster's connect timeout.
    #[error("connect to {addr} timed out after {timeout:?}")]
    TimedOut { addr: SocketAddr, timeout: Duration },
    /// The HTTP/2 handshake with a connected endpoint failed.
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

/// Opens a TCP connection to `addr` within the cluster's connect timeout.
pub async fn connect_tcp(
    addr: SocketAddr,
    timeout: Duration,
    worker: &Worker,
    cluster: usize,
) -> Result<TcpStream, ConnectError> {
    let (shard, c) = (&worker.stats.shard, &worker.stats.ids.clusters[cluster]);
    shard.inc(c.upstream_cx_total);
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(source)) => {
            shard.inc(c.upstream_cx_connect_fail);
            Err(ConnectError::Failed { addr, source })
        }
        Err(_) => {
            shard.inc(c.upstream_cx_connect_fail);
            shard.inc(c.upstream_cx_connect_timeout);
            Err(ConnectError::TimedOut { addr, timeout })
        }
    }
}

/// One of a cluster's `max_connections`, held for a connection's life.
pub struct ConnectionSlot {
    handle: Arc<ClusterHandle>,
}

impl ConnectionSlot {
    /// Takes a slot if the cluster is under `max` connections (over all workers).
    pub fn take(handle: &Arc<ClusterHandle>, max: usize) -> Option<ConnectionSlot> {
        if handle.cx_active.fetch_add(1, Ordering::Relaxed) >= max {
            handle.cx_active.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ConnectionSlot {
            handle: handle.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.handle.cx_active.fetch_sub(1, Ordering::Relaxed);
        self.handle.cx_freed.notify_waiters();
    }
}

/// One worker's idle connections to the endpoints of one cluster, by address (endpoints come
/// and go with the cluster's snapshots; a connection to one that left expires unused).
pub struct ClusterPool {
    /// Fx, not SipHash: the keys are endpoint addresses from the config or DNS, not from clients,
    /// and SipHash took 2 % of a keep-alive request's instructions (three lookups each way).
    idle: RefCell<FxHashMap<SocketAddr, Vec<IdleConnection>>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Wakes requests waiting for a connection of this worker's (`max_connections` reached).
    pub freed: tokio::sync::Notify,
    /// Requests of this worker waiting for a connection, by endpoint.
    waiting: RefCell<FxHashMap<SocketAddr, usize>>,
    handle: Arc<ClusterHandle>,
}

struct IdleConnection {
    conn: Conn,
    since: Instant,
}

/// A connection taken from the pool (or new), to go back once its response is complete.
pub struct Checkout {
    pub conn: Conn,
    /// How long it sat idle in the pool; `None` for a new connection.
    pub idle_for: Option<Duration>,
}

impl ClusterPool {
    pub fn new(cluster: &Cluster, handle: Arc<ClusterHandle>) -> Self {
        ClusterPool {
            idle: RefCell::new(FxHashMap::default()),
            max_idle: cluster.max_idle_per_endpoint,
            idle_timeout: cluster.idle_timeout,
            freed: tokio::sync::Notify::new(),
            waiting: RefCell::new(FxHashMap::default()),
            handle,
        }
    }

    /// A usable idle connection to `endpoint`, dropping any that closed or expired.
    pub fn checkout(&self, endpoint: SocketAddr) -> Option<Checkout> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&endpoint)?;
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            let idle_for = now.saturating_duration_since(idle.since);
            if idle_for < self.idle_timeout && idle.conn.is_usable() {
                return Some(Checkout {
                    conn: idle.conn,
                    idle_for: Some(idle_for),
                });
            }
        }
        None
    }

    /// Takes back a connection whose response is complete.
    pub fn release(&self, endpoint: SocketAddr, conn: Conn) {
        if conn.is_usable() {
            self.put(endpoint, conn);
        }
    }

    fn put(&self, endpoint: SocketAddr, conn: Conn) {
        let wanted_here = self.waiting.borrow().contains_key(&endpoint);
        if !wanted_here && self.handle.rq_pending.load(Ordering::Relaxed) > 0 {
            // A request waits for a connection elsewhere (another endpoint, another worker;
            // the cluster is at max_connections): this one closes, so that its place goes
            // to that request rather than idling here.
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(endpoint).or_default();
        if list.len() >= self.max_idle {
            // Connections the upstream closed meanwhile make room first.
            list.retain(|c| c.conn.is_usable());
        }
        if list.len() < self.max_idle {
            list.push(IdleConnection {
                conn,
                since: Instant::now(),
            });
            drop(idle);
            // Every waiter of this worker looks again (each waits for its own endpoint).
            self.freed.notify_waiters();
        }
    }

    /// Counts a request of this worker that starts (`true`) or stops waiting for a connection
    /// to `endpoint`.
    pub fn wait(&self, endpoint: SocketAddr, start: bool) {
        let mut waiting = self.waiting.borrow_mut();
        let n = waiting.entry(endpoint).or_default();
        if start {
            *n += 1;
        } else {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&endpoint);
            }
        }
    }

    /// Closes one idle connection to an endpoint other than `endpoint`, so that its place under
    /// `max_connections` goes to a request that waits (its slot comes free as it closes).
    /// Connections the upstreams closed go first.
    pub fn close_idle_except(&self, endpoint: SocketAddr) {
        self.sweep();
        let mut idle = self.idle.borrow_mut();
        if let Some(list) = idle
            .iter_mut()
            .find(|(addr, list)| **addr != endpoint && !list.is_empty())
            .map(|(_, list)| list)
        {
            list.pop();
        }
    }

    /// Closes connections idle past the timeout, so upstreams are not held open for nothing.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.idle.borrow_mut().retain(|_, list| {
            list.retain(|c| {
                now.saturating_duration_since(c.since) < self.idle_timeout && c.conn.is_usable()
            });
            !list.is_empty()
        });
    }
}
