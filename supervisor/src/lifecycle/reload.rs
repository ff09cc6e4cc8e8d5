//! The reload in progress, as the lifecycle keeps it.

use std::time::{Duration, Instant};

use super::event::Waiter;

/// A reload under way (`epoch` set), and the requests that came meanwhile.
#[derive(Debug, Default)]
pub struct Reload {
    /// The generation being started by the reload in progress.
    pub epoch: Option<u64>,
    pub waiters: Vec<Waiter>,
    /// Requests that came while one was in progress: one more reload, after it.
    pub queued: Option<Vec<Waiter>>,
    /// The new generation is active; the reload ends once the one it replaced no longer
    /// accepts (or has gone, or the deadline passed), so that when `baton reload` returns,
    /// new connections go to the new generation only.
    pub handover: Option<(u64, Instant)>,
}

/// How long a reload waits for the replaced generation to stop accepting (and a drain for the
/// drained one).
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(2);
