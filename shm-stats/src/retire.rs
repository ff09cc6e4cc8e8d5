//! Retiring shards: the counts of a row whose writer has gone move into the retired row (row 0)
//! before the row is freed, inside an odd retirement sequence that readers retry around, so that
//! counters never go back.

#![forbid(unsafe_code)]

use std::sync::atomic::{Ordering, fence};

use crate::error::{ReadError, StatsError};
use crate::layout::{self, Kind, SlotState, header, slot};
use crate::parse;
use crate::process;
use crate::region::Region;
use crate::shard::add;
use crate::snapshot::ShardInfo;

impl Region {
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
            !process::alive(s.pid, recorded)
        })
    }

    fn retire_where(&self, mut pick: impl FnMut(&ShardInfo) -> bool) -> Result<usize, StatsError> {
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
            .map(|i| parse::read_entry(self.view, &self.header, i, used))
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
            let info = ShardInfo {
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
