//! The generation lifecycle as a pure state machine: events in, actions out, no I/O.
//!
//! ```text
//! Starting --Ready--> Active --Drain--> Draining --(exit)--> gone
//!     \--Failed / exit / readiness timeout--> gone   (the Active generation stays Active)
//! ```
//!
//! Drained (`baton drain`, SIGWINCH): the Active generation drains as on a reload, but nothing
//! replaces it until the next reload; the listen sockets stay in the store, so clients wait in
//! the accept queue.
//!
//! The event loop (`server/`) turns signals, control requests, channel messages and child
//! exits into [`Event`]s, and carries out the [`Action`]s; everything that decides is here and
//! is tested without processes. The machine is this file; its children hold what it works
//! with (`event`, `generation`, `reload`, `backoff`, `reason`).

mod backoff;
mod event;
mod generation;
mod reason;
mod reload;

use std::time::{Duration, Instant};

use restart_protocol::DrainStrategy;

use backoff::Backoff;
pub use event::{Action, Event, Source, Waiter};
use generation::Generations;
pub use generation::{Counts, Generation, Settings, State};
use reload::{HANDOVER_TIMEOUT, Reload};

pub struct Lifecycle {
    settings: Settings,
    generations: Generations,
    next_epoch: u64,
    reload: Reload,
    /// While no generation is Active (and none is drained on purpose), the next replacement
    /// from the last good launch is started then; a reload never cancels it.
    restart_at: Option<Instant>,
    /// The delay before the next replacement.
    backoff: Backoff,
    /// Set by Stop: no new generations; exit when the last one is gone.
    stopping: bool,
    /// Whether a generation was ever Active (a first generation that fails ends the supervisor).
    ever_active: bool,
    /// Drained on request: no generation takes new connections until the next reload.
    drained: bool,
    /// Taken over from the supervisor this process replaced (not a fresh start).
    restored: bool,
    /// The drain in progress: the generation that stops accepting, by when at the latest, and
    /// who waits for it.
    drain: Option<(u64, Instant, Vec<Waiter>)>,
    pub counts: Counts,
}

impl Lifecycle {
    pub fn new(settings: Settings, first_epoch: u64) -> Self {
        Lifecycle {
            settings,
            generations: Generations::default(),
            next_epoch: first_epoch,
            reload: Reload::default(),
            restart_at: None,
            backoff: Backoff::default(),
            stopping: false,
            ever_active: false,
            drained: false,
            restored: false,
            drain: None,
            counts: Counts::default(),
        }
    }

    /// The lifecycle of a supervisor that took over from another (see `upgrade.rs`): its
    /// generations, already active or draining, and its counts.
    pub fn restore(
        settings: Settings,
        next_epoch: u64,
        generations: Vec<(u64, State)>,
        counts: Counts,
        drained: bool,
        now: Instant,
    ) -> Self {
        let mut l = Lifecycle::new(settings, next_epoch);
        l.counts = counts;
        l.ever_active = true;
        let kill_at = now + settings.drain_timeout + settings.kill_grace;
        for (epoch, state) in generations {
            l.generations
                .insert(epoch, Generation::restored(epoch, state, now, kill_at));
        }
        l.drained = drained;
        l.restored = true;
        if !drained && l.active().is_none() {
            // Taken over between a crash and its replacement: replace it now.
            l.restart_at = Some(now);
        }
        l
    }

    /// The epoch the next generation gets.
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    pub fn generations(&self) -> impl Iterator<Item = &Generation> {
        self.generations.values()
    }

    pub fn active(&self) -> Option<u64> {
        self.generations.first_in(State::Active).map(|g| g.epoch)
    }

    /// Whether this lifecycle was taken over from a replaced supervisor (see [`Self::restore`]).
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// Whether a stop was asked for: no generation is started any more.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Whether the supervisor is drained: no generation takes new connections until a reload.
    pub fn drained(&self) -> bool {
        self.drained
    }

    /// Whether a generation is starting, or one is to be started after a crash.
    pub fn starting(&self) -> bool {
        self.restart_at.is_some() || self.generations.first_in(State::Starting).is_some()
    }

    /// Whether a reload is in progress (a new generation starting or handing over).
    pub fn reloading(&self) -> bool {
        self.reload.epoch.is_some()
    }

    /// The generation a reload (or the first start) is waiting for: its failure is told by the
    /// reload's reply.
    pub fn reload_epoch(&self) -> Option<u64> {
        self.reload.epoch
    }

    pub fn draining(&self) -> usize {
        self.generations.count(State::Draining)
    }

    /// The earliest moment a [`Event::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.generations
            .deadlines()
            .chain(self.restart_at)
            .chain(self.reload.handover.map(|(_, deadline)| deadline))
            .chain(self.drain.as_ref().map(|(_, deadline, _)| *deadline))
            .min()
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::Reload { waiter } => self.reload(waiter, now, &mut actions),
            Event::SpawnFailed { epoch, error } => {
                self.generations.remove(&epoch);
                self.start_failed(
                    epoch,
                    reason::cannot_start(epoch, &error),
                    now,
                    &mut actions,
                );
            }
            Event::Ready { epoch } => self.ready(epoch, now, &mut actions),
            Event::StoppedAccepting { epoch } => {
                if self.reload.handover.is_some_and(|(old, _)| old == epoch) {
                    self.finish_reload(now, &mut actions);
                }
                if self.drain.as_ref().is_some_and(|(e, ..)| *e == epoch) {
                    self.finish_drain(&mut actions);
                }
            }
            Event::Failed { epoch, reason } => {
                if let Some(g) = self.generations.get_mut(&epoch)
                    && g.state == State::Starting
                {
                    g.failure = Some(reason);
                    g.stopping = true;
                    // It exits on its own after `Failed`; kill it if it does not.
                    g.deadline = Some(now + self.settings.kill_grace);
                }
            }
            Event::Exited { epoch, status } => self.exited(epoch, status, now, &mut actions),
            Event::Stop { graceful } => self.stop(graceful, now, &mut actions),
            Event::Drain { waiter } => self.drain(waiter, now, &mut actions),
            Event::Tick => self.tick(now, &mut actions),
        }
        actions
    }

    fn spawn(&mut self, from: Source, now: Instant, actions: &mut Vec<Action>) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let ready_by = now + self.settings.readiness_timeout;
        self.generations.insert(
            epoch,
            Generation::starting(epoch, ready_by, from == Source::LastGood),
        );
        actions.push(Action::Spawn { epoch, from });
        epoch
    }

    /// New settings (a reload's config is active): they apply from now on.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// Whether the supervisor is to get a generation active again: none is, and none is meant
    /// not to be (drained on purpose, stopping, or the first start still under way).
    fn needs_recovery(&self) -> bool {
        self.ever_active && !self.stopping && !self.drained && self.active().is_none()
    }

    fn reload(&mut self, waiter: Option<Waiter>, now: Instant, actions: &mut Vec<Action>) {
        if self.stopping {
            if let Some(w) = waiter {
                actions.push(Action::Reply {
                    waiters: vec![w],
                    result: Err(reason::STOPPING.into()),
                });
            }
            return;
        }
        if self.reload.epoch.is_some() {
            // Coalesce: everything asked during this reload is served by one reload after it,
            // which picks up whatever changed meanwhile.
            self.reload
                .queued
                .get_or_insert_with(Vec::new)
                .extend(waiter);
            return;
        }
        // A replacement for a crash, if one is pending, goes on beside the reload: the reload's
        // new config may fail, and the last good one must not wait for that.
        let epoch = self.spawn(Source::Disk, now, actions);
        self.reload.epoch = Some(epoch);
        self.reload.waiters.extend(waiter);
        // The first start goes the way of a reload but is not one.
        if self.ever_active {
            self.counts.reloads += 1;
        }
    }

    fn ready(&mut self, epoch: u64, now: Instant, actions: &mut Vec<Action>) {
        let Some(g) = self.generations.get_mut(&epoch) else {
            return;
        };
        if g.state != State::Starting || g.stopping {
            return;
        }
        let recovery = g.recovery;
        if recovery && self.active().is_some() {
            // A reload's generation became active first: the replacement of the crashed one,
            // from an older config, is not needed.
            self.stop_one(epoch, now, actions);
            return;
        }
        let Some(g) = self.generations.get_mut(&epoch) else {
            return;
        };
        g.state = State::Active;
        g.deadline = None;
        g.active_since = Some(now);
        self.restart_at = None;
        // Replacements of a crashed generation still starting are not needed any more.
        for other in self.generations.replacements() {
            self.stop_one(other, now, actions);
        }
        self.ever_active = true;
        self.drained = false;
        let previous = self.generations.other_active(epoch);
        if let Some(old) = previous {
            self.start_draining(
                old,
                self.settings.drain_timeout,
                self.settings.strategy,
                now,
                actions,
            );
        }
        actions.push(Action::Activated {
            epoch,
            replaced: previous,
        });
        self.limit_draining(now, actions);
        if self.reload.epoch == Some(epoch) {
            match previous {
                Some(old) => self.reload.handover = Some((old, now + HANDOVER_TIMEOUT)),
                None => self.finish_reload(now, actions),
            }
        }
    }

    /// The reload in progress is done: its new generation is active and the old one no longer
    /// accepts.
    fn finish_reload(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let Some(epoch) = self.reload.epoch.take() else {
            return;
        };
        self.reload.handover = None;
        let waiters = std::mem::take(&mut self.reload.waiters);
        actions.push(Action::Reply {
            waiters,
            result: Ok(epoch),
        });
        self.next_reload(now, actions);
    }

    fn start_draining(
        &mut self,
        epoch: u64,
        timeout: Duration,
        strategy: DrainStrategy,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let kill_grace = self.settings.kill_grace;
        let Some(g) = self.generations.get_mut(&epoch) else {
            return;
        };
        if g.state != State::Draining {
            g.draining_since = Some(now);
        }
        g.state = State::Draining;
        g.deadline_at_most(now + timeout + kill_grace);
        actions.push(Action::Drain {
            epoch,
            timeout,
            strategy,
        });
    }

    /// Past `max_draining`, the oldest draining generations are hurried: every answer now
    /// closes its connection (and HTTP/2 clients get their GOAWAY at once), so that idle and
    /// keep-alive connections leave early. An answer being sent, a TCP session or a tunnel is
    /// never cut for it: what is left is closed at the drain's own deadline, as without a hurry.
    fn limit_draining(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let draining = self.generations.draining_oldest_first(now);
        let excess = draining.len().saturating_sub(self.settings.max_draining);
        let kill_grace = self.settings.kill_grace;
        for &epoch in draining.iter().take(excess) {
            let Some(g) = self.generations.get_mut(&epoch) else {
                continue;
            };
            g.stopping = true;
            // What is left of its drain time, unchanged.
            let left = g.deadline.map_or(self.settings.drain_timeout, |d| {
                d.saturating_duration_since(now).saturating_sub(kill_grace)
            });
            self.start_draining(epoch, left, DrainStrategy::Immediate, now, actions);
        }
    }

    fn drain(&mut self, waiter: Option<Waiter>, now: Instant, actions: &mut Vec<Action>) {
        let refuse = if self.stopping {
            Some(reason::STOPPING.to_owned())
        } else {
            self.generations
                .first_in(State::Starting)
                .map(|g| reason::drain_while_starting(g.epoch))
        };
        if let Some(reason) = refuse {
            actions.push(Action::DrainReply {
                waiters: waiter.into_iter().collect(),
                result: Err(reason),
            });
            return;
        }
        self.drained = true;
        // A replacement for a crash would undo the drain.
        self.restart_at = None;
        self.backoff.reset();
        match self.active() {
            Some(epoch) => {
                self.start_draining(
                    epoch,
                    self.settings.drain_timeout,
                    self.settings.strategy,
                    now,
                    actions,
                );
                // Answered once it no longer accepts (or has gone, or the deadline passed).
                let drain = self
                    .drain
                    .get_or_insert_with(|| (epoch, now + HANDOVER_TIMEOUT, Vec::new()));
                drain.2.extend(waiter);
            }
            None => {
                // Already drained; a drain in progress answers this waiter too.
                match &mut self.drain {
                    Some((.., waiters)) => waiters.extend(waiter),
                    None => actions.push(Action::DrainReply {
                        waiters: waiter.into_iter().collect(),
                        result: Ok(None),
                    }),
                }
            }
        }
    }

    fn finish_drain(&mut self, actions: &mut Vec<Action>) {
        if let Some((epoch, _, waiters)) = self.drain.take() {
            actions.push(Action::DrainReply {
                waiters,
                result: Ok(Some(epoch)),
            });
        }
    }

    fn next_reload(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if let Some(waiters) = self.reload.queued.take() {
            self.reload(None, now, actions);
            self.reload.waiters.extend(waiters);
        }
    }

    /// A generation failed before it was ready. A reload's: the Active one stays, and if none
    /// is (it crashed), the replacement from the last good launch goes on. A replacement's:
    /// another one is tried, a little later each time.
    fn start_failed(
        &mut self,
        epoch: u64,
        reason: String,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        if self.reload.epoch == Some(epoch) {
            self.counts.reload_failures += 1;
            let waiters = std::mem::take(&mut self.reload.waiters);
            self.reload.epoch = None;
            if !self.ever_active && !self.stopping {
                // The very first generation failed: there is nothing to serve with.
                actions.push(Action::Reply {
                    waiters,
                    result: Err(reason),
                });
                self.stopping = true;
                self.reload.queued = None;
                actions.push(Action::Exit { code: 1 });
                return;
            }
            let reason = if self.needs_recovery() {
                self.recover(now);
                reason::while_recovering(&reason)
            } else {
                reason
            };
            actions.push(Action::Reply {
                waiters,
                result: Err(reason),
            });
            self.next_reload(now, actions);
        } else if self.needs_recovery() {
            // A replacement for a crashed generation failed: try again, later.
            self.backoff.start_failed();
            self.recover(now);
        }
    }

    /// Makes sure a replacement is on its way while no generation is active: one starting from
    /// the last good launch, or one due at `restart_at`.
    fn recover(&mut self, now: Instant) {
        let replacing = !self.generations.replacements().is_empty();
        if !replacing && self.restart_at.is_none() {
            self.restart_at = Some(now + self.backoff.delay());
        }
    }

    /// Tells one generation to close everything and exit.
    fn stop_one(&mut self, epoch: u64, now: Instant, actions: &mut Vec<Action>) {
        if let Some(g) = self.generations.get_mut(&epoch) {
            g.stopping = true;
            g.deadline_at_most(now + self.settings.kill_grace);
            actions.push(Action::Stop { epoch });
        }
    }

    fn exited(&mut self, epoch: u64, status: String, now: Instant, actions: &mut Vec<Action>) {
        let Some(g) = self.generations.remove(&epoch) else {
            return;
        };
        actions.push(Action::Retire { epoch });
        if self.reload.handover.is_some_and(|(old, _)| old == epoch) {
            self.finish_reload(now, actions);
        }
        if self.drain.as_ref().is_some_and(|(e, ..)| *e == epoch) {
            self.finish_drain(actions);
        }
        match g.state {
            State::Starting => {
                let reason = g
                    .failure
                    .unwrap_or_else(|| reason::exited_before_ready(epoch, &status));
                self.start_failed(epoch, reason, now, actions);
            }
            State::Active if !g.stopping && !self.stopping => {
                // A crash: the listen sockets stay in the store, so clients queue in the kernel
                // until the replacement accepts. One that had served is replaced at once; one
                // that crashes right after it became active is replaced later each time.
                self.counts.crashes += 1;
                self.backoff.crashed(g.active_since, now);
                self.restart_at = None;
                self.recover(now);
            }
            State::Active | State::Draining => {}
        }
        if self.stopping && self.generations.is_empty() {
            actions.push(Action::Exit { code: 0 });
        }
    }

    fn stop(&mut self, graceful: bool, now: Instant, actions: &mut Vec<Action>) {
        let already = self.stopping;
        self.stopping = true;
        self.restart_at = None;
        let waiters: Vec<Waiter> = std::mem::take(&mut self.reload.waiters)
            .into_iter()
            .chain(self.reload.queued.take().into_iter().flatten())
            .collect();
        if !waiters.is_empty() {
            actions.push(Action::Reply {
                waiters,
                result: Err(reason::STOPPING.into()),
            });
        }
        // The drained generation is among those drained now.
        self.finish_drain(actions);
        for (epoch, state) in self.generations.states() {
            match (graceful, state) {
                (true, State::Active | State::Draining) if !already => {
                    let timeout = self.settings.drain_timeout;
                    self.start_draining(epoch, timeout, DrainStrategy::Immediate, now, actions);
                }
                _ => {
                    // Starting generations, a non-graceful stop, or a second stop request.
                    actions.push(Action::Stop { epoch });
                    if let Some(g) = self.generations.get_mut(&epoch) {
                        g.stopping = true;
                        g.deadline_at_most(now + self.settings.kill_grace);
                    }
                }
            }
        }
        if self.generations.is_empty() {
            actions.push(Action::Exit { code: 0 });
        }
    }

    fn tick(&mut self, now: Instant, actions: &mut Vec<Action>) {
        for (epoch, state, stopping) in self.generations.due(now) {
            if state == State::Starting && !stopping {
                // Not ready in time: give up on it; its exit ends the reload with this reason.
                let timeout = self.settings.readiness_timeout;
                if let Some(g) = self.generations.get_mut(&epoch) {
                    g.failure = Some(reason::not_ready_in_time(epoch, timeout));
                    g.stopping = true;
                    g.deadline = Some(now + self.settings.kill_grace);
                }
                actions.push(Action::Kill { epoch });
            } else {
                if let Some(g) = self.generations.get_mut(&epoch) {
                    g.deadline = None;
                }
                actions.push(Action::Kill { epoch });
            }
        }
        if self
            .reload
            .handover
            .is_some_and(|(_, deadline)| deadline <= now)
        {
            self.finish_reload(now, actions);
        }
        if self
            .drain
            .as_ref()
            .is_some_and(|(_, deadline, _)| *deadline <= now)
        {
            self.finish_drain(actions);
        }
        if self.restart_at.is_some_and(|at| at <= now) {
            self.restart_at = None;
            if self.needs_recovery() {
                self.spawn(Source::LastGood, now, actions);
            }
        }
    }
}

#[cfg(test)]
mod tests;
