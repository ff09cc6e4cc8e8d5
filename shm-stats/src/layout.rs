//! The byte layout of a stats region: every offset and size, as pure functions and constants.
//! `LAYOUT.md` documents the same layout for readers in other languages; the two must agree, and
//! [`LAYOUT_VERSION`] changes with any change here.

#![forbid(unsafe_code)]

use crate::histogram::Bounds;

/// The first 8 bytes of every region.
pub const MAGIC: [u8; 8] = *b"BATONSHM";
/// Bumped on any change to the layout (2: bucket bounds chosen per region and stored in it).
pub const LAYOUT_VERSION: u32 = 2;

/// Size of the header at offset 0.
pub const HEADER_SIZE: u64 = 128;
/// Size of one lock slot (a process-shared `pthread_mutex_t` with room to spare).
pub const LOCK_SLOT_SIZE: u64 = 64;
/// Size of one name-table entry.
pub const ENTRY_SIZE: u64 = 256;
/// Size of one shard slot descriptor.
pub const SLOT_SIZE: u64 = 64;
/// Size of the bucket-bounds area: room for the most bounds a region may have.
pub const BOUNDS_SIZE: u64 = crate::histogram::MAX_BOUNDS as u64 * 8;
/// Size of one cell.
pub const CELL_SIZE: u64 = 8;
/// Cells of a row come in multiples of this, so every row starts on its own cache line.
pub const CELLS_PER_LINE: u32 = 8;

/// Header fields: byte offsets from the start of the region.
pub mod header {
    pub const MAGIC: u64 = 0;
    pub const LAYOUT_VERSION: u64 = 8;
    pub const HEADER_SIZE: u64 = 12;
    pub const REGION_SIZE: u64 = 16;
    pub const MAX_STATS: u64 = 24;
    pub const MAX_SHARDS: u64 = 28;
    pub const CELLS_PER_SHARD: u64 = 32;
    pub const LOCK_COUNT: u64 = 36;
    pub const LOCKS_OFFSET: u64 = 40;
    pub const NAMES_OFFSET: u64 = 48;
    pub const SLOTS_OFFSET: u64 = 56;
    pub const CELLS_OFFSET: u64 = 64;
    /// u32, atomic: entries of the name table that are complete (release on publish).
    pub const STAT_COUNT: u64 = 72;
    /// u32, atomic: cells of each row handed out so far.
    pub const CELLS_USED: u64 = 76;
    /// u32, atomic: pid of the supervisor, 0 when a proxy runs alone.
    pub const SUPERVISOR_PID: u64 = 80;
    /// u32: the histograms' finite bucket bounds, 1 to [`crate::histogram::MAX_BOUNDS`].
    pub const BOUND_COUNT: u64 = 84;
    /// u64, atomic: odd while a retirement moves counts between rows (readers retry).
    pub const RETIRE_SEQ: u64 = 88;
    /// u64, atomic: the epoch of the active generation.
    pub const CURRENT_EPOCH: u64 = 96;
    /// u64: when the region was created, in milliseconds since the Unix epoch.
    pub const CREATED_UNIX_MS: u64 = 104;
    /// u64: where the bucket bounds are (`BOUND_COUNT` u64s, in the histograms' unit).
    pub const BOUNDS_OFFSET: u64 = 112;
}

/// Name-table entry fields: offsets from the start of an entry.
pub mod entry {
    pub const KIND: u64 = 0;
    pub const UNIT: u64 = 1;
    pub const NAME_LEN: u64 = 2;
    pub const TAGS_LEN: u64 = 3;
    pub const HELP_LEN: u64 = 4;
    pub const MERGE: u64 = 5;
    pub const FIRST_CELL: u64 = 8;
    pub const CELL_COUNT: u64 = 12;
    pub const NAME: u64 = 16;
    pub const NAME_MAX: usize = 64;
    pub const TAGS: u64 = 80;
    pub const TAGS_MAX: usize = 80;
    pub const HELP: u64 = 160;
    pub const HELP_MAX: usize = 96;
}

/// Shard slot fields: offsets from the start of a slot.
pub mod slot {
    /// u32, atomic: [`super::SlotState`].
    pub const STATE: u64 = 0;
    pub const WORKER: u64 = 4;
    pub const EPOCH: u64 = 8;
    pub const PID: u64 = 16;
    pub const ATTACHED_UNIX_MS: u64 = 24;
    /// u64: the writer's start time (`/proc/<pid>/stat` field 22), so that a reused pid is not
    /// taken for the writer; 0 if unknown.
    pub const START_TIME: u64 = 32;
}

/// What a shard slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SlotState {
    Free = 0,
    /// A generation's worker writes this row.
    Live = 1,
    /// Slot 0: the row that holds the counts of every retired shard.
    Retired = 2,
}

impl SlotState {
    pub fn from_u32(v: u32) -> Option<SlotState> {
        match v {
            0 => Some(SlotState::Free),
            1 => Some(SlotState::Live),
            2 => Some(SlotState::Retired),
            _ => None,
        }
    }
}

/// The kind of a stat, as stored in an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Only goes up; its value is the sum over every row, the retired one included.
    Counter = 1,
    /// Goes up and down; its value is taken over the live rows only.
    Gauge = 2,
    /// Counts of values in the region's buckets, then their sum and their maximum.
    Histogram = 3,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Counter),
            2 => Some(Kind::Gauge),
            3 => Some(Kind::Histogram),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The unit of a stat's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Unit {
    None = 0,
    Microseconds = 1,
    Bytes = 2,
    Seconds = 3,
}

impl Unit {
    pub fn from_u8(v: u8) -> Option<Unit> {
        match v {
            0 => Some(Unit::None),
            1 => Some(Unit::Microseconds),
            2 => Some(Unit::Bytes),
            3 => Some(Unit::Seconds),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::None => "",
            Unit::Microseconds => "us",
            Unit::Bytes => "bytes",
            Unit::Seconds => "s",
        }
    }
}

/// How a gauge's live rows combine into its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Merge {
    /// Sum: connections open, across workers and generations.
    Sum = 0,
    /// Maximum: the newest epoch, the longest uptime.
    Max = 1,
}

impl Merge {
    pub fn from_u8(v: u8) -> Option<Merge> {
        match v {
            0 => Some(Merge::Sum),
            1 => Some(Merge::Max),
            _ => None,
        }
    }
}

/// What a region is created with, and keeps: its sizes and its histograms' bucket bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacities {
    /// Entries of the name table.
    pub max_stats: u32,
    /// Shard rows besides the retired one: at least (workers + 1) per overlapping generation.
    pub max_shards: u32,
    /// Cells of each row; a counter or gauge takes 1, a histogram one per bucket and 2 more
    /// (see [`cells_of`]).
    pub cells_per_shard: u32,
    /// The bucket bounds of every histogram of the region.
    pub bounds: Bounds,
}

impl Default for Capacities {
    fn default() -> Self {
        Capacities {
            max_stats: 4096,
            max_shards: 256,
            cells_per_shard: 16384,
            bounds: Bounds::default(),
        }
    }
}

/// Locks of the lock area, by index.
pub mod locks {
    /// Taken while registering stats, attaching shards and retiring them.
    pub const REGISTRY: usize = 0;
    /// Shared by generations that write one access log.
    pub const ACCESS_LOG: usize = 1;
    /// Shared by generations that write one log file.
    pub const LOG: usize = 2;
    /// Locks in the area.
    pub const COUNT: u32 = 4;
}

/// Offsets of a region's parts, derived from its capacities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    pub locks: u64,
    pub bounds: u64,
    pub names: u64,
    pub slots: u64,
    pub cells: u64,
    pub size: u64,
}

/// Where every part of a region with `caps` goes, or `None` if it would not fit in memory.
pub fn offsets(caps: Capacities) -> Option<Offsets> {
    let locks = HEADER_SIZE;
    let bounds = locks.checked_add(u64::from(locks::COUNT) * LOCK_SLOT_SIZE)?;
    let names = bounds.checked_add(BOUNDS_SIZE)?;
    let slots = names.checked_add(u64::from(caps.max_stats).checked_mul(ENTRY_SIZE)?)?;
    let rows = u64::from(caps.max_shards).checked_add(1)?;
    let cells = align_up(slots.checked_add(rows.checked_mul(SLOT_SIZE)?)?, 64)?;
    let row_bytes = u64::from(caps.cells_per_shard).checked_mul(CELL_SIZE)?;
    let size = align_up(cells.checked_add(rows.checked_mul(row_bytes)?)?, 4096)?;
    Some(Offsets {
        locks,
        bounds,
        names,
        slots,
        cells,
        size,
    })
}

fn align_up(v: u64, to: u64) -> Option<u64> {
    Some(v.checked_add(to - 1)? / to * to)
}

/// Offset of entry `i` of the name table.
pub fn entry_offset(names: u64, i: u32) -> u64 {
    names + u64::from(i) * ENTRY_SIZE
}

/// Offset of slot `row` (0 is the retired row).
pub fn slot_offset(slots: u64, row: u32) -> u64 {
    slots + u64::from(row) * SLOT_SIZE
}

/// Offset of cell `cell` of row `row`.
pub fn cell_offset(cells: u64, cells_per_shard: u32, row: u32, cell: u32) -> u64 {
    cells + (u64::from(row) * u64::from(cells_per_shard) + u64::from(cell)) * CELL_SIZE
}

// Every field fits its structure; checked when compiling.
const _: () = {
    assert!(header::BOUNDS_OFFSET + 8 <= HEADER_SIZE);
    assert!(entry::HELP + entry::HELP_MAX as u64 <= ENTRY_SIZE);
    assert!(slot::START_TIME + 8 <= SLOT_SIZE);
    assert!(std::mem::size_of::<libc::pthread_mutex_t>() as u64 <= LOCK_SLOT_SIZE);
};

/// Cells a stat of `kind` takes in a region whose histograms have `bounds`: a histogram takes
/// one per bucket (`+Inf` included), then its sum and its maximum.
pub fn cells_of(kind: Kind, bounds: &Bounds) -> u32 {
    match kind {
        Kind::Counter | Kind::Gauge => 1,
        Kind::Histogram => bounds.buckets() as u32 + 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_do_not_overlap_and_rows_are_cache_aligned() {
        let caps = Capacities {
            max_stats: 10,
            max_shards: 3,
            cells_per_shard: 16,
            bounds: Bounds::default(),
        };
        let o = offsets(caps).unwrap();
        assert_eq!(o.locks, HEADER_SIZE);
        assert_eq!(o.bounds, o.locks + 4 * LOCK_SLOT_SIZE);
        assert_eq!(o.names, o.bounds + 32 * 8);
        assert_eq!(o.slots, o.names + 10 * ENTRY_SIZE);
        assert!(o.cells >= o.slots + 4 * SLOT_SIZE);
        assert_eq!(o.cells % 64, 0);
        assert!(o.size >= o.cells + 4 * 16 * 8);
        assert_eq!(o.size % 4096, 0);
        for row in 0..4 {
            assert_eq!(cell_offset(o.cells, 16, row, 0) % 64, 0);
        }
        assert_eq!(cell_offset(o.cells, 16, 1, 3), o.cells + (16 + 3) * 8);
    }

    #[test]
    fn absurd_capacities_do_not_overflow() {
        let caps = Capacities {
            max_stats: u32::MAX,
            max_shards: u32::MAX,
            cells_per_shard: u32::MAX,
            bounds: Bounds::default(),
        };
        // 2^32 rows of 2^35 bytes do not fit in u64.
        assert_eq!(offsets(caps), None);
    }
}
