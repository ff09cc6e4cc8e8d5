//! The supervisor's event loop: one thread, one mio `Poll` over signals, the control socket, its
//! clients and one channel per generation. Events become [`lifecycle::Event`]s; the lifecycle's
//! [`Action`]s are carried out here.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use restart_protocol::{
    Channel, ChannelError, FEATURE_ADOPT, FEATURE_BIND_SOCKET, FEATURES, Load, PROTOCOL_VERSIONS,
    Received, SocketKey, ToGeneration, ToSupervisor, negotiate,
};
use shm_stats::{Counter, Gauge, ReadError, Region, Shard, Spec, StatsError};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook_mio::v1_0::Signals;
use tracing::{debug, error, info, warn};

use crate::EXIT_USAGE;
use crate::activation;
use crate::adopt;
use crate::config::{self, SupervisorConfig};
use crate::control::{GenerationStatus, Request, Response, Status};
use crate::launch::Launch;
use crate::lifecycle::{self, Action, Event, Lifecycle, Settings, Source, State, Waiter};
use crate::notify::{Notifier, Watchdog};
use crate::spawn;
use crate::store::SocketStore;
use crate::upgrade;

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

/// How long the new binary has for each of its checks before an upgrade.
const UPGRADE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where an upgrade is: the new binary answers `internal upgrade-check`, then takes over on
/// trial.
#[derive(Debug, Clone, Copy)]
enum Step {
    Check,
    Trial,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Check => "self-check",
            Step::Trial => "trial take-over",
        }
    }
}

/// An upgrade under way: the child checking the new binary, and who waits for the outcome.
struct Upgrading {
    step: Step,
    child: std::process::Child,
    deadline: Instant,
    waiters: Vec<Waiter>,
    nonce: u64,
}

impl Upgrading {
    /// Starts a check of the new binary, its output read once it has exited (without
    /// blocking: a child it left behind may hold the pipes), `input` on its standard input.
    fn start(
        step: Step,
        mut command: std::process::Command,
        input: Option<&[u8]>,
    ) -> std::io::Result<std::process::Child> {
        use std::process::Stdio;
        // The state on standard input from a memfd, whatever its size (a pipe holds 64 KiB,
        // and a config can be larger).
        let stdin = match input {
            Some(input) => {
                let memfd = nix::sys::memfd::memfd_create(
                    c"baton-upgrade-trial",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )?;
                let mut file = std::fs::File::from(memfd);
                file.write_all(input)?;
                std::io::Seek::rewind(&mut file)?;
                Stdio::from(file)
            }
            None => Stdio::null(),
        };
        command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The checks are not the supervisor: systemd's variables and the upgrade's are not
        // theirs.
        for var in crate::notify::SYSTEMD_ENV {
            command.env_remove(var);
        }
        command.env_remove(crate::UPGRADE_FD_ENV);
        let child = command.spawn()?;
        if let Some(stdout) = &child.stdout {
            set_nonblocking(stdout)?;
        }
        if let Some(stderr) = &child.stderr {
            set_nonblocking(stderr)?;
        }
        debug!("{} started", step.name());
        Ok(child)
    }

    /// What the child wrote (at most 64 KiB of each).
    fn output(&mut self) -> (String, String) {
        let read = |pipe: Option<&mut dyn Read>| {
            let mut out = Vec::new();
            if let Some(pipe) = pipe {
                let mut buf = [0u8; 4096];
                while out.len() < 64 * 1024 {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => out.extend_from_slice(&buf[..n]),
                    }
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        let stdout = read(self.child.stdout.as_mut().map(|p| p as &mut dyn Read));
        let stderr = read(self.child.stderr.as_mut().map(|p| p as &mut dyn Read));
        (stdout, stderr)
    }
}

fn set_nonblocking(fd: &impl AsFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map(|_| ())
    .map_err(std::io::Error::from)
}

/// A number nobody can guess ahead, for an upgrade's trial to answer with.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// `baton run --config PATH`: a fresh start from the config at `path`, or, in a program executed
/// by `baton upgrade-supervisor`, the take-over of what the previous one handed over (its config
/// included: the file on disk is not read). Runs the supervisor until it is stopped; returns the
/// exit status.
pub fn main(path: &Path) -> u8 {
    let started = match upgrade::inherited() {
        None => match config::load(path) {
            Ok(config) => Supervisor::fresh(&config).map(|parts| (config, parts, None)),
            Err(e) => {
                eprintln!("baton: {e}");
                return crate::EXIT_USAGE;
            }
        },
        Some(Ok(handover)) => match Supervisor::take_over(path, &handover.state) {
            Ok((config, parts)) => Ok((config, parts, Some(handover))),
            Err(reason) => return fall_back(&reason),
        },
        Some(Err(reason)) => return fall_back(&reason),
    };
    let (config, parts, handover) = match started {
        Ok(started) => started,
        Err(e) => {
            error!("{e}");
            return 1;
        }
    };
    let mut supervisor = match Supervisor::new(config, parts) {
        Ok(s) => s,
        Err(e) if handover.is_some() => return fall_back(&e),
        Err(e) => {
            error!("{e}");
            return 1;
        }
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

/// This program cannot take over what the previous one handed over: the previous one takes
/// over again, if it can be executed (once: a previous program that cannot take over either
/// does not go back to the one that failed).
fn fall_back(reason: &str) -> u8 {
    if let Some(first) = upgrade::failed_upgrade() {
        return orphaned(&format!(
            "the upgrade failed ({first}), and the previous binary cannot take over again either: {reason}"
        ));
    }
    error!("this supervisor cannot take over: {reason}; executing the previous binary again");
    let why = upgrade::fall_back(reason);
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

fn now_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How a process ended, or `None` if it has not (stopped or continued).
fn describe(status: WaitStatus) -> Option<String> {
    match status {
        WaitStatus::Exited(_, code) => Some(format!("exit status {code}")),
        WaitStatus::Signaled(_, signal, _) => Some(format!(
            "killed by signal {} ({})",
            signal as i32,
            signal.as_str()
        )),
        _ => None,
    }
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

/// Says that the region at the stats path, made by an earlier release, was replaced.
fn replaced_older_region(region: &Region, version: u32) {
    warn!(
        path = %region.path().display(),
        "the stats region had layout version {version}, made by an earlier baton, which this one cannot write: replaced by a new region (layout version {}), whose counters start from zero; generations started before keep writing the old one until they end",
        shm_stats::LAYOUT_VERSION
    );
}

fn register_stats(region: &Arc<Region>) -> Result<SupervisorStats, String> {
    let err = |e: shm_stats::StatsError| e.to_string();
    Ok(SupervisorStats {
        reloads: region
            .counter(Spec::new(
                "supervisor.reloads_total",
                &[],
                "Reloads started (the first start is not one).",
            ))
            .map_err(err)?,
        failures: region
            .counter(Spec::new(
                "supervisor.reload_failures_total",
                &[],
                "Reloads whose new generation never became active.",
            ))
            .map_err(err)?,
        crashes: region
            .counter(Spec::new(
                "supervisor.generation_crashes_total",
                &[],
                "Active generations that exited unasked.",
            ))
            .map_err(err)?,
        draining: region
            .gauge(Spec::new(
                "supervisor.generations_draining",
                &[],
                "Generations draining now.",
            ))
            .map_err(err)?,
        draining_connections: region
            .gauge(Spec::new(
                "supervisor.draining_connections",
                &[],
                "Connections the draining generations still hold.",
            ))
            .map_err(err)?,
        draining_requests: region
            .gauge(Spec::new(
                "supervisor.draining_requests",
                &[],
                "Requests the draining generations are still answering.",
            ))
            .map_err(err)?,
        shard: region
            .attach_shard(SUPERVISOR_SHARD_EPOCH, 0)
            .map_err(err)?,
        written: lifecycle::Counts::default(),
    })
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

impl Supervisor {
    fn new(config: SupervisorConfig, parts: Parts) -> Result<Supervisor, String> {
        let Parts {
            region,
            mut control,
            store,
            names,
            activated,
            lifecycle,
            generations,
            last_reload,
            last_good,
            upgrades,
            last_upgrade,
            rendezvous,
        } = parts;
        region.set_supervisor_pid(std::process::id());
        if let Some(mismatch) = region.capacity_mismatch(config.capacities) {
            warn!("{mismatch}");
        }
        let stats = register_stats(&region)?;
        let poll = Poll::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
        let mut signals =
            Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCHLD])
                .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| format!("cannot watch signals: {e}"))?;
        poll.registry()
            .register(&mut control, CONTROL, Interest::READABLE)
            .map_err(|e| format!("cannot watch the control socket: {e}"))?;
        let region = region;
        for (&epoch, g) in &generations {
            if let Some(channel) = &g.channel {
                poll.registry()
                    .register(
                        &mut SourceFd(&channel.as_raw_fd()),
                        Token(GENERATIONS + epoch as usize),
                        Interest::READABLE,
                    )
                    .map_err(|e| format!("cannot watch generation {epoch}'s channel: {e}"))?;
            }
        }
        let notify = Notifier::from_env(config.fd_store);
        Ok(Supervisor {
            first_start: !lifecycle.restored(),
            config_refused: false,
            lifecycle,
            config,
            poll,
            signals,
            control,
            clients: HashMap::new(),
            next_client: 0,
            generations,
            store,
            names,
            activated,
            region,
            stats,
            exit: None,
            last_reload,
            watchdog: notify.watchdog_interval().map(|every| Watchdog {
                every,
                next: Instant::now(),
            }),
            notify,
            status_line: String::new(),
            exe: upgrade::binary_path(),
            args: std::env::args().collect(),
            last_good,
            upgrades,
            last_upgrade,
            upgrading: None,
            rendezvous,
            region_lost: false,
        })
    }

    fn fresh(config: &SupervisorConfig) -> Result<Parts, String> {
        if let Some(run_as) = &config.run_as {
            let me = nix::unistd::geteuid();
            if !me.is_root() && me.as_raw() != run_as.uid {
                return Err(format!(
                    "supervisor.user = \"{}\": only a supervisor started as root can run generations as another user; start `baton run` as root (it binds the ports and starts generations as {}), or leave supervisor.user out",
                    run_as.user, run_as.user
                ));
            }
        }
        if let Ok(meta) = std::fs::metadata(&config.stats_path) {
            use std::os::unix::fs::MetadataExt;
            let me = nix::unistd::geteuid().as_raw();
            if meta.uid() != me {
                // Someone else made it (or a generation's user): this supervisor would trust
                // what another user wrote.
                return Err(format!(
                    "stats region {} belongs to uid {}, not to this supervisor's uid {me}; remove it, or set stats.path to a place of this user's",
                    config.stats_path.display(),
                    meta.uid()
                ));
            }
        }
        let (region, replaced) =
            Region::create_or_replace_older(&config.stats_path, config.capacities)
                .map_err(|e| e.to_string())?;
        if let Some(version) = replaced {
            replaced_older_region(&region, version);
        }
        share_region(config, &region)?;
        match region.reclaim_dead() {
            Ok(0) => {}
            Ok(n) => info!(shards = n, "retired the stats of processes that are gone"),
            Err(e) => warn!("{e}"),
        }
        let control = bind_control(&config.control_socket)?;
        // Generations a supervisor of this instance left serving when it died are adopted,
        // not replaced: no connection is refused, none is cut.
        let at = restart_protocol::rendezvous::path_for(&config.control_socket);
        let uid = config
            .run_as
            .as_ref()
            .map_or(nix::unistd::geteuid().as_raw(), |r| r.uid);
        let mut orphans = adopt::find(&at, uid, config.run_as.is_some());
        let rendezvous = match restart_protocol::rendezvous::listen_at(&at) {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(
                    "cannot make the rendezvous {}: {e}; should this supervisor die, its generations drain instead of waiting to be adopted",
                    at.display()
                );
                None
            }
        };
        let mut store = SocketStore::default();
        let mut generations = BTreeMap::new();
        let mut states = Vec::new();
        let mut last_reload = None;
        let mut last_good = None;
        // The newest is the active one (there is one, unless a supervisor died in the middle
        // of a handover); any other drains.
        orphans.sort_by_key(|o| std::cmp::Reverse(o.epoch));
        let now = Instant::now();
        for (i, orphan) in orphans.into_iter().enumerate() {
            let state = if i == 0 {
                info!(
                    epoch = orphan.epoch,
                    pid = orphan.pid,
                    sockets = orphan.sockets.len(),
                    "adopted the active generation a supervisor that is gone left serving"
                );
                last_reload = Some(format!(
                    "adopted generation {} (pid {}), left serving by a supervisor that is gone",
                    orphan.epoch, orphan.pid
                ));
                for (key, fd) in orphan.sockets {
                    store.insert(key, fd);
                }
                // Its config and binary: what a crash of it is replaced from.
                last_good = orphan
                    .config
                    .and_then(|fd| adopted_launch(fd, orphan.pid, &config.path));
                State::Active
            } else {
                warn!(
                    epoch = orphan.epoch,
                    pid = orphan.pid,
                    "adopted another generation that thought it was active; draining it"
                );
                let _ = orphan.channel.send(
                    &ToGeneration::Drain {
                        timeout_ms: u64::try_from(config.drain_timeout.as_millis())
                            .unwrap_or(u64::MAX),
                        strategy: config.drain_strategy,
                    },
                    &[],
                );
                State::Draining
            };
            states.push((orphan.epoch, state));
            generations.insert(
                orphan.epoch,
                GenIo {
                    pid: orphan.pid,
                    channel: Some(orphan.channel),
                    started: SystemTime::now(),
                    build: orphan.build,
                    load: Load::default(),
                    connections_left: None,
                    sockets: Vec::new(),
                    heard: now,
                    launch: last_good.clone().filter(|_| state == State::Active),
                    features: orphan.features,
                    adopted: true,
                },
            );
        }
        for (epoch, state) in &states {
            if *state == State::Active
                && let Some(g) = generations.get_mut(epoch)
            {
                g.sockets = store.keys();
            }
        }
        let lifecycle = match states.iter().map(|(e, _)| *e).max() {
            Some(newest) => Lifecycle::restore(
                settings(config),
                newest + 1,
                states,
                lifecycle::Counts::default(),
                false,
                now,
            ),
            None => Lifecycle::new(settings(config), 0),
        };
        // Sockets systemd passed (socket activation, or our own fd store) seed the store.
        let mut names = HashMap::new();
        let mut activated = std::collections::HashSet::new();
        for passed in activation::passed() {
            info!(key = %passed.key, name = passed.name.as_deref(), "listen socket from systemd");
            if let Some(name) = passed.name {
                names.insert(name, passed.key);
                activated.insert(passed.key);
            }
            store.insert(passed.key, passed.fd);
        }
        Ok(Parts {
            region,
            control,
            store,
            names,
            activated,
            lifecycle,
            generations,
            last_reload,
            last_good,
            upgrades: 0,
            last_upgrade: None,
            rendezvous,
        })
    }

    /// Takes over from the supervisor this process replaced (see `upgrade.rs`). Entries that
    /// do not check out (a process gone, an fd that is not what it should be) are left out,
    /// with a word in the log.
    fn take_over(
        path: &Path,
        state: &upgrade::Inherited,
    ) -> Result<(SupervisorConfig, Parts), String> {
        #[cfg(debug_assertions)]
        if let Some(how) = std::env::var_os("BATON_TEST_TAKEOVER_FAILS")
            && (how == "always" || upgrade::failed_upgrade().is_none())
        {
            // Tests make an upgraded program fail here, to see the previous one take over again.
            return Err("BATON_TEST_TAKEOVER_FAILS is set (a test build)".into());
        }
        // The running config: the one handed over (a supervisor that did not hand it over
        // leaves only the file to read).
        let last_good = match &state.last_good {
            Some(launch) => {
                let binary = upgrade::adopt(launch.binary_fd)
                    .map(std::fs::File::from)
                    .ok_or("the proxy binary was not handed over")?;
                Some(Rc::new(Launch::handed_over(
                    path,
                    launch.config_source.clone(),
                    binary,
                    launch.binary_path.clone(),
                )?))
            }
            None => None,
        };
        let config = match &last_good {
            Some(launch) => launch.config.clone(),
            None => config::load(path)?,
        };
        let config = &config;
        let control = upgrade::adopt(state.control_fd)
            .map(std::os::unix::net::UnixListener::from)
            .ok_or("the control socket was not handed over")?;
        control
            .set_nonblocking(true)
            .map_err(|e| format!("control socket: {e}"))?;
        let control = UnixListener::from_std(control);
        let region_file = upgrade::adopt(state.region_fd)
            .map(std::fs::File::from)
            .ok_or("the stats region was not handed over")?;
        let region = match Region::from_file(&config.stats_path, region_file) {
            Ok(region) => region,
            // The supervisor this one replaced is of an earlier release, whose region this
            // release cannot write: the generations started from now on get a new one.
            Err(StatsError::Unusable(ReadError::UnknownVersion { found, known, .. }))
                if found < known =>
            {
                let (region, _) =
                    Region::create_or_replace_older(&config.stats_path, config.capacities)
                        .map_err(|e| e.to_string())?;
                replaced_older_region(&region, found);
                region
            }
            Err(e) => return Err(e.to_string()),
        };
        // The new binary's config may have gained `supervisor.user`.
        share_region(config, &region)?;
        let mut store = SocketStore::default();
        for (key, fd) in &state.sockets {
            match upgrade::adopt(*fd) {
                Some(fd) => {
                    store.insert(*key, fd);
                }
                None => warn!(%key, "a handed-over listen socket is not open; left out"),
            }
        }
        let now = Instant::now();
        let mut generations = BTreeMap::new();
        let mut states = Vec::new();
        for g in &state.generations {
            let alive = nix::sys::signal::kill(Pid::from_raw(g.pid as i32), None).is_ok();
            let channel = upgrade::adopt(g.channel_fd).and_then(|fd| Channel::from_fd(fd).ok());
            let (Some(gen_state), true, Some(channel)) = (g.state(), alive, channel) else {
                warn!(
                    epoch = g.epoch,
                    pid = g.pid,
                    "a handed-over generation does not check out; left out"
                );
                continue;
            };
            states.push((g.epoch, gen_state));
            generations.insert(
                g.epoch,
                GenIo {
                    pid: g.pid,
                    channel: Some(channel),
                    started: UNIX_EPOCH + std::time::Duration::from_millis(g.started_unix_ms),
                    build: g.build.clone(),
                    load: g.load(),
                    connections_left: None,
                    sockets: g.sockets.clone(),
                    heard: now,
                    launch: None,
                    features: g.features,
                    adopted: g.adopted,
                },
            );
        }
        info!(
            generations = generations.len(),
            sockets = store.len(),
            "took over from the supervisor this one replaced"
        );
        let lifecycle = Lifecycle::restore(
            settings(config),
            state.next_epoch,
            states,
            state.counts(),
            state.drained,
            now,
        );
        // The rendezvous: handed over, or made now (a supervisor that had none).
        let rendezvous = state.rendezvous_fd.and_then(upgrade::adopt).or_else(|| {
            restart_protocol::rendezvous::listen_at(&restart_protocol::rendezvous::path_for(
                &config.control_socket,
            ))
            .map_err(|e| warn!("cannot make the rendezvous: {e}"))
            .ok()
        });
        // The active generation runs the handed-over launch.
        if let Some(active) = lifecycle.active()
            && let Some(g) = generations.get_mut(&active)
        {
            g.launch = last_good.clone();
        }
        Ok((
            config.clone(),
            Parts {
                region,
                control,
                store,
                names: state.names.iter().cloned().collect(),
                activated: state.activated.iter().copied().collect(),
                lifecycle,
                generations,
                last_reload: state.last_reload.clone(),
                last_good,
                upgrades: state.upgrades,
                last_upgrade: state.last_upgrade.clone(),
                rendezvous,
            },
        ))
    }

    /// Why the supervisor cannot be upgraded now, if it cannot.
    fn upgrade_refusal(&self) -> Option<String> {
        if self.lifecycle.stopping() {
            return Some("the supervisor is stopping".into());
        }
        if self.lifecycle.reloading() {
            return Some(
                "a reload is in progress; upgrade the supervisor once it has ended".into(),
            );
        }
        if self.lifecycle.starting() {
            return Some(
                "a generation is starting (replacing one that crashed); upgrade the supervisor once `baton status` shows it active"
                    .into(),
            );
        }
        None
    }

    /// SIGUSR2 and `baton upgrade-supervisor`: check the `baton` binary on disk (see
    /// `upgrade.rs`), then execute it in this process's place. The checks run as children the
    /// loop waits for, so that a binary that hangs holds nothing up.
    fn start_upgrade(&mut self, waiter: Option<Waiter>) {
        if let Some(reason) = self.upgrade_refusal() {
            self.upgrade_failed(waiter.into_iter().collect(), &reason);
            return;
        }
        if let Some(upgrading) = &mut self.upgrading {
            upgrading.waiters.extend(waiter);
            return;
        }
        info!(binary = %self.exe.display(), "upgrading the supervisor: checking the binary on disk");
        let mut command = std::process::Command::new(&self.exe);
        command.args(["internal", "upgrade-check"]);
        match Upgrading::start(Step::Check, command, None) {
            Ok(child) => {
                self.upgrading = Some(Upgrading {
                    step: Step::Check,
                    child,
                    deadline: Instant::now() + UPGRADE_CHECK_TIMEOUT,
                    waiters: waiter.into_iter().collect(),
                    nonce: nonce(),
                });
            }
            Err(e) => {
                let reason = format!("cannot run {}: {e}", self.exe.display());
                self.upgrade_failed(waiter.into_iter().collect(), &reason);
            }
        }
    }

    /// Looks at the check under way: carries on when it has ended, gives up past its deadline.
    fn upgrade_progress(&mut self) {
        let Some(upgrading) = &mut self.upgrading else {
            return;
        };
        let status = match upgrading.child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) if Instant::now() < upgrading.deadline => return,
            Ok(None) | Err(_) => {
                let _ = upgrading.child.kill();
                let _ = upgrading.child.wait();
                let step = upgrading.step;
                let Some(upgrading) = self.upgrading.take() else {
                    return;
                };
                let reason = format!(
                    "{} did not answer its {} within {UPGRADE_CHECK_TIMEOUT:?}; it was killed",
                    self.exe.display(),
                    step.name()
                );
                self.upgrade_failed(upgrading.waiters, &reason);
                return;
            }
        };
        let (stdout, stderr) = upgrading.output();
        let step = upgrading.step;
        let nonce = upgrading.nonce;
        let exe = self.exe.clone();
        let said = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map_or(String::new(), |l| format!(": {}", l.trim()));
        match step {
            Step::Check => {
                let answer = if status.success() {
                    upgrade::read_check_answer(&exe, &stdout)
                } else {
                    Err(format!(
                        "{} failed its self-check ({status}){said}",
                        exe.display()
                    ))
                };
                match answer {
                    Ok(()) => {
                        let state = self.handover_state(nonce);
                        let mut command = std::process::Command::new(&exe);
                        command
                            .args(self.args.iter().skip(1))
                            .env(upgrade::TRIAL_ENV, "1");
                        let trial = upgrade::to_json(&state).and_then(|json| {
                            Upgrading::start(Step::Trial, command, Some(&json))
                                .map_err(|e| format!("cannot run {}: {e}", exe.display()))
                        });
                        match trial {
                            Ok(child) => {
                                if let Some(upgrading) = &mut self.upgrading {
                                    upgrading.step = Step::Trial;
                                    upgrading.child = child;
                                    upgrading.deadline = Instant::now() + UPGRADE_CHECK_TIMEOUT;
                                }
                            }
                            Err(reason) => {
                                let waiters =
                                    self.upgrading.take().map(|u| u.waiters).unwrap_or_default();
                                self.upgrade_failed(waiters, &reason);
                            }
                        }
                    }
                    Err(reason) => {
                        let waiters = self.upgrading.take().map(|u| u.waiters).unwrap_or_default();
                        self.upgrade_failed(waiters, &reason);
                    }
                }
            }
            Step::Trial => {
                if status.success() && stdout.trim() == format!("ok {nonce}") {
                    self.exec_upgrade();
                } else {
                    let waiters = self.upgrading.take().map(|u| u.waiters).unwrap_or_default();
                    let reason = format!(
                        "{} cannot take over this supervisor: run as `baton run` with the running state, it {}{said}",
                        exe.display(),
                        if status.success() {
                            "did not read it".to_owned()
                        } else {
                            format!("failed ({status})")
                        }
                    );
                    self.upgrade_failed(waiters, &reason);
                }
            }
        }
    }

    fn upgrade_failed(&mut self, waiters: Vec<Waiter>, reason: &str) {
        error!("the supervisor was not upgraded: {reason}");
        self.last_upgrade = Some(format!("not upgraded: {reason}"));
        self.respond_all(waiters, false, &format!("not upgraded: {reason}"));
    }

    /// What a new program takes over.
    fn handover_state(&self, nonce: u64) -> upgrade::Inherited {
        upgrade::Inherited {
            version: upgrade::STATE_VERSION,
            control_fd: self.control.as_raw_fd(),
            region_fd: self.region.file().as_raw_fd(),
            sockets: self.store.fds(),
            names: self.names.iter().map(|(n, k)| (n.clone(), *k)).collect(),
            activated: self.activated.iter().copied().collect(),
            generations: self
                .lifecycle
                .generations()
                .filter_map(|g| {
                    let io = self.generations.get(&g.epoch)?;
                    Some(upgrade::InheritedGeneration {
                        epoch: g.epoch,
                        pid: io.pid,
                        state: g.state.name().to_owned(),
                        channel_fd: io.channel.as_ref()?.as_raw_fd(),
                        started_unix_ms: now_ms(io.started),
                        build: io.build.clone(),
                        sockets: io.sockets.clone(),
                        load: (io.load.connections, io.load.requests),
                        features: io.features,
                        adopted: io.adopted,
                    })
                })
                .collect(),
            next_epoch: self.lifecycle.next_epoch(),
            counts: (
                self.lifecycle.counts.reloads,
                self.lifecycle.counts.reload_failures,
                self.lifecycle.counts.crashes,
            ),
            last_reload: self.last_reload.clone(),
            drained: self.lifecycle.drained(),
            last_good: self.last_good.as_ref().map(|l| upgrade::InheritedLaunch {
                config_source: l.source.clone(),
                binary_fd: upgrade::raw(&l.binary),
                binary_path: l.binary_path.clone(),
            }),
            upgrades: self.upgrades,
            last_upgrade: self.last_upgrade.clone(),
            nonce,
            rendezvous_fd: self.rendezvous.as_ref().map(upgrade::raw),
        }
    }

    /// The new binary passed its checks: execute it in this process's place.
    fn exec_upgrade(&mut self) {
        let Some(upgrading) = self.upgrading.take() else {
            return;
        };
        if let Some(reason) = self.upgrade_refusal() {
            self.upgrade_failed(upgrading.waiters, &reason);
            return;
        }
        // This program's own binary, for the new one to go back to if it cannot take over.
        let previous = match upgrade::own_binary() {
            Ok(file) => Some(file),
            Err(e) => {
                warn!("cannot keep this binary for a fallback: {e}");
                None
            }
        };
        let state = self.handover_state(upgrading.nonce);
        info!(binary = %self.exe.display(), "upgrading the supervisor: executing the binary on disk in place");
        // Answered first: the connections do not survive the exec.
        let message = format!("upgrading: executing {} in place", self.exe.display());
        self.respond_all(upgrading.waiters, true, &message);
        self.notify.reloading();
        // The new program attaches its own stats row; this one's counts fold in first.
        if let Err(e) = self.region.retire_epoch(SUPERVISOR_SHARD_EPOCH) {
            warn!("cannot retire the supervisor's stats: {e}");
        }
        let error = upgrade::exec(
            &self.exe,
            &self.args,
            &state,
            previous.as_ref().map(upgrade::raw),
        );
        // Still here: the exec failed and nothing was handed over.
        match register_stats(&self.region) {
            Ok(stats) => self.stats = stats,
            Err(e) => warn!("cannot count the supervisor's stats again: {e}"),
        }
        self.notify.ready(&self.status_line);
        error!("the supervisor was not upgraded: {error}");
        self.last_upgrade = Some(format!("not upgraded: {error}"));
    }

    /// Feeds an event to the lifecycle and carries out what it decides.
    fn apply(&mut self, event: Event) {
        if matches!(event, Event::Stop { .. }) {
            self.notify.stopping();
            // Before the generations are told to drain: then the last accept loop to end closes
            // each socket. (Copies in systemd's fd store keep theirs open for a restart.)
            self.store.close_all();
        }
        let actions = self.lifecycle.handle(event, Instant::now());
        for action in actions {
            self.execute(action);
        }
        self.update_stats();
        let line = self.status_line();
        if line != self.status_line {
            self.notify.status(&line);
            self.status_line = line;
        }
    }

    /// One line for `systemctl status`: the active generation, what drains, the last reload.
    fn status_line(&self) -> String {
        let active = match self.lifecycle.active() {
            Some(epoch) => {
                let pid = self.generations.get(&epoch).map_or(0, |g| g.pid);
                format!("generation {epoch} active (pid {pid})")
            }
            None if self.lifecycle.drained() => {
                "drained: no generation accepts until `baton reload`".to_owned()
            }
            None if self.lifecycle.starting() => {
                "no active generation yet: one is starting".to_owned()
            }
            None => "no active generation".to_owned(),
        };
        let draining = self.lifecycle.draining();
        let draining = if draining > 0 {
            format!(", {draining} draining")
        } else {
            String::new()
        };
        let last = self
            .last_reload
            .as_ref()
            .map_or(String::new(), |r| format!("; last reload: {r}"));
        format!("{active}{draining}{last}")
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

    fn update_stats(&mut self) {
        let counts = self.lifecycle.counts;
        let s = &mut self.stats;
        s.shard.add(s.reloads, counts.reloads - s.written.reloads);
        s.shard.add(
            s.failures,
            counts.reload_failures - s.written.reload_failures,
        );
        s.shard.add(s.crashes, counts.crashes - s.written.crashes);
        s.written = counts;
        s.shard.set(s.draining, self.lifecycle.draining() as i64);
        let (mut connections, mut requests) = (0, 0);
        for g in self
            .lifecycle
            .generations()
            .filter(|g| g.state == State::Draining)
        {
            if let Some(io) = self.generations.get(&g.epoch) {
                connections += io.load.connections;
                requests += io.load.requests;
            }
        }
        s.shard.set(s.draining_connections, connections as i64);
        s.shard.set(s.draining_requests, requests as i64);
    }

    fn execute(&mut self, action: Action) {
        match action {
            Action::Spawn { epoch, from } => self.spawn(epoch, from),
            Action::Drain {
                epoch,
                timeout,
                strategy,
            } => {
                info!(epoch, timeout = %humantime::format_duration(timeout), strategy = strategy.name(), "draining");
                let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                if !self.send(
                    epoch,
                    &ToGeneration::Drain {
                        timeout_ms,
                        strategy,
                    },
                    &[],
                ) {
                    self.kill(epoch);
                }
            }
            Action::Stop { epoch } => {
                info!(epoch, "stopping");
                if !self.send(epoch, &ToGeneration::Stop, &[]) {
                    self.kill(epoch);
                }
            }
            Action::Kill { epoch } => {
                warn!(epoch, "killing a generation that did not finish in time");
                self.kill(epoch);
            }
            Action::Activated { epoch, replaced } => {
                let used = self
                    .generations
                    .get(&epoch)
                    .map(|g| g.sockets.clone())
                    .unwrap_or_default();
                for key in self.store.retain(&used) {
                    if self.activated.remove(&key) {
                        let name = self
                            .names
                            .iter()
                            .find(|(_, k)| **k == key)
                            .map(|(n, _)| n.clone());
                        warn!(%key, name = name.as_deref(), "systemd passed a socket that no listener uses; closing it");
                    } else {
                        info!(%key, "closed a listen socket the active generation no longer uses");
                        self.notify.remove_fd(&activation::store_name(&key));
                    }
                }
                self.region.set_current_epoch(epoch);
                let pid = self.generations.get(&epoch).map_or(0, |g| g.pid);
                match replaced {
                    Some(replaced) => info!(epoch, pid, replaced, "active"),
                    None => info!(epoch, pid, "active"),
                }
                // Its config is the running one now: its settings apply, and a crash is
                // replaced from its launch.
                self.hand_rendezvous(epoch);
                if let Some(launch) = self.generations.get(&epoch).and_then(|g| g.launch.clone()) {
                    self.config = launch.config.clone();
                    self.lifecycle.set_settings(settings(&self.config));
                    self.last_good = Some(launch);
                }
            }
            Action::Reply { waiters, result } => {
                let (ok, message) = match &result {
                    Ok(epoch) => (true, format!("generation {epoch} is active")),
                    Err(reason) => (false, reason.clone()),
                };
                // The first reply tells the first start's outcome: not a reload's.
                let first_start = std::mem::replace(&mut self.first_start, false);
                if !ok {
                    let what = if first_start { "first start" } else { "reload" };
                    error!("{what} failed: {message}");
                }
                if !first_start {
                    self.last_reload = Some(if ok {
                        message.clone()
                    } else {
                        format!("failed: {message}")
                    });
                }
                // A reload (or the first start) ended: systemd's reload job is done either way.
                if self.lifecycle.active().is_some() {
                    let line = self.status_line();
                    self.notify.ready(&line);
                    self.status_line = line;
                }
                self.respond_all(waiters, ok, &message);
            }
            Action::DrainReply { waiters, result } => {
                let (ok, message) = match &result {
                    Ok(Some(epoch)) => (
                        true,
                        format!(
                            "drained: generation {epoch} no longer accepts and finishes its connections; new connections wait in the accept queue until `baton reload`"
                        ),
                    ),
                    Ok(None) => (
                        true,
                        "already drained: no generation accepts; `baton reload` starts one".into(),
                    ),
                    Err(reason) => (false, format!("not drained: {reason}")),
                };
                if ok {
                    info!("{message}");
                } else {
                    warn!("{message}");
                }
                let line = self.status_line();
                self.notify.status(&line);
                self.status_line = line;
                self.respond_all(waiters, ok, &message);
            }
            Action::Retire { epoch } => {
                if let Some(mut g) = self.generations.remove(&epoch) {
                    if let Some(channel) = g.channel.take() {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&channel.as_raw_fd()));
                    }
                    if let Err(e) = self.region.retire_pid(g.pid) {
                        warn!(epoch, "cannot retire its stats: {e}");
                    }
                }
            }
            // The first reason to exit is the one to report (a failed first start's 1 is not
            // undone by the exit of its generation that follows).
            Action::Exit { code } => {
                let code = if code == 1 && self.config_refused {
                    EXIT_USAGE
                } else {
                    code
                };
                self.exit = Some(self.exit.map_or(code, |c| c.max(code)));
            }
        }
    }

    /// The launch a generation starts from: the disk's (checked whole, as `baton check` does),
    /// or the last good one.
    fn launch(&self, from: Source) -> Result<Rc<Launch>, String> {
        if from == Source::LastGood
            && let Some(launch) = &self.last_good
        {
            return Ok(launch.clone());
        }
        Launch::from_disk(&self.config.path, Some(&self.config)).map(Rc::new)
    }

    fn spawn(&mut self, epoch: u64, from: Source) {
        if self.lifecycle.active().is_some() && self.lifecycle.reloading() {
            self.notify.reloading();
        }
        let spawned = self.launch(from).and_then(|launch| {
            spawn::spawn(&launch, epoch, self.config.run_as.as_ref())
                .map(|(child, channel)| (child, channel, launch.clone()))
                .map_err(|e| {
                    let hint = match (&self.config.run_as, e.raw_os_error()) {
                        (Some(run_as), Some(libc::EPERM)) => format!(
                            "; running it as supervisor.user {} needs CAP_SETUID and CAP_SETGID (under systemd: in the unit's CapabilityBoundingSet, as the shipped unit has them)",
                            run_as.user
                        ),
                        _ => String::new(),
                    };
                    format!("cannot run {}: {e}{hint}", launch.binary_path.display())
                })
        });
        match spawned {
            Ok((child, channel, launch)) => {
                let pid = child.id();
                // Reaped by pid in `reap`; the handle itself holds nothing that needs it.
                drop(child);
                let token = Token(GENERATIONS + epoch as usize);
                if let Err(e) = self.poll.registry().register(
                    &mut SourceFd(&channel.as_raw_fd()),
                    token,
                    Interest::READABLE,
                ) {
                    error!(epoch, "cannot watch the generation's channel: {e}");
                }
                let from = match from {
                    Source::Disk => "disk",
                    Source::LastGood => "last active config",
                };
                info!(epoch, pid, binary = %launch.binary_path.display(), from, "spawned");
                self.generations.insert(
                    epoch,
                    GenIo {
                        pid,
                        channel: Some(channel),
                        started: SystemTime::now(),
                        build: String::new(),
                        load: Load::default(),
                        connections_left: None,
                        sockets: Vec::new(),
                        heard: Instant::now(),
                        launch: Some(launch),
                        features: 0,
                        adopted: false,
                    },
                );
            }
            Err(error) => {
                // A reload's failure is logged with its reply; a replacement's only here.
                if self.lifecycle.reload_epoch() != Some(epoch) {
                    error!(epoch, "{error}");
                }
                self.apply(Event::SpawnFailed { epoch, error });
            }
        }
    }

    /// Another process cut the stats region short (the supervisor lives on: see `shm_stats`'s
    /// guard): makes a new one at the path, for itself and the generations started from now on,
    /// so that reloads work and stats are recorded again (from zero: the old counts went with
    /// the file).
    fn check_region(&mut self) {
        if self.region_lost || !self.region.lost() {
            return;
        }
        let path = self.region.path().to_owned();
        error!(
            "the stats region {} was cut short by another process (never truncate or remove it while baton runs); the generations serve on, their counts so far are gone",
            path.display()
        );
        let _ = std::fs::remove_file(&path);
        let made = Region::create_or_open(&path, self.config.capacities)
            .map_err(|e| e.to_string())
            .and_then(|region| {
                // Made by this process, not planted by another user in the moment between.
                use std::os::unix::fs::MetadataExt;
                let me = nix::unistd::geteuid().as_raw();
                let owner = region.file().metadata().map_err(|e| e.to_string())?.uid();
                if owner != me {
                    return Err(format!(
                        "{} belongs to uid {owner}, not to this supervisor's uid {me}",
                        path.display()
                    ));
                }
                share_region(&self.config, &region)?;
                region.set_supervisor_pid(std::process::id());
                if let Some(active) = self.lifecycle.active() {
                    region.set_current_epoch(active);
                }
                let stats = register_stats(&region)?;
                Ok((region, stats))
            });
        match made {
            Ok((region, stats)) => {
                self.region = region;
                self.stats = stats;
                info!(path = %path.display(), "made a new stats region: the generations started from now on record their stats there, from zero");
            }
            Err(e) => {
                self.region_lost = true;
                error!(
                    "cannot make a new stats region: {e}; stop and start baton to have stats again"
                );
            }
        }
    }

    /// Gives the active generation the rendezvous, where the next supervisor adopts it should
    /// this one die.
    fn hand_rendezvous(&mut self, epoch: u64) {
        let adoptable = self
            .generations
            .get(&epoch)
            .is_some_and(|g| g.features & FEATURE_ADOPT != 0);
        let Some(rendezvous) = self.rendezvous.as_ref().filter(|_| adoptable) else {
            return;
        };
        let Ok(copy) = rendezvous.try_clone() else {
            return;
        };
        self.send(epoch, &ToGeneration::Rendezvous, &[copy.as_fd()]);
    }

    fn kill(&mut self, epoch: u64) {
        if let Some(g) = self.generations.get(&epoch) {
            match nix::sys::signal::kill(Pid::from_raw(g.pid as i32), Signal::SIGKILL) {
                // Gone already.
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(nix::errno::Errno::EPERM) => error!(
                    epoch,
                    pid = g.pid,
                    "cannot kill the generation, which runs as another user: the supervisor lacks CAP_KILL (under systemd, add it to the unit's CapabilityBoundingSet); it goes on waiting for the generation to exit"
                ),
                Err(e) => warn!(epoch, pid = g.pid, "cannot kill the generation: {e}"),
            }
        }
    }

    /// Sends to a generation; false if it cannot be reached.
    fn send(
        &mut self,
        epoch: u64,
        msg: &ToGeneration,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> bool {
        let Some(channel) = self
            .generations
            .get(&epoch)
            .and_then(|g| g.channel.as_ref())
        else {
            return false;
        };
        match channel.send(msg, fds) {
            Ok(()) => true,
            Err(e) => {
                warn!(epoch, "cannot send to the generation: {e}");
                false
            }
        }
    }

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

    fn reopen_logs(&mut self) {
        let epochs: Vec<u64> = self.generations.keys().copied().collect();
        for epoch in epochs {
            self.send(epoch, &ToGeneration::ReopenLogs, &[]);
        }
    }

    fn reap(&mut self) {
        let mut exited = Vec::new();
        for (&epoch, g) in &self.generations {
            if g.adopted {
                // Not our child: its channel closing tells its exit.
                continue;
            }
            match waitpid(Pid::from_raw(g.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(status) => {
                    if let Some(how) = describe(status) {
                        exited.push((epoch, g.pid, how));
                    }
                    // The first generation refused the config (the proxy's part of it, which
                    // `baton check` reads too): `baton run` exits as for a bad config.
                    if matches!(status, WaitStatus::Exited(_, code) if code == i32::from(EXIT_USAGE))
                        && self.first_start
                        && self.lifecycle.reload_epoch() == Some(epoch)
                    {
                        self.config_refused = true;
                    }
                }
                // Not our child any more (already reaped): it is gone.
                Err(nix::errno::Errno::ECHILD) => exited.push((epoch, g.pid, "gone".to_owned())),
                Err(e) => warn!(epoch, "cannot check the generation's process: {e}"),
            }
        }
        for (epoch, pid, status) in exited {
            // What it said before it died (a `Failed` with the reason, an `Exiting` with the
            // connections left) may still wait unread.
            self.generation_readable(epoch);
            self.log_exit(epoch, pid, &status);
            self.apply(Event::Exited { epoch, status });
        }
    }

    /// One line for a generation's exit. The connections it closed unfinished are those it
    /// counted at the end of its drain; one that exited without draining (a crash, a kill)
    /// took with it those it held at its last load report.
    fn log_exit(&self, epoch: u64, pid: u32, status: &str) {
        match self.generations.get(&epoch) {
            Some(GenIo {
                connections_left: Some(left),
                ..
            }) => info!(epoch, pid, status, connections_left = left, "exited"),
            Some(g) if g.load.connections > 0 => warn!(
                epoch,
                pid,
                status,
                connections_at_last_report = g.load.connections,
                "exited without draining"
            ),
            _ => info!(epoch, pid, status, "exited"),
        }
    }

    fn generation_readable(&mut self, epoch: u64) {
        loop {
            let Some(channel) = self
                .generations
                .get(&epoch)
                .and_then(|g| g.channel.as_ref())
            else {
                return;
            };
            match channel.recv::<ToSupervisor>() {
                Ok(Some(received)) => self.on_message(epoch, received),
                Ok(None) => return,
                Err(ChannelError::Closed) => {
                    debug!(epoch, "the generation closed its channel");
                    let mut adopted = None;
                    if let Some(g) = self.generations.get_mut(&epoch)
                        && let Some(channel) = g.channel.take()
                    {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&channel.as_raw_fd()));
                        adopted = g.adopted.then_some(g.pid);
                    }
                    // A child's exit arrives with SIGCHLD (see `reap`); an adopted generation
                    // closes its channel only by exiting.
                    if let Some(pid) = adopted {
                        let status =
                            "exited (adopted: its exit status went to its parent)".to_owned();
                        self.log_exit(epoch, pid, &status);
                        self.apply(Event::Exited { epoch, status });
                    }
                    return;
                }
                Err(ChannelError::Io(e)) => {
                    warn!(epoch, "cannot read from the generation: {e}");
                    return;
                }
                Err(e) => warn!(epoch, "ignored a bad message from the generation: {e}"),
            }
        }
    }

    fn on_message(&mut self, epoch: u64, received: Received<ToSupervisor>) {
        let Received { msg, fds } = received;
        match msg {
            ToSupervisor::Hello {
                versions,
                features,
                build,
                ..
            } => match negotiate(PROTOCOL_VERSIONS, versions) {
                Ok(version) => {
                    let offered_features = if self.config.run_as.is_some() {
                        FEATURES
                    } else {
                        FEATURES & !FEATURE_BIND_SOCKET
                    } & features;
                    if let Some(g) = self.generations.get_mut(&epoch) {
                        g.build = build;
                        g.features = offered_features;
                    }
                    // Binding for a generation is for one that runs unprivileged; others bind
                    // themselves and report their own errors, with their advice.
                    let offered = if self.config.run_as.is_some() {
                        FEATURES
                    } else {
                        FEATURES & !FEATURE_BIND_SOCKET
                    };
                    self.send(
                        epoch,
                        &ToGeneration::Welcome {
                            version,
                            features: offered & features,
                            supervisor_pid: std::process::id(),
                        },
                        &[],
                    );
                }
                Err(e) => {
                    let reason = e.to_string();
                    self.send(
                        epoch,
                        &ToGeneration::Refused {
                            reason: reason.clone(),
                        },
                        &[],
                    );
                    self.apply(Event::Failed { epoch, reason });
                }
            },
            ToSupervisor::GetSocket { id, key } => {
                let stored = self.store.get(&key).map(|fd| fd.try_clone_to_owned());
                match stored {
                    Some(Ok(fd)) => {
                        debug!(epoch, %key, "handing over a stored socket");
                        self.send(epoch, &ToGeneration::Socket { id, key }, &[fd.as_fd()]);
                    }
                    Some(Err(e)) => {
                        let message = format!("cannot copy socket {key}: {e}");
                        self.send(epoch, &ToGeneration::Error { id, message }, &[]);
                    }
                    None => {
                        self.send(epoch, &ToGeneration::NotFound { id, key }, &[]);
                    }
                }
            }
            ToSupervisor::DepositSocket { id, key } => match fds.into_iter().next() {
                Some(fd) => {
                    // Kept by systemd too, so that a restart of the supervisor gets it back.
                    self.notify
                        .store_fd(&activation::store_name(&key), fd.as_fd());
                    if self.store.insert(key, fd) {
                        info!(epoch, %key, "stored a new listen socket");
                    }
                    self.send(epoch, &ToGeneration::Deposited { id }, &[]);
                }
                None => {
                    let message = "no socket came with the deposit".to_owned();
                    self.send(epoch, &ToGeneration::Error { id, message }, &[]);
                }
            },
            ToSupervisor::GetNamedSocket { id, name } => {
                let found = self
                    .names
                    .get(&name)
                    .and_then(|key| Some((*key, self.store.get(key)?.try_clone_to_owned())));
                match found {
                    Some((key, Ok(fd))) => {
                        debug!(epoch, %key, name, "handing over a socket systemd passed");
                        self.send(epoch, &ToGeneration::Socket { id, key }, &[fd.as_fd()]);
                    }
                    Some((key, Err(e))) => {
                        let message = format!("cannot copy socket {key}: {e}");
                        self.send(epoch, &ToGeneration::Error { id, message }, &[]);
                    }
                    None => {
                        let mut known: Vec<&str> = self.names.keys().map(String::as_str).collect();
                        known.sort_unstable();
                        let message = if known.is_empty() {
                            format!(
                                "no socket named `{name}`: systemd passed none (is baton started by its .socket unit?)"
                            )
                        } else {
                            format!(
                                "no socket named `{name}` was passed by systemd (FileDescriptorName: {})",
                                known.join(", ")
                            )
                        };
                        self.send(epoch, &ToGeneration::Error { id, message }, &[]);
                    }
                }
            }
            ToSupervisor::GetStatsRegion { id } => {
                let region = self.region.clone();
                let path = region.path().display().to_string();
                self.send(
                    epoch,
                    &ToGeneration::StatsRegion { id, path },
                    &[region.file().as_fd()],
                );
            }
            ToSupervisor::Ready { sockets } => {
                if let Some(g) = self.generations.get_mut(&epoch) {
                    g.sockets = sockets;
                }
                info!(epoch, "ready");
                self.apply(Event::Ready { epoch });
            }
            ToSupervisor::Failed { reason } => {
                // A reload's failure is logged once, with its reply; a replacement's only here.
                if self.lifecycle.reload_epoch() == Some(epoch) {
                    debug!(epoch, "generation failed to start: {reason}");
                } else {
                    error!(epoch, "generation failed to start: {reason}");
                }
                self.apply(Event::Failed { epoch, reason });
            }
            ToSupervisor::Load(load) => {
                if let Some(g) = self.generations.get_mut(&epoch) {
                    g.load = load;
                    g.heard = Instant::now();
                }
                self.update_stats();
            }
            ToSupervisor::Draining => {
                debug!(epoch, "no longer accepting");
                self.apply(Event::StoppedAccepting { epoch });
            }
            ToSupervisor::Exiting { connections_left } => {
                debug!(epoch, connections_left, "generation is exiting");
                if let Some(g) = self.generations.get_mut(&epoch) {
                    g.connections_left = Some(connections_left);
                    g.load = Load::default();
                }
                self.update_stats();
            }
            ToSupervisor::BindSocket { id, key, backlog } => {
                // The addresses of the config this generation was started with.
                let source = self
                    .generations
                    .get(&epoch)
                    .and_then(|g| g.launch.as_ref())
                    .map(|l| l.source.clone());
                let listed = match &source {
                    Some(source) => config::listen_addresses_in(&self.config.path, source),
                    None => config::listen_addresses(&self.config.path),
                };
                let bound = listed.and_then(|configured| {
                    if !configured.contains(&key.address) {
                        return Err(format!(
                            "{} is not a listener or admin address of {}",
                            key.address,
                            self.config.path.display()
                        ));
                    }
                    if let Some(fd) = self.store.get(&key) {
                        return fd
                            .try_clone_to_owned()
                            .map_err(|e| format!("cannot copy socket {key}: {e}"));
                    }
                    // Bound as baton-proxy binds its own (the generation makes it non-blocking
                    // either way).
                    let fd = std::os::fd::OwnedFd::from(
                        restart_protocol::listen::bind_tcp(key.address, backlog)
                            .map_err(|e| format!("cannot listen on {}: {e}", key.address))?,
                    );
                    let copy = fd
                        .try_clone()
                        .map_err(|e| format!("cannot copy socket {key}: {e}"))?;
                    self.notify
                        .store_fd(&activation::store_name(&key), copy.as_fd());
                    self.store.insert(key, copy);
                    info!(epoch, %key, "bound a listen socket for an unprivileged generation");
                    Ok(fd)
                });
                match bound {
                    Ok(fd) => {
                        self.send(epoch, &ToGeneration::Socket { id, key }, &[fd.as_fd()]);
                    }
                    Err(message) => {
                        warn!(epoch, "{message}");
                        self.send(epoch, &ToGeneration::Error { id, message }, &[]);
                    }
                }
            }
            ToSupervisor::HeldSocket { key } => {
                // Only an adoption at the rendezvous hands sockets over this way (`adopt.rs`).
                debug!(epoch, %key, "ignored a socket handed over outside an adoption");
            }
            ToSupervisor::HeldConfig => {
                debug!(epoch, "ignored a config handed over outside an adoption");
            }
            ToSupervisor::DrainRequested => {
                if self.lifecycle.active() == Some(epoch) {
                    info!(
                        epoch,
                        "the active generation asks to be drained (/drain_listeners)"
                    );
                    self.apply(Event::Drain { waiter: None });
                } else {
                    debug!(
                        epoch,
                        "drain request from a generation that is not active; ignored"
                    );
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.control.accept() {
                Ok((mut stream, _)) => {
                    if let Err(reason) = peer_allowed(&stream) {
                        warn!("refused a control connection: {reason}");
                        let refusal = Response {
                            ok: false,
                            message: reason,
                            status: None,
                        };
                        let mut line = serde_json::to_vec(&refusal).unwrap_or_default();
                        line.push(b'\n');
                        let _ = stream.write(&line);
                        continue;
                    }
                    let id = self.next_client;
                    self.next_client += 1;
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(CLIENTS + id as usize),
                        Interest::READABLE,
                    ) {
                        warn!("cannot watch a control connection: {e}");
                        continue;
                    }
                    self.clients.insert(
                        id,
                        Client {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            waits_for_exit: false,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn client_ready(&mut self, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if !client.output.is_empty() {
            self.flush(id);
            return;
        }
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => client.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if client.input.len() > 64 * 1024 {
                closed = true;
                break;
            }
        }
        if client.waits_for_exit {
            // Answered already: nothing more is read from a `baton stop` that waits.
            client.input.clear();
            if closed {
                self.drop_client(id);
            }
            return;
        }
        let Some(end) = client.input.iter().position(|b| *b == b'\n') else {
            if closed {
                self.drop_client(id);
            }
            return;
        };
        let line = client.input[..end].to_vec();
        client.input.clear();
        match serde_json::from_slice::<Request>(&line) {
            Ok(request) => self.request(id, request),
            Err(e) => self.respond(
                id,
                Response {
                    ok: false,
                    message: format!("bad request: {e}"),
                    status: None,
                },
            ),
        }
    }

    fn request(&mut self, client: Waiter, request: Request) {
        match request {
            Request::Status => {
                let status = self.status();
                self.respond(
                    client,
                    Response {
                        ok: true,
                        message: String::new(),
                        status: Some(status),
                    },
                );
            }
            Request::Drain => {
                info!("drain requested over the control socket");
                self.apply(Event::Drain {
                    waiter: Some(client),
                });
            }
            Request::Reload => {
                info!("reload requested over the control socket");
                self.apply(Event::Reload {
                    waiter: Some(client),
                });
            }
            Request::Stop => {
                info!("stop requested over the control socket: drain every generation, then exit");
                if let Some(c) = self.clients.get_mut(&client) {
                    c.waits_for_exit = true;
                }
                self.respond(
                    client,
                    Response {
                        ok: true,
                        message: "stopping: every generation drains, then the supervisor exits"
                            .into(),
                        status: None,
                    },
                );
                self.apply(Event::Stop { graceful: true });
            }
            Request::UpgradeSupervisor => {
                info!("supervisor upgrade requested over the control socket");
                // Answered once the new binary passed its checks, right before it is executed,
                // or with why it was not.
                self.start_upgrade(Some(client));
            }
            Request::ReopenLogs => {
                self.reopen_logs();
                let count = self.generations.len();
                self.respond(
                    client,
                    Response {
                        ok: true,
                        message: format!("asked {count} generation(s) to reopen their logs"),
                        status: None,
                    },
                );
            }
        }
    }

    fn status(&self) -> Status {
        let generations = self
            .lifecycle
            .generations()
            .filter_map(|g| {
                let io = self.generations.get(&g.epoch)?;
                Some(GenerationStatus {
                    epoch: g.epoch,
                    pid: io.pid,
                    state: g.state.name().to_owned(),
                    started_unix_ms: now_ms(io.started),
                    uptime_seconds: io.started.elapsed().map_or(0, |d| d.as_secs()),
                    connections: io.load.connections,
                    requests: io.load.requests,
                    build: io.build.clone(),
                })
            })
            .collect();
        let counts = self.lifecycle.counts;
        Status {
            supervisor_pid: std::process::id(),
            supervisor_build: env!("BATON_BUILD_ID").to_owned(),
            instance: self.config.instance.clone(),
            // Absolute, so that a client in another directory can tell whether it names it.
            config: std::fs::canonicalize(&self.config.path)
                .unwrap_or_else(|_| self.config.path.clone())
                .display()
                .to_string(),
            active_epoch: self.lifecycle.active(),
            drained: self.lifecycle.drained(),
            generations,
            reloads: counts.reloads,
            reload_failures: counts.reload_failures,
            crashes: counts.crashes,
            last_reload: self.last_reload.clone(),
            sockets: self.store.len(),
            supervisor_upgrades: self.upgrades,
            last_upgrade: self.last_upgrade.clone(),
        }
    }

    /// Answers every waiter of a reload or a drain alike.
    fn respond_all(&mut self, waiters: Vec<Waiter>, ok: bool, message: &str) {
        for waiter in waiters {
            self.respond(
                waiter,
                Response {
                    ok,
                    message: message.to_owned(),
                    status: None,
                },
            );
        }
    }

    fn respond(&mut self, id: Waiter, response: Response) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let mut line = serde_json::to_vec(&response).unwrap_or_default();
        line.push(b'\n');
        client.output = line;
        self.flush(id);
    }

    /// Writes what is pending; closes the connection once all is written.
    fn flush(&mut self, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        while !client.output.is_empty() {
            match client.stream.write(&client.output) {
                Ok(n) => {
                    client.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let _ = self.poll.registry().reregister(
                        &mut client.stream,
                        Token(CLIENTS + id as usize),
                        Interest::WRITABLE,
                    );
                    return;
                }
                Err(_) => {
                    self.drop_client(id);
                    return;
                }
            }
        }
        if client.waits_for_exit {
            // Kept open until the exit; its closing is noticed by reading.
            let _ = self.poll.registry().reregister(
                &mut client.stream,
                Token(CLIENTS + id as usize),
                Interest::READABLE,
            );
            return;
        }
        self.drop_client(id);
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(mut client) = self.clients.remove(&id) {
            let _ = self.poll.registry().deregister(&mut client.stream);
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

/// The launch of an adopted generation: the config it handed over and the binary it runs.
fn adopted_launch(config: OwnedFd, pid: u32, path: &Path) -> Option<Rc<Launch>> {
    let made = (|| {
        let exe = format!("/proc/{pid}/exe");
        let binary = std::fs::File::open(&exe).map_err(|e| format!("{exe}: {e}"))?;
        let binary_path = std::fs::read_link(&exe).map_err(|e| format!("{exe}: {e}"))?;
        let source = std::fs::read_to_string(format!("/proc/self/fd/{}", config.as_raw_fd()))
            .map_err(|e| format!("the config it handed over: {e}"))?;
        Launch::handed_over(path, source, binary, binary_path)
    })();
    match made {
        Ok(launch) => Some(Rc::new(launch)),
        Err(e) => {
            warn!(
                "cannot keep the adopted generation's launch ({e}); a crash of it is replaced from the files on disk"
            );
            None
        }
    }
}

/// With `supervisor.user`, gives the stats region to the generations' group: they write through
/// the descriptor the supervisor hands them, and the group lets `baton-stats` run as their user
/// read it (mode 0640).
fn share_region(config: &SupervisorConfig, region: &Region) -> Result<(), String> {
    let Some(run_as) = &config.run_as else {
        return Ok(());
    };
    nix::unistd::fchown(
        region.file(),
        None,
        Some(nix::unistd::Gid::from_raw(run_as.gid)),
    )
    .map_err(|e| {
        format!(
            "cannot give the stats region {} to group {} of supervisor.user {}: {e}; start `baton run` as root, with CAP_CHOWN, CAP_SETUID, CAP_SETGID and CAP_KILL (under systemd: in the unit's CapabilityBoundingSet, as the shipped unit has them)",
            config.stats_path.display(),
            run_as.gid,
            run_as.user
        )
    })
}

/// Whether the supervisor runs attached to a terminal (its standard input or output is one).
fn in_terminal() -> bool {
    nix::unistd::isatty(std::io::stdin()).unwrap_or(false)
        || nix::unistd::isatty(std::io::stdout()).unwrap_or(false)
}

/// Binds the control socket, mode 0600. A live supervisor already there is an error; a stale
/// socket file from one that died is replaced.
fn bind_control(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    format!(
                        "cannot create the folder of the control socket {}: {e}; set supervisor.control_socket to a writable place",
                        path.display()
                    )
                })?;
        }
        safe_folder(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another supervisor is listening on {}: stop it, or give this one another instance or supervisor.control_socket",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| {
            format!(
                "cannot remove the stale control socket {}: {e}",
                path.display()
            )
        })?;
    }
    // Created with no permissions for others from the start: no window where another user
    // could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    bound.map_err(|e| {
        format!(
            "cannot create the control socket {}: {e}; set supervisor.control_socket to a writable place",
            path.display()
        )
    })
}

/// The control socket's folder must be this user's (or root's), and writable by nobody else
/// unless sticky (as `/tmp` is): another local user who made `/tmp/baton-<uid>` first, or who
/// may write in the folder, could put their own socket (and the rendezvous) in its place.
fn safe_folder(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir).map_err(|e| {
        format!(
            "cannot look at the control socket's folder {}: {e}",
            dir.display()
        )
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "the control socket's folder {} belongs to uid {}, not to this user (uid {me}): another user may have made it to take the control socket; remove it, or set supervisor.control_socket to a folder of yours",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(format!(
            "the control socket's folder {} is writable by other users (mode {:o}): they could put their own socket in its place; chmod go-w it, or set supervisor.control_socket to a folder of yours",
            dir.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Only root and the supervisor's own user may control it.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let own = nix::unistd::geteuid().as_raw();
    if creds.uid() == 0 || creds.uid() == own {
        Ok(())
    } else {
        Err(format!(
            "user {} may not control this supervisor (only root and user {own} may)",
            creds.uid()
        ))
    }
}
