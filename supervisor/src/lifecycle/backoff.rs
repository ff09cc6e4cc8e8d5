//! How long the supervisor waits before it starts another replacement while no generation is
//! active.

use std::time::{Duration, Instant};

/// Restart delays while no generation is active: 100 ms after the crash of a generation that had
/// served (been active for [`SERVED`]); doubling, but never past 1 s, while generations crash
/// right after they became active; doubling to 5 s while replacements fail before they are ready
/// (a config or binary that cannot start is not helped by haste). New clients wait in the accept
/// queue meanwhile, so the delay stays far below a client's connect timeout.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_CRASH_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Active this long, a generation has served: its crash starts the backoff again.
const SERVED: Duration = Duration::from_secs(1);

/// The delay before the next replacement; grows while replacements fail.
#[derive(Debug, Clone, Copy)]
pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(FIRST_BACKOFF)
    }
}

impl Backoff {
    pub fn delay(self) -> Duration {
        self.0
    }

    /// From the shortest delay again.
    pub fn reset(&mut self) {
        self.0 = FIRST_BACKOFF;
    }

    /// The active generation crashed: one that had served (active since `active_since` for
    /// [`SERVED`] at `now`) is replaced at once; one that crashes right after it became active
    /// later each time.
    pub fn crashed(&mut self, active_since: Option<Instant>, now: Instant) {
        let served =
            active_since.is_some_and(|since| now.saturating_duration_since(since) >= SERVED);
        self.0 = if served {
            FIRST_BACKOFF
        } else {
            (self.0 * 2).min(MAX_CRASH_BACKOFF)
        };
    }

    /// A replacement failed before it was ready.
    pub fn start_failed(&mut self) {
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
    }
}
