//! The cluster manager: who each cluster's endpoints are, which of them may take requests, and
//! how requests are spread over them.
//!
//! The [`manager`] runs on the main thread. It owns every cluster's membership and health
//! (discovery, active health checks, outlier ejections); when any of it changes it builds a new
//! immutable [`Snapshot`] and publishes it in the cluster's [`ClusterHandle`] (an `ArcSwap`).
//! Workers read the current snapshot with no lock (read-copy-update: a request holds the
//! snapshot it started with, and a newer one replaces it for the next request, never half-way).
//! What is per worker stays in the worker: connection pools, round-robin cursors, least-request
//! credits. What must be counted over all workers is in atomics: a host's active requests (least
//! request, `/clusters`), a cluster's circuit-breaker counts, a host's consecutive failures
//! (outlier detection, which tells the manager through a channel when a threshold is crossed).

mod guards;
mod handle;
pub mod health;
pub mod manager;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::config::Cluster;
use crate::lb::{self, Table};

pub use guards::{ActiveRetry, ClusterRequest, HostRequest, PendingRequest};
pub use handle::{ClusterHandle, Outcome, WorkerLb, request_hash};

/// An endpoint of a cluster. The same `Host` stays in every snapshot for as long as the
/// endpoint is a member, so its counters carry over.
#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    pub weight: u32,
    /// Requests in flight to it, over all workers.
    pub rq_active: AtomicU32,
    pub rq_total: AtomicU64,
    /// Answers of 5xx and requests that got none (connect failure, reset, timeout).
    pub rq_error: AtomicU64,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
}

impl Host {
    pub fn new(address: SocketAddr, weight: u32) -> Host {
        Host {
            address,
            weight,
            rq_active: AtomicU32::new(0),
            rq_total: AtomicU64::new(0),
            rq_error: AtomicU64::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
        }
    }

    /// Starts counting again (an ejection ended).
    fn reset_failures(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
    }
}

/// Why a host is not taking requests (or is about to stop), as `/clusters` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthFlags {
    /// Active health checking says unhealthy.
    pub failed_active_hc: bool,
    /// Not checked yet (taken as healthy until the first answer).
    pub pending_active_hc: bool,
    /// Ejected by outlier detection.
    pub ejected: bool,
    /// Discovery dropped it; health checking keeps it until it fails.
    pub pending_removal: bool,
}

impl HealthFlags {
    pub fn healthy(self) -> bool {
        !self.failed_active_hc && !self.ejected
    }

    /// Envoy's `health_flags` words.
    pub fn describe(self) -> String {
        let mut words = Vec::new();
        if self.failed_active_hc {
            words.push("/failed_active_hc");
        }
        if self.pending_active_hc {
            words.push("/pending_active_hc");
        }
        if self.ejected {
            words.push("/failed_outlier_check");
        }
        if self.pending_removal {
            words.push("/pending_dynamic_removal");
        }
        if words.is_empty() {
            "healthy".to_owned()
        } else {
            words.concat()
        }
    }
}

/// A cluster as the workers see it at one moment. Never changed once published.
#[derive(Debug)]
pub struct Snapshot {
    /// Counts the snapshots of this cluster.
    pub version: u64,
    /// Every member, with its health.
    pub hosts: Vec<(Arc<Host>, HealthFlags)>,
    /// Those that take requests: the healthy ones, or all in panic mode.
    pub targets: Vec<Arc<Host>>,
    /// Too few hosts are healthy (below `panic_threshold`): requests go to all of them.
    pub panic: bool,
    /// The balancer's table over `targets`.
    pub table: Table,
    /// Every target has the same weight (least request then draws two and takes the less busy).
    pub equal_weights: bool,
}

impl Snapshot {
    /// Builds the snapshot for `hosts` under `cluster`'s balancing and panic rules.
    pub fn build(cluster: &Cluster, version: u64, hosts: Vec<(Arc<Host>, HealthFlags)>) -> Self {
        let healthy: Vec<Arc<Host>> = hosts
            .iter()
            .filter(|(_, f)| f.healthy())
            .map(|(h, _)| h.clone())
            .collect();
        let share = if hosts.is_empty() {
            100.0
        } else {
            100.0 * healthy.len() as f64 / hosts.len() as f64
        };
        let panic = !hosts.is_empty() && share < cluster.panic_threshold;
        let targets = if panic {
            hosts.iter().map(|(h, _)| h.clone()).collect()
        } else {
            healthy
        };
        let members: Vec<lb::Member> = targets
            .iter()
            .map(|h| lb::Member {
                address: h.address,
                weight: h.weight,
            })
            .collect();
        Snapshot {
            version,
            table: Table::build(cluster.lb_policy, &members),
            equal_weights: members
                .windows(2)
                .all(|m| m[0].weight.max(1) == m[1].weight.max(1)),
            hosts,
            targets,
            panic,
        }
    }
}

/// What the manager hears from workers and from its own tasks.
#[derive(Debug)]
pub enum Event {
    /// A host crossed an outlier-detection threshold.
    Outlier { cluster: usize, host: Arc<Host> },
    /// An active health check ended.
    Checked {
        cluster: usize,
        address: SocketAddr,
        /// Why it failed; `None`: it passed.
        failure: Option<String>,
        /// Failed for want of an answer in time.
        timed_out: bool,
    },
    /// An ejection has run its time.
    Uneject {
        cluster: usize,
        address: SocketAddr,
        ejection: u32,
    },
    /// A `strict_dns` resolution ended: every name's addresses (a name that failed keeps its
    /// last answer), and what failed, if anything.
    Resolved {
        cluster: usize,
        addresses: Vec<(SocketAddr, u32)>,
        failure: Option<String>,
    },
}
