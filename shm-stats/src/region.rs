//! A region mapped for writing: creating it (built under a private name, then linked into
//! place) or opening it, its header's fields and its locks. The rest of the writer adds to
//! [`Region`] in its own module: registering stats (`registry.rs`), attaching shards
//! (`shard.rs`) and retiring them (`retire.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{ReadError, StatsError};
use crate::guard::Guard;
use crate::layout::{self, Capacities, SlotState, header, locks, slot};
use crate::lock::{Acquired, LockGuard, RawLock};
use crate::names::NameIndex;
use crate::parse::{self, HeaderInfo};
use crate::snapshot::{self, MetaCache, Snapshot};
use crate::view::View;

/// A region mapped for writing.
pub struct Region {
    pub(crate) path: PathBuf,
    file: File,
    /// Before `map`, so that it is unguarded before it is unmapped.
    guard: Guard,
    pub(crate) map: MmapRaw,
    pub(crate) view: View,
    pub(crate) header: HeaderInfo,
    metas: MetaCache,
    pub(crate) names: Mutex<NameIndex>,
}

#[allow(unsafe_code)] // Holds pointers into its mapping.
// SAFETY: `view` points into `map`, which the region owns and which is shared memory meant for
// concurrent use; every mutation goes through atomics or happens under the registry lock.
unsafe impl Send for Region {}
#[allow(unsafe_code)] // Holds pointers into its mapping.
// SAFETY: as above; `&Region` only offers atomic accesses and lock-protected writes.
unsafe impl Sync for Region {}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Region {
    /// Opens the region at `path`, or creates it (mode 0640) with `capacities` if there is none.
    /// An existing region keeps its own capacities.
    pub fn create_or_open(path: &Path, capacities: Capacities) -> Result<Arc<Region>, StatsError> {
        let io_err = |action: &'static str| {
            move |source| StatsError::Io {
                path: path.to_owned(),
                action,
                source,
            }
        };
        for _ in 0..3 {
            match OpenOptions::new().read(true).write(true).open(path) {
                Ok(file) => return Self::from_file(path, file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot open the stats region")(e)),
            }
            // Build the region under a private name, then link it into place: readers and
            // other writers never see a half-initialised region, and of two creators racing,
            // one wins and the other opens its region.
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
            let _ = std::fs::remove_file(&temp);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o640)
                .open(&temp)
                .map_err(io_err("cannot create the stats region"))?;
            let built = Self::initialise(&temp, &file, capacities);
            let linked = built.and_then(|()| {
                std::fs::hard_link(&temp, path).or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(io_err("cannot put the stats region in place")(e))
                    }
                })
            });
            let _ = std::fs::remove_file(&temp);
            linked?;
        }
        Err(io_err("cannot create the stats region")(io::Error::other(
            "it kept appearing and disappearing",
        )))
    }

    /// [`Region::create_or_open`], except that a region an earlier release made (an older
    /// layout version, which this release cannot write) is replaced by a new one at the same
    /// path; then the older version is returned too. Its counts are gone for readers, and a
    /// process still writing it (an older generation) writes into the unlinked file until it
    /// ends. A region of a newer layout is refused and left alone, as any unusable one.
    pub fn create_or_replace_older(
        path: &Path,
        capacities: Capacities,
    ) -> Result<(Arc<Region>, Option<u32>), StatsError> {
        match Self::create_or_open(path, capacities) {
            Err(StatsError::Unusable(ReadError::UnknownVersion { found, known, .. }))
                if found < known =>
            {
                std::fs::remove_file(path).map_err(|source| StatsError::Io {
                    path: path.to_owned(),
                    action: "cannot remove the stats region an earlier release made",
                    source,
                })?;
                Ok((Self::create_or_open(path, capacities)?, Some(found)))
            }
            other => other.map(|region| (region, None)),
        }
    }

    /// Writes a fresh region into `file`.
    #[allow(unsafe_code)] // Maps a new region and initialises its locks.
    fn initialise(path: &Path, file: &File, caps: Capacities) -> Result<(), StatsError> {
        let bad = |problem: &str| StatsError::InvalidStat {
            name: "<capacities>".into(),
            problem: problem.into(),
        };
        if caps.max_stats == 0 || caps.max_shards == 0 || caps.cells_per_shard == 0 {
            return Err(bad("every capacity must be at least 1"));
        }
        let caps = Capacities {
            cells_per_shard: caps.cells_per_shard.div_ceil(layout::CELLS_PER_LINE)
                * layout::CELLS_PER_LINE,
            ..caps
        };
        let o = layout::offsets(caps).ok_or_else(|| bad("the region would not fit in memory"))?;
        let io_err = |action: &'static str| {
            move |source| StatsError::Io {
                path: path.to_owned(),
                action,
                source,
            }
        };
        file.set_len(o.size)
            .map_err(io_err("cannot size the stats region"))?;
        let map = MmapOptions::new()
            .map_raw(file)
            .map_err(io_err("cannot map the stats region"))?;
        // SAFETY: `map` is a fresh page-aligned mapping of `o.size` bytes that lives until the
        // end of this function, longer than the view.
        let view = unsafe { View::new(map.as_ptr(), map.len()) };
        // The file is new and zero-filled; only non-zero fields need writing, and no other
        // process can see it yet.
        let put32 = |at: u64, v: u32| view.atomic_u32(at).map(|a| a.store(v, Ordering::Relaxed));
        let put64 = |at: u64, v: u64| view.atomic_u64(at).map(|a| a.store(v, Ordering::Relaxed));
        let magic = u64::from_ne_bytes(layout::MAGIC);
        put64(header::MAGIC, magic);
        put32(header::LAYOUT_VERSION, layout::LAYOUT_VERSION);
        put32(header::HEADER_SIZE, layout::HEADER_SIZE as u32);
        put64(header::REGION_SIZE, o.size);
        put32(header::MAX_STATS, caps.max_stats);
        put32(header::MAX_SHARDS, caps.max_shards);
        put32(header::CELLS_PER_SHARD, caps.cells_per_shard);
        put32(header::LOCK_COUNT, locks::COUNT);
        put64(header::LOCKS_OFFSET, o.locks);
        put64(header::BOUNDS_OFFSET, o.bounds);
        put32(header::BOUND_COUNT, caps.bounds.as_slice().len() as u32);
        for (i, &bound) in caps.bounds.as_slice().iter().enumerate() {
            put64(o.bounds + i as u64 * 8, bound);
        }
        put64(header::NAMES_OFFSET, o.names);
        put64(header::SLOTS_OFFSET, o.slots);
        put64(header::CELLS_OFFSET, o.cells);
        put64(header::CREATED_UNIX_MS, now_ms());
        put32(
            layout::slot_offset(o.slots, 0) + slot::STATE,
            SlotState::Retired as u32,
        );
        for i in 0..u64::from(locks::COUNT) {
            // SAFETY: lock slot `i` lies inside the fresh mapping (see `layout::offsets`), is
            // 64-byte aligned, and the mapping outlives the RawLock.
            let lock = unsafe {
                RawLock::at(
                    map.as_mut_ptr()
                        .add((o.locks + i * layout::LOCK_SLOT_SIZE) as usize),
                )
            };
            lock.init()
                .map_err(io_err("cannot initialise the region's locks"))?;
        }
        map.flush()
            .map_err(io_err("cannot write the stats region"))?;
        Ok(())
    }

    /// Uses an open region file (as handed over by the supervisor, or found at `path`).
    #[allow(unsafe_code)] // Maps the region.
    pub fn from_file(path: &Path, file: File) -> Result<Arc<Region>, StatsError> {
        let map = MmapOptions::new()
            .map_raw(&file)
            .map_err(|source| StatsError::Io {
                path: path.to_owned(),
                action: "cannot map the stats region",
                source,
            })?;
        // SAFETY: the mapping is page-aligned, `map.len()` bytes, and owned by the Region that
        // also owns the view.
        let view = unsafe { View::new(map.as_ptr(), map.len()) };
        let header = parse::read_header(path, view).map_err(StatsError::Unusable)?;
        Ok(Arc::new(Region {
            path: path.to_owned(),
            file,
            guard: Guard::new(map.as_ptr(), map.len()),
            map,
            view,
            header,
            metas: Default::default(),
            names: Default::default(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether another process cut the region's file short under this mapping. The process
    /// lives on (see `guard.rs`), but its stats go nowhere anyone reads until it maps a region
    /// again.
    pub fn lost(&self) -> bool {
        self.guard.lost()
    }

    /// The open file, to hand to another process.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn capacities(&self) -> Capacities {
        self.header.capacities
    }

    /// An existing region keeps the sizes it was made with: a sentence saying so when
    /// `configured` asks for others.
    pub fn capacity_mismatch(&self, configured: Capacities) -> Option<String> {
        let have = self.header.capacities;
        let want = Capacities {
            cells_per_shard: configured.cells_per_shard.div_ceil(layout::CELLS_PER_LINE)
                * layout::CELLS_PER_LINE,
            ..configured
        };
        (have != want).then(|| {
            format!(
                "stats region {} was created with max_stats={}, max_shards={}, cells_per_shard={}, histogram_buckets={}, not the configured {}, {}, {}, {}; it keeps its own: remove it while no baton runs (its counters start over) to apply the configured ones",
                self.path.display(),
                have.max_stats,
                have.max_shards,
                have.cells_per_shard,
                have.bounds,
                want.max_stats,
                want.max_shards,
                want.cells_per_shard,
                want.bounds,
            )
        })
    }

    /// A consistent snapshot of every stat, read through this writer's own mapping.
    pub fn snapshot(&self) -> Result<Snapshot, ReadError> {
        snapshot::take(&self.path, self.view, &self.header, &self.metas)
    }

    /// Records which epoch is active, for readers.
    pub fn set_current_epoch(&self, epoch: u64) {
        if let Some(a) = self.view.atomic_u64(header::CURRENT_EPOCH) {
            a.store(epoch, Ordering::Relaxed);
        }
    }

    /// Records the supervisor's pid, for readers.
    pub fn set_supervisor_pid(&self, pid: u32) {
        if let Some(a) = self.view.atomic_u32(header::SUPERVISOR_PID) {
            a.store(pid, Ordering::Relaxed);
        }
    }

    /// Takes lock `index` of the lock area (see [`layout::locks`]).
    #[allow(unsafe_code)] // Points at a lock in the mapping.
    pub fn lock(&self, index: usize) -> Result<LockGuard<'_>, StatsError> {
        let o = self.header.offsets;
        if index >= locks::COUNT as usize {
            return Err(StatsError::Lock {
                path: self.path.clone(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "no such lock"),
            });
        }
        // SAFETY: the lock slot lies inside our mapping (validated header), was initialised when
        // the region was created, and the guard cannot outlive `self`.
        let raw = unsafe {
            RawLock::at(
                self.map
                    .as_mut_ptr()
                    .add((o.locks + index as u64 * layout::LOCK_SLOT_SIZE) as usize),
            )
        };
        let acquired = raw.lock().map_err(|source| StatsError::Lock {
            path: self.path.clone(),
            source,
        })?;
        Ok(LockGuard::new(raw, acquired))
    }

    /// Takes the registry lock, which serialises registrations, attachments and retirements.
    pub(crate) fn registry(&self) -> Result<LockGuard<'_>, StatsError> {
        let guard = self.lock(locks::REGISTRY)?;
        if guard.acquired() == Acquired::OwnerDied {
            // A holder died mid-way. Registration publishes an entry only once it is complete;
            // a retirement may have been cut short, so make the sequence even again for readers.
            if let Some(seq) = self.view.atomic_u64(header::RETIRE_SEQ) {
                let s = seq.load(Ordering::Relaxed);
                if s % 2 == 1 {
                    seq.store(s + 1, Ordering::Release);
                }
            }
        }
        Ok(guard)
    }

    pub(crate) fn atomic_u32(&self, at: u64) -> &AtomicU32 {
        // The header was validated at open: its fields are in bounds and aligned.
        self.view
            .atomic_u32(at)
            .expect("header fields are in bounds")
    }

    pub(crate) fn atomic_u64(&self, at: u64) -> &AtomicU64 {
        self.view
            .atomic_u64(at)
            .expect("header fields are in bounds")
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("path", &self.path).finish()
    }
}
