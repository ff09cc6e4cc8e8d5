//! A generation as the lifecycle sees it ([`Generation`], its [`State`]), the settings the
//! lifecycle runs by, and the counts it keeps.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use restart_protocol::DrainStrategy;

/// Where a generation is in its life. Logs, `baton status` and tests use these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Spawned; fetching sockets and initialising. The Active generation (if any) serves alone.
    Starting,
    /// Ready and serving: the generation new connections go to.
    Active,
    /// Told to drain: no longer accepting, finishing its connections.
    Draining,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Active => "active",
            State::Draining => "draining",
        }
    }
}

/// The lifecycle settings, from the config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub readiness_timeout: Duration,
    pub drain_timeout: Duration,
    pub strategy: DrainStrategy,
    /// Draining generations allowed at once; past it the oldest is hurried.
    pub max_draining: usize,
    /// How long a generation may take to exit after a Stop, or past its drain timeout, before
    /// it is killed.
    pub kill_grace: Duration,
}

/// One generation as the lifecycle sees it.
#[derive(Debug, Clone)]
pub struct Generation {
    pub epoch: u64,
    pub state: State,
    /// Readiness deadline (Starting) or kill deadline (Draining, or after a Stop).
    pub deadline: Option<Instant>,
    /// When it became Draining, to pick the oldest.
    pub draining_since: Option<Instant>,
    /// A failure it reported, to tell the reload's requester.
    pub failure: Option<String>,
    /// Stopped or killed on purpose: its exit is no crash.
    pub stopping: bool,
    /// Started to replace a crashed active generation (not by a reload).
    pub recovery: bool,
    /// When it became Active.
    pub active_since: Option<Instant>,
}

impl Generation {
    /// One just spawned: Starting, to be ready by `ready_by`. `recovery`: it replaces a crashed
    /// active generation.
    pub(super) fn starting(epoch: u64, ready_by: Instant, recovery: bool) -> Generation {
        Generation {
            epoch,
            state: State::Starting,
            deadline: Some(ready_by),
            draining_since: None,
            failure: None,
            stopping: false,
            recovery,
            active_since: None,
        }
    }

    /// One taken over from a replaced supervisor, Active or Draining since `now`; a draining
    /// one is killed if it has not exited by `kill_at`.
    pub(super) fn restored(epoch: u64, state: State, now: Instant, kill_at: Instant) -> Generation {
        Generation {
            epoch,
            state,
            deadline: (state == State::Draining).then_some(kill_at),
            draining_since: (state == State::Draining).then_some(now),
            failure: None,
            stopping: false,
            recovery: false,
            active_since: (state == State::Active).then_some(now),
        }
    }

    /// Brings its deadline forward to `deadline`; one already earlier stays.
    pub(super) fn deadline_at_most(&mut self, deadline: Instant) {
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
    }
}

/// The generations the lifecycle knows, by epoch, and the questions it asks about them.
#[derive(Debug, Default)]
pub struct Generations(BTreeMap<u64, Generation>);

impl Deref for Generations {
    type Target = BTreeMap<u64, Generation>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Generations {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Generations {
    /// The oldest generation in `state`.
    pub fn first_in(&self, state: State) -> Option<&Generation> {
        self.0.values().find(|g| g.state == state)
    }

    /// How many are in `state`.
    pub fn count(&self, state: State) -> usize {
        self.0.values().filter(|g| g.state == state).count()
    }

    /// The Active generation other than `epoch`, if there is one.
    pub fn other_active(&self, epoch: u64) -> Option<u64> {
        self.0
            .values()
            .find(|g| g.state == State::Active && g.epoch != epoch)
            .map(|g| g.epoch)
    }

    /// Every generation's deadline.
    pub fn deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        self.0.values().filter_map(|g| g.deadline)
    }

    /// The replacements of a crashed active generation still starting, and not being stopped.
    pub fn replacements(&self) -> Vec<u64> {
        self.0
            .values()
            .filter(|g| g.recovery && g.state == State::Starting && !g.stopping)
            .map(|g| g.epoch)
            .collect()
    }

    /// The draining generations not hurried yet, the longest draining first (those without a
    /// start count as draining since `now`).
    pub fn draining_oldest_first(&self, now: Instant) -> Vec<u64> {
        let mut draining: Vec<(Instant, u64)> = self
            .0
            .values()
            .filter(|g| g.state == State::Draining && !g.stopping)
            .map(|g| (g.draining_since.unwrap_or(now), g.epoch))
            .collect();
        draining.sort();
        draining.into_iter().map(|(_, epoch)| epoch).collect()
    }

    /// Every generation's epoch and state.
    pub fn states(&self) -> Vec<(u64, State)> {
        self.0.values().map(|g| (g.epoch, g.state)).collect()
    }

    /// The generations whose deadline has come at `now`: epoch, state, and whether it is being
    /// stopped.
    pub fn due(&self, now: Instant) -> Vec<(u64, State, bool)> {
        self.0
            .values()
            .filter(|g| g.deadline.is_some_and(|d| d <= now))
            .map(|g| (g.epoch, g.state, g.stopping))
            .collect()
    }
}

/// Counts for the supervisor's stats.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub reloads: u64,
    pub reload_failures: u64,
    pub crashes: u64,
}
