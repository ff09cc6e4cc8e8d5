//! The main thread's side of the cluster manager: membership, health, ejections, and the
//! snapshots it publishes.

mod discovery;
mod ejection;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{ClusterHandle, Event, HealthFlags, Host, Snapshot, health};
use crate::config::{Cluster, Config, Discovery, UpstreamProtocol};
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
                } => Some(tokio::task::spawn_local(Manager::resolve_forever(
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
            } => self.uneject(cluster, address, ejection),
            Event::Resolved {
                cluster,
                addresses,
                failure,
            } => self.resolved(cluster, addresses, failure),
        }
    }

    /// Why each endpoint of `cluster` last failed its health check, for `/clusters`.
    pub fn last_failures(&self, cluster: usize) -> Vec<(SocketAddr, String)> {
        self.state.borrow()[cluster]
            .members
            .iter()
            .filter_map(|m| Some((m.host.address, m.last_failure.clone()?)))
            .collect()
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
