//! The stats-region reader (`baton-stats`, the admin's `/stats`) on arbitrary bytes: a region
//! damaged, cut short, or written by something else. Reading must fail with an error or give
//! a snapshot, never panic or read out of bounds.
//!
//! Inputs that start with the region's magic are used as they are; others get a header that
//! passes the checks (capacities from the first bytes), with the rest of the input as the name
//! table, the shard slots and the cells, so that the fuzzer reaches what lies past the header.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use shm_stats::layout::{self, Capacities};

fn region_bytes(data: &[u8]) -> Vec<u8> {
    if data.starts_with(&layout::MAGIC) || data.len() < 8 {
        return data.to_vec();
    }
    let caps = Capacities {
        max_stats: 1 + u32::from(data[0] % 16),
        max_shards: 1 + u32::from(data[1] % 4),
        cells_per_shard: 8 * (1 + u32::from(data[2] % 32)),
        ..Default::default()
    };
    let offsets = layout::offsets(caps).expect("small capacities fit");
    let mut bytes = vec![0u8; offsets.size as usize];
    let body = &data[8..];
    // Past the header, the input repeated over the whole region (zeros if there is none).
    if !body.is_empty() {
        for (i, b) in bytes[layout::HEADER_SIZE as usize..].iter_mut().enumerate() {
            *b = body[i % body.len()];
        }
    }
    let mut put = |at: u64, value: &[u8]| {
        bytes[at as usize..at as usize + value.len()].copy_from_slice(value);
    };
    use layout::header as h;
    put(h::MAGIC, &layout::MAGIC);
    put(h::LAYOUT_VERSION, &layout::LAYOUT_VERSION.to_ne_bytes());
    put(h::HEADER_SIZE, &(layout::HEADER_SIZE as u32).to_ne_bytes());
    put(h::REGION_SIZE, &offsets.size.to_ne_bytes());
    put(h::MAX_STATS, &caps.max_stats.to_ne_bytes());
    put(h::MAX_SHARDS, &caps.max_shards.to_ne_bytes());
    put(h::CELLS_PER_SHARD, &caps.cells_per_shard.to_ne_bytes());
    put(h::LOCK_COUNT, &4u32.to_ne_bytes());
    put(h::LOCKS_OFFSET, &offsets.locks.to_ne_bytes());
    // Valid bucket bounds (1 to 4 of them: 1, 10, 100, 1000), so that histograms are read.
    let bounds = 1 + u32::from(data[6] % 4);
    put(h::BOUND_COUNT, &bounds.to_ne_bytes());
    put(h::BOUNDS_OFFSET, &offsets.bounds.to_ne_bytes());
    for i in 0..u64::from(bounds) {
        put(offsets.bounds + i * 8, &10u64.pow(i as u32).to_ne_bytes());
    }
    put(h::NAMES_OFFSET, &offsets.names.to_ne_bytes());
    put(h::SLOTS_OFFSET, &offsets.slots.to_ne_bytes());
    put(h::CELLS_OFFSET, &offsets.cells.to_ne_bytes());
    // Entries and cells in use, and the retirement sequence, from the input too.
    put(h::STAT_COUNT, &u32::from(data[3] % 20).to_ne_bytes());
    put(h::CELLS_USED, &(u32::from(data[4]) * 8).to_ne_bytes());
    put(h::RETIRE_SEQ, &u64::from(data[5] & 2).to_ne_bytes());
    bytes
}

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(&region_bytes(data)).expect("written");
    if let Ok(reader) = shm_stats::Reader::open(file.path()) {
        let _ = reader.header();
        if let Ok(snapshot) = reader.snapshot() {
            for stat in &snapshot.stats {
                let _ = shm_stats::format::display_name(stat);
            }
            let refs: Vec<&shm_stats::Stat> = snapshot.stats.iter().collect();
            let _ = shm_stats::format::plain(&refs);
            let _ = shm_stats::format::prometheus(&refs);
        }
    }
});
