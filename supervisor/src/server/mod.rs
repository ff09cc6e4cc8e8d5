//! The supervisor's event loop: one thread, one mio `Poll` over signals, the control socket, its
//! clients and one channel per generation. Events become [`lifecycle::Event`]s; the lifecycle's
//! [`Action`](lifecycle::Action)s are carried out in `actions.rs`.
//!
//! This file holds the supervisor's state and the loop itself (signals, the systemd watchdog, the
//! exit); each child adds the methods of one part:
//! - `start.rs`: a fresh start (adopting what a supervisor that died left serving) or the
//!   take-over from the supervisor this program replaced;
//! - `actions.rs`: an event fed to the lifecycle, and its actions carried out (spawn, drain, kill);
//! - `generation_io.rs`: the generations' channels, their messages and their exits;
//! - `control.rs`: the control socket and its clients;
//! - `upgrading.rs`: the in-place upgrade, from its checks to the exec;
//! - `stats.rs`: the supervisor's own stats and the region they live in.

mod actions;
mod control;
mod error;
mod generation_io;
mod start;
mod stats;
mod upgrading;

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Poll, Token};
use restart_protocol::{Channel, Load, SocketKey};
use shm_stats::{Counter, Gauge, Region, Shard};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook_mio::v1_0::Signals;
use tracing::{error, info, warn};

use crate::config::{self, SupervisorConfig};
use crate::control::Response;
use crate::launch::Launch;
use crate::lifecycle::{self, Event, Lifecycle, Settings};
use crate::notify::{Notifier, Watchdog};
use crate::store::SocketStore;
use crate::upgrade::{self, Upgrading};
use error::StartError;

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
/// Client `n` is `Token(CLIENTS + n)`; generation `e` is `Token(GENERATIONS + e)`.
const CLIENTS: usize = 1 << 20;
const GENERATIONS: usize = 1 << 40;

/// The `epoch` of the supervisor's own shard in the stats region.
const SUPERVISOR_SHARD_EPOCH: u64 = u64::MAX;

/// A generation's process and channel. The process is known by pid, not by a
/// `std::process::Child`, so that a re-executed supervisor can take it over: it is our child
/// either way, so waiting on its pid is free of pid-reuse races.
struct GenIo {
    pid: u32,
    /// `None` once the generation closed it.
    channel: Option<Channel>,
    started: SystemTime,
    build: String,
    load: Load,
    /// The connections it closed unfinished at the end of its drain, as it said in `Exiting`
    /// (its last load report may be up to half a second old by then).
    connections_left: Option<u64>,
    /// The sockets it said it uses, in its `Ready`.
    sockets: Vec<SocketKey>,
    /// When its last load report came: its sign of life for the watchdog.
    heard: Instant,
    /// The binary and config it was started from (`None` for one taken over from a
    /// supervisor that did not hand launches over, or adopted).
    launch: Option<Rc<Launch>>,
    /// The protocol features both sides have.
    features: u64,
    /// Adopted from a supervisor that died: not this process's child, so its exit is known by
    /// its channel closing, not by `waitpid`.
    adopted: bool,
}

/// A control connection.
struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// A `baton stop` waiting for the supervisor's exit: the connection stays open after the
    /// first answer, and gets a last line as the supervisor exits.
    waits_for_exit: bool,
}

/// The supervisor's own stats.
struct SupervisorStats {
    shard: Shard,
    reloads: Counter,
    failures: Counter,
    crashes: Counter,
    draining: Gauge,
    /// Connections and requests the draining generations still hold.
    draining_connections: Gauge,
    draining_requests: Gauge,
    written: lifecycle::Counts,
}

pub struct Supervisor {
    config: SupervisorConfig,
    poll: Poll,
    signals: Signals,
    control: UnixListener,
    clients: HashMap<u64, Client>,
    next_client: u64,
    generations: BTreeMap<u64, GenIo>,
    store: SocketStore,
    /// `FileDescriptorName`s of sockets systemd passed, and their keys.
    names: HashMap<String, SocketKey>,
    /// Keys of sockets that came from a `.socket` unit (systemd keeps those itself).
    activated: std::collections::HashSet<SocketKey>,
    region: Arc<Region>,
    stats: SupervisorStats,
    lifecycle: Lifecycle,
    exit: Option<u8>,
    last_reload: Option<String>,
    /// Until the first start's outcome is told: its reply is not a reload's.
    first_start: bool,
    /// The first generation exited for a bad config: `baton run` then exits 64, not 1.
    config_refused: bool,
    notify: Notifier,
    watchdog: Option<Watchdog>,
    /// The last `STATUS=` sent, to send only changes.
    status_line: String,
    /// The binary and arguments this supervisor was started with, to execute again.
    exe: std::path::PathBuf,
    args: Vec<String>,
    /// The launch of the last generation that became active: a crashed generation is replaced
    /// from it, whatever is on disk now.
    last_good: Option<Rc<Launch>>,
    /// In-place upgrades this supervisor has had, and the outcome of the last one asked for.
    upgrades: u64,
    last_upgrade: Option<String>,
    /// The upgrade being checked, if one is.
    upgrading: Option<Upgrading>,
    /// The rendezvous's listening socket, handed to the active generation (see `adopt.rs`).
    rendezvous: Option<OwnedFd>,
    /// Said once: the stats region was cut short under us.
    region_lost: bool,
}

/// What differs between a fresh start and a take-over.
struct Parts {
    region: Arc<Region>,
    control: UnixListener,
    store: SocketStore,
    names: HashMap<String, SocketKey>,
    activated: std::collections::HashSet<SocketKey>,
    lifecycle: Lifecycle,
    generations: BTreeMap<u64, GenIo>,
    last_reload: Option<String>,
    last_good: Option<Rc<Launch>>,
    upgrades: u64,
    last_upgrade: Option<String>,
    rendezvous: Option<OwnedFd>,
}

/// `baton run --config PATH`: a fresh start from the config at `path`, or, in a program executed
/// by `baton upgrade-supervisor`, the take-over of what the previous one handed over (its config
/// included: the file on disk is not read). Runs the supervisor until it is stopped; returns the
/// exit status.
pub fn main(path: &Path) -> u8 {
    let (mut supervisor, handover) = match start(path) {
        Ok(started) => started,
        Err(NotStarted::Fresh(StartError::Config(e))) => {
            eprintln!("baton: {e}");
            return crate::env::EXIT_USAGE;
        }
        Err(NotStarted::Fresh(e)) => {
            error!("{e}");
            return 1;
        }
        Err(NotStarted::TakeOver(e)) => return fall_back(&e),
    };
    if let Some(handover) = handover {
        handover.release();
        match upgrade::failed_upgrade() {
            Some(reason) => {
                error!(
                    "the supervisor upgrade failed: {reason}; this binary took over again and carries on"
                );
                supervisor.last_upgrade = Some(format!("failed: {reason}"));
            }
            None => {
                supervisor.upgrades += 1;
                info!(
                    upgrades = supervisor.upgrades,
                    build = env!("BATON_BUILD_ID"),
                    "took over as the upgraded supervisor"
                );
                supervisor.last_upgrade = Some(format!(
                    "upgraded to build {} at {}",
                    env!("BATON_BUILD_ID"),
                    humantime::format_rfc3339_seconds(SystemTime::now())
                ));
            }
        }
    }
    let took_over = supervisor.lifecycle.restored();
    info!(
        pid = std::process::id(),
        config = %supervisor.config.path.display(),
        control = %supervisor.config.control_socket.display(),
        stats = %supervisor.region.path().display(),
        "supervisor started"
    );
    if let Some(active) = supervisor.lifecycle.active() {
        // Adopted, or taken over: the (new) rendezvous goes to the active generation.
        supervisor.hand_rendezvous(active);
    }
    if took_over {
        // Children that exited while the binary was being replaced are reaped now.
        supervisor.reap();
        let line = supervisor.status_line();
        supervisor.notify.ready(&line);
    } else {
        supervisor.apply(Event::Reload { waiter: None });
    }
    let mut events = Events::with_capacity(64);
    while supervisor.exit.is_none() {
        let timeout = supervisor
            .lifecycle
            .next_deadline()
            .into_iter()
            .chain(supervisor.watchdog.as_ref().map(|w| w.next))
            .chain(supervisor.upgrading.as_ref().map(|u| u.deadline))
            .min()
            .map(|d| d.saturating_duration_since(Instant::now()));
        if let Err(e) = supervisor.poll.poll(&mut events, timeout) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            error!("the event loop failed: {e}");
            return 1;
        }
        for event in events.iter() {
            supervisor.dispatch(event.token());
        }
        supervisor.apply(Event::Tick);
        supervisor.upgrade_progress();
        supervisor.watchdog();
        supervisor.check_region();
    }
    supervisor.finish()
}

/// How far `baton run` got before it failed, which decides what it does about it.
enum NotStarted {
    /// A fresh start: a config file that does not load exits 64 (the operator fixes it),
    /// anything else 1.
    Fresh(StartError),
    /// The take-over of what the supervisor this program replaced handed over: the previous
    /// binary is executed again.
    TakeOver(StartError),
}

/// A fresh start from the config at `path`, or, in a program executed by `baton
/// upgrade-supervisor`, the take-over of what the previous one handed over (with what it came
/// with, released once the loop runs).
fn start(path: &Path) -> Result<(Supervisor, Option<upgrade::Handover>), NotStarted> {
    match upgrade::inherited() {
        None => {
            let fresh = || {
                let config = config::load(path).map_err(StartError::Config)?;
                let parts = Supervisor::fresh(&config)?;
                Supervisor::new(config, parts)
            };
            fresh().map(|s| (s, None)).map_err(NotStarted::Fresh)
        }
        Some(handover) => {
            let take_over = || {
                let handover = handover?;
                let (config, parts) = Supervisor::take_over(path, &handover.state)?;
                Ok((Supervisor::new(config, parts)?, Some(handover)))
            };
            take_over().map_err(NotStarted::TakeOver)
        }
    }
}

/// This program cannot take over what the previous one handed over: the previous one takes
/// over again, if it can be executed (once: a previous program that cannot take over either
/// does not go back to the one that failed).
fn fall_back(reason: &StartError) -> u8 {
    if let Some(first) = upgrade::failed_upgrade() {
        return orphaned(&format!(
            "the upgrade failed ({first}), and the previous binary cannot take over again either: {reason}"
        ));
    }
    error!("this supervisor cannot take over: {reason}; executing the previous binary again");
    let why = upgrade::fall_back(&reason.to_string());
    orphaned(&format!(
        "{reason}; and the previous binary could not be executed again: {why}"
    ))
}

/// Neither program can take over: this process exits. Its generations see their channel close:
/// the active one serves on and waits at the rendezvous for the next `baton run` (which systemd
/// or runit start), the draining ones finish.
fn orphaned(reason: &str) -> u8 {
    error!(
        "the supervisor cannot run: {reason}; exiting: the active generation serves on and the next `baton run` adopts it"
    );
    1
}

impl Supervisor {
    fn dispatch(&mut self, token: Token) {
        match token {
            SIGNALS => self.signals(),
            CONTROL => self.accept(),
            Token(t) if t >= GENERATIONS => self.generation_readable((t - GENERATIONS) as u64),
            Token(t) if t >= CLIENTS => self.client_ready((t - CLIENTS) as u64),
            _ => {}
        }
    }

    fn signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for signal in pending {
            match signal {
                SIGHUP => {
                    info!("SIGHUP: reload");
                    self.apply(Event::Reload { waiter: None });
                }
                SIGTERM => {
                    info!("SIGTERM: drain every generation, then exit");
                    self.apply(Event::Stop { graceful: true });
                }
                SIGINT => {
                    info!("SIGINT: stop every generation now");
                    self.apply(Event::Stop { graceful: false });
                }
                SIGUSR1 => {
                    info!("SIGUSR1: every generation reopens its logs");
                    self.reopen_logs();
                }
                SIGWINCH if in_terminal() => {
                    // A terminal sends it on every resize of its window.
                    info!(
                        "SIGWINCH ignored: baton runs in a terminal, which sends it when the window is resized; use `baton drain`"
                    );
                }
                SIGWINCH => {
                    info!("SIGWINCH: drain the active generation; none serves until a reload");
                    self.apply(Event::Drain { waiter: None });
                }
                SIGUSR2 => {
                    info!("SIGUSR2: upgrade the supervisor in place");
                    self.start_upgrade(None);
                }
                SIGCHLD => {
                    self.reap();
                    self.upgrade_progress();
                }
                _ => {}
            }
        }
    }

    /// Pings systemd's watchdog when it is due, if the loop runs (it does, we are here) and the
    /// active generation reported lately; a wedged active generation stops the pings, so that
    /// systemd restarts the service.
    fn watchdog(&mut self) {
        let Some(watchdog) = &mut self.watchdog else {
            return;
        };
        let now = Instant::now();
        if now < watchdog.next {
            return;
        }
        watchdog.next = now + watchdog.every;
        let fresh = (watchdog.every * 2).max(std::time::Duration::from_secs(2));
        let alive = match self.lifecycle.active() {
            Some(epoch) => self
                .generations
                .get(&epoch)
                .is_some_and(|g| now.saturating_duration_since(g.heard) <= fresh),
            // Starting or replacing a crashed generation: the loop itself is alive.
            None => true,
        };
        if alive {
            self.notify.watchdog();
        } else {
            warn!("the active generation has not reported for {fresh:?}; not pinging the watchdog");
        }
    }

    /// Leaves nothing behind: the control socket file goes, the supervisor's stats fold into
    /// the retired row. The `baton stop`s waiting are told.
    fn finish(mut self) -> u8 {
        let code = self.exit.unwrap_or(0);
        for epoch in self.generations.keys().copied().collect::<Vec<_>>() {
            self.kill(epoch);
        }
        let last = Response {
            ok: code == 0,
            message: if code == 0 {
                format!(
                    "stopped: every generation has exited, and so has the supervisor (pid {})",
                    std::process::id()
                )
            } else {
                format!("the supervisor exits with status {code}; its log says why")
            },
            status: None,
        };
        let mut line = serde_json::to_vec(&last).unwrap_or_default();
        line.push(b'\n');
        for client in self.clients.values_mut().filter(|c| c.waits_for_exit) {
            // A line of a hundred bytes into a socket whose buffer the first answer left empty:
            // one write takes it; a client too slow to read it is not waited for.
            let _ = client.stream.write(&line);
        }
        let _ = std::fs::remove_file(&self.config.control_socket);
        if let Err(e) = self.region.retire_pid(std::process::id()) {
            warn!("cannot retire the supervisor's stats: {e}");
        }
        info!(code, "supervisor exited");
        code
    }
}

fn now_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn settings(config: &SupervisorConfig) -> Settings {
    Settings {
        readiness_timeout: config.readiness_timeout,
        drain_timeout: config.drain_timeout,
        strategy: config.drain_strategy,
        max_draining: config.max_draining,
        kill_grace: std::time::Duration::from_secs(5),
    }
}

/// Whether the supervisor runs attached to a terminal (its standard input or output is one).
fn in_terminal() -> bool {
    nix::unistd::isatty(std::io::stdin()).unwrap_or(false)
        || nix::unistd::isatty(std::io::stdout()).unwrap_or(false)
}
