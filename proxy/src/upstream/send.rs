//! One try of a request to one endpoint: on a pooled HTTP/1.1 connection or a new one (waiting
//! for one at the cluster's `max_connections`), or as a stream of the worker's HTTP/2
//! connection to the endpoint.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either};
use tracing::debug;

use crate::cluster::PendingRequest;
use crate::config::{ClusterId, UpstreamProtocol};
use crate::runtime::context::WorkerContext;

use super::connect::{ConnectError, ConnectionSlot};
use super::h1::{self, Outgoing};
use super::h2;
use super::pool::{Checkout, ClusterPool};
use super::request::RequestBody;
use super::response::{Upstream, UpstreamBody};
use super::state::Upstreams;

/// Why a request could not be sent upstream.
pub enum SendError {
    Connect(ConnectError),
    /// An HTTP/2 stream failed.
    Reset(hyper::Error),
    /// An HTTP/1.1 exchange failed.
    Http1(h1::Error),
    /// A circuit breaker refused it; names which.
    Overflow(&'static str),
}

/// Sends on a pooled connection to `addr` when one is usable, else on a new one (waiting for one
/// when the cluster is at `max_connections`). A request that a pooled connection could not
/// carry (it closed under the request, before any answer) goes once more on another connection:
/// a `replayable` one (idempotent, its body kept) in any case, others only when not even their
/// head could be written. An `http2` cluster's requests go as streams of the worker's connection
/// to the endpoint (`h2`).
pub async fn send(
    worker: &Rc<WorkerContext>,
    upstreams: &Upstreams,
    cluster_id: ClusterId,
    addr: SocketAddr,
    request: Request<RequestBody>,
    replayable: bool,
) -> Result<(Response<UpstreamBody>, Upstream), SendError> {
    let cluster = worker.config.cluster(cluster_id);
    if cluster.protocol == UpstreamProtocol::Http2 {
        // Boxed: the HTTP/1.1 path below, the common one, should not carry (and copy) the size
        // of HTTP/2's state in every request's future.
        return match Box::pin(upstreams.h2.send(worker, cluster_id, addr, request)).await {
            Ok((response, stream)) => {
                Ok((response.map(UpstreamBody::Http2), Upstream::Http2(stream)))
            }
            Err(h2::SendError::Connect(e)) => Err(SendError::Connect(e)),
            Err(h2::SendError::Request(e)) => Err(SendError::Reset(e)),
        };
    }
    let wc = &upstreams.clusters[cluster_id.0];
    let pool = &wc.pool;
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let max = cluster.breakers.max_connections;
    let (parts, body) = request.into_parts();
    let mut outgoing = match body {
        Either::Left(streamed) if !streamed.is_end_stream() => Outgoing::streamed(&parts, streamed),
        Either::Left(_) => Outgoing::kept(&parts, Bytes::new()),
        Either::Right(kept) => {
            let kept = kept.collect().await.map(|b| b.to_bytes());
            Outgoing::kept(&parts, kept.unwrap_or_default())
        }
    };
    let mut sent_again = false;
    loop {
        let connection = match pool.checkout(addr) {
            Some(pooled) => Connection::Pooled(pooled),
            None => match ConnectionSlot::take(&wc.handle, max) {
                Some(slot) => Connection::New(slot),
                None => wait_for_connection(worker, upstreams, cluster_id, addr).await?,
            },
        };
        let (mut conn, idle_for) = match connection {
            Connection::Pooled(pooled) => (pooled.conn, pooled.idle_for),
            Connection::New(slot) => (
                h1::Conn::connect(addr, cluster, worker, cluster_id.0, slot)
                    .await
                    .map_err(SendError::Connect)?,
                None,
            ),
        };
        match conn.send(&mut outgoing).await {
            Ok(head) => {
                let body = h1::Body::new(conn, &head, outgoing);
                let mut response = Response::new(UpstreamBody::Http1(body));
                *response.status_mut() = head.status;
                *response.version_mut() = head.version;
                *response.headers_mut() = head.headers;
                let upstream = Upstream::Http1 {
                    pool: pool.clone(),
                    endpoint: addr,
                };
                return Ok((response, upstream));
            }
            Err(failure) => {
                let again = idle_for.is_some()
                    && !sent_again
                    && !failure.answered
                    && !failure.body_taken
                    && (replayable || !failure.head_sent);
                if !again {
                    return Err(SendError::Http1(failure.error));
                }
                sent_again = true;
                debug!(
                    worker = worker.id,
                    idle_for = ?idle_for.unwrap_or(Duration::ZERO),
                    "pooled upstream connection closed under a request; sending it again: {}",
                    failure.error
                );
                stats.shard.inc(cluster_stats.upstream_rq_retry);
            }
        }
    }
}

/// A connection to send on: a pooled one, or a place for a new one.
enum Connection {
    Pooled(Checkout),
    New(ConnectionSlot),
}

/// At `max_connections`: waits, as a pending request, for a connection of this worker to
/// `addr` to come back to the pool or for a place for a new one. An idle connection of this
/// worker to another endpoint is closed to make that place.
async fn wait_for_connection(
    worker: &WorkerContext,
    upstreams: &Upstreams,
    cluster_id: ClusterId,
    addr: SocketAddr,
) -> Result<Connection, SendError> {
    let cluster = worker.config.cluster(cluster_id);
    let wc = &upstreams.clusters[cluster_id.0];
    let pool = &wc.pool;
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    stats.shard.inc(cluster_stats.upstream_cx_overflow);
    let Some(_pending) = PendingRequest::take(&wc.handle, cluster.breakers.max_pending_requests)
    else {
        stats.shard.inc(cluster_stats.upstream_rq_pending_overflow);
        return Err(SendError::Overflow("max_pending_requests"));
    };
    let _waiting = Waiting::new(pool, addr);
    loop {
        let freed_here = pool.freed.notified();
        let freed_anywhere = wc.handle.cx_freed.notified();
        if let Some(pooled) = pool.checkout(addr) {
            return Ok(Connection::Pooled(pooled));
        }
        if let Some(slot) = ConnectionSlot::take(&wc.handle, cluster.breakers.max_connections) {
            return Ok(Connection::New(slot));
        }
        pool.close_idle_except(addr);
        tokio::select! {
            _ = freed_here => {}
            _ = freed_anywhere => {}
        }
    }
}

/// Counts a request of this worker waiting for a connection to an endpoint, while it waits.
struct Waiting<'a>(&'a ClusterPool, SocketAddr);

impl<'a> Waiting<'a> {
    fn new(pool: &'a ClusterPool, addr: SocketAddr) -> Self {
        pool.wait(addr, true);
        Waiting(pool, addr)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.wait(self.1, false);
    }
}
