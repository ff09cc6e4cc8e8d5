//! A worker's drain: whether it drains, how, and until when; and the count of its open
//! downstream connections, which the drain waits on.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use restart_protocol::DrainStrategy;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Whether this worker drains, how, and a way to wait for the moment it starts.
#[derive(Default)]
pub struct DrainState {
    draining: Cell<bool>,
    since: Cell<Option<Instant>>,
    timeout: Cell<Duration>,
    strategy: Cell<Option<DrainStrategy>>,
    started: Notify,
}

impl DrainState {
    /// Starts the drain, or hurries one that has begun.
    pub fn begin(&self, timeout: Duration, strategy: DrainStrategy) {
        let now = Instant::now();
        let since = self.since.get().unwrap_or(now);
        self.since.set(Some(since));
        // A later drain (a hurry) shortens the time left; it never lengthens it.
        let left = timeout + now.saturating_duration_since(since);
        let timeout = match self.strategy.get() {
            Some(_) => self.timeout.get().min(left),
            None => timeout,
        };
        self.timeout.set(timeout);
        let strategy = match (self.strategy.get(), strategy) {
            (Some(DrainStrategy::Immediate), _) | (_, DrainStrategy::Immediate) => {
                DrainStrategy::Immediate
            }
            _ => DrainStrategy::Gradual,
        };
        self.strategy.set(Some(strategy));
        self.draining.set(true);
        self.started.notify_waiters();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Whether the HTTP/1.1 answer being made now should carry `Connection: close`: always
    /// when draining immediately; when draining gradually, with a probability that grows from
    /// 0 to 1 over the drain time, so that clients reconnect spread out.
    pub fn close_this_answer(&self) -> bool {
        match (self.strategy.get(), self.since.get()) {
            (Some(DrainStrategy::Immediate), _) => true,
            (Some(DrainStrategy::Gradual), Some(since)) => {
                let share =
                    since.elapsed().as_secs_f64() / self.timeout.get().as_secs_f64().max(1e-3);
                fastrand::f64() < share
            }
            _ => false,
        }
    }

    /// How long an HTTP/2 connection waits before its GOAWAY: at once when draining
    /// immediately, a random moment in the first half of the drain time when gradually.
    pub fn goaway_delay(&self) -> Duration {
        match self.strategy.get() {
            Some(DrainStrategy::Gradual) => self.timeout.get().mul_f64(fastrand::f64() / 2.0),
            _ => Duration::ZERO,
        }
    }

    /// Fires when a drain begins. Check [`Self::is_draining`] first: a drain that began before
    /// this future was made does not fire it.
    pub fn started(&self) -> Notified<'_> {
        self.started.notified()
    }
}

/// The number of open downstream connections on this worker.
pub struct Connections {
    /// Written by this worker only; read by the main thread.
    open: Arc<AtomicUsize>,
    closed: Notify,
}

impl Connections {
    pub fn new(open: Arc<AtomicUsize>) -> Self {
        Connections {
            open,
            closed: Notify::new(),
        }
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn set(&self, n: usize) {
        self.open.store(n, Ordering::Relaxed);
    }

    /// A connection was accepted.
    pub fn opened(&self) {
        self.set(self.open() + 1);
    }

    /// A connection closed; wakes [`Self::all_closed`] when it was the last.
    pub fn closed(&self) {
        self.set(self.open() - 1);
        if self.open() == 0 {
            self.closed.notify_waiters();
        }
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        while self.open() > 0 {
            self.closed.notified().await;
        }
    }
}
