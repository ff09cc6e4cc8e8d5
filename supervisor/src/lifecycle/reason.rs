//! What the lifecycle tells a reload's or a drain's requester when it failed or was refused:
//! one line naming what happened to which generation, and the way out where there is one.

use std::time::Duration;

/// A reload or drain asked of a supervisor that is stopping.
pub const STOPPING: &str = "the supervisor is stopping";

/// The process of generation `epoch` could not be started at all.
pub fn cannot_start(epoch: u64, error: &str) -> String {
    format!("cannot start generation {epoch}: {error}")
}

/// Generation `epoch` exited (`status`) before it was ready, without saying why.
pub fn exited_before_ready(epoch: u64, status: &str) -> String {
    format!("generation {epoch} exited before it was ready ({status})")
}

/// Generation `epoch` was not ready within the readiness timeout.
pub fn not_ready_in_time(epoch: u64, timeout: Duration) -> String {
    format!("generation {epoch} was not ready within the readiness timeout ({timeout:?})")
}

/// A reload failed (`reason`) while no generation is active: the replacement goes on.
pub fn while_recovering(reason: &str) -> String {
    format!(
        "{reason}; no generation is active (the last one crashed): the supervisor keeps starting one from the last config that was active"
    )
}

/// A drain refused while generation `epoch` is starting.
pub fn drain_while_starting(epoch: u64) -> String {
    format!(
        "generation {epoch} is starting (a reload or a restart); drain again once `baton status` shows it active"
    )
}
