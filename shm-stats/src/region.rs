//! The writer side: creating or opening a region, registering stats, attaching shards, retiring
//! them.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};

use crate::guard::Guard;
use crate::histogram::Bounds;
use crate::layout::{self, Capacities, Kind, Merge, SlotState, Unit, entry, header, locks, slot};
use crate::lock::{Acquired, LockGuard, RawLock};
use crate::reader::{self, HeaderInfo, ReadError};
use crate::view::View;

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

/// A region mapped for writing.
pub struct Region {
    path: PathBuf,
    file: File,
    /// Before `map`, so that it is unguarded before it is unmapped.
    guard: Guard,
    map: MmapRaw,
    view: View,
    header: HeaderInfo,
    metas: reader::MetaCache,
    names: Mutex<NameIndex>,
}

/// The name table as this process has read it, so that a registration looks a name up instead
/// of reading the whole table: with thousands of stats (a config of hundreds of clusters) that
/// scan made a generation's start quadratic, seconds long. The table only grows, and a
/// published entry never changes, so entries read once stay true.
#[derive(Default)]
struct NameIndex {
    /// Entries read so far: the table's first `read` entries.
    read: u32,
    /// By name: the name's kind (one name, one kind), and the first cell of each tag list.
    by_name: HashMap<String, (Kind, HashMap<String, u32>)>,
}

impl NameIndex {
    fn add(&mut self, kind: Kind, name: &str, tags: &str, first_cell: u32) {
        let (_, by_tags) = self
            .by_name
            .entry(name.to_owned())
            .or_insert_with(|| (kind, HashMap::new()));
        by_tags.entry(tags.to_owned()).or_insert(first_cell);
        self.read += 1;
    }
}

// SAFETY: `view` points into `map`, which the region owns and which is shared memory meant for
// concurrent use; every mutation goes through atomics or happens under the registry lock.
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only offers atomic accesses and lock-protected writes.
unsafe impl Sync for Region {}

/// A registered stat: where its cells are in every row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Counter(u32);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gauge(u32);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Histogram(u32);

/// What is registered: name, tags, help, unit, and for gauges how live rows combine.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub name: &'a str,
    pub tags: &'a [(&'a str, &'a str)],
    pub help: &'a str,
    pub unit: Unit,
    pub merge: Merge,
}

impl<'a> Spec<'a> {
    pub fn new(name: &'a str, tags: &'a [(&'a str, &'a str)], help: &'a str) -> Self {
        Spec {
            name,
            tags,
            help,
            unit: Unit::None,
            merge: Merge::Sum,
        }
    }

    pub fn unit(mut self, unit: Unit) -> Self {
        self.unit = unit;
        self
    }

    pub fn merge(mut self, merge: Merge) -> Self {
        self.merge = merge;
        self
    }
}

fn now_ms() -> u64 {
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
        let header = reader::read_header(path, view).map_err(StatsError::Unusable)?;
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
    pub fn snapshot(&self) -> Result<reader::Snapshot, ReadError> {
        reader::snapshot(&self.path, self.view, &self.header, &self.metas)
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

    fn registry(&self) -> Result<LockGuard<'_>, StatsError> {
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

    pub fn counter(&self, spec: Spec<'_>) -> Result<Counter, StatsError> {
        self.register(Kind::Counter, spec).map(Counter)
    }

    pub fn gauge(&self, spec: Spec<'_>) -> Result<Gauge, StatsError> {
        self.register(Kind::Gauge, spec).map(Gauge)
    }

    pub fn histogram(&self, spec: Spec<'_>) -> Result<Histogram, StatsError> {
        self.register(Kind::Histogram, spec).map(Histogram)
    }

    /// Registers a stat, or finds the one registered before with the same name and tags (by
    /// this process or another). Returns its first cell.
    fn register(&self, kind: Kind, spec: Spec<'_>) -> Result<u32, StatsError> {
        let invalid = |problem: String| StatsError::InvalidStat {
            name: spec.name.to_owned(),
            problem,
        };
        validate_name(spec.name).map_err(invalid)?;
        let tags = encode_tags(spec.tags).map_err(invalid)?;
        let help = truncate(spec.help.lines().next().unwrap_or(""), entry::HELP_MAX);

        let _guard = self.registry()?;
        let o = self.header.offsets;
        let caps = self.header.capacities;
        let count_cell = self.atomic_u32(header::STAT_COUNT);
        let used_cell = self.atomic_u32(header::CELLS_USED);
        let count = count_cell.load(Ordering::Relaxed).min(caps.max_stats);
        let used = used_cell.load(Ordering::Relaxed);
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        // Entries registered since this process last looked (by it or another process).
        while names.read < count {
            let existing =
                reader::read_entry(self.view, &self.header, names.read, used).map_err(|what| {
                    StatsError::Unusable(ReadError::Corrupt {
                        path: self.path.clone(),
                        what,
                    })
                })?;
            if let Some((kind, _)) = names.by_name.get(existing.name())
                && *kind != existing.kind
            {
                // Registration keeps one kind per name; a table with two was damaged.
                return Err(StatsError::Unusable(ReadError::Corrupt {
                    path: self.path.clone(),
                    what: format!(
                        "entry {} names `{}` a {} as well as a {}",
                        names.read,
                        existing.name(),
                        existing.kind.name(),
                        kind.name()
                    ),
                }));
            }
            names.add(
                existing.kind,
                existing.name(),
                existing.tags(),
                existing.first_cell,
            );
        }
        if let Some((existing, by_tags)) = names.by_name.get(spec.name) {
            // One name, one kind, whatever the tags: exposition formats group series by name.
            if *existing != kind {
                return Err(StatsError::KindMismatch {
                    name: spec.name.to_owned(),
                    existing: existing.name(),
                });
            }
            if let Some(&first_cell) = by_tags.get(tags.as_str()) {
                return Ok(first_cell);
            }
        }
        let full = |what, capacity, setting| StatsError::Full {
            path: self.path.clone(),
            what,
            capacity,
            setting,
        };
        if count >= caps.max_stats {
            return Err(full("the name table", caps.max_stats, "max_stats"));
        }
        let cells = layout::cells_of(kind, &caps.bounds);
        if used
            .checked_add(cells)
            .is_none_or(|end| end > caps.cells_per_shard)
        {
            return Err(full(
                "a shard's cells",
                caps.cells_per_shard,
                "cells_per_shard",
            ));
        }

        let mut raw = [0u8; layout::ENTRY_SIZE as usize];
        raw[entry::KIND as usize] = kind as u8;
        raw[entry::UNIT as usize] = spec.unit as u8;
        raw[entry::MERGE as usize] = spec.merge as u8;
        raw[entry::NAME_LEN as usize] = spec.name.len() as u8;
        raw[entry::TAGS_LEN as usize] = tags.len() as u8;
        raw[entry::HELP_LEN as usize] = help.len() as u8;
        raw[8..12].copy_from_slice(&used.to_ne_bytes());
        raw[12..16].copy_from_slice(&cells.to_ne_bytes());
        let put = |raw: &mut [u8], at: u64, s: &str| {
            raw[at as usize..at as usize + s.len()].copy_from_slice(s.as_bytes())
        };
        put(&mut raw, entry::NAME, spec.name);
        put(&mut raw, entry::TAGS, &tags);
        put(&mut raw, entry::HELP, help);
        let at = layout::entry_offset(o.names, count);
        // SAFETY: entry `count` < max_stats lies inside the mapping (validated offsets); no
        // reader looks at it before `STAT_COUNT` passes it (release store below), and writers
        // are serialised by the registry lock.
        unsafe {
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                self.map.as_mut_ptr().add(at as usize),
                raw.len(),
            );
        }
        used_cell.store(used + cells, Ordering::Release);
        count_cell.store(count + 1, Ordering::Release);
        names.add(kind, spec.name, &tags, used);
        Ok(used)
    }

    fn atomic_u32(&self, at: u64) -> &std::sync::atomic::AtomicU32 {
        // The header was validated at open: its fields are in bounds and aligned.
        self.view
            .atomic_u32(at)
            .expect("header fields are in bounds")
    }

    fn atomic_u64(&self, at: u64) -> &AtomicU64 {
        self.view
            .atomic_u64(at)
            .expect("header fields are in bounds")
    }

    /// Takes a free shard row for worker `worker` of generation `epoch`.
    pub fn attach_shard(self: &Arc<Self>, epoch: u64, worker: u32) -> Result<Shard, StatsError> {
        let _guard = self.registry()?;
        let o = self.header.offsets;
        let caps = self.header.capacities;
        for row in 1..=caps.max_shards {
            let s = layout::slot_offset(o.slots, row);
            let state = self.atomic_u32(s + slot::STATE);
            if state.load(Ordering::Relaxed) != SlotState::Free as u32 {
                continue;
            }
            self.atomic_u32(s + slot::WORKER)
                .store(worker, Ordering::Relaxed);
            self.atomic_u64(s + slot::EPOCH)
                .store(epoch, Ordering::Relaxed);
            self.atomic_u32(s + slot::PID)
                .store(std::process::id(), Ordering::Relaxed);
            self.atomic_u64(s + slot::ATTACHED_UNIX_MS)
                .store(now_ms(), Ordering::Relaxed);
            self.atomic_u64(s + slot::START_TIME).store(
                start_time(std::process::id()).unwrap_or(0),
                Ordering::Relaxed,
            );
            state.store(SlotState::Live as u32, Ordering::Release);
            let base = layout::cell_offset(o.cells, caps.cells_per_shard, row, 0);
            // SAFETY: the row lies inside the mapping (validated offsets, row <= max_shards), and
            // the pointer is derived from the mapping's own, valid for the whole row.
            let base = unsafe { self.map.as_mut_ptr().add(base as usize) } as *const AtomicU64;
            return Ok(Shard {
                region: self.clone(),
                base,
                bounds: caps.bounds,
                cells: caps.cells_per_shard,
                row,
                _single_thread: PhantomData,
            });
        }
        Err(StatsError::Full {
            path: self.path.clone(),
            what: "the shard table",
            capacity: caps.max_shards,
            setting: "max_shards",
        })
    }

    /// Folds the counters and histograms of every live shard of `epoch` into the retired row and
    /// frees those shards; their gauges stop counting. For a generation that has exited.
    pub fn retire_epoch(&self, epoch: u64) -> Result<usize, StatsError> {
        self.retire_where(|s| s.epoch == epoch)
    }

    /// Retires the live shards that process `pid` attached.
    pub fn retire_pid(&self, pid: u32) -> Result<usize, StatsError> {
        self.retire_where(|s| s.pid == pid)
    }

    /// Retires the live shards whose process no longer exists (it crashed without retiring).
    /// A process is the writer only if its pid exists with the start time the writer recorded,
    /// so a reused pid does not keep a dead writer's row alive.
    pub fn reclaim_dead(&self) -> Result<usize, StatsError> {
        let o = self.header.offsets;
        self.retire_where(|s| {
            let recorded = self
                .view
                .load_u64(
                    layout::slot_offset(o.slots, s.row) + slot::START_TIME,
                    Ordering::Relaxed,
                )
                .unwrap_or(0);
            !process_alive(s.pid, recorded)
        })
    }

    fn retire_where(
        &self,
        mut pick: impl FnMut(&reader::ShardInfo) -> bool,
    ) -> Result<usize, StatsError> {
        let _guard = self.registry()?;
        let o = self.header.offsets;
        let caps = self.header.capacities;
        // Bounded by the capacities: the region may be written by a less trusted process (a
        // generation running as another user), and this runs in the supervisor.
        let used = self
            .atomic_u32(header::CELLS_USED)
            .load(Ordering::Relaxed)
            .min(caps.cells_per_shard);
        let count = self
            .atomic_u32(header::STAT_COUNT)
            .load(Ordering::Relaxed)
            .min(caps.max_stats);
        let entries = (0..count)
            .map(|i| reader::read_entry(self.view, &self.header, i, used))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|what| {
                StatsError::Unusable(ReadError::Corrupt {
                    path: self.path.clone(),
                    what,
                })
            })?;
        let cell = |row: u32, c: u32| {
            self.atomic_u64(layout::cell_offset(o.cells, caps.cells_per_shard, row, c))
        };
        let seq = self.atomic_u64(header::RETIRE_SEQ);
        let mut retired = 0;
        for row in 1..=caps.max_shards {
            let s = layout::slot_offset(o.slots, row);
            let state = self.atomic_u32(s + slot::STATE);
            if state.load(Ordering::Relaxed) != SlotState::Live as u32 {
                continue;
            }
            let info = reader::ShardInfo {
                row,
                epoch: self.atomic_u64(s + slot::EPOCH).load(Ordering::Relaxed),
                worker: self.atomic_u32(s + slot::WORKER).load(Ordering::Relaxed),
                pid: self.atomic_u32(s + slot::PID).load(Ordering::Relaxed),
            };
            if !pick(&info) {
                continue;
            }
            // Readers that overlap this fold see an odd sequence and retry.
            let s0 = seq.load(Ordering::Relaxed);
            seq.store(s0 + 1, Ordering::Relaxed);
            fence(Ordering::Release);
            for e in &entries {
                match e.kind {
                    Kind::Gauge => {}
                    Kind::Counter => add(
                        cell(0, e.first_cell),
                        cell(row, e.first_cell).load(Ordering::Relaxed),
                    ),
                    Kind::Histogram => {
                        // Buckets and the sum add up; the maximum, in the last cell, does not.
                        let max = e.first_cell + layout::cells_of(e.kind, &caps.bounds) - 1;
                        for c in e.first_cell..max {
                            add(cell(0, c), cell(row, c).load(Ordering::Relaxed));
                        }
                        cell(0, max)
                            .fetch_max(cell(row, max).load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
            }
            for c in 0..used {
                cell(row, c).store(0, Ordering::Relaxed);
            }
            state.store(SlotState::Free as u32, Ordering::Relaxed);
            seq.store(s0 + 2, Ordering::Release);
            retired += 1;
        }
        Ok(retired)
    }
}

fn add(cell: &AtomicU64, v: u64) {
    cell.store(
        cell.load(Ordering::Relaxed).wrapping_add(v),
        Ordering::Relaxed,
    );
}

/// A process's start time in clock ticks since boot, from `/proc/<pid>/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last `)`.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` runs and is the process that recorded `recorded_start` (0: unknown).
fn process_alive(pid: u32, recorded_start: u64) -> bool {
    if recorded_start != 0 {
        return start_time(pid) == Some(recorded_start);
    }
    process_exists(pid)
}

fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 performs only the existence and permission check; no signal is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > entry::NAME_MAX {
        return Err(format!("a name is 1 to {} bytes", entry::NAME_MAX));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        || name.as_bytes()[0].is_ascii_digit()
    {
        return Err(
            "a name holds letters, digits, `_` and `.`, and does not start with a digit".into(),
        );
    }
    Ok(())
}

/// `[("listener", "public")]` → `listener=public`.
fn encode_tags(tags: &[(&str, &str)]) -> Result<String, String> {
    let mut out = String::new();
    for (k, v) in tags {
        let key_ok = !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes()[0].is_ascii_digit();
        if !key_ok {
            return Err(format!("tag key `{k}`: use letters, digits and `_`"));
        }
        if !v
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b',' | b'=' | b'"' | b'\\'))
        {
            return Err(format!(
                "tag `{k}`: value `{v}` may hold printable ASCII except , = \" and \\"
            ));
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    if out.len() > entry::TAGS_MAX {
        return Err(format!("tags are at most {} bytes in all", entry::TAGS_MAX));
    }
    Ok(out)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One worker's row of cells. Only its own thread writes it (the type is `Send` but not `Sync`),
/// so updates are a plain load and store of a relaxed atomic: no locked instruction, no
/// contention, and readers in other processes still see whole values.
pub struct Shard {
    region: Arc<Region>,
    base: *const AtomicU64,
    /// The region's bucket bounds, copied here so that a record reads no other memory.
    bounds: Bounds,
    cells: u32,
    row: u32,
    _single_thread: PhantomData<std::cell::Cell<()>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("region", &self.region.path)
            .field("row", &self.row)
            .finish()
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("path", &self.path).finish()
    }
}

// SAFETY: `base` points into the region's mapping, which `region` keeps alive; moving the shard
// to another thread is fine as long as one thread at a time uses it, which `!Sync` ensures.
unsafe impl Send for Shard {}

impl Shard {
    #[inline]
    fn cell(&self, i: u32) -> Option<&AtomicU64> {
        if i < self.cells {
            // SAFETY: `i` is within this row (checked), which lies inside the live mapping.
            Some(unsafe { &*self.base.add(i as usize) })
        } else {
            None
        }
    }

    #[inline]
    pub fn inc(&self, c: Counter) {
        self.add(c, 1);
    }

    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        if let Some(cell) = self.cell(c.0) {
            add(cell, n);
        }
    }

    #[inline]
    pub fn set(&self, g: Gauge, v: i64) {
        if let Some(cell) = self.cell(g.0) {
            cell.store(v as u64, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn gauge_add(&self, g: Gauge, delta: i64) {
        if let Some(cell) = self.cell(g.0) {
            cell.store(
                (cell.load(Ordering::Relaxed) as i64).wrapping_add(delta) as u64,
                Ordering::Relaxed,
            );
        }
    }

    #[inline]
    pub fn record(&self, h: Histogram, value: u64) {
        let first = h.0;
        let buckets = self.bounds.buckets() as u32;
        if let (Some(bucket), Some(sum), Some(max)) = (
            self.cell(first + self.bounds.bucket(value) as u32),
            self.cell(first + buckets),
            self.cell(first + buckets + 1),
        ) {
            add(bucket, 1);
            add(sum, value);
            if value > max.load(Ordering::Relaxed) {
                max.store(value, Ordering::Relaxed);
            }
        }
    }

    /// The row this shard writes (slot index in the region).
    pub fn row(&self) -> u32 {
        self.row
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
}
