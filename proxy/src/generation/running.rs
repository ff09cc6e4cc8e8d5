//! A running generation: its listen sockets, worker threads and access logs, and the drain.
//!
//! [`Generation::drain`] is a plain async function: SIGTERM calls it when the proxy runs alone,
//! and the supervisor's `Drain` message will call it when the proxy runs as one generation of many.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::net::TcpListener;

use restart_protocol::DrainStrategy;
use tracing::{error, info, warn};

use super::listen;
use crate::cluster::ClusterHandle;
use crate::config::{Config, GuardDogSettings};
use crate::runtime::access_log::{AccessLog, LogTarget};
use crate::runtime::limits::ConnectionLimits;
use crate::stats::ThreadStats;
use crate::worker::{WorkerHandle, WorkerSetup};

/// Where a generation is in its life, as `/ready`, `/server_info` and logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Accepting and serving.
    Live = 0,
    /// Not accepting; finishing the connections it has.
    Draining = 1,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Live => "live",
            State::Draining => "draining",
        }
    }
}

/// What the admin endpoints read about the generation, from any thread.
pub struct Info {
    pub epoch: u64,
    pub concurrency: usize,
    pub started: Instant,
    state: AtomicU8,
    healthcheck_failed: AtomicBool,
}

impl Info {
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            0 => State::Live,
            _ => State::Draining,
        }
    }

    pub fn healthcheck_failed(&self) -> bool {
        self.healthcheck_failed.load(Ordering::Relaxed)
    }

    /// `/healthcheck/fail` and `/healthcheck/ok`: lets an operator take the proxy out of a load
    /// balancer's rotation (through `/ready`) while it keeps serving.
    pub fn set_healthcheck_failed(&self, failed: bool) {
        self.healthcheck_failed.store(failed, Ordering::Relaxed);
    }
}

/// Why a generation could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen socket could not be bound: the address is taken, absent, or privileged.
    #[error(
        "listener `{listener}`: cannot listen on {address}: {source}; {}",
        listen::bind_advice(source)
    )]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// An access log could not be opened.
    #[error("{0}")]
    AccessLog(#[source] std::io::Error),
    /// The system refused a thread or a socket copy (limits on threads or file descriptors).
    #[error("cannot start worker threads: {0}")]
    Workers(#[source] std::io::Error),
    /// A listener names its socket only by `fd_name`: only `baton run` under systemd has it.
    #[error(
        "listener `{listener}` has only an fd_name: its socket comes from systemd through `baton run`; give it an address to run baton-proxy alone"
    )]
    NeedsSupervisor { listener: String },
    /// The stats region has no room for this generation's stats or shards.
    #[error("{0}")]
    Stats(#[from] shm_stats::StatsError),
}

/// How a drain ended.
#[derive(Debug, Clone, Copy)]
pub struct DrainOutcome {
    /// Connections still open when the drain ended (at its deadline); [`Generation::stop`]
    /// closes them.
    pub connections_left: usize,
    pub took: Duration,
}

pub struct Generation {
    pub info: Arc<Info>,
    /// The main thread's shard: server-wide stats.
    main: Rc<ThreadStats>,
    workers: Vec<WorkerHandle>,
    access_log: Option<AccessLog>,
    /// When the drain in progress closes what is left.
    deadline: std::cell::Cell<Option<tokio::time::Instant>>,
    hurried: tokio::sync::Notify,
    guard_dog: GuardDogSettings,
    /// Per worker: 0 beating, 1 missed, 2 mega-missed (so each stall is counted once).
    stalls: std::cell::RefCell<Vec<u8>>,
    /// When the guard dog last looked (since the clock's start).
    guard_dog_ran: std::cell::Cell<Duration>,
}

/// The `worker` index of the main thread's shard in the stats region.
pub const MAIN_THREAD_SHARD: u32 = u32::MAX;

impl Generation {
    /// Registers its stats in `region`, opens the access logs and starts `concurrency` workers
    /// accepting on `sockets` (one per listener of the config, in order). Nothing is left running
    /// if any step fails (shards it attached stay for the caller to retire).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: Arc<Config>,
        concurrency: usize,
        epoch: u64,
        region: Arc<shm_stats::Region>,
        sockets: Vec<TcpListener>,
        main: Rc<ThreadStats>,
        clusters: Vec<Arc<ClusterHandle>>,
    ) -> Result<Self, StartError> {
        let ids = main.ids.clone();
        let mut shards = (0..concurrency)
            .map(|w| region.attach_shard(epoch, w as u32))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();

        // One file per distinct path: two listeners may share a log.
        let mut paths: Vec<PathBuf> = Vec::new();
        let mut file_of: HashMap<PathBuf, usize> = HashMap::new();
        let files: Vec<Option<usize>> = config
            .listeners
            .iter()
            .map(|l| {
                l.access_log.as_ref().map(|p| {
                    *file_of.entry(p.clone()).or_insert_with(|| {
                        paths.push(p.clone());
                        paths.len() - 1
                    })
                })
            })
            .collect();
        let access_log = if paths.is_empty() {
            None
        } else {
            Some(AccessLog::start(paths).map_err(StartError::AccessLog)?)
        };
        let targets: Vec<Option<LogTarget>> = files
            .iter()
            .map(|f| {
                f.zip(access_log.as_ref()).map(|(file, log)| LogTarget {
                    sender: log.sender(),
                    file,
                })
            })
            .collect();

        let limits = Arc::new(ConnectionLimits::new(&config));
        let clock = Instant::now();
        let beat_every = beat_every(config.guard_dog.miss);
        let mut workers = Vec::with_capacity(concurrency);
        for id in 0..concurrency {
            let spawned = sockets
                .iter()
                .map(|s| s.try_clone())
                .collect::<std::io::Result<Vec<_>>>()
                .and_then(|listeners| {
                    let shard = shards
                        .next()
                        .ok_or_else(|| std::io::Error::other("no shard"))?;
                    WorkerHandle::spawn(WorkerSetup {
                        id,
                        config: config.clone(),
                        listeners,
                        access_logs: targets.clone(),
                        stats: ThreadStats {
                            shard,
                            ids: ids.clone(),
                        },
                        open: Default::default(),
                        requests: Default::default(),
                        epoch_header: config.epoch_header.then(|| http::HeaderValue::from(epoch)),
                        limits: limits.clone(),
                        heartbeat: Arc::new(AtomicU64::new(0)),
                        clusters: clusters.clone(),
                        clock,
                        beat_every,
                    })
                });
            match spawned {
                Ok(worker) => workers.push(worker),
                Err(e) => {
                    for w in workers {
                        w.stop();
                    }
                    return Err(StartError::Workers(e));
                }
            }
        }
        // The workers hold their own copies; once they drop them the sockets close.
        drop(sockets);

        let server = &ids.server;
        main.shard
            .set(server.epoch, i64::try_from(epoch).unwrap_or(i64::MAX));
        main.shard.set(server.live, 1);
        main.shard.set(server.concurrency, concurrency as i64);
        region.set_current_epoch(epoch);
        Ok(Generation {
            main,
            guard_dog: config.guard_dog,
            stalls: std::cell::RefCell::new(vec![0; concurrency]),
            guard_dog_ran: std::cell::Cell::new(Duration::ZERO),
            info: Arc::new(Info {
                epoch,
                concurrency,
                started: clock,
                state: AtomicU8::new(State::Live as u8),
                healthcheck_failed: AtomicBool::new(false),
            }),
            workers,
            access_log,
            deadline: Default::default(),
            hurried: Default::default(),
        })
    }

    /// Downstream connections open on every worker.
    pub fn open_connections(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .sum()
    }

    /// Connections open and requests being answered, as reported to the supervisor.
    pub fn load(&self) -> restart_protocol::Load {
        restart_protocol::Load {
            connections: self.open_connections() as u64,
            requests: self
                .workers
                .iter()
                .map(|w| w.requests.load(Ordering::Relaxed) as u64)
                .sum(),
        }
    }

    /// How often the main thread should run [`Generation::guard_dog`].
    pub fn guard_dog_every(&self) -> Duration {
        beat_every(self.guard_dog.miss)
    }

    /// Looks at every running worker's heartbeat: a worker whose event loop has not run for
    /// `miss_timeout` is counted, for `mega_miss_timeout` logged too, and for `kill_timeout`
    /// aborts the whole process, so that the supervisor replaces a generation that a wedged
    /// worker would otherwise leave holding its connections.
    pub fn guard_dog(&self) {
        let now = self.info.started.elapsed();
        let late = now.saturating_sub(self.guard_dog_ran.replace(now));
        if late >= self.guard_dog.miss + self.guard_dog_every() {
            // The main thread did not run either: the whole process was paused (SIGSTOP, a
            // frozen cgroup, a debugger, a paused VM). The workers get a beat to show they run.
            return;
        }
        let mut stalls = self.stalls.borrow_mut();
        let server = &self.main.ids.server;
        for (worker, stall) in self.workers.iter().zip(stalls.iter_mut()) {
            if !worker.running() {
                continue;
            }
            let beat = Duration::from_millis(worker.heartbeat.load(Ordering::Relaxed));
            // The first beat comes as the worker starts; until then its start is the beat.
            let silent = now.saturating_sub(beat);
            let GuardDogSettings {
                miss,
                mega_miss,
                kill,
            } = self.guard_dog;
            if let Some(kill) = kill
                && silent >= kill
            {
                error!(
                    epoch = self.info.epoch,
                    worker = worker.id,
                    "worker {} has not run its event loop for {silent:?} (guard_dog.kill_timeout {kill:?}); aborting this generation so that it is replaced",
                    worker.id
                );
                std::process::abort();
            }
            let level = if silent >= mega_miss {
                2
            } else if silent >= miss {
                1
            } else {
                0
            };
            if level > *stall {
                if *stall == 0 {
                    self.main.shard.inc(server.watchdog_miss);
                }
                if level == 2 {
                    self.main.shard.inc(server.watchdog_mega_miss);
                    warn!(
                        epoch = self.info.epoch,
                        worker = worker.id,
                        "worker {} has not run its event loop for {silent:?} (guard_dog.mega_miss_timeout {mega_miss:?})",
                        worker.id
                    );
                }
            }
            *stall = level;
        }
    }

    /// Debug builds: handles that wedge a worker (the admin's `/debug/wedge`).
    #[cfg(debug_assertions)]
    pub fn wedgers(&self) -> Vec<tokio::sync::mpsc::UnboundedSender<crate::worker::Command>> {
        self.workers.iter().map(WorkerHandle::wedger).collect()
    }

    /// Updates the stats that change with time alone; the main thread calls it every second.
    pub fn tick(&self) {
        let uptime = self.info.started.elapsed().as_secs();
        self.main
            .shard
            .set(self.main.ids.server.uptime, uptime as i64);
    }

    /// Stops accepting and lets the connections finish: HTTP/1.1 answers carry
    /// `Connection: close` and idle connections close after the idle grace; HTTP/2 connections
    /// get a graceful GOAWAY; TCP sessions run until they end. Returns when the last connection
    /// is closed or at `timeout`, whichever comes first.
    ///
    /// `stopped_accepting` runs once no worker accepts any more (the supervisor is told then).
    pub async fn drain(
        &self,
        timeout: Duration,
        strategy: DrainStrategy,
        stopped_accepting: impl FnOnce(),
    ) -> DrainOutcome {
        let start = Instant::now();
        self.info
            .state
            .store(State::Draining as u8, Ordering::Relaxed);
        self.main.shard.set(self.main.ids.server.live, 0);
        info!(
            epoch = self.info.epoch,
            connections = self.open_connections(),
            timeout = %humantime::format_duration(timeout),
            strategy = strategy.name(),
            "draining"
        );
        self.deadline
            .set(Some(tokio::time::Instant::now() + timeout));
        let (accepting, waits): (Vec<_>, Vec<_>) = self
            .workers
            .iter()
            .map(|w| w.drain(timeout, strategy))
            .unzip();
        for stopped in accepting {
            let _ = stopped.await;
        }
        stopped_accepting();
        let mut timed_out = false;
        'workers: for mut done in waits {
            loop {
                let deadline = self
                    .deadline
                    .get()
                    .unwrap_or_else(tokio::time::Instant::now);
                tokio::select! {
                    _ = &mut done => break,
                    _ = tokio::time::sleep_until(deadline) => {
                        timed_out = true;
                        break 'workers;
                    }
                    // A hurry moved the deadline: wait again with the new one.
                    _ = self.hurried.notified() => {}
                }
            }
        }
        DrainOutcome {
            connections_left: if timed_out {
                self.open_connections()
            } else {
                0
            },
            took: start.elapsed(),
        }
    }

    /// Makes a drain in progress hurry: every answer now carries `Connection: close`, and what is
    /// still open after `timeout` is closed. The running [`Generation::drain`] returns then.
    pub fn hurry(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        self.deadline.set(Some(
            self.deadline.get().map_or(deadline, |d| d.min(deadline)),
        ));
        self.hurried.notify_waiters();
        for w in &self.workers {
            // The worker answers the first drain's `done`; this one's receiver is not needed.
            drop(w.drain(timeout, DrainStrategy::Immediate));
        }
    }

    /// Asks the access log thread to reopen its files (after log rotation).
    pub fn reopen_logs(&self) {
        match &self.access_log {
            Some(log) => log.reopen(),
            None => info!("no access log to reopen"),
        }
    }

    /// Closes every connection now, stops the workers and writes what the access logs hold.
    pub fn stop(self) {
        for worker in self.workers {
            worker.stop();
        }
        if let Some(log) = self.access_log {
            log.finish();
        }
    }
}

/// How often workers beat and the guard dog looks: often enough to see a miss soon after it.
fn beat_every(miss: Duration) -> Duration {
    (miss / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
}

/// Binds every listener of `config` itself, as a proxy running alone does.
pub fn bind_listeners(config: &Config) -> Result<Vec<TcpListener>, StartError> {
    config
        .listeners
        .iter()
        .map(|l| {
            let address = l.address.ok_or_else(|| StartError::NeedsSupervisor {
                listener: l.name.clone(),
            })?;
            listen::bind_tcp(address, l.backlog).map_err(|source| StartError::Bind {
                listener: l.name.clone(),
                address,
                source,
            })
        })
        .collect()
}
