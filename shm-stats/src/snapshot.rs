//! Snapshots: every stat of a region at one moment, consistent with respect to retirements
//! (taken again while a retirement's odd sequence number is seen); entries parsed once and
//! cached, as an entry never changes once published.

#![forbid(unsafe_code)]

use std::path::Path;
use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, Mutex};

use crate::error::ReadError;
use crate::histogram::Summary;
use crate::layout::{self, Kind, Merge, SlotState, Unit, header, slot};
use crate::parse::{self, HeaderInfo, corrupt};
use crate::view::View;

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

/// How long a snapshot waits for retirements to finish before it reports the region busy.
const SNAPSHOT_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) fn take(
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
                let e = parse::read_entry(view, header, i, cells_used)
                    .map_err(|what| corrupt(path, what))?;
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
