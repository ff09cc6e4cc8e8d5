//! The supervisor's own stats (reloads, failures, crashes, what drains) and the region they live
//! in: registering them, keeping them current, sharing the region with the generations' group,
//! and making a new region when another process cut the old one short.

use std::sync::Arc;

use shm_stats::{Region, Spec, StatsError};
use tracing::{error, info, warn};

use super::error::ShareRegionError;
use super::{SUPERVISOR_SHARD_EPOCH, Supervisor, SupervisorStats};
use crate::config::SupervisorConfig;
use crate::lifecycle::{self, State};

impl Supervisor {
    pub(super) fn update_stats(&mut self) {
        let counts = self.lifecycle.counts;
        let s = &mut self.stats;
        s.shard.add(s.reloads, counts.reloads - s.written.reloads);
        s.shard.add(
            s.failures,
            counts.reload_failures - s.written.reload_failures,
        );
        s.shard.add(s.crashes, counts.crashes - s.written.crashes);
        s.written = counts;
        s.shard.set(s.draining, self.lifecycle.draining() as i64);
        let (mut connections, mut requests) = (0, 0);
        for g in self
            .lifecycle
            .generations()
            .filter(|g| g.state == State::Draining)
        {
            if let Some(io) = self.generations.get(&g.epoch) {
                connections += io.load.connections;
                requests += io.load.requests;
            }
        }
        s.shard.set(s.draining_connections, connections as i64);
        s.shard.set(s.draining_requests, requests as i64);
    }

    /// Another process cut the stats region short (the supervisor lives on: see `shm_stats`'s
    /// guard): makes a new one at the path, for itself and the generations started from now on,
    /// so that reloads work and stats are recorded again (from zero: the old counts went with
    /// the file).
    pub(super) fn check_region(&mut self) {
        if self.region_lost || !self.region.lost() {
            return;
        }
        let path = self.region.path().to_owned();
        error!(
            "the stats region {} was cut short by another process (never truncate or remove it while baton runs); the generations serve on, their counts so far are gone",
            path.display()
        );
        let _ = std::fs::remove_file(&path);
        let made = Region::create_or_open(&path, self.config.capacities)
            .map_err(|e| e.to_string())
            .and_then(|region| {
                // Made by this process, not planted by another user in the moment between.
                use std::os::unix::fs::MetadataExt;
                let me = nix::unistd::geteuid().as_raw();
                let owner = region.file().metadata().map_err(|e| e.to_string())?.uid();
                if owner != me {
                    return Err(format!(
                        "{} belongs to uid {owner}, not to this supervisor's uid {me}",
                        path.display()
                    ));
                }
                share_region(&self.config, &region).map_err(|e| e.to_string())?;
                region.set_supervisor_pid(std::process::id());
                if let Some(active) = self.lifecycle.active() {
                    region.set_current_epoch(active);
                }
                let stats = register_stats(&region).map_err(|e| e.to_string())?;
                Ok((region, stats))
            });
        match made {
            Ok((region, stats)) => {
                self.region = region;
                self.stats = stats;
                info!(path = %path.display(), "made a new stats region: the generations started from now on record their stats there, from zero");
            }
            Err(e) => {
                self.region_lost = true;
                error!(
                    "cannot make a new stats region: {e}; stop and start baton to have stats again"
                );
            }
        }
    }
}

pub(super) fn register_stats(region: &Arc<Region>) -> Result<SupervisorStats, StatsError> {
    Ok(SupervisorStats {
        reloads: region.counter(Spec::new(
            "supervisor.reloads_total",
            &[],
            "Reloads started (the first start is not one).",
        ))?,
        failures: region.counter(Spec::new(
            "supervisor.reload_failures_total",
            &[],
            "Reloads whose new generation never became active.",
        ))?,
        crashes: region.counter(Spec::new(
            "supervisor.generation_crashes_total",
            &[],
            "Active generations that exited unasked.",
        ))?,
        draining: region.gauge(Spec::new(
            "supervisor.generations_draining",
            &[],
            "Generations draining now.",
        ))?,
        draining_connections: region.gauge(Spec::new(
            "supervisor.draining_connections",
            &[],
            "Connections the draining generations still hold.",
        ))?,
        draining_requests: region.gauge(Spec::new(
            "supervisor.draining_requests",
            &[],
            "Requests the draining generations are still answering.",
        ))?,
        shard: region.attach_shard(SUPERVISOR_SHARD_EPOCH, 0)?,
        written: lifecycle::Counts::default(),
    })
}

/// Says that the region at the stats path, made by an earlier release, was replaced.
pub(super) fn replaced_older_region(region: &Region, version: u32) {
    warn!(
        path = %region.path().display(),
        "the stats region had layout version {version}, made by an earlier baton, which this one cannot write: replaced by a new region (layout version {}), whose counters start from zero; generations started before keep writing the old one until they end",
        shm_stats::LAYOUT_VERSION
    );
}

/// With `supervisor.user`, gives the stats region to the generations' group: they write through
/// the descriptor the supervisor hands them, and the group lets `baton-stats` run as their user
/// read it (mode 0640).
pub(super) fn share_region(
    config: &SupervisorConfig,
    region: &Region,
) -> Result<(), ShareRegionError> {
    let Some(run_as) = &config.run_as else {
        return Ok(());
    };
    nix::unistd::fchown(
        region.file(),
        None,
        Some(nix::unistd::Gid::from_raw(run_as.gid)),
    )
    .map_err(|source| ShareRegionError {
        path: config.stats_path.clone(),
        gid: run_as.gid,
        user: run_as.user.clone(),
        source,
    })
}
