//! The per-connection context the worker builds for each connection it accepts, and the
//! bookkeeping from accept to close.

use std::rc::Rc;

use crate::runtime::context::WorkerContext;
use crate::upstream::state::Upstreams;

/// Counts a downstream connection from accept to close, in the stats and for the drain, and
/// carries what serving it needs: the worker's context and upstreams, and its listener.
pub struct ConnectionGuard {
    pub worker: Rc<WorkerContext>,
    pub upstreams: Rc<Upstreams>,
    pub listener: usize,
    /// Holds a place in the connection limits.
    pub limited: bool,
}

impl ConnectionGuard {
    pub fn new(
        worker: Rc<WorkerContext>,
        upstreams: Rc<Upstreams>,
        listener: usize,
        limited: bool,
    ) -> Self {
        let stats = &worker.stats;
        let ids = &stats.ids.listeners[listener];
        stats.shard.inc(ids.downstream_cx_total);
        stats.shard.gauge_add(ids.downstream_cx_active, 1);
        worker.connections.opened();
        ConnectionGuard {
            worker,
            upstreams,
            listener,
            limited,
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let stats = &self.worker.stats;
        let ids = &stats.ids.listeners[self.listener];
        stats.shard.gauge_add(ids.downstream_cx_active, -1);
        stats.shard.inc(ids.downstream_cx_destroy);
        self.worker.connections.closed();
        if self.limited {
            self.worker.limits.give_back(self.listener);
        }
    }
}
