//! An upgraded connection's tunnel as it waits for its connection and as it ends: the
//! [`Handoff`] where the service leaves it, and its bookkeeping (stats, access log line).

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::cluster::{ClusterRequest, HostRequest};
use crate::runtime::context::WorkerContext;
use crate::upstream::h1::Upgraded;

use super::body::{Flag, LogRecord, format_line};

/// Where the service leaves a tunnel for its connection.
#[derive(Default)]
pub struct Handoff(RefCell<Option<Box<Tunnel>>>);

impl Handoff {
    pub fn put(&self, tunnel: Box<Tunnel>) {
        *self.0.borrow_mut() = Some(tunnel);
    }

    pub fn take(&self) -> Option<Box<Tunnel>> {
        self.0.borrow_mut().take()
    }
}

/// An upgraded connection's upstream side and bookkeeping, from the `101` to the end. Its access
/// log line is written when it is dropped, however it ends (also when the drain deadline stops
/// its worker).
pub struct Tunnel {
    pub(super) worker: Rc<WorkerContext>,
    pub(super) listener: usize,
    pub(super) upstream: Upgraded,
    /// The request's places in its cluster's and host's counts, held until the tunnel ends.
    pub(super) _in_flight: (ClusterRequest, HostRequest),
    pub(super) idle_timeout: Duration,
    /// When the request arrived.
    pub(super) started: Instant,
    pub(super) log: Option<Box<LogRecord>>,
    /// Bytes passed on after the `101`.
    pub(super) to_client: Cell<u64>,
    pub(super) from_client: Cell<u64>,
    pub(super) flag: Flag,
    /// Counted in `downstream_cx_upgrades_active`.
    pub(super) active: bool,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let stats = &self.worker.stats;
        let ids = &stats.ids.listeners[self.listener];
        if self.active {
            stats.shard.gauge_add(ids.downstream_cx_upgrades_active, -1);
        }
        let Some(mut log) = self.log.take() else {
            return;
        };
        let Some(target) = &self.worker.access_logs[self.listener] else {
            return;
        };
        log.flag = match self.flag {
            Flag::None if self.worker.stopping.get() => Flag::ProxyClosed,
            flag => flag,
        };
        let mut line = format_line(
            &self.worker.config.listeners[self.listener].name,
            &log,
            StatusCode::SWITCHING_PROTOCOLS.as_u16(),
            self.to_client.get(),
            self.started.elapsed().as_secs_f64(),
        );
        let _ = write!(line, " sent={}", self.from_client.get());
        if !target.sender.send(target.file, line) {
            stats.shard.inc(stats.ids.server.access_log_dropped);
        }
    }
}
