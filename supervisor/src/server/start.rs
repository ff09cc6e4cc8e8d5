//! How a supervisor comes to hold what it runs: a fresh start (binding the control socket,
//! making the stats region, adopting the generations a supervisor that died left serving), or
//! the take-over of what the supervisor this program replaced handed over (see `upgrade.rs`).
//! Either way the result is a [`Parts`], made into the [`Supervisor`].

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use mio::net::UnixListener;
use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use nix::unistd::Pid;
use restart_protocol::{Channel, Load, ToGeneration};
use shm_stats::{ReadError, Region, StatsError};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2, SIGWINCH};
use signal_hook_mio::v1_0::Signals;
use tracing::{info, warn};

use super::control::bind_control;
use super::error::StartError;
use super::stats::{register_stats, replaced_older_region, share_region};
use super::{CONTROL, GENERATIONS, GenIo, Parts, SIGNALS, Supervisor, settings};
use crate::activation;
use crate::adopt;
use crate::config::{self, SupervisorConfig};
use crate::launch::Launch;
use crate::lifecycle::{self, Lifecycle, State};
use crate::notify::{Notifier, Watchdog};
use crate::store::SocketStore;
use crate::upgrade::{self, HandoverError};

impl Supervisor {
    pub(super) fn new(config: SupervisorConfig, parts: Parts) -> Result<Supervisor, StartError> {
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
        let poll = Poll::new().map_err(StartError::EventLoop)?;
        let mut signals =
            Signals::new([SIGHUP, SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCHLD])
                .map_err(StartError::Signals)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(StartError::WatchSignals)?;
        poll.registry()
            .register(&mut control, CONTROL, Interest::READABLE)
            .map_err(StartError::WatchControl)?;
        let region = region;
        for (&epoch, g) in &generations {
            if let Some(channel) = &g.channel {
                poll.registry()
                    .register(
                        &mut SourceFd(&channel.as_raw_fd()),
                        Token(GENERATIONS + epoch as usize),
                        Interest::READABLE,
                    )
                    .map_err(|source| StartError::WatchChannel { epoch, source })?;
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

    pub(super) fn fresh(config: &SupervisorConfig) -> Result<Parts, StartError> {
        if let Some(run_as) = &config.run_as {
            let me = nix::unistd::geteuid();
            if !me.is_root() && me.as_raw() != run_as.uid {
                return Err(StartError::NotRoot {
                    user: run_as.user.clone(),
                });
            }
        }
        if let Ok(meta) = std::fs::metadata(&config.stats_path) {
            use std::os::unix::fs::MetadataExt;
            let me = nix::unistd::geteuid().as_raw();
            if meta.uid() != me {
                // Someone else made it (or a generation's user): this supervisor would trust
                // what another user wrote.
                return Err(StartError::RegionNotOurs {
                    path: config.stats_path.clone(),
                    owner: meta.uid(),
                    me,
                });
            }
        }
        let (region, replaced) =
            Region::create_or_replace_older(&config.stats_path, config.capacities)?;
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
    pub(super) fn take_over(
        path: &Path,
        state: &upgrade::Inherited,
    ) -> Result<(SupervisorConfig, Parts), StartError> {
        #[cfg(debug_assertions)]
        if let Some(how) = std::env::var_os("BATON_TEST_TAKEOVER_FAILS")
            && (how == "always" || upgrade::failed_upgrade().is_none())
        {
            // Tests make an upgraded program fail here, to see the previous one take over again.
            return Err(HandoverError::TestFailure.into());
        }
        // The running config: the one handed over (a supervisor that did not hand it over
        // leaves only the file to read).
        let last_good = match &state.last_good {
            Some(launch) => {
                let binary = upgrade::adopt(launch.binary_fd)
                    .map(std::fs::File::from)
                    .ok_or(HandoverError::Missing("proxy binary"))?;
                Some(Rc::new(
                    Launch::handed_over(
                        path,
                        launch.config_source.clone(),
                        binary,
                        launch.binary_path.clone(),
                    )
                    .map_err(StartError::Launch)?,
                ))
            }
            None => None,
        };
        let config = match &last_good {
            Some(launch) => launch.config.clone(),
            None => config::load(path).map_err(StartError::Config)?,
        };
        let config = &config;
        let control = upgrade::adopt(state.control_fd)
            .map(std::os::unix::net::UnixListener::from)
            .ok_or(HandoverError::Missing("control socket"))?;
        control
            .set_nonblocking(true)
            .map_err(HandoverError::ControlSocket)?;
        let control = UnixListener::from_std(control);
        let region_file = upgrade::adopt(state.region_fd)
            .map(std::fs::File::from)
            .ok_or(HandoverError::Missing("stats region"))?;
        let region = match Region::from_file(&config.stats_path, region_file) {
            Ok(region) => region,
            // The supervisor this one replaced is of an earlier release, whose region this
            // release cannot write: the generations started from now on get a new one.
            Err(StatsError::Unusable(ReadError::UnknownVersion { found, known, .. }))
                if found < known =>
            {
                let (region, _) =
                    Region::create_or_replace_older(&config.stats_path, config.capacities)?;
                replaced_older_region(&region, found);
                region
            }
            Err(e) => return Err(e.into()),
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
