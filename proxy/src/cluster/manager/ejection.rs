//! The manager's health bookkeeping: the results of active health checks, outlier ejections
//! (within `max_ejection_percent`, each longer than the last) and their end.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{info, warn};

use super::Manager;
use crate::cluster::{Event, Host};

impl Manager {
    /// Whether `address` is where a listener of this generation listens.
    fn own(&self, address: SocketAddr) -> bool {
        self.config
            .listeners
            .iter()
            .filter_map(|l| l.address)
            .any(|l| {
                l.port() == address.port()
                    && (l.ip() == address.ip()
                        || (l.ip().is_unspecified() && address.ip().is_loopback()))
            })
    }

    pub(super) fn checked(
        &self,
        cluster: usize,
        address: SocketAddr,
        failure: Option<String>,
        timed_out: bool,
    ) {
        let passed = failure.is_none();
        let config = &self.config.clusters[cluster];
        let Some(check) = &config.health_check else {
            return;
        };
        let ids = &self.stats.ids.clusters[cluster];
        let shard = &self.stats.shard;
        shard.inc(ids.health_check_attempt);
        shard.inc(if passed {
            ids.health_check_success
        } else {
            ids.health_check_failure
        });
        let mut states = self.state.borrow_mut();
        let members = &mut states[cluster].members;
        let Some(i) = members.iter().position(|m| m.host.address == address) else {
            return;
        };
        let m = &mut members[i];
        let before = m.flags;
        if m.flags.pending_active_hc && timed_out && m.fails == 0 && self.own(address) {
            // An endpoint that is a listener of this very generation cannot answer its first
            // check, which runs before the workers do: that decides nothing; the next check
            // will. (Any other endpoint without an answer is down, as the old generation knew.)
            m.fails = 1;
            return;
        }
        if let Some(why) = &failure {
            m.last_failure = Some(why.clone());
        }
        if passed {
            m.fails = 0;
            m.passes = m.passes.saturating_add(1);
            if m.flags.ejected {
                // A passed active check ends an ejection (Envoy's
                // successful_active_health_check_uneject_host).
                m.flags.ejected = false;
                m.unejected = Some(std::time::Instant::now());
                m.host.reset_failures();
            }
            if m.flags.pending_active_hc || m.passes >= check.healthy_threshold {
                m.flags.failed_active_hc = false;
            }
        } else {
            m.passes = 0;
            m.fails = m.fails.saturating_add(1);
            if m.flags.pending_active_hc || m.fails >= check.unhealthy_threshold {
                m.flags.failed_active_hc = true;
            }
        }
        m.flags.pending_active_hc = false;
        if m.flags.failed_active_hc != before.failed_active_hc {
            let name = &config.name;
            if m.flags.failed_active_hc {
                let why = failure.as_deref().unwrap_or("-");
                warn!(cluster = %name, upstream = %address, "endpoint is unhealthy (active health check): {why}");
            } else if !before.pending_active_hc {
                info!(cluster = %name, upstream = %address, "endpoint is healthy again (active health check)");
            }
        }
        let remove = m.flags.pending_removal && m.flags.failed_active_hc;
        let changed = remove || m.flags != before;
        if remove {
            info!(cluster = %config.name, upstream = %address, "endpoint left DNS and failed its health check: removed");
            members.remove(i);
        }
        drop(states);
        if changed {
            self.state.borrow_mut()[cluster].dirty = true;
        }
    }

    pub(super) fn outlier(&self, cluster: usize, host: &Arc<Host>) {
        let config = &self.config.clusters[cluster];
        let Some(outlier) = &config.outlier else {
            return;
        };
        let ids = &self.stats.ids.clusters[cluster];
        let mut states = self.state.borrow_mut();
        let members = &mut states[cluster].members;
        let ejected = members.iter().filter(|m| m.flags.ejected).count();
        let total = members.len();
        let Some(m) = members.iter_mut().find(|m| Arc::ptr_eq(&m.host, host)) else {
            return;
        };
        // Whatever comes of it, the run is counted from zero again: the next threshold crossing
        // is a new event (the detectors fire on reaching the threshold, not past it).
        m.host.reset_failures();
        if m.flags.ejected {
            return;
        }
        // At least one host may always be ejected; more only within the cap.
        let allowed = ejected == 0
            || ((ejected + 1) as f64) * 100.0 <= outlier.max_ejection_percent * total as f64;
        if !allowed {
            self.stats.shard.inc(ids.outlier_ejections_overflow);
            warn!(cluster = %config.name, upstream = %host.address, ejected, "outlier detection would eject this endpoint, but max_ejection_percent is reached");
            return;
        }
        if let Some(since) = m.unejected {
            let served = since.elapsed().as_nanos() / outlier.base_ejection_time.as_nanos().max(1);
            m.ejections = m
                .ejections
                .saturating_sub(u32::try_from(served).unwrap_or(u32::MAX));
        }
        m.ejections = m.ejections.saturating_add(1);
        m.flags.ejected = true;
        let ejection = m.ejections;
        let time = outlier
            .base_ejection_time
            .saturating_mul(ejection)
            .min(outlier.max_ejection_time);
        warn!(cluster = %config.name, upstream = %host.address, ejection_time = ?time, ejections = ejection, "endpoint ejected by outlier detection");
        self.stats.shard.inc(ids.outlier_ejections_total);
        let events = self.events.clone();
        let address = host.address;
        tokio::task::spawn_local(async move {
            tokio::time::sleep(time).await;
            let _ = events.send(Event::Uneject {
                cluster,
                address,
                ejection,
            });
        });
        drop(states);
        self.state.borrow_mut()[cluster].dirty = true;
    }

    /// An ejection has run its time: the endpoint takes requests again if that ejection (the
    /// `ejection`th) is still the one that holds it.
    pub(super) fn uneject(&self, cluster: usize, address: SocketAddr, ejection: u32) {
        let mut states = self.state.borrow_mut();
        let changed = match states[cluster]
            .members
            .iter_mut()
            .find(|m| m.host.address == address)
        {
            Some(m) if m.flags.ejected && m.ejections == ejection => {
                m.flags.ejected = false;
                m.unejected = Some(std::time::Instant::now());
                m.host.reset_failures();
                info!(cluster = %self.config.clusters[cluster].name, upstream = %address, "outlier ejection ended");
                true
            }
            _ => false,
        };
        drop(states);
        if changed {
            self.state.borrow_mut()[cluster].dirty = true;
        }
    }
}
