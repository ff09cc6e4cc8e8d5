//! The main thread's side of the cluster manager: membership, health, ejections, and the
//! snapshots it publishes.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{ClusterHandle, Event, HealthFlags, Host, Snapshot, health};
use crate::config::{Cluster, Config, Discovery, LookupFamily, UpstreamProtocol};
use crate::dns::{DnsError, Resolver};
use crate::stats::ThreadStats;

/// The longest a new generation waits for its first health checks and DNS answers.
const MAX_WARM: Duration = Duration::from_secs(10);

/// How long a DNS question may take.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);

/// A member of a cluster, as the manager keeps it.
struct Member {
    host: Arc<Host>,
    flags: HealthFlags,
    /// Health-check passes and failures in a row.
    passes: u32,
    fails: u32,
    /// Times ejected: the next ejection lasts this many base times (plus one); one is
    /// forgiven for every `base_ejection_time` spent in service since the last ejection.
    ejections: u32,
    /// When the last ejection ended.
    unejected: Option<std::time::Instant>,
    /// Why the last failed health check failed.
    last_failure: Option<String>,
    checker: Option<JoinHandle<()>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(checker) = self.checker.take() {
            checker.abort();
        }
    }
}

struct ClusterState {
    members: Vec<Member>,
    version: u64,
    /// Changed since the last snapshot.
    dirty: bool,
    /// A `strict_dns` cluster has had its first answer (or failure).
    resolved: bool,
    resolver_task: Option<JoinHandle<()>>,
}

pub struct Manager {
    config: Arc<Config>,
    handles: Vec<Arc<ClusterHandle>>,
    state: RefCell<Vec<ClusterState>>,
    stats: Rc<ThreadStats>,
    events: mpsc::UnboundedSender<Event>,
    /// Fires when something that [`Manager::warmed`] waits for happened.
    progress: tokio::sync::Notify,
    task: RefCell<Option<JoinHandle<()>>>,
}

impl Manager {
    /// Builds every cluster's first snapshot and starts the health checks and DNS resolutions.
    /// Must run inside the main thread's `LocalSet`.
    pub fn start(config: Arc<Config>, stats: Rc<ThreadStats>) -> Rc<Manager> {
        let (events, mut rx) = mpsc::unbounded_channel();
        let mut states = Vec::with_capacity(config.clusters.len());
        let mut handles = Vec::with_capacity(config.clusters.len());
        for (index, cluster) in config.clusters.iter().enumerate() {
            let members: Vec<Member> = cluster
                .endpoints
                .iter()
                .map(|e| new_member(index, cluster, e.address, e.weight, &events))
                .collect();
            let snapshot = Snapshot::build(cluster, 0, flags_of(&members));
            handles.push(Arc::new(ClusterHandle::new(
                index,
                snapshot,
                events.clone(),
            )));
            let resolver_task = match &cluster.discovery {
                Discovery::Static => None,
                Discovery::StrictDns {
                    names,
                    refresh,
                    resolvers,
                    family,
                } => Some(tokio::task::spawn_local(resolve_forever(
                    index,
                    cluster.name.clone(),
                    names.clone(),
                    *refresh,
                    (resolvers.clone(), *family),
                    events.clone(),
                ))),
            };
            states.push(ClusterState {
                members,
                version: 0,
                dirty: false,
                resolved: matches!(cluster.discovery, Discovery::Static),
                resolver_task,
            });
        }
        let manager = Rc::new(Manager {
            config,
            handles,
            state: RefCell::new(states),
            stats,
            events,
            progress: tokio::sync::Notify::new(),
            task: RefCell::new(None),
        });
        for index in 0..manager.handles.len() {
            manager.count_membership(index);
        }
        let m = manager.clone();
        let task = tokio::task::spawn_local(async move {
            while let Some(event) = rx.recv().await {
                // Everything that is already waiting goes into one snapshot per cluster: when
                // many endpoints fail at once, the tables are built once, not once per endpoint.
                m.handle(event);
                while let Ok(event) = rx.try_recv() {
                    m.handle(event);
                }
                m.publish_dirty();
                m.progress.notify_waiters();
            }
        });
        *manager.task.borrow_mut() = Some(task);
        manager
    }

    /// The clusters, in config order, for the workers.
    pub fn handles(&self) -> Vec<Arc<ClusterHandle>> {
        self.handles.clone()
    }

    /// Waits until every health-checked endpoint has had its first check and every
    /// `strict_dns` cluster its first answer, or `limit` has passed: a new generation starts
    /// serving with what it knows, not with guesses.
    pub async fn warmed(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let progress = self.progress.notified();
            if self.is_warm() {
                return;
            }
            if tokio::time::timeout_at(deadline, progress).await.is_err() {
                return;
            }
        }
    }

    fn is_warm(&self) -> bool {
        self.state.borrow().iter().all(|c| {
            c.resolved
                && c.members
                    .iter()
                    .all(|m| !(m.flags.pending_active_hc && m.fails == 0))
        })
    }

    /// How long [`Manager::warmed`] should wait at most: the slowest first check or resolution.
    pub fn warm_limit(&self) -> Duration {
        self.config
            .clusters
            .iter()
            .map(|c| {
                let hc = c
                    .health_check
                    .as_ref()
                    .map_or(Duration::ZERO, |h| h.timeout);
                let dns = match c.discovery {
                    Discovery::StrictDns { .. } => DNS_TIMEOUT,
                    Discovery::Static => Duration::ZERO,
                };
                // A strict_dns cluster's endpoints are checked once they are known.
                hc + dns
            })
            .max()
            .unwrap_or(Duration::ZERO)
            .saturating_add(Duration::from_millis(100))
            // Well within the supervisor's readiness timeout (30 s by default).
            .min(MAX_WARM)
    }

    /// Stops every task of the manager.
    pub fn stop(&self) {
        if let Some(task) = self.task.borrow_mut().take() {
            task.abort();
        }
        for state in self.state.borrow_mut().iter_mut() {
            if let Some(t) = state.resolver_task.take() {
                t.abort();
            }
            state.members.clear();
        }
    }

    fn handle(&self, event: Event) {
        match event {
            Event::Checked {
                cluster,
                address,
                failure,
                timed_out,
            } => self.checked(cluster, address, failure, timed_out),
            Event::Outlier { cluster, host } => self.outlier(cluster, &host),
            Event::Uneject {
                cluster,
                address,
                ejection,
            } => {
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
            Event::Resolved {
                cluster,
                addresses,
                failure,
            } => self.resolved(cluster, addresses, failure),
        }
    }

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

    /// Why each endpoint of `cluster` last failed its health check, for `/clusters`.
    pub fn last_failures(&self, cluster: usize) -> Vec<(SocketAddr, String)> {
        self.state.borrow()[cluster]
            .members
            .iter()
            .filter_map(|m| Some((m.host.address, m.last_failure.clone()?)))
            .collect()
    }

    fn checked(
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

    fn outlier(&self, cluster: usize, host: &Arc<Host>) {
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

    fn resolved(&self, cluster: usize, addresses: Vec<(SocketAddr, u32)>, failure: Option<String>) {
        let config = &self.config.clusters[cluster];
        let ids = &self.stats.ids.clusters[cluster];
        let shard = &self.stats.shard;
        shard.inc(ids.update_attempt);
        match failure {
            None => shard.inc(ids.update_success),
            Some(e) => {
                shard.inc(ids.update_failure);
                warn!(cluster = %config.name, "DNS resolution failed; keeping that name's last answer: {e}");
            }
        }
        let mut states = self.state.borrow_mut();
        let state = &mut states[cluster];
        state.resolved = true;
        let mut changed = false;
        // Members that DNS no longer names: gone at once, unless health checking vouches for
        // them (health checking has precedence over discovery): then until they fail a check.
        let mut i = 0;
        while i < state.members.len() {
            let m = &mut state.members[i];
            let named = addresses.iter().any(|(a, _)| *a == m.host.address);
            if named {
                if m.flags.pending_removal {
                    m.flags.pending_removal = false;
                    changed = true;
                }
                i += 1;
                continue;
            }
            let vouched = config.health_check.is_some()
                && !m.flags.failed_active_hc
                && !m.flags.pending_active_hc;
            if vouched {
                if !m.flags.pending_removal {
                    m.flags.pending_removal = true;
                    changed = true;
                }
                i += 1;
            } else {
                info!(cluster = %config.name, upstream = %m.host.address, "endpoint left DNS: removed");
                state.members.remove(i);
                changed = true;
            }
        }
        for (address, weight) in addresses {
            let known = state.members.iter().position(|m| m.host.address == address);
            match known {
                Some(i) if state.members[i].host.weight == weight => {}
                Some(i) => {
                    // A new weight: a new host (its counters start again).
                    let old = &mut state.members[i];
                    let mut member = new_member(cluster, config, address, weight, &self.events);
                    member.flags = old.flags;
                    member.passes = old.passes;
                    member.fails = old.fails;
                    member.ejections = old.ejections;
                    member.unejected = old.unejected;
                    member.last_failure = old.last_failure.take();
                    state.members[i] = member;
                    changed = true;
                }
                None => {
                    info!(cluster = %config.name, upstream = %address, "endpoint joined from DNS");
                    state
                        .members
                        .push(new_member(cluster, config, address, weight, &self.events));
                    changed = true;
                }
            }
        }
        drop(states);
        if changed {
            self.state.borrow_mut()[cluster].dirty = true;
        }
    }

    /// Builds and publishes the next snapshot of every cluster that changed.
    fn publish_dirty(&self) {
        for cluster in 0..self.handles.len() {
            if std::mem::take(&mut self.state.borrow_mut()[cluster].dirty) {
                self.publish(cluster);
            }
        }
    }

    /// Builds and publishes the cluster's next snapshot.
    fn publish(&self, cluster: usize) {
        let mut states = self.state.borrow_mut();
        let state = &mut states[cluster];
        state.version += 1;
        let snapshot = Snapshot::build(
            &self.config.clusters[cluster],
            state.version,
            flags_of(&state.members),
        );
        drop(states);
        self.handles[cluster].snapshot.store(Arc::new(snapshot));
        self.count_membership(cluster);
    }

    fn count_membership(&self, cluster: usize) {
        let states = self.state.borrow();
        let members = &states[cluster].members;
        let ids = &self.stats.ids.clusters[cluster];
        let shard = &self.stats.shard;
        let healthy = members.iter().filter(|m| m.flags.healthy()).count();
        shard.set(ids.membership_total, members.len() as i64);
        shard.set(ids.membership_healthy, healthy as i64);
        shard.set(
            ids.outlier_ejections_active,
            members.iter().filter(|m| m.flags.ejected).count() as i64,
        );
    }
}

fn flags_of(members: &[Member]) -> Vec<(Arc<Host>, HealthFlags)> {
    members.iter().map(|m| (m.host.clone(), m.flags)).collect()
}

fn new_member(
    index: usize,
    cluster: &Cluster,
    address: SocketAddr,
    weight: u32,
    events: &mpsc::UnboundedSender<Event>,
) -> Member {
    let checker = cluster.health_check.as_ref().map(|check| {
        let http2 = cluster.protocol == UpstreamProtocol::Http2;
        tokio::task::spawn_local(health::run(
            index,
            address,
            check.clone(),
            http2,
            events.clone(),
        ))
    });
    Member {
        host: Arc::new(Host::new(address, weight)),
        flags: HealthFlags {
            pending_active_hc: checker.is_some(),
            ..HealthFlags::default()
        },
        passes: 0,
        fails: 0,
        ejections: 0,
        unejected: None,
        last_failure: None,
        checker,
    }
}

/// Resolves a `strict_dns` cluster's names now and every `refresh`, telling the manager each
/// answer. A name whose resolution fails (no answer, SERVFAIL) keeps its last answer, so that
/// the manager does not drop its endpoints; a name that does not exist or has no address is a
/// real answer: it has no endpoints now.
async fn resolve_forever(
    cluster: usize,
    name: String,
    names: Vec<crate::config::DnsName>,
    refresh: Duration,
    (servers, family): (Vec<SocketAddr>, LookupFamily),
    events: mpsc::UnboundedSender<Event>,
) {
    let mut last: Vec<Vec<SocketAddr>> = vec![Vec::new(); names.len()];
    // Names said to have no address, so that it is said once, not at every refresh.
    let mut warned = vec![false; names.len()];
    let mut resolver = None;
    loop {
        if resolver.is_none() {
            match Resolver::new(&servers, DNS_TIMEOUT) {
                Ok(r) => resolver = Some(r),
                Err(e) => {
                    warn!(cluster = %name, "cannot set up DNS resolution (tried again every dns_refresh_rate): {e}")
                }
            }
        }
        let mut failure = None;
        match &resolver {
            None => failure = Some("no resolver".to_owned()),
            Some(resolver) => {
                for (i, (n, kept)) in names.iter().zip(last.iter_mut()).enumerate() {
                    match resolver.resolve(&n.host, n.port).await {
                        Ok(mut addresses) => {
                            family.filter(&mut addresses);
                            if addresses.is_empty() && (!kept.is_empty() || !warned[i]) {
                                warn!(cluster = %name, "DNS name {} has no address of dns_lookup_family; it has no endpoints now", n.host);
                            }
                            warned[i] = addresses.is_empty();
                            *kept = addresses;
                        }
                        Err(e @ (DnsError::NotFound { .. } | DnsError::NoAddresses { .. })) => {
                            if !kept.is_empty() || !warned[i] {
                                warn!(cluster = %name, "{e}; it has no endpoints now");
                            }
                            warned[i] = true;
                            kept.clear()
                        }
                        Err(e) => failure = Some(e.to_string()),
                    }
                }
            }
        }
        let mut addresses: Vec<(SocketAddr, u32)> = Vec::new();
        for (n, kept) in names.iter().zip(&last) {
            for a in kept {
                if !addresses.iter().any(|(b, _)| b == a) {
                    addresses.push((*a, n.weight));
                }
            }
        }
        let event = Event::Resolved {
            cluster,
            addresses,
            failure,
        };
        if events.send(event).is_err() {
            return;
        }
        tokio::time::sleep(refresh).await;
    }
}
