//! Reading the bytes of a region without trusting them: its header, its histograms' bucket
//! bounds and its name-table entries, each checked (the magic, the layout version, the size
//! against the file's, every offset against the capacities, every entry's lengths and cells)
//! and answered with a [`ReadError`] that says what is wrong, instead of reading out of bounds
//! or panicking.

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::error::ReadError;
use crate::histogram::{Bounds, MAX_BOUNDS};
use crate::layout::{self, Capacities, Kind, Merge, Offsets, Unit, entry, header};
use crate::view::View;

/// The fixed facts of a region, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderInfo {
    pub version: u32,
    pub capacities: Capacities,
    pub offsets: Offsets,
    pub created_unix_ms: u64,
}

/// A [`ReadError::Corrupt`] about `path`: the region is damaged.
pub(crate) fn corrupt(path: &Path, what: impl Into<String>) -> ReadError {
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
