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

pub mod health;
pub mod manager;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::config::{Cluster, HashKey, OutlierDetection};
use crate::lb::{self, Policy, Table, least_request};

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

/// One cluster, shared by the manager (which publishes) and the workers (which read).
pub struct ClusterHandle {
    pub index: usize,
    pub snapshot: ArcSwap<Snapshot>,
    pub events: mpsc::UnboundedSender<Event>,
    /// Circuit breakers, counted over all workers.
    pub rq_active: AtomicUsize,
    pub rq_pending: AtomicUsize,
    pub retries_active: AtomicUsize,
    pub cx_active: AtomicUsize,
    /// Wakes requests waiting for a connection (`max_connections` reached) when one frees.
    pub cx_freed: tokio::sync::Notify,
}

/// What one worker keeps between its picks in one cluster.
#[derive(Debug, Default)]
pub struct WorkerLb {
    /// The round-robin position.
    pub cursor: Cell<usize>,
    /// Least request's credits, when the weights are unequal.
    credits: RefCell<least_request::Credits>,
}

impl WorkerLb {
    /// Starts the round robin at `cursor` (spreading the workers' positions).
    pub fn starting_at(cursor: usize) -> WorkerLb {
        WorkerLb {
            cursor: Cell::new(cursor),
            credits: RefCell::default(),
        }
    }
}

/// A host chosen for a request.
pub struct Pick {
    pub host: Arc<Host>,
    /// The snapshot was in panic mode.
    pub panic: bool,
}

/// How a try went, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// No answer: connect failure, reset, or timeout.
    LocalFailure,
}

impl ClusterHandle {
    pub fn new(index: usize, initial: Snapshot, events: mpsc::UnboundedSender<Event>) -> Self {
        ClusterHandle {
            index,
            snapshot: ArcSwap::from_pointee(initial),
            events,
            rq_active: AtomicUsize::new(0),
            rq_pending: AtomicUsize::new(0),
            retries_active: AtomicUsize::new(0),
            cx_active: AtomicUsize::new(0),
            cx_freed: tokio::sync::Notify::new(),
        }
    }

    /// Chooses a host for a request, from the current snapshot. `state` is the worker's own
    /// (round-robin position, least-request credits); `hash` the request's hash key (ring hash,
    /// Maglev); `avoid` hosts already tried (a retry goes elsewhere when it can).
    pub fn pick(
        &self,
        policy: Policy,
        state: &WorkerLb,
        hash: Option<u64>,
        avoid: &[SocketAddr],
    ) -> Option<Pick> {
        let snapshot = self.snapshot.load();
        if snapshot.targets.is_empty() {
            return None;
        }
        let mut chosen = None;
        // A few draws to get away from hosts already tried (Envoy's previous_hosts predicate).
        for _ in 0..3 {
            let index = match policy {
                // A retry does not move the round-robin cursor (else, with two hosts, every
                // first try would land on the same one): it draws by weight instead.
                Policy::RoundRobin if avoid.is_empty() => {
                    let n = state.cursor.get();
                    state.cursor.set(n.wrapping_add(1));
                    snapshot.table.scheduled(n)
                }
                Policy::RoundRobin => snapshot.table.drawn(fastrand::u64(..)),
                Policy::Random => snapshot.table.drawn(fastrand::u64(..)),
                Policy::LeastRequest if snapshot.equal_weights => {
                    least_request::two_choices(snapshot.targets.len(), |i| {
                        snapshot.targets[i].rq_active.load(Ordering::Relaxed)
                    })
                }
                Policy::LeastRequest => {
                    let mut credits = state.credits.borrow_mut();
                    let load = |i: usize, skip: bool| {
                        let h = &snapshot.targets[i];
                        (!(skip && avoid.contains(&h.address)))
                            .then(|| (h.weight, h.rq_active.load(Ordering::Relaxed)))
                    };
                    let n = snapshot.targets.len();
                    // A retry passes over the hosts it tried, unless it tried them all.
                    credits
                        .pick(snapshot.version, n, |i| load(i, true))
                        .or_else(|| credits.pick(snapshot.version, n, |i| load(i, false)))
                }
                Policy::RingHash | Policy::Maglev => match hash {
                    // A retry of a hashed request goes to the next host on the ring.
                    Some(h) => snapshot
                        .table
                        .hashed_skipping(h, |i| avoid.contains(&snapshot.targets[i].address)),
                    None => snapshot.table.drawn(fastrand::u64(..)),
                },
            };
            let Some(index) = index else { break };
            let host = &snapshot.targets[index];
            chosen = Some(host.clone());
            if !avoid.contains(&host.address) {
                break;
            }
        }
        if chosen.as_ref().is_some_and(|h| avoid.contains(&h.address)) {
            // The draws kept landing on hosts already tried: take any other, from a random
            // place, so that a retry goes elsewhere whenever there is an elsewhere.
            let n = snapshot.targets.len();
            let start = fastrand::usize(..n);
            if let Some(other) = (0..n)
                .map(|k| &snapshot.targets[(start + k) % n])
                .find(|h| !avoid.contains(&h.address))
            {
                chosen = Some(other.clone());
            }
        }
        chosen.map(|host| Pick {
            host,
            panic: snapshot.panic,
        })
    }

    /// Counts how a try to `host` went; tells the manager when a run of failures crosses an
    /// outlier-detection threshold.
    pub fn report(&self, host: &Arc<Host>, outcome: Outcome, outlier: Option<&OutlierDetection>) {
        let (server_error, gateway) = match outcome {
            Outcome::Status(s) if s >= 500 => (true, matches!(s, 502..=504)),
            Outcome::Status(_) => (false, false),
            Outcome::LocalFailure => (true, true),
        };
        if !server_error {
            if host.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                host.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            if host.consecutive_gateway.load(Ordering::Relaxed) != 0 {
                host.consecutive_gateway.store(0, Ordering::Relaxed);
            }
            return;
        }
        host.rq_error.fetch_add(1, Ordering::Relaxed);
        let Some(outlier) = outlier else { return };
        let mut crossed = false;
        let n = host.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        crossed |= outlier.consecutive_5xx == Some(n);
        if gateway {
            let n = host.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1;
            crossed |= outlier.consecutive_gateway_failure == Some(n);
        } else if host.consecutive_gateway.load(Ordering::Relaxed) != 0 {
            host.consecutive_gateway.store(0, Ordering::Relaxed);
        }
        if crossed {
            let _ = self.events.send(Event::Outlier {
                cluster: self.index,
                host: host.clone(),
            });
        }
    }
}

/// The hash of a request's key for ring hash and Maglev, if the request has the key.
pub fn request_hash(
    key: Option<&HashKey>,
    headers: &http::HeaderMap,
    peer: std::net::IpAddr,
) -> Option<u64> {
    match key? {
        HashKey::Header(name) => headers.get(name).map(|v| lb::hash_key(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then(|| lb::hash_key(v.as_bytes()))
            }),
        HashKey::SourceIp => Some(match peer {
            std::net::IpAddr::V4(ip) => lb::hash_key(&ip.octets()),
            std::net::IpAddr::V6(ip) => lb::hash_key(&ip.octets()),
        }),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Discovery, OutlierDetection};
    use std::time::Duration;

    fn cluster(panic_threshold: f64) -> Cluster {
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\nroute = [{ cluster = \"c\" }]\n[[cluster]]\nname = \"c\"\nendpoints = [\"127.0.0.1:2\"]\n",
        )
        .expect("a valid config");
        let mut c = config.clusters.into_iter().next().unwrap();
        c.panic_threshold = panic_threshold;
        assert!(matches!(c.discovery, Discovery::Static));
        c
    }

    fn hosts(healthy: &[bool]) -> Vec<(Arc<Host>, HealthFlags)> {
        healthy
            .iter()
            .enumerate()
            .map(|(i, &ok)| {
                let host = Arc::new(Host::new(SocketAddr::from(([10, 0, 0, i as u8], 80)), 1));
                let flags = HealthFlags {
                    failed_active_hc: !ok,
                    ..HealthFlags::default()
                };
                (host, flags)
            })
            .collect()
    }

    #[test]
    fn too_few_healthy_hosts_mean_panic_mode_over_all_of_them() {
        let s = Snapshot::build(&cluster(50.0), 1, hosts(&[true, false, false]));
        assert!(s.panic);
        assert_eq!(s.targets.len(), 3);
        let s = Snapshot::build(&cluster(50.0), 1, hosts(&[true, true, false]));
        assert!(!s.panic);
        assert_eq!(s.targets.len(), 2);
        assert!(
            s.targets
                .iter()
                .all(|h| h.address.ip().to_string() != "10.0.0.2")
        );
        // Panic mode off: no healthy host, no target.
        let s = Snapshot::build(&cluster(0.0), 1, hosts(&[false, false]));
        assert!(!s.panic);
        assert!(s.targets.is_empty());
    }

    #[test]
    fn a_retry_goes_to_another_host_whenever_there_is_one() {
        let (tx, _rx) = mpsc::unbounded_channel();
        for policy in [Policy::RoundRobin, Policy::Random, Policy::LeastRequest] {
            let mut c = cluster(50.0);
            c.lb_policy = policy;
            let s = Snapshot::build(&c, 1, hosts(&[true, true]));
            let first = s.targets[0].address;
            let handle = ClusterHandle::new(0, s, tx.clone());
            let state = WorkerLb::default();
            for _ in 0..500 {
                let pick = handle.pick(policy, &state, None, &[first]).unwrap();
                assert_ne!(pick.host.address, first, "{policy:?}");
            }
        }
    }

    /// A least-request cluster over hosts of `weights`, all healthy.
    fn least_request(weights: &[u32]) -> (ClusterHandle, Vec<Arc<Host>>) {
        let mut c = cluster(50.0);
        c.lb_policy = Policy::LeastRequest;
        let hosts: Vec<(Arc<Host>, HealthFlags)> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let address = SocketAddr::from(([10, 0, 0, i as u8], 80));
                (Arc::new(Host::new(address, w)), HealthFlags::default())
            })
            .collect();
        let s = Snapshot::build(&c, 1, hosts);
        let targets = s.targets.clone();
        let (tx, _rx) = mpsc::unbounded_channel();
        (ClusterHandle::new(0, s, tx), targets)
    }

    /// How many of `n` picks went to each of `hosts`.
    fn spread(handle: &ClusterHandle, hosts: &[Arc<Host>], n: usize) -> Vec<usize> {
        let state = WorkerLb::default();
        let mut counts = vec![0; hosts.len()];
        for _ in 0..n {
            let pick = handle
                .pick(Policy::LeastRequest, &state, None, &[])
                .unwrap();
            counts[hosts
                .iter()
                .position(|h| h.address == pick.host.address)
                .unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn least_request_with_unequal_weights_follows_them_and_moves_off_a_loaded_host() {
        // Nothing in flight: the weights' shares, exactly (the heavier used to take them all).
        let (handle, hosts) = least_request(&[2, 1]);
        assert_eq!(spread(&handle, &hosts, 600), [400, 200]);
        let (handle, hosts) = least_request(&[1, 3, 1]);
        assert_eq!(spread(&handle, &hosts, 500), [100, 300, 100]);
        // The heavier with 3 in flight weighs 2/4 against 1: a third of the picks, not two.
        let (handle, hosts) = least_request(&[2, 1]);
        hosts[0].rq_active.store(3, Ordering::Relaxed);
        assert_eq!(spread(&handle, &hosts, 600), [200, 400]);
    }

    #[test]
    fn least_request_with_equal_weights_takes_the_less_busy_of_two() {
        let (handle, hosts) = least_request(&[3, 3]);
        let got = spread(&handle, &hosts, 3000);
        // Binomial(3000, 1/2): a standard deviation of 27; 300 is eleven of them.
        assert!(got.iter().all(|&c| (1200..1800).contains(&c)), "{got:?}");
        hosts[1].rq_active.store(1, Ordering::Relaxed);
        assert_eq!(spread(&handle, &hosts, 100), [100, 0]);
    }

    #[test]
    fn a_least_request_retry_with_unequal_weights_goes_elsewhere() {
        let (handle, hosts) = least_request(&[5, 1]);
        let state = WorkerLb::default();
        for _ in 0..100 {
            let pick = handle
                .pick(Policy::LeastRequest, &state, None, &[hosts[0].address])
                .unwrap();
            assert_eq!(pick.host.address, hosts[1].address);
        }
        // Every host tried: one is still chosen.
        let all = [hosts[0].address, hosts[1].address];
        assert!(
            handle
                .pick(Policy::LeastRequest, &state, None, &all)
                .is_some()
        );
    }

    #[test]
    fn a_run_of_failures_tells_the_manager_once_and_a_success_ends_it() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = Snapshot::build(&cluster(50.0), 1, hosts(&[true]));
        let host = s.targets[0].clone();
        let handle = ClusterHandle::new(0, s, tx);
        let outlier = OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway_failure: Some(2),
            base_ejection_time: Duration::from_secs(1),
            max_ejection_time: Duration::from_secs(10),
            max_ejection_percent: 10.0,
        };
        handle.report(&host, Outcome::Status(500), Some(&outlier));
        handle.report(&host, Outcome::Status(500), Some(&outlier));
        assert!(rx.try_recv().is_err(), "two 500s are not three");
        handle.report(&host, Outcome::Status(200), Some(&outlier));
        handle.report(&host, Outcome::Status(500), Some(&outlier));
        handle.report(&host, Outcome::Status(500), Some(&outlier));
        assert!(rx.try_recv().is_err(), "a success started the count again");
        handle.report(&host, Outcome::Status(500), Some(&outlier));
        assert!(matches!(rx.try_recv(), Ok(Event::Outlier { .. })));
        handle.report(&host, Outcome::Status(500), Some(&outlier));
        assert!(rx.try_recv().is_err(), "one event per run");
        // Gateway failures: connect failures count.
        handle.report(&host, Outcome::Status(200), Some(&outlier));
        handle.report(&host, Outcome::LocalFailure, Some(&outlier));
        handle.report(&host, Outcome::Status(503), Some(&outlier));
        assert!(matches!(rx.try_recv(), Ok(Event::Outlier { .. })));
        assert_eq!(host.rq_error.load(Ordering::Relaxed), 8);
    }
}
