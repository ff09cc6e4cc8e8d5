//! Why a region could not be used: [`ReadError`] for a reader, [`StatsError`] for a writer.

#![forbid(unsafe_code)]

use std::io;
use std::path::PathBuf;

/// Why a region could not be read. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No file at the path: baton is not running, or runs with another instance name or path.
    #[error("{}: no stats region here ({source}); is baton running with this instance? (--instance NAME or --path FILE)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file could not be mapped.
    #[error("{}: cannot map the stats region: {source}", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not start with baton's magic (or is a folder): it is something else.
    #[error("{}: not a baton stats region", path.display())]
    Foreign { path: PathBuf },
    /// The path names a folder, a named pipe, a socket or a device: a region is a regular file.
    #[error("{}: is a {kind}, not a stats region (a region is a regular file: the one `stats.path` names, or /dev/shm/baton.<instance>)", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    /// A layout this reader does not know: reader and writer come from different releases.
    #[error("{}: stats region layout version {found}, but this reader knows version {known}; use the baton-stats of the running baton", path.display())]
    UnknownVersion {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    /// The file is shorter than its header says: cut short, or still being created.
    #[error("{}: stats region is truncated: {actual} bytes of {expected}", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A retirement has kept the region's counts moving for longer than a reader waits; the
    /// writer doing it may have died mid-way. Trying again usually works.
    #[error("{}: stats region is busy: a retirement has been moving counts for over {waited:?}; try again", path.display())]
    Busy {
        path: PathBuf,
        waited: std::time::Duration,
    },
    /// Offsets or entries are inconsistent: the region is damaged.
    #[error("{}: stats region is corrupt: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
}

/// Why a writer could not use a region. Each says whose problem it is and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The file could not be created, opened, sized or mapped (permissions, a missing folder,
    /// a full /dev/shm).
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// An existing file is not a usable region: foreign, damaged, or of another layout version.
    #[error(
        "{0}; stop the processes that use it (or remove the file if none does), or set another stats path"
    )]
    Unusable(#[source] ReadError),
    /// A name, tag or help text that the layout cannot hold: the caller's mistake.
    #[error("stat `{name}`: {problem}")]
    InvalidStat { name: String, problem: String },
    /// The same name and tags were registered before as another kind.
    #[error("stat `{name}` is already registered as a {existing}")]
    KindMismatch {
        name: String,
        existing: &'static str,
    },
    /// A capacity of the region is exhausted.
    #[error("stats region {}: {what} is full ({capacity}); a region keeps the sizes it was created with: stop baton, remove the file (its counters start over) and raise stats.{setting}", path.display())]
    Full {
        path: PathBuf,
        what: &'static str,
        capacity: u32,
        setting: &'static str,
    },
    /// Locking the region failed for a reason other than a dead holder.
    #[error("stats region {}: cannot take its lock: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}
