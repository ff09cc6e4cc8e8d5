//! What the tasks of one worker thread share: its config, its stats shard, its drain, its
//! listeners' TLS and access logs. Owned by the worker (an `Rc`), lent to each connection and
//! request by reference or by a clone of that `Rc`: per-thread state needs no lock.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::stats::ThreadStats;

use super::access_log::LogTarget;
use super::drain::{Connections, DrainState};
use super::limits::ConnectionLimits;

/// A worker thread's state, shared by the tasks on its thread.
pub struct WorkerContext {
    pub id: usize,
    pub config: Arc<Config>,
    pub stats: ThreadStats,
    /// One per listener of the config.
    pub tls: Vec<Option<TlsAcceptor>>,
    /// One per listener of the config.
    pub access_logs: Vec<Option<LogTarget>>,
    pub drain: DrainState,
    pub connections: Connections,
    /// Set when the worker closes everything it still holds (drain deadline, stop).
    pub stopping: Cell<bool>,
    /// Requests being answered (single writer: this worker).
    pub requests: Arc<AtomicUsize>,
    pub epoch_header: Option<::http::HeaderValue>,
    pub limits: Arc<ConnectionLimits>,
    /// Connections being answered 503 because a limit was reached.
    pub refusing: Cell<usize>,
}
