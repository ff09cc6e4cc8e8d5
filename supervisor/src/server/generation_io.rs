//! Talking with the generations over their channels: their messages (the version handshake,
//! requests for sockets and the stats region, readiness, load reports, their exit), what is sent
//! to them, and their exits, known by `waitpid` (or, for an adopted one, by its channel closing).

use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use mio::unix::SourceFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use restart_protocol::{
    ChannelError, FEATURE_ADOPT, FEATURE_BIND_SOCKET, FEATURES, Load, PROTOCOL_VERSIONS, Received,
    ToGeneration, ToSupervisor, negotiate,
};
use tracing::{debug, error, info, warn};

use super::{GenIo, Supervisor};
use crate::activation;
use crate::config;
use crate::env::EXIT_USAGE;
use crate::lifecycle::Event;

impl Supervisor {
    pub(super) fn generation_readable(&mut self, epoch: u64) {
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

    /// Sends to a generation; false if it cannot be reached.
    pub(super) fn send(
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

    /// Gives the active generation the rendezvous, where the next supervisor adopts it should
    /// this one die.
    pub(super) fn hand_rendezvous(&mut self, epoch: u64) {
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

    pub(super) fn reopen_logs(&mut self) {
        let epochs: Vec<u64> = self.generations.keys().copied().collect();
        for epoch in epochs {
            self.send(epoch, &ToGeneration::ReopenLogs, &[]);
        }
    }

    pub(super) fn reap(&mut self) {
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
