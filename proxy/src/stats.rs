//! The proxy's stats, in the shared-memory region of `shm-stats`: the names an Envoy user
//! expects, registered once per generation, and written by each worker into its own shard.

use std::sync::Arc;

use shm_stats::{Counter, Gauge, Histogram, Merge, Region, Shard, Spec, StatsError, Unit};

use crate::config::Config;

/// Stats of one listener.
pub struct ListenerStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub downstream_rq_total: Counter,
    /// Responses by class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub downstream_rq_class: [Counter; 5],
    pub downstream_rq_time: Histogram,
    /// Connections closed because the listener's `max_connections` was reached.
    pub downstream_cx_overflow: Counter,
    /// Connections closed because the generation's `max_connections` was reached.
    pub downstream_global_cx_overflow: Counter,
    /// Connections closed after `idle_timeout` without a request.
    pub downstream_cx_idle_timeout: Counter,
    /// Connections cut off by `request_header_timeout` (408 when part of a request came).
    pub downstream_rq_header_timeout: Counter,
    /// Requests whose line and headers were over the size or count limit (431).
    pub downstream_rq_headers_too_large: Counter,
    /// Requests whose body was over `max_request_body` (413).
    pub downstream_rq_too_large: Counter,
    /// Requests refused (429) by a route's rate limit.
    pub downstream_rq_rate_limited: Counter,
    /// Connections that switched protocols (a `101`) and became tunnels.
    pub downstream_cx_upgrades_total: Counter,
    /// Tunnels open.
    pub downstream_cx_upgrades_active: Gauge,
    /// Tunnels closed after their idle timeout without a byte either way.
    pub downstream_cx_upgrades_idle_timeout: Counter,
}

/// Stats of one cluster.
pub struct ClusterStats {
    pub upstream_cx_total: Counter,
    pub upstream_cx_active: Gauge,
    pub upstream_cx_connect_fail: Counter,
    pub upstream_cx_connect_timeout: Counter,
    pub upstream_rq_total: Counter,
    pub upstream_rq_timeout: Counter,
    pub upstream_rq_reset: Counter,
    pub upstream_rq_retry: Counter,
    /// Upstream answers by class: 1xx, 2xx, 3xx, 4xx, 5xx (each try counts).
    pub upstream_rq_class: [Counter; 5],
    pub upstream_rq_time: Histogram,
    pub upstream_rq_retry_success: Counter,
    pub upstream_rq_retry_overflow: Counter,
    pub upstream_rq_per_try_timeout: Counter,
    pub upstream_cx_overflow: Counter,
    pub upstream_rq_pending_overflow: Counter,
    pub upstream_rq_overflow: Counter,
    pub upstream_cx_none_healthy: Counter,
    pub upstream_rq_mirror: Counter,
    pub lb_healthy_panic: Counter,
    pub outlier_ejections_total: Counter,
    pub outlier_ejections_overflow: Counter,
    pub health_check_attempt: Counter,
    pub health_check_success: Counter,
    pub health_check_failure: Counter,
    pub update_attempt: Counter,
    pub update_success: Counter,
    pub update_failure: Counter,
    pub membership_total: Gauge,
    pub membership_healthy: Gauge,
    pub outlier_ejections_active: Gauge,
}

/// Stats of the whole generation, written by its main thread.
pub struct ServerStats {
    pub uptime: Gauge,
    pub epoch: Gauge,
    pub live: Gauge,
    pub concurrency: Gauge,
    pub access_log_dropped: Counter,
    pub watchdog_miss: Counter,
    pub watchdog_mega_miss: Counter,
}

/// Every stat of a generation; shared by all its threads.
pub struct StatIds {
    pub listeners: Vec<ListenerStats>,
    pub clusters: Vec<ClusterStats>,
    pub server: ServerStats,
}

/// A thread's shard and the ids to write with.
pub struct ThreadStats {
    pub shard: Shard,
    pub ids: Arc<StatIds>,
}

impl StatIds {
    /// Registers (or finds, when an earlier generation registered them) every stat `config` needs.
    pub fn register(region: &Region, config: &Config) -> Result<StatIds, StatsError> {
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let tags = [("listener", l.name.as_str())];
                let counter = |name, help| region.counter(Spec::new(name, &tags, help));
                let class = |class: &str| {
                    let name = format!("downstream_rq_{class}");
                    region.counter(Spec::new(
                        &name,
                        &[("listener", l.name.as_str()), ("code_class", class)],
                        "Responses by status class.",
                    ))
                };
                Ok(ListenerStats {
                    downstream_cx_total: counter("downstream_cx_total", "Connections accepted.")?,
                    downstream_cx_active: region.gauge(Spec::new(
                        "downstream_cx_active",
                        &tags,
                        "Connections open.",
                    ))?,
                    downstream_cx_destroy: counter("downstream_cx_destroy", "Connections closed.")?,
                    downstream_cx_rx_bytes_total: region.counter(
                        Spec::new(
                            "downstream_cx_rx_bytes_total",
                            &tags,
                            "Bytes received from clients.",
                        )
                        .unit(Unit::Bytes),
                    )?,
                    downstream_cx_tx_bytes_total: region.counter(
                        Spec::new(
                            "downstream_cx_tx_bytes_total",
                            &tags,
                            "Bytes sent to clients.",
                        )
                        .unit(Unit::Bytes),
                    )?,
                    downstream_rq_total: counter("downstream_rq_total", "Requests received.")?,
                    downstream_rq_class: [
                        class("1xx")?,
                        class("2xx")?,
                        class("3xx")?,
                        class("4xx")?,
                        class("5xx")?,
                    ],
                    downstream_rq_time: region.histogram(
                        Spec::new(
                            "downstream_rq_time",
                            &tags,
                            "Time from a request's arrival to the end of its response.",
                        )
                        .unit(Unit::Microseconds),
                    )?,
                    downstream_cx_overflow: counter(
                        "downstream_cx_overflow",
                        "Connections closed at once: the listener's max_connections was reached.",
                    )?,
                    downstream_global_cx_overflow: counter(
                        "downstream_global_cx_overflow",
                        "Connections closed at once: the generation's max_connections was reached.",
                    )?,
                    downstream_cx_idle_timeout: counter(
                        "downstream_cx_idle_timeout",
                        "Connections closed after idle_timeout without a request.",
                    )?,
                    downstream_rq_header_timeout: counter(
                        "downstream_rq_header_timeout",
                        "Connections cut at request_header_timeout: headers came too slowly (answered 408) or not at all.",
                    )?,
                    downstream_rq_headers_too_large: counter(
                        "downstream_rq_headers_too_large",
                        "Requests refused (431) for headers over max_request_header_size or max_request_headers.",
                    )?,
                    downstream_rq_too_large: counter(
                        "downstream_rq_too_large",
                        "Requests refused (413) for a body over max_request_body.",
                    )?,
                    downstream_rq_rate_limited: counter(
                        "downstream_rq_rate_limited",
                        "Requests refused (429) by a route's rate_limit.",
                    )?,
                    downstream_cx_upgrades_total: counter(
                        "downstream_cx_upgrades_total",
                        "Connections upgraded (101 Switching Protocols, a WebSocket) into tunnels.",
                    )?,
                    downstream_cx_upgrades_active: region.gauge(Spec::new(
                        "downstream_cx_upgrades_active",
                        &tags,
                        "Tunnels of upgraded connections open.",
                    ))?,
                    downstream_cx_upgrades_idle_timeout: counter(
                        "downstream_cx_upgrades_idle_timeout",
                        "Tunnels closed after the route's upgrade_idle_timeout without a byte either way.",
                    )?,
                })
            })
            .collect::<Result<Vec<_>, StatsError>>()?;
        let clusters = config
            .clusters
            .iter()
            .map(|c| {
                let tags = [("cluster", c.name.as_str())];
                let counter = |name, help| region.counter(Spec::new(name, &tags, help));
                let class = |class: &str| {
                    let name = format!("upstream_rq_{class}");
                    region.counter(Spec::new(
                        &name,
                        &[("cluster", c.name.as_str()), ("code_class", class)],
                        "Upstream answers by status class (each try).",
                    ))
                };
                Ok(ClusterStats {
                    upstream_rq_class: [
                        class("1xx")?,
                        class("2xx")?,
                        class("3xx")?,
                        class("4xx")?,
                        class("5xx")?,
                    ],
                    upstream_cx_total: counter(
                        "upstream_cx_total",
                        "Upstream connections opened.",
                    )?,
                    upstream_cx_active: region.gauge(Spec::new(
                        "upstream_cx_active",
                        &tags,
                        "Upstream connections open.",
                    ))?,
                    upstream_cx_connect_fail: counter(
                        "upstream_cx_connect_fail",
                        "Upstream connections that failed to open.",
                    )?,
                    upstream_cx_connect_timeout: counter(
                        "upstream_cx_connect_timeout",
                        "Upstream connections that timed out opening.",
                    )?,
                    upstream_rq_total: counter("upstream_rq_total", "Requests sent upstream (each try, and each mirrored copy).")?,
                    upstream_rq_timeout: counter(
                        "upstream_rq_timeout",
                        "Requests whose upstream answered too late.",
                    )?,
                    upstream_rq_reset: counter(
                        "upstream_rq_reset",
                        "Requests whose upstream connection broke.",
                    )?,
                    upstream_rq_retry: counter(
                        "upstream_rq_retry",
                        "Requests sent again: by a route's retry policy, or after a pooled connection closed under them.",
                    )?,
                    upstream_rq_time: region.histogram(
                        Spec::new(
                            "upstream_rq_time",
                            &tags,
                            "Time from sending a request upstream to the end of its response.",
                        )
                        .unit(Unit::Microseconds),
                    )?,
                    upstream_rq_retry_success: counter(
                        "upstream_rq_retry_success",
                        "Requests that succeeded on a retry.",
                    )?,
                    upstream_rq_retry_overflow: counter(
                        "upstream_rq_retry_overflow",
                        "Retries not made: the retry budget or circuit_breakers.max_retries was reached.",
                    )?,
                    upstream_rq_per_try_timeout: counter(
                        "upstream_rq_per_try_timeout",
                        "Tries that ran past the route's per_try_timeout.",
                    )?,
                    upstream_cx_overflow: counter(
                        "upstream_cx_overflow",
                        "Times a connection could not be opened: circuit_breakers.max_connections was reached.",
                    )?,
                    upstream_rq_pending_overflow: counter(
                        "upstream_rq_pending_overflow",
                        "Requests answered 503: circuit_breakers.max_pending_requests was reached.",
                    )?,
                    upstream_rq_overflow: counter(
                        "upstream_rq_overflow",
                        "Requests answered 503: circuit_breakers.max_requests was reached.",
                    )?,
                    upstream_cx_none_healthy: counter(
                        "upstream_cx_none_healthy",
                        "Requests answered 503: the cluster had no endpoint to send them to.",
                    )?,
                    upstream_rq_mirror: counter(
                        "upstream_rq_mirror",
                        "Requests copied to this cluster by a route's mirror.",
                    )?,
                    lb_healthy_panic: counter(
                        "lb_healthy_panic",
                        "Requests balanced over all endpoints because too few were healthy (panic_threshold).",
                    )?,
                    outlier_ejections_total: counter(
                        "outlier_ejections_total",
                        "Endpoints ejected by outlier detection.",
                    )?,
                    outlier_ejections_overflow: counter(
                        "outlier_ejections_overflow",
                        "Ejections not made: max_ejection_percent was reached.",
                    )?,
                    health_check_attempt: counter(
                        "health_check_attempt",
                        "Active health checks made.",
                    )?,
                    health_check_success: counter(
                        "health_check_success",
                        "Active health checks passed.",
                    )?,
                    health_check_failure: counter(
                        "health_check_failure",
                        "Active health checks failed.",
                    )?,
                    update_attempt: counter(
                        "update_attempt",
                        "DNS resolutions of a strict_dns cluster.",
                    )?,
                    update_success: counter(
                        "update_success",
                        "DNS resolutions that answered.",
                    )?,
                    update_failure: counter(
                        "update_failure",
                        "DNS resolutions that failed (the last answer was kept).",
                    )?,
                    membership_total: region.gauge(
                        Spec::new("membership_total", &tags, "Endpoints in the cluster.").merge(Merge::Max),
                    )?,
                    membership_healthy: region.gauge(
                        Spec::new("membership_healthy", &tags, "Endpoints taking requests (not failing health checks, not ejected).").merge(Merge::Max),
                    )?,
                    outlier_ejections_active: region.gauge(
                        Spec::new("outlier_ejections_active", &tags, "Endpoints ejected now.").merge(Merge::Max),
                    )?,
                })
            })
            .collect::<Result<Vec<_>, StatsError>>()?;
        let server = ServerStats {
            uptime: region.gauge(
                Spec::new(
                    "server.uptime",
                    &[],
                    "Seconds since the oldest live generation started.",
                )
                .unit(Unit::Seconds)
                .merge(Merge::Max),
            )?,
            epoch: region.gauge(
                Spec::new("server.epoch", &[], "The newest live generation's epoch.")
                    .merge(Merge::Max),
            )?,
            live: region.gauge(Spec::new(
                "server.live",
                &[],
                "Generations accepting connections (1 in normal operation).",
            ))?,
            concurrency: region.gauge(Spec::new(
                "server.concurrency",
                &[],
                "Worker threads of the live generations.",
            ))?,
            access_log_dropped: region.counter(Spec::new(
                "server.access_log_dropped",
                &[],
                "Access log lines dropped because the disk fell behind.",
            ))?,
            watchdog_miss: region.counter(Spec::new(
                "server.watchdog_miss",
                &[],
                "Times a worker's event loop stalled past guard_dog.miss_timeout.",
            ))?,
            watchdog_mega_miss: region.counter(Spec::new(
                "server.watchdog_mega_miss",
                &[],
                "Times a worker's event loop stalled past guard_dog.mega_miss_timeout.",
            ))?,
        };
        Ok(StatIds {
            listeners,
            clusters,
            server,
        })
    }
}

/// The index of a status code's class in [`ListenerStats::downstream_rq_class`].
pub fn class_index(status: u16) -> Option<usize> {
    match status {
        100..=599 => Some(usize::from(status / 100 - 1)),
        _ => None,
    }
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
