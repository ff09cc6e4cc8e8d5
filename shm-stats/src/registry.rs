//! Registering stats: what a stat is ([`Spec`]), the handles a registration returns, and
//! [`Region::counter`] and its siblings, which find a stat registered before (by this process or
//! another) or append it to the name table under the registry lock.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use crate::error::{ReadError, StatsError};
use crate::layout::{self, Kind, Merge, Unit, entry, header};
use crate::lock::LockGuard;
use crate::names;
use crate::parse;
use crate::region::Region;

/// A registered stat: where its cells are in every row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Counter(pub(crate) u32);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gauge(pub(crate) u32);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Histogram(pub(crate) u32);

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

impl Region {
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
        names::validate_name(spec.name).map_err(invalid)?;
        let tags = names::encode_tags(spec.tags).map_err(invalid)?;
        let help = spec.help.lines().next().unwrap_or("");
        // Every help text of baton's own stats fits whole (a cut one reads as a typo in
        // Prometheus); another program's is cut to fit.
        debug_assert!(
            help.len() <= entry::HELP_MAX,
            "the help of `{}` is {} bytes; at most {} fit in the region: {help}",
            spec.name,
            help.len(),
            entry::HELP_MAX
        );
        let help = names::truncate(help, entry::HELP_MAX);

        let guard = self.registry()?;
        let caps = self.header.capacities;
        let count_cell = self.atomic_u32(header::STAT_COUNT);
        let used_cell = self.atomic_u32(header::CELLS_USED);
        let count = count_cell.load(Ordering::Relaxed).min(caps.max_stats);
        let used = used_cell.load(Ordering::Relaxed);
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        // Entries registered since this process last looked (by it or another process).
        while names.read < count {
            let existing =
                parse::read_entry(self.view, &self.header, names.read, used).map_err(|what| {
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
        self.write_entry(&guard, count, &raw);
        used_cell.store(used + cells, Ordering::Release);
        count_cell.store(count + 1, Ordering::Release);
        names.add(kind, spec.name, &tags, used);
        Ok(used)
    }

    /// Copies a complete entry into place `index` of the name table, where no reader looks
    /// before the stat count passes it; `_registry` shows that the registry lock is held.
    #[allow(unsafe_code)] // Writes into the mapping.
    fn write_entry(
        &self,
        _registry: &LockGuard<'_>,
        index: u32,
        raw: &[u8; layout::ENTRY_SIZE as usize],
    ) {
        assert!(
            index < self.header.capacities.max_stats,
            "a name-table index"
        );
        let at = layout::entry_offset(self.header.offsets.names, index);
        // SAFETY: entry `index` < max_stats lies inside the mapping (validated offsets); no
        // reader looks at it before `STAT_COUNT` passes it (the caller's release store after
        // this), and writers are serialised by the registry lock.
        unsafe {
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                self.map.as_mut_ptr().add(at as usize),
                raw.len(),
            );
        }
    }
}
