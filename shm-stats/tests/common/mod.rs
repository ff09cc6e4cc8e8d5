//! What the integration tests of the region share.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use shm_stats::{Capacities, Region};

pub fn region_in(dir: &Path, caps: Capacities) -> (PathBuf, Arc<Region>) {
    let path = dir.join("stats");
    let region = Region::create_or_open(&path, caps).expect("a region");
    (path, region)
}

pub fn small() -> Capacities {
    Capacities {
        max_stats: 64,
        max_shards: 16,
        cells_per_shard: 2048,
        ..Default::default()
    }
}
