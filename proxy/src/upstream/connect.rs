//! Opening upstream connections: TCP within the cluster's connect timeout, counted in the
//! thread's stats, and the cluster's `max_connections` (a slot held for a connection's life).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::cluster::ClusterHandle;
use crate::stats::ThreadStats;

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
    stats: &ThreadStats,
    cluster: usize,
) -> Result<TcpStream, ConnectError> {
    let (shard, c) = (&stats.shard, &stats.ids.clusters[cluster]);
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
