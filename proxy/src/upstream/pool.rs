//! Each worker's pool of idle HTTP/1.1 connections per endpoint of a cluster (spoken by `h1`).
//!
//! A pool belongs to one worker and is only touched from its thread, so it is a `RefCell`, not a
//! lock. Connections are taken most-recently-used first, which keeps a small hot set warm and lets
//! the rest reach their idle timeout and close.

use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::cluster::ClusterHandle;
use crate::config::Cluster;

use super::h1::Conn;

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
