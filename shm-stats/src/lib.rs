//! The shared-memory stats region of baton.
//!
//! One file (by default `/dev/shm/baton.<instance>`) holds every stat of an instance: the
//! supervisor creates it, every generation maps it and writes its own rows, and outside tools map
//! it read-only. During a hot restart the old and the new generation write the same region, and
//! when a generation ends its counts are folded into a retired row, so counters never go back.
//!
//! Who depends on it: the proxy (writes through [`Shard`]s), the supervisor (creates regions,
//! [`Region::retire_epoch`]), `baton-stats` and any other reader ([`Reader`]).
//!
//! What it promises:
//! - Writes are uncontended: a [`Shard`] is one worker's row, written by one thread with relaxed
//!   atomic loads and stores; rows are cache-line aligned, so workers never share a line.
//! - Reads need no lock: entries are published with a release store of the stat count, and a
//!   sequence number makes snapshots consistent across retirements.
//! - A reader never trusts the file: foreign, truncated, damaged or newer regions give a
//!   [`ReadError`] that says so, never a crash.
//! - Every histogram of a region counts into the bucket bounds the region was created with, which
//!   it stores: writers of other configs or releases that share it, and its readers, all agree.
//! - The byte layout is the contract with external tools: it is documented in `LAYOUT.md`, and
//!   [`LAYOUT_VERSION`] changes with any change to it.
//!
//! It does not know about processes beyond a pid in each row, nor about sockets or the proxy.

// Unsafe only where the region's memory is mapped, read or written through raw pointers and
// where the OS is called without a safe wrapper (the SIGBUS handler, the robust mutexes); each
// such item is allowed by name, and every module without one forbids it.
#![deny(unsafe_code)]

mod error;
pub mod format;
mod guard;
pub mod histogram;
pub mod layout;
mod lock;
mod names;
mod parse;
mod process;
mod reader;
mod region;
mod registry;
mod retire;
mod shard;
mod snapshot;
mod view;

pub use error::{ReadError, StatsError};
pub use histogram::Bounds;
pub use layout::{Capacities, Kind, LAYOUT_VERSION, Merge, Unit};
pub use lock::{Acquired, LockGuard};
pub use parse::HeaderInfo;
pub use reader::Reader;
pub use region::Region;
pub use registry::{Counter, Gauge, Histogram, Spec};
pub use shard::Shard;
pub use snapshot::{ShardInfo, Snapshot, Stat, StatMeta, Value};

/// Where the region of `instance` lives by default.
pub fn default_path(instance: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/dev/shm/baton.{instance}"))
}
