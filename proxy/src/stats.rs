//! The proxy's counters, one block per worker so that the request path only touches its own
//! cache lines with relaxed atomics; readers (admin `/stats`) sum the blocks.
//!
//! These live in process memory. The shared-memory region that external tools and the next
//! generation read is the `shm-stats` crate's job; it will take this module's place.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::config::Config;

/// Counters of one listener on one worker.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    pub downstream_cx_total: AtomicU64,
    pub downstream_cx_active: AtomicI64,
    pub downstream_cx_destroy: AtomicU64,
    pub downstream_rq_total: AtomicU64,
    /// Responses by class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub downstream_rq_class: [AtomicU64; 5],
}

/// Counters of one cluster on one worker.
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub upstream_cx_total: AtomicU64,
    pub upstream_cx_active: AtomicI64,
    pub upstream_cx_connect_fail: AtomicU64,
    pub upstream_cx_connect_timeout: AtomicU64,
    pub upstream_rq_total: AtomicU64,
    pub upstream_rq_timeout: AtomicU64,
    pub upstream_rq_reset: AtomicU64,
    /// Requests sent again on a fresh connection because a pooled one closed under them.
    pub upstream_rq_retry: AtomicU64,
}

/// Everything one worker counts. Aligned so that two workers never share a cache line.
#[derive(Debug)]
#[repr(align(128))]
pub struct WorkerCounters {
    pub listeners: Box<[ListenerCounters]>,
    pub clusters: Box<[ClusterCounters]>,
    pub access_log_dropped: AtomicU64,
}

impl WorkerCounters {
    pub fn new(config: &Config) -> Arc<Self> {
        Arc::new(WorkerCounters {
            listeners: config
                .listeners
                .iter()
                .map(|_| Default::default())
                .collect(),
            clusters: config.clusters.iter().map(|_| Default::default()).collect(),
            access_log_dropped: AtomicU64::new(0),
        })
    }
}

/// Adds one to a counter that only this worker writes.
#[inline]
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[inline]
pub fn gauge_add(gauge: &AtomicI64, delta: i64) {
    gauge.fetch_add(delta, Ordering::Relaxed);
}

/// The index of a status code's class in [`ListenerCounters::downstream_rq_class`].
pub fn class_index(status: u16) -> Option<usize> {
    match status {
        100..=599 => Some(usize::from(status / 100 - 1)),
        _ => None,
    }
}

/// Sums every worker's counters into `name: value` lines, as Envoy's plain `/stats`.
pub fn render_plain(config: &Config, workers: &[Arc<WorkerCounters>]) -> String {
    use std::fmt::Write;
    let total = |f: &dyn Fn(&WorkerCounters) -> &AtomicU64| -> u64 {
        workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum()
    };
    let level = |f: &dyn Fn(&WorkerCounters) -> &AtomicI64| -> i64 {
        workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum()
    };
    let mut out = String::new();
    for (i, cluster) in config.clusters.iter().enumerate() {
        let name = &cluster.name;
        let line = |out: &mut String, stat: &str, value: i128| {
            let _ = writeln!(out, "cluster.{name}.{stat}: {value}");
        };
        line(
            &mut out,
            "upstream_cx_active",
            level(&|w| &w.clusters[i].upstream_cx_active).into(),
        );
        for (stat, value) in [
            (
                "upstream_cx_connect_fail",
                total(&|w| &w.clusters[i].upstream_cx_connect_fail),
            ),
            (
                "upstream_cx_connect_timeout",
                total(&|w| &w.clusters[i].upstream_cx_connect_timeout),
            ),
            (
                "upstream_cx_total",
                total(&|w| &w.clusters[i].upstream_cx_total),
            ),
            (
                "upstream_rq_reset",
                total(&|w| &w.clusters[i].upstream_rq_reset),
            ),
            (
                "upstream_rq_retry",
                total(&|w| &w.clusters[i].upstream_rq_retry),
            ),
            (
                "upstream_rq_timeout",
                total(&|w| &w.clusters[i].upstream_rq_timeout),
            ),
            (
                "upstream_rq_total",
                total(&|w| &w.clusters[i].upstream_rq_total),
            ),
        ] {
            line(&mut out, stat, value.into());
        }
    }
    for (i, listener) in config.listeners.iter().enumerate() {
        let name = &listener.name;
        let line = |out: &mut String, stat: &str, value: i128| {
            let _ = writeln!(out, "listener.{name}.{stat}: {value}");
        };
        line(
            &mut out,
            "downstream_cx_active",
            level(&|w| &w.listeners[i].downstream_cx_active).into(),
        );
        line(
            &mut out,
            "downstream_cx_destroy",
            total(&|w| &w.listeners[i].downstream_cx_destroy).into(),
        );
        line(
            &mut out,
            "downstream_cx_total",
            total(&|w| &w.listeners[i].downstream_cx_total).into(),
        );
        for class in 0..5 {
            let value = total(&|w| &w.listeners[i].downstream_rq_class[class]);
            line(
                &mut out,
                &format!("downstream_rq_{}xx", class + 1),
                value.into(),
            );
        }
        line(
            &mut out,
            "downstream_rq_total",
            total(&|w| &w.listeners[i].downstream_rq_total).into(),
        );
    }
    let _ = writeln!(
        out,
        "server.access_log_dropped: {}",
        total(&|w| &w.access_log_dropped)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(class_index(101), Some(0));
        assert_eq!(class_index(200), Some(1));
        assert_eq!(class_index(504), Some(4));
        assert_eq!(class_index(600), None);
        assert_eq!(class_index(99), None);
    }
}
