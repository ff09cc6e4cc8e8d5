//! Upstream HTTP/2 (cleartext, prior knowledge): each worker's multiplexed connections, one per
//! cluster and endpoint address, every request a stream on it.
//!
//! A pool belongs to one worker and is only touched from its thread, so it is a `RefCell`, not a
//! lock, and its connections run as local tasks. It is keyed by the endpoint's address, not by
//! its place in the cluster, so that it does not care how the endpoint set is kept.
//!
//! A connection is made when a request finds none (the requests that come meanwhile wait for the
//! same one, and share its failure), and replaced once it has closed (the upstream went away or
//! sent GOAWAY). Past the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`, hyper holds further
//! requests until a stream ends: it does not say that a connection is full, so there is no
//! second connection to the same endpoint. A connection with no stream open for the cluster's
//! `idle_timeout` is closed by [`Pool::sweep`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::Notify;
use tracing::debug;

use crate::config::{ClusterId, Config};
use crate::runtime::LocalExec;
use crate::runtime::context::WorkerContext;

use super::connect::{self, ConnectError};
use super::request::RequestBody;

/// Sends requests on one HTTP/2 connection; clones share the connection.
pub type Sender = http2::SendRequest<RequestBody>;

/// Why a request could not be sent upstream over HTTP/2.
pub enum SendError {
    /// No connection could be made.
    Connect(ConnectError),
    /// The connection or the stream failed before the response headers came.
    Request(hyper::Error),
}

/// One worker's HTTP/2 connections, by cluster and endpoint address.
#[derive(Default)]
pub struct Pool {
    /// Shared with the tasks that make connections, which put them here.
    slots: Rc<Slots>,
}

type Slots = RefCell<HashMap<(usize, SocketAddr), Slot>>;

enum Slot {
    /// A connection is being made; requests for the endpoint wait for it.
    Connecting(Rc<Connecting>),
    Open(Connection),
}

#[derive(Default)]
struct Connecting {
    done: Notify,
    /// Set before `done` is notified.
    outcome: RefCell<Option<Result<Connection, ConnectError>>>,
}

#[derive(Clone)]
struct Connection {
    sender: Sender,
    usage: Rc<Usage>,
}

/// How busy a connection is, for closing it once idle.
struct Usage {
    streams: Cell<usize>,
    idle_since: Cell<Instant>,
}

/// A request's stream on a shared connection, held until its response is complete (or dropped):
/// a connection with a stream open is not idle.
pub struct Stream {
    usage: Rc<Usage>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        let streams = self.usage.streams.get().saturating_sub(1);
        self.usage.streams.set(streams);
        if streams == 0 {
            self.usage.idle_since.set(Instant::now());
        }
    }
}

impl Connection {
    fn open_stream(&self) -> Stream {
        self.usage.streams.set(self.usage.streams.get() + 1);
        Stream {
            usage: self.usage.clone(),
        }
    }
}

impl Pool {
    /// Sends `request` (its URI absolute, its headers fit for HTTP/2) to `addr` on this worker's
    /// connection to it, made if there is none. A request the connection closed before sending
    /// goes once more on a new connection (counted in `upstream_rq_retry`).
    pub async fn send(
        &self,
        worker: &Rc<WorkerContext>,
        cluster: ClusterId,
        addr: SocketAddr,
        request: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Stream), SendError> {
        let key = (cluster.0, addr);
        let mut request = request;
        let mut retried = false;
        loop {
            let connection = self
                .connection(worker, key)
                .await
                .map_err(SendError::Connect)?;
            let stream = connection.open_stream();
            let mut sender = connection.sender.clone();
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, stream)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !retried => {
                        debug!(worker = worker.id, upstream = %addr, "HTTP/2 connection closed before a request went; sending it on a new one: {}", e.error());
                        self.forget(key, &connection);
                        let stats = &worker.stats;
                        stats
                            .shard
                            .inc(stats.ids.clusters[cluster.0].upstream_rq_retry);
                        request = unsent;
                        retried = true;
                    }
                    _ => {
                        self.forget_if_closed(key);
                        return Err(SendError::Request(e.into_error()));
                    }
                },
            }
        }
    }

    /// The open connection for `key`, or the one being made, or a new one.
    async fn connection(
        &self,
        worker: &Rc<WorkerContext>,
        key: (usize, SocketAddr),
    ) -> Result<Connection, ConnectError> {
        let connecting = {
            let mut slots = self.slots.borrow_mut();
            match slots.get(&key) {
                Some(Slot::Open(c)) if !c.sender.is_closed() => return Ok(c.clone()),
                Some(Slot::Connecting(connecting)) => connecting.clone(),
                _ => {
                    // Made by a task of its own, so that the request that began it may go away
                    // (a timeout, a client that left) without stranding those that wait.
                    let connecting = Rc::new(Connecting::default());
                    slots.insert(key, Slot::Connecting(connecting.clone()));
                    tokio::task::spawn_local(connect(
                        worker.clone(),
                        self.slots.clone(),
                        key,
                        connecting.clone(),
                    ));
                    connecting
                }
            }
        };
        // Registered before the connecting task can run (nothing awaited since the slot was
        // read), so its notification cannot be missed.
        connecting.done.notified().await;
        match &*connecting.outcome.borrow() {
            Some(Ok(connection)) => Ok(connection.clone()),
            Some(Err(e)) => Err(copy_error(e)),
            None => unreachable!("the outcome is set before waiters are notified"),
        }
    }

    /// Drops `key`'s slot if it still holds `connection`, so that the next request makes a new one.
    fn forget(&self, key: (usize, SocketAddr), connection: &Connection) {
        let mut slots = self.slots.borrow_mut();
        if let Some(Slot::Open(open)) = slots.get(&key)
            && Rc::ptr_eq(&open.usage, &connection.usage)
        {
            slots.remove(&key);
        }
    }

    fn forget_if_closed(&self, key: (usize, SocketAddr)) {
        let mut slots = self.slots.borrow_mut();
        if let Some(Slot::Open(open)) = slots.get(&key)
            && open.sender.is_closed()
        {
            slots.remove(&key);
        }
    }

    /// Drops connections that closed, and those without a stream for their cluster's
    /// `idle_timeout` (hyper closes a connection once its last sender is gone and its streams
    /// have ended).
    pub fn sweep(&self, config: &Config) {
        let now = Instant::now();
        self.slots
            .borrow_mut()
            .retain(|(cluster, _), slot| match slot {
                Slot::Connecting(_) => true,
                Slot::Open(c) => {
                    let usage = &c.usage;
                    let idle = usage.streams.get() == 0
                        && now.saturating_duration_since(usage.idle_since.get())
                            >= config.clusters[*cluster].idle_timeout;
                    !c.sender.is_closed() && !idle
                }
            });
    }
}

/// Makes the connection for `key`, puts it in the pool and tells the waiting requests.
async fn connect(
    worker: Rc<WorkerContext>,
    slots: Rc<Slots>,
    key: (usize, SocketAddr),
    connecting: Rc<Connecting>,
) {
    let outcome = handshake(&worker, key).await;
    {
        let mut slots = slots.borrow_mut();
        match &outcome {
            Ok(connection) => {
                slots.insert(key, Slot::Open(connection.clone()));
            }
            Err(_) => {
                slots.remove(&key);
            }
        }
    }
    *connecting.outcome.borrow_mut() = Some(outcome);
    connecting.done.notify_waiters();
}

/// How often an HTTP/2 upstream connection is pinged while it has streams (Envoy's default
/// interval is off; gRPC's is 20 s of idleness).
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// How long a ping may go unanswered before the connection is closed.
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

async fn handshake(
    worker: &Rc<WorkerContext>,
    (cluster_index, addr): (usize, SocketAddr),
) -> Result<Connection, ConnectError> {
    let cluster = &worker.config.clusters[cluster_index];
    let stream =
        connect::connect_tcp(addr, cluster.connect_timeout, &worker.stats, cluster_index).await?;
    let (sender, connection) = http2::Builder::new(LocalExec)
        .timer(TokioTimer::new())
        // A connection whose peer is gone (a host lost, a NAT entry dropped) is found out by
        // pings, instead of holding its streams until each one times out.
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    let active = worker.stats.ids.clusters[cluster_index].upstream_cx_active;
    worker.stats.shard.gauge_add(active, 1);
    let task_worker = worker.clone();
    tokio::task::spawn_local(async move {
        if let Err(e) = connection.await {
            debug!(upstream = %addr, "upstream HTTP/2 connection ended: {e}");
        }
        task_worker.stats.shard.gauge_add(active, -1);
    });
    Ok(Connection {
        sender,
        usage: Rc::new(Usage {
            streams: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
        }),
    })
}

/// The failure of a shared connection attempt, for each request that waited on it.
fn copy_error(e: &ConnectError) -> ConnectError {
    match e {
        ConnectError::TimedOut { addr, timeout } => ConnectError::TimedOut {
            addr: *addr,
            timeout: *timeout,
        },
        ConnectError::Failed { addr, source } => ConnectError::Failed {
            addr: *addr,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        ConnectError::Handshake { addr, source } => ConnectError::Failed {
            addr: *addr,
            source: std::io::Error::other(format!("HTTP/2 handshake failed: {source}")),
        },
    }
}
