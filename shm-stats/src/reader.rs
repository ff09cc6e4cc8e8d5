//! Reading a region: validate its header, then take consistent snapshots of every stat.
//!
//! A reader never trusts the file: it checks the magic, the layout version, the size against the
//! file's, every offset against the capacities, and every entry's lengths and cells, and answers
//! a [`ReadError`] that says what is wrong instead of reading out of bounds or panicking.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

use crate::histogram::{Bounds, MAX_BOUNDS, Summary};
use crate::layout::{self, Capacities, Kind, Merge, Offsets, SlotState, Unit, entry, header, slot};
use crate::view::View;

/// Why a region could not be read. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No file at the path: baton is not running, or runs with another instance name or path.
    #[error("{}: no stats region here ({source}); is baton running with this instance? (--instance NAME or --path FILE)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file could not be mapped.
    #[error("{}: cannot map the stats region: {source}", path.display())]
    Map {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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

/// What a file that is not a regular file is, in words; `None` for a regular file.
fn not_a_file(kind: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("folder")
    } else if kind.is_fifo() {
        Some("named pipe (FIFO)")
    } else if kind.is_socket() {
        Some("socket")
    } else if kind.is_char_device() {
        Some("character device")
    } else if kind.is_block_device() {
        Some("block device")
    } else {
        Some("special file")
    }
}

/// The fixed facts of a region, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    pub version: u32,
    pub capacities: Capacities,
    pub offsets: Offsets,
    pub created_unix_ms: u64,
}

/// What a stat is: everything but its value. Entries never change once published, so readers
/// parse each once and share it between snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatMeta {
    /// Name, tags (`k=v,k2=v2`) and help, one after the other: one allocation per stat.
    text: Box<str>,
    name_end: usize,
    tags_end: usize,
    pub kind: Kind,
    pub unit: Unit,
    pub merge: Merge,
    first_cell: u32,
}

impl StatMeta {
    pub fn name(&self) -> &str {
        &self.text[..self.name_end]
    }

    /// The tags as stored: `key=value` pairs joined by commas.
    pub fn tags_str(&self) -> &str {
        &self.text[self.name_end..self.tags_end]
    }

    /// The tags as `(key, value)` pairs.
    pub fn tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tags_str()
            .split(',')
            .filter(|t| !t.is_empty())
            .map(|t| t.split_once('=').unwrap_or((t, "")))
    }

    pub fn help(&self) -> &str {
        &self.text[self.tags_end..]
    }
}

/// One stat's value at the time of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub meta: Arc<StatMeta>,
    pub value: Value,
}

impl std::ops::Deref for Stat {
    type Target = StatMeta;

    fn deref(&self) -> &StatMeta {
        &self.meta
    }
}

/// Parsed entries of a region, in table order.
#[derive(Default)]
pub(crate) struct MetaCache(Mutex<Vec<Arc<StatMeta>>>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Counter(u64),
    Gauge(i64),
    Histogram(Summary),
}

/// A shard row in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardInfo {
    pub row: u32,
    pub epoch: u64,
    pub worker: u32,
    pub pid: u32,
}

/// Every stat of a region at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub header: HeaderInfo,
    pub supervisor_pid: u32,
    pub current_epoch: u64,
    pub shards: Vec<ShardInfo>,
    pub stats: Vec<Stat>,
}

/// A region mapped read-only.
pub struct Reader {
    path: PathBuf,
    file: File,
    _map: MmapRaw,
    view: View,
    header: HeaderInfo,
    metas: MetaCache,
}

impl Reader {
    /// Maps the region at `path` read-only and validates its header.
    pub fn open(path: &Path) -> Result<Reader, ReadError> {
        use std::os::unix::fs::OpenOptionsExt;
        // Non-blocking, so that opening a named pipe returns at once (without it, the open
        // waits for a writer forever); its type is refused just below. O_NONBLOCK changes
        // nothing for a regular file.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| ReadError::Open {
                path: path.to_owned(),
                source,
            })?;
        let metadata = file.metadata().map_err(|source| ReadError::Open {
            path: path.to_owned(),
            source,
        })?;
        if let Some(kind) = not_a_file(metadata.file_type()) {
            return Err(ReadError::NotAFile {
                path: path.to_owned(),
                kind,
            });
        }
        let len = metadata.len();
        if len < layout::HEADER_SIZE {
            // Too short to hold even a header: tell a foreign file from a cut-short region.
            let mut head = Vec::new();
            use std::io::Read;
            let _ = (&file).take(8).read_to_end(&mut head);
            if !layout::MAGIC.starts_with(&head) {
                return Err(ReadError::Foreign {
                    path: path.to_owned(),
                });
            }
            return Err(ReadError::Truncated {
                path: path.to_owned(),
                expected: layout::HEADER_SIZE,
                actual: len,
            });
        }
        let map = MmapOptions::new()
            .map_raw_read_only(&file)
            .map_err(|source| ReadError::Map {
                path: path.to_owned(),
                source,
            })?;
        // SAFETY: the mapping is page-aligned, `map.len()` bytes long, and kept in `_map` for as
        // long as the view is used.
        let view = unsafe { View::new(map.as_ptr(), map.len()) };
        let header = read_header(path, view)?;
        Ok(Reader {
            path: path.to_owned(),
            file,
            _map: map,
            view,
            header,
            metas: MetaCache::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> HeaderInfo {
        self.header
    }

    /// Every stat, consistent with respect to retirements.
    ///
    /// A file cut short under the mapping would fault on access (SIGBUS), so its size is checked
    /// first; only a truncation in the instant between the check and the read remains possible,
    /// and only by the file's owner (the region is mode 0640).
    pub fn snapshot(&self) -> Result<Snapshot, ReadError> {
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        if size < self.header.offsets.size {
            return Err(ReadError::Truncated {
                path: self.path.clone(),
                expected: self.header.offsets.size,
                actual: size,
            });
        }
        snapshot(&self.path, self.view, &self.header, &self.metas)
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> ReadError {
    ReadError::Corrupt {
        path: path.to_owned(),
        what: what.into(),
    }
}

/// Validates the header of the region in `view`.
pub(crate) fn read_header(path: &Path, view: View) -> Result<HeaderInfo, ReadError> {
    // Only the fields fixed at creation (offsets 0..72) are copied; the others change while we
    // read and are loaded atomically where they are used.
    let fixed = view
        .copy(0, header::STAT_COUNT as usize)
        .ok_or_else(|| ReadError::Truncated {
            path: path.to_owned(),
            expected: layout::HEADER_SIZE,
            actual: view.len(),
        })?;
    let u32_at = |o: u64| {
        u32::from_ne_bytes(
            fixed[o as usize..o as usize + 4]
                .try_into()
                .unwrap_or_default(),
        )
    };
    let u64_at = |o: u64| {
        u64::from_ne_bytes(
            fixed[o as usize..o as usize + 8]
                .try_into()
                .unwrap_or_default(),
        )
    };
    if fixed[..8] != layout::MAGIC {
        return Err(ReadError::Foreign {
            path: path.to_owned(),
        });
    }
    let version = u32_at(header::LAYOUT_VERSION);
    if version != layout::LAYOUT_VERSION {
        return Err(ReadError::UnknownVersion {
            path: path.to_owned(),
            found: version,
            known: layout::LAYOUT_VERSION,
        });
    }
    if u64::from(u32_at(header::HEADER_SIZE)) != layout::HEADER_SIZE {
        return Err(corrupt(path, "header size"));
    }
    let region_size = u64_at(header::REGION_SIZE);
    if region_size > view.len() {
        return Err(ReadError::Truncated {
            path: path.to_owned(),
            expected: region_size,
            actual: view.len(),
        });
    }
    let bounds = read_bounds(path, view)?;
    let capacities = Capacities {
        max_stats: u32_at(header::MAX_STATS),
        max_shards: u32_at(header::MAX_SHARDS),
        cells_per_shard: u32_at(header::CELLS_PER_SHARD),
        bounds,
    };
    let offsets =
        layout::offsets(capacities).ok_or_else(|| corrupt(path, "capacities overflow"))?;
    let stored = Offsets {
        locks: u64_at(header::LOCKS_OFFSET),
        bounds: view
            .load_u64(header::BOUNDS_OFFSET, Ordering::Relaxed)
            .unwrap_or(0),
        names: u64_at(header::NAMES_OFFSET),
        slots: u64_at(header::SLOTS_OFFSET),
        cells: u64_at(header::CELLS_OFFSET),
        size: region_size,
    };
    if stored != offsets
        || u32_at(header::LOCK_COUNT) != layout::locks::COUNT
        || capacities.cells_per_shard % layout::CELLS_PER_LINE != 0
    {
        return Err(corrupt(path, "offsets do not match capacities"));
    }
    if offsets.size != view.len() {
        return Err(corrupt(
            path,
            format!(
                "region size {} differs from file size {}",
                offsets.size,
                view.len()
            ),
        ));
    }
    Ok(HeaderInfo {
        version,
        capacities,
        offsets,
        created_unix_ms: view
            .load_u64(header::CREATED_UNIX_MS, Ordering::Relaxed)
            .unwrap_or(0),
    })
}

/// The histograms' bucket bounds, checked: 1 to `MAX_BOUNDS` of them, above zero, increasing.
/// Written once when the region is made, before any process can see it.
fn read_bounds(path: &Path, view: View) -> Result<Bounds, ReadError> {
    let count = view
        .load_u32(header::BOUND_COUNT, Ordering::Relaxed)
        .unwrap_or(0) as usize;
    let at = view
        .load_u64(header::BOUNDS_OFFSET, Ordering::Relaxed)
        .unwrap_or(0);
    if !(1..=MAX_BOUNDS).contains(&count) {
        return Err(corrupt(
            path,
            format!("{count} histogram bucket bounds (1 to {MAX_BOUNDS})"),
        ));
    }
    // The offset is checked against the capacities by the caller; here only that it can be read.
    let values = (0..count as u64)
        .map(|i| view.load_u64(at.checked_add(i * 8)?, Ordering::Relaxed))
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| corrupt(path, "histogram bucket bounds out of bounds"))?;
    Bounds::new(&values).map_err(|e| corrupt(path, format!("histogram bucket bounds: {e}")))
}

/// One validated name-table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub kind: Kind,
    pub unit: Unit,
    pub merge: Merge,
    pub first_cell: u32,
    raw: [u8; layout::ENTRY_SIZE as usize],
}

impl Entry {
    fn text(&self, offset: u64, len_at: u64) -> &str {
        let start = offset as usize;
        let len = self.raw[len_at as usize] as usize;
        // Checked to be UTF-8 within its field by `read_entry`.
        std::str::from_utf8(&self.raw[start..start + len]).unwrap_or("")
    }

    pub fn name(&self) -> &str {
        self.text(entry::NAME, entry::NAME_LEN)
    }

    pub fn tags(&self) -> &str {
        self.text(entry::TAGS, entry::TAGS_LEN)
    }

    pub fn help(&self) -> &str {
        self.text(entry::HELP, entry::HELP_LEN)
    }
}

/// Reads and validates entry `i`; `cells_used` bounds its cells.
pub(crate) fn read_entry(
    view: View,
    header: &HeaderInfo,
    i: u32,
    cells_used: u32,
) -> Result<Entry, String> {
    let at = layout::entry_offset(header.offsets.names, i);
    let raw: [u8; layout::ENTRY_SIZE as usize] = view
        .copy_array(at)
        .ok_or_else(|| format!("entry {i} is out of bounds"))?;
    let kind = Kind::from_u8(raw[entry::KIND as usize])
        .ok_or_else(|| format!("entry {i} has an unknown kind"))?;
    let unit = Unit::from_u8(raw[entry::UNIT as usize])
        .ok_or_else(|| format!("entry {i} has an unknown unit"))?;
    let merge = Merge::from_u8(raw[entry::MERGE as usize])
        .ok_or_else(|| format!("entry {i} has an unknown merge"))?;
    let first_cell = u32::from_ne_bytes(raw[8..12].try_into().unwrap_or_default());
    let cell_count = u32::from_ne_bytes(raw[12..16].try_into().unwrap_or_default());
    if cell_count != layout::cells_of(kind, &header.capacities.bounds)
        || first_cell
            .checked_add(cell_count)
            .is_none_or(|end| end > cells_used)
    {
        return Err(format!("entry {i} has cells out of bounds"));
    }
    for (offset, len_at, max, what) in [
        (entry::NAME, entry::NAME_LEN, entry::NAME_MAX, "name"),
        (entry::TAGS, entry::TAGS_LEN, entry::TAGS_MAX, "tag list"),
        (entry::HELP, entry::HELP_LEN, entry::HELP_MAX, "help text"),
    ] {
        let len = raw[len_at as usize] as usize;
        if len > max {
            return Err(format!("entry {i} has a {what} longer than its field"));
        }
        let start = offset as usize;
        if std::str::from_utf8(&raw[start..start + len]).is_err() {
            return Err(format!("entry {i} has a {what} that is not UTF-8"));
        }
    }
    Ok(Entry {
        kind,
        unit,
        merge,
        first_cell,
        raw,
    })
}

/// How long a snapshot waits for retirements to finish before it reports the region busy.
const SNAPSHOT_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) fn snapshot(
    path: &Path,
    view: View,
    header: &HeaderInfo,
    cache: &MetaCache,
) -> Result<Snapshot, ReadError> {
    let o = header.offsets;
    let caps = header.capacities;
    let seq = view
        .atomic_u64(header::RETIRE_SEQ)
        .ok_or_else(|| corrupt(path, "header"))?;
    let started = std::time::Instant::now();
    while started.elapsed() < SNAPSHOT_PATIENCE {
        let before = seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            // A retirement takes microseconds; its thread may have been preempted.
            std::thread::yield_now();
            continue;
        }
        let count = view
            .load_u32(header::STAT_COUNT, Ordering::Acquire)
            .unwrap_or(0);
        let cells_used = view
            .load_u32(header::CELLS_USED, Ordering::Acquire)
            .unwrap_or(0);
        if count > caps.max_stats || cells_used > caps.cells_per_shard {
            return Err(corrupt(path, "stat count or cells beyond capacity"));
        }
        let metas = {
            let mut cached = cache.0.lock().unwrap_or_else(|e| e.into_inner());
            for i in cached.len() as u32..count {
                let e =
                    read_entry(view, header, i, cells_used).map_err(|what| corrupt(path, what))?;
                cached.push(Arc::new(StatMeta {
                    text: [e.name(), e.tags(), e.help()].concat().into_boxed_str(),
                    name_end: e.name().len(),
                    tags_end: e.name().len() + e.tags().len(),
                    kind: e.kind,
                    unit: e.unit,
                    merge: e.merge,
                    first_cell: e.first_cell,
                }));
            }
            cached[..count as usize].to_vec()
        };
        // Cached entries were checked against the cells handed out when they were read; the
        // region can only have lost cells since if it was damaged.
        if let Some(bad) = metas.iter().position(|m| {
            u64::from(m.first_cell) + u64::from(layout::cells_of(m.kind, &caps.bounds))
                > u64::from(cells_used)
        }) {
            return Err(corrupt(
                path,
                format!("entry {bad} has cells out of bounds"),
            ));
        }

        // Sum and maximum of every cell over the rows in use. The retired row holds no gauge
        // values (retirement drops them), so a gauge's sum is its sum over the live rows.
        let n = cells_used as usize;
        let (mut sum, mut max) = (vec![0u64; n], vec![0u64; n]);
        let mut shards = Vec::new();
        for row in 0..=caps.max_shards {
            let s = layout::slot_offset(o.slots, row);
            let state = view
                .load_u32(s + slot::STATE, Ordering::Acquire)
                .and_then(SlotState::from_u32);
            let live = match state {
                Some(SlotState::Live) => true,
                Some(SlotState::Retired) if row == 0 => false,
                Some(SlotState::Free) => continue,
                _ => {
                    return Err(corrupt(
                        path,
                        format!("shard slot {row} has an invalid state"),
                    ));
                }
            };
            if live {
                shards.push(ShardInfo {
                    row,
                    epoch: view
                        .load_u64(s + slot::EPOCH, Ordering::Relaxed)
                        .unwrap_or(0),
                    worker: view
                        .load_u32(s + slot::WORKER, Ordering::Relaxed)
                        .unwrap_or(0),
                    pid: view.load_u32(s + slot::PID, Ordering::Relaxed).unwrap_or(0),
                });
            }
            let cells = view
                .atomic_u64s(
                    layout::cell_offset(o.cells, caps.cells_per_shard, row, 0),
                    n,
                )
                .ok_or_else(|| corrupt(path, "cells out of bounds"))?;
            for ((s, m), cell) in sum.iter_mut().zip(max.iter_mut()).zip(cells) {
                let v = cell.load(Ordering::Relaxed);
                *s = s.wrapping_add(v);
                *m = (*m).max(v);
            }
        }
        fence(Ordering::Acquire);
        if seq.load(Ordering::Relaxed) != before {
            continue;
        }

        let bounds = Arc::new(caps.bounds);
        let stats = metas
            .into_iter()
            .map(|meta| {
                let first = meta.first_cell as usize;
                let value = match meta.kind {
                    Kind::Counter => Value::Counter(sum[first]),
                    Kind::Gauge => Value::Gauge(match meta.merge {
                        Merge::Sum => sum[first] as i64,
                        // Max-merged gauges hold non-negative values (epochs, uptimes).
                        Merge::Max => max[first] as i64,
                    }),
                    Kind::Histogram => {
                        let buckets = caps.bounds.buckets();
                        Value::Histogram(Summary {
                            bounds: bounds.clone(),
                            buckets: sum[first..first + buckets].to_vec(),
                            sum: sum[first + buckets],
                            max: max[first + buckets + 1],
                        })
                    }
                };
                Stat { meta, value }
            })
            .collect();
        return Ok(Snapshot {
            header: *header,
            supervisor_pid: view
                .load_u32(header::SUPERVISOR_PID, Ordering::Relaxed)
                .unwrap_or(0),
            current_epoch: view
                .load_u64(header::CURRENT_EPOCH, Ordering::Relaxed)
                .unwrap_or(0),
            shards,
            stats,
        });
    }
    Err(ReadError::Busy {
        path: path.to_owned(),
        waited: SNAPSHOT_PATIENCE,
    })
}
