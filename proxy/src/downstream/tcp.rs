//! TCP listeners: bytes both ways between the client and one endpoint of the cluster.
//!
//! Half-close is passed on: when one side shuts down its sending half, the other side's
//! sending half is shut down too, and the session lasts until both directions are done. A drain
//! lets sessions run until they end (or until the drain deadline stops the worker). The bytes
//! move by splice(2) (`relay`), and are counted as they go.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use tokio::net::TcpStream;
use tracing::debug;

use crate::cluster::{self, HostRequest, Outcome};
use crate::config::ListenerKind;
use crate::upstream::connect::{ConnectionSlot, connect_tcp};

use super::conn::ConnectionGuard;
use super::relay;

pub async fn serve(guard: ConnectionGuard, downstream: TcpStream, peer: SocketAddr) {
    let worker = guard.worker.clone();
    let listener = &worker.config.listeners[guard.listener];
    let ListenerKind::Tcp {
        cluster: cluster_id,
    } = listener.kind
    else {
        return;
    };
    let cluster = worker.config.cluster(cluster_id);
    let start = Instant::now();
    let wc = &guard.upstreams.clusters[cluster_id.0];
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let listener_stats = &stats.ids.listeners[guard.listener];
    let hash = cluster::request_hash(
        cluster.hash_key.as_ref(),
        &http::HeaderMap::new(),
        peer.ip(),
    );
    let Some(pick) = wc.handle.pick(cluster.lb_policy, &wc.lb, hash, &[]) else {
        stats.shard.inc(cluster_stats.upstream_cx_none_healthy);
        debug!(worker = worker.id, %peer, cluster = %cluster.name, "no healthy upstream; closing");
        return;
    };
    if pick.panic {
        stats.shard.inc(cluster_stats.lb_healthy_panic);
    }
    let addr = pick.host.address;
    let Some(slot) = ConnectionSlot::take(&wc.handle, cluster.breakers.max_connections) else {
        stats.shard.inc(cluster_stats.upstream_cx_overflow);
        debug!(worker = worker.id, %peer, cluster = %cluster.name, "circuit_breakers.max_connections reached; closing");
        return;
    };
    let _host = HostRequest::new(pick.host.clone());
    let (sent, received) = (Cell::new(0u64), Cell::new(0u64));
    let connected = connect_tcp(addr, cluster.connect_timeout, stats, cluster_id.0).await;
    // A session that connects counts as a success for outlier detection; one that cannot, as a
    // local failure (as Envoy's TCP proxy reports them).
    let outcome = match &connected {
        Ok(_) => Outcome::Status(200),
        Err(_) => Outcome::LocalFailure,
    };
    wc.handle
        .report(&pick.host, outcome, cluster.outlier.as_ref());
    let flag = match connected {
        Ok(upstream) => {
            stats.shard.gauge_add(cluster_stats.upstream_cx_active, 1);
            let relayed = relay::relay(
                &downstream,
                &upstream,
                |n| {
                    sent.set(sent.get() + n);
                    stats
                        .shard
                        .add(listener_stats.downstream_cx_rx_bytes_total, n)
                },
                |n| {
                    received.set(received.get() + n);
                    stats
                        .shard
                        .add(listener_stats.downstream_cx_tx_bytes_total, n)
                },
            )
            .await;
            stats.shard.gauge_add(cluster_stats.upstream_cx_active, -1);
            match relayed {
                Ok(()) => "-",
                Err(e) => {
                    debug!(worker = worker.id, %peer, upstream = %addr, "tcp session ended: {e}");
                    "UR"
                }
            }
        }
        Err(e) => {
            debug!(worker = worker.id, %peer, "{e}");
            "UF"
        }
    };
    if let Some(target) = &worker.access_logs[guard.listener] {
        // What was delivered, also for a session that ended in error.
        let (sent, received) = (sent.get(), received.get());
        let line = format!(
            "{} {} {peer} \"TCP\" - {received} {:.3} {addr} {flag} sent={sent}",
            humantime::format_rfc3339_millis(SystemTime::now()),
            listener.name,
            start.elapsed().as_secs_f64(),
        );
        if !target.sender.send(target.file, line) {
            stats.shard.inc(stats.ids.server.access_log_dropped);
        }
    }
    drop(slot);
    drop(guard);
}
