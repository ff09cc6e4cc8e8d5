//! The guards that count a request while it holds a place: under the circuit breakers
//! (`max_requests`, `max_pending_requests`, `max_retries` and the retry budget) and on its host.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{ClusterHandle, Host};

/// A request's place under its cluster's `max_requests`, held until its response is done.
pub struct ClusterRequest {
    handle: Arc<ClusterHandle>,
}

impl ClusterRequest {
    pub fn take(handle: &Arc<ClusterHandle>, max: usize) -> Option<ClusterRequest> {
        take_place(&handle.rq_active, max).then(|| ClusterRequest {
            handle: handle.clone(),
        })
    }
}

impl Drop for ClusterRequest {
    fn drop(&mut self) {
        self.handle.rq_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request waiting for a connection (`max_connections` reached), under `max_pending_requests`.
pub struct PendingRequest {
    handle: Arc<ClusterHandle>,
}

impl PendingRequest {
    pub fn take(handle: &Arc<ClusterHandle>, max: usize) -> Option<PendingRequest> {
        take_place(&handle.rq_pending, max).then(|| PendingRequest {
            handle: handle.clone(),
        })
    }
}

impl Drop for PendingRequest {
    fn drop(&mut self) {
        self.handle.rq_pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry in flight, under the retry budget and `max_retries`.
pub struct ActiveRetry {
    handle: Arc<ClusterHandle>,
}

impl ActiveRetry {
    /// Allowed while retries in flight stay under `max_retries` and under the budget: a share
    /// of the requests in flight, but at least `min_concurrency`.
    pub fn take(
        handle: &Arc<ClusterHandle>,
        max_retries: usize,
        budget_percent: f64,
        min_concurrency: u32,
    ) -> Option<ActiveRetry> {
        let requests = handle.rq_active.load(Ordering::Relaxed) as f64;
        let budget = ((requests * budget_percent / 100.0) as usize).max(min_concurrency as usize);
        take_place(&handle.retries_active, max_retries.min(budget)).then(|| ActiveRetry {
            handle: handle.clone(),
        })
    }
}

impl Drop for ActiveRetry {
    fn drop(&mut self) {
        self.handle.retries_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A try in flight to a host (least request, `/clusters`).
pub struct HostRequest {
    host: Arc<Host>,
}

impl HostRequest {
    pub fn new(host: Arc<Host>) -> HostRequest {
        host.rq_active.fetch_add(1, Ordering::Relaxed);
        host.rq_total.fetch_add(1, Ordering::Relaxed);
        HostRequest { host }
    }

    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }
}

impl Drop for HostRequest {
    fn drop(&mut self) {
        self.host.rq_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one more in `counter` if it is under `max`.
fn take_place(counter: &AtomicUsize, max: usize) -> bool {
    if counter.fetch_add(1, Ordering::Relaxed) >= max {
        counter.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}
