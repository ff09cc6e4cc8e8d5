//! One worker's upstream side: per cluster its pool and balancer state, and its HTTP/2
//! connections. Owned by the worker (an `Rc`), lent to the connections it serves.

use std::rc::Rc;
use std::sync::Arc;

use crate::cluster::{ClusterHandle, WorkerLb};
use crate::config::Config;

use super::h2;
use super::pool::ClusterPool;

/// A cluster as one worker uses it: the shared snapshot, and this worker's own pool and
/// balancer state (round-robin position, least-request credits).
pub struct WorkerCluster {
    pub handle: Arc<ClusterHandle>,
    pub pool: Rc<ClusterPool>,
    pub lb: WorkerLb,
}

/// What one worker holds of its upstreams.
pub struct Upstreams {
    /// One per cluster of the config.
    pub clusters: Vec<WorkerCluster>,
    /// Connections to the endpoints of `protocol = "http2"` clusters.
    pub h2: h2::Pool,
}

impl Upstreams {
    /// Worker `worker`'s pools and balancers for `config`'s clusters, whose shared handles are
    /// `handles` (one per cluster, in order).
    pub fn new(config: &Config, worker: usize, handles: Vec<Arc<ClusterHandle>>) -> Self {
        Upstreams {
            clusters: config
                .clusters
                .iter()
                .zip(handles)
                .map(|(c, handle)| WorkerCluster {
                    pool: Rc::new(ClusterPool::new(c, handle.clone())),
                    handle,
                    // Spread the workers' round-robin positions.
                    lb: WorkerLb::starting_at(worker.wrapping_mul(7919)),
                })
                .collect(),
            h2: h2::Pool::default(),
        }
    }

    /// Closes connections idle past their cluster's timeout.
    pub fn sweep(&self, config: &Config) {
        for cluster in &self.clusters {
            cluster.pool.sweep();
        }
        self.h2.sweep(config);
    }
}
