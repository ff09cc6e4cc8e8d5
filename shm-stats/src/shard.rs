//! A worker's row of cells: attaching one ([`Region::attach_shard`]) and the updates through it,
//! each a relaxed load and store by the one thread that owns the row.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::StatsError;
use crate::histogram::Bounds;
use crate::layout::{self, SlotState, slot};
use crate::process;
use crate::region::{self, Region};
use crate::registry::{Counter, Gauge, Histogram};

impl Region {
    /// Takes a free shard row for worker `worker` of generation `epoch`.
    #[allow(unsafe_code)] // Points at a row of the mapping.
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
                .store(region::now_ms(), Ordering::Relaxed);
            self.atomic_u64(s + slot::START_TIME).store(
                process::start_time(std::process::id()).unwrap_or(0),
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
}

/// Adds `v` to a cell that only the caller writes: a plain load and store, no locked instruction.
pub(crate) fn add(cell: &AtomicU64, v: u64) {
    cell.store(
        cell.load(Ordering::Relaxed).wrapping_add(v),
        Ordering::Relaxed,
    );
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

#[allow(unsafe_code)] // Holds a pointer into the mapping.
// SAFETY: `base` points into the region's mapping, which `region` keeps alive; moving the shard
// to another thread is fine as long as one thread at a time uses it, which `!Sync` ensures.
unsafe impl Send for Shard {}

impl Shard {
    #[inline]
    #[allow(unsafe_code)] // Reads a cell of the row through its pointer.
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
