//! What a worker does with a cluster: `ClusterHandle::pick` loads the current snapshot (no lock)
//! and asks its balancer table, or the endpoints' loads; `report` counts how a try went and
//! tells the manager when an endpoint crosses an outlier threshold.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::{Event, Host, Snapshot};
use crate::config::{HashKey, OutlierDetection};
use crate::lb::{self, Policy, least_request};

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
