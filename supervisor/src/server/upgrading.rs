//! The running supervisor's side of an in-place upgrade (`baton upgrade-supervisor`, SIGUSR2):
//! when it may start, the checks of the new binary run as children the loop waits for (see
//! [`Upgrading`]), the state handed over, and the exec. The state's format, the exec itself and
//! the new program's side are in `upgrade.rs` and its children.

use std::os::fd::AsFd;
use std::time::Instant;

use tracing::{error, info, warn};

use super::stats::register_stats;
use super::{SUPERVISOR_SHARD_EPOCH, Supervisor, now_ms};
use crate::lifecycle::Waiter;
use crate::upgrade::{self, Step, UPGRADE_CHECK_TIMEOUT, UpgradeError, Upgrading, nonce};

impl Supervisor {
    /// Why the supervisor cannot be upgraded now, if it cannot.
    fn upgrade_refusal(&self) -> Option<UpgradeError> {
        if self.lifecycle.stopping() {
            return Some(UpgradeError::Stopping);
        }
        if self.lifecycle.reloading() {
            return Some(UpgradeError::Reloading);
        }
        if self.lifecycle.starting() {
            return Some(UpgradeError::Starting);
        }
        None
    }

    /// SIGUSR2 and `baton upgrade-supervisor`: check the `baton` binary on disk (see
    /// `upgrade.rs`), then execute it in this process's place. The checks run as children the
    /// loop waits for, so that a binary that hangs holds nothing up.
    pub(super) fn start_upgrade(&mut self, waiter: Option<Waiter>) {
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
            Err(source) => {
                let reason = UpgradeError::CannotRun {
                    binary: self.exe.clone(),
                    source,
                };
                self.upgrade_failed(waiter.into_iter().collect(), &reason);
            }
        }
    }

    /// Looks at the check under way: carries on when it has ended, gives up past its deadline.
    pub(super) fn upgrade_progress(&mut self) {
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
                let reason = UpgradeError::CheckTimedOut {
                    binary: self.exe.clone(),
                    step: step.name(),
                    timeout: UPGRADE_CHECK_TIMEOUT,
                };
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
                    Err(UpgradeError::SelfCheckFailed {
                        binary: exe.clone(),
                        status,
                        said,
                    })
                };
                match answer {
                    Ok(()) => {
                        let (state, _) = self.handover_state(nonce);
                        let mut command = std::process::Command::new(&exe);
                        command
                            .args(self.args.iter().skip(1))
                            .env(upgrade::TRIAL_ENV, "1");
                        let trial = upgrade::to_json(&state).and_then(|json| {
                            Upgrading::start(Step::Trial, command, Some(&json)).map_err(|source| {
                                UpgradeError::CannotRun {
                                    binary: exe.clone(),
                                    source,
                                }
                            })
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
                    let reason = if status.success() {
                        UpgradeError::TrialUnread { binary: exe, said }
                    } else {
                        UpgradeError::TrialFailed {
                            binary: exe,
                            status,
                            said,
                        }
                    };
                    self.upgrade_failed(waiters, &reason);
                }
            }
        }
    }

    fn upgrade_failed(&mut self, waiters: Vec<Waiter>, reason: &UpgradeError) {
        error!("the supervisor was not upgraded: {reason}");
        self.last_upgrade = Some(format!("not upgraded: {reason}"));
        self.respond_all(waiters, false, &format!("not upgraded: {reason}"));
    }

    /// What a new program takes over, and the descriptors the state names.
    fn handover_state(&self, nonce: u64) -> (upgrade::Inherited, upgrade::HandedFds<'_>) {
        let mut fds = upgrade::HandedFds::default();
        let state = upgrade::Inherited {
            version: upgrade::STATE_VERSION,
            control_fd: fds.hand(self.control.as_fd()),
            region_fd: fds.hand(self.region.file().as_fd()),
            sockets: self
                .store
                .fds()
                .map(|(key, fd)| (key, fds.hand(fd)))
                .collect(),
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
                        channel_fd: fds.hand(io.channel.as_ref()?.as_fd()),
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
                binary_fd: fds.hand(l.binary.as_fd()),
                binary_path: l.binary_path.clone(),
            }),
            upgrades: self.upgrades,
            last_upgrade: self.last_upgrade.clone(),
            nonce,
            rendezvous_fd: self.rendezvous.as_ref().map(|r| fds.hand(r.as_fd())),
        };
        (state, fds)
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
        info!(binary = %self.exe.display(), "upgrading the supervisor: executing the binary on disk in place");
        // Answered first: the connections do not survive the exec.
        let message = format!("upgrading: executing {} in place", self.exe.display());
        self.respond_all(upgrading.waiters, true, &message);
        self.notify.reloading();
        // The new program attaches its own stats row; this one's counts fold in first.
        if let Err(e) = self.region.retire_epoch(SUPERVISOR_SHARD_EPOCH) {
            warn!("cannot retire the supervisor's stats: {e}");
        }
        let (state, fds) = self.handover_state(upgrading.nonce);
        let error = upgrade::exec(
            &self.exe,
            &self.args,
            &state,
            &fds,
            previous.as_ref().map(|f| f.as_fd()),
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
}
