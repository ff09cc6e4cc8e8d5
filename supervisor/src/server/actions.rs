//! Feeding an event to the lifecycle and carrying out the [`Action`]s it decides: spawning a
//! generation from its launch, telling one to drain or stop, killing one, answering who waits
//! for a reload or a drain, and the status line systemd shows.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::{Instant, SystemTime};

use mio::unix::SourceFd;
use mio::{Interest, Token};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use restart_protocol::{Load, ToGeneration};
use tracing::{error, info, warn};

use super::{GENERATIONS, GenIo, Supervisor, settings};
use crate::activation;
use crate::env::EXIT_USAGE;
use crate::launch::Launch;
use crate::lifecycle::{Action, Event, Source};
use crate::spawn;

impl Supervisor {
    /// Feeds an event to the lifecycle and carries out what it decides.
    pub(super) fn apply(&mut self, event: Event) {
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
    pub(super) fn status_line(&self) -> String {
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

    pub(super) fn kill(&mut self, epoch: u64) {
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
}
