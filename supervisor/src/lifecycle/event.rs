//! What goes into the lifecycle ([`Event`]s, from the event loop) and what comes out of it
//! ([`Action`]s, for the event loop to carry out).

use std::time::Duration;

use restart_protocol::DrainStrategy;

/// Who waits for the outcome of a reload (a `baton reload` client).
pub type Waiter = u64;

/// What a generation is started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The binary and config on disk (a reload, or the first start).
    Disk,
    /// The binary and config the last active generation started from: a replacement for a
    /// crashed generation, which must not depend on what has changed on disk since.
    LastGood,
}

/// What the outside world tells the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP (no waiter) or `baton reload` (its client waits).
    Reload {
        waiter: Option<Waiter>,
    },
    /// The process of `epoch` could not be started at all.
    SpawnFailed {
        epoch: u64,
        error: String,
    },
    Ready {
        epoch: u64,
    },
    /// A draining generation no longer accepts.
    StoppedAccepting {
        epoch: u64,
    },
    /// The generation reported why it cannot start.
    Failed {
        epoch: u64,
        reason: String,
    },
    /// The process exited; `status` is how, for logs and replies.
    Exited {
        epoch: u64,
        status: String,
    },
    /// SIGTERM (graceful) or SIGINT.
    Stop {
        graceful: bool,
    },
    /// SIGWINCH, `baton drain` (its client waits) or the Active generation's
    /// `/drain_listeners`: drain without a successor, until the next reload.
    Drain {
        waiter: Option<Waiter>,
    },
    /// Time passed: deadlines may have come.
    Tick,
}

/// What the lifecycle asks the outside world to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start generation `epoch`.
    Spawn { epoch: u64, from: Source },
    Drain {
        epoch: u64,
        timeout: Duration,
        strategy: DrainStrategy,
    },
    /// Tell it to close everything now.
    Stop { epoch: u64 },
    /// SIGKILL.
    Kill { epoch: u64 },
    /// `epoch` is now the Active generation: close the stored sockets it does not use.
    Activated { epoch: u64, replaced: Option<u64> },
    /// A reload ended: tell whoever waits.
    Reply {
        waiters: Vec<Waiter>,
        result: Result<u64, String>,
    },
    /// A drain took effect (the generation it drained, if one was active) or was refused.
    DrainReply {
        waiters: Vec<Waiter>,
        result: Result<Option<u64>, String>,
    },
    /// Fold the stats of `epoch` into the retired row (it has exited).
    Retire { epoch: u64 },
    /// Exit the supervisor with this status.
    Exit { code: u8 },
}
