//! Why a writer could not use a region: [`StatsError`].

use std::io;
use std::path::PathBuf;

use crate::reader::ReadError;

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
