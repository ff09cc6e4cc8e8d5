//! The region through its public API: writers in threads and processes, retirement, readers of
//! good files (bad files: `bad_files.rs`).

mod common;

use std::collections::HashMap;

use common::{region_in, small};
use proptest::prelude::*;
use shm_stats::histogram::{Bounds, Summary};
use shm_stats::{
    Acquired, Capacities, Merge, Reader, Region, Spec, StatsError, Unit, Value, layout,
};

fn value(reader: &Reader, name: &str, tags: &[(&str, &str)]) -> Value {
    let snap = reader.snapshot().expect("a snapshot");
    snap.stats
        .into_iter()
        .find(|s| s.name() == name && s.tags().eq(tags.iter().copied()))
        .unwrap_or_else(|| panic!("no stat {name} {tags:?}"))
        .value
}

#[test]
fn registering_twice_returns_the_same_stat() {
    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    let a = region
        .counter(Spec::new(
            "requests",
            &[("listener", "public")],
            "Requests.",
        ))
        .unwrap();
    let again = region
        .counter(Spec::new(
            "requests",
            &[("listener", "public")],
            "Other help.",
        ))
        .unwrap();
    assert_eq!(a, again);
    let b = region
        .counter(Spec::new("requests", &[("listener", "admin")], "Requests."))
        .unwrap();
    assert_ne!(a, b);

    // Another process (here: another mapping) registering the same stat gets it too.
    let other = Region::create_or_open(&path, Capacities::default()).unwrap();
    assert_eq!(
        other.capacities(),
        region.capacities(),
        "an existing region keeps its sizes"
    );
    assert_eq!(
        other
            .counter(Spec::new("requests", &[("listener", "admin")], ""))
            .unwrap(),
        b
    );
    // Stats the other mapping adds after this one last looked are found too (each mapping
    // keeps an index of the names it has read, and catches up with what others appended).
    let from_other = other
        .counter(Spec::new("upstream_rq", &[("cluster", "a")], ""))
        .unwrap();
    other.gauge(Spec::new("in_flight", &[], "")).unwrap();
    assert_eq!(
        region
            .counter(Spec::new("upstream_rq", &[("cluster", "a")], ""))
            .unwrap(),
        from_other
    );
    assert_ne!(
        region
            .counter(Spec::new("upstream_rq", &[("cluster", "b")], ""))
            .unwrap(),
        from_other
    );
    match region.counter(Spec::new("in_flight", &[("worker", "0")], "")) {
        Err(StatsError::KindMismatch { existing, .. }) => assert_eq!(existing, "gauge"),
        other => panic!("expected a kind mismatch, got {other:?}"),
    }

    match region.gauge(Spec::new("requests", &[], "")) {
        Err(StatsError::KindMismatch { existing, .. }) => assert_eq!(existing, "counter"),
        other => panic!("expected a kind mismatch, got {other:?}"),
    }
    for bad in ["", "has space", "9lives", &"x".repeat(65)] {
        assert!(
            matches!(
                region.counter(Spec::new(bad, &[], "")),
                Err(StatsError::InvalidStat { .. })
            ),
            "{bad:?}"
        );
    }
    let long = "v".repeat(80);
    assert!(
        region.counter(Spec::new("t", &[("k", &long)], "")).is_err(),
        "tags longer than their field"
    );
    assert!(
        region.counter(Spec::new("t", &[("k", "a,b")], "")).is_err(),
        "a comma in a tag value"
    );
    let err = region
        .counter(Spec::new("t", &[("k", "a=b")], ""))
        .unwrap_err();
    assert!(err.to_string().contains("tag `k`"), "{err}");
}

#[test]
fn counters_sum_over_shards_and_survive_retirement() {
    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    let c = region.counter(Spec::new("rq", &[], "")).unwrap();
    let w0 = region.attach_shard(1, 0).unwrap();
    let w1 = region.attach_shard(1, 1).unwrap();
    w0.add(c, 5);
    w1.inc(c);
    let reader = Reader::open(&path).unwrap();
    assert_eq!(value(&reader, "rq", &[]), Value::Counter(6));

    assert_eq!(region.retire_epoch(1).unwrap(), 2);
    assert_eq!(
        value(&reader, "rq", &[]),
        Value::Counter(6),
        "retirement keeps the count"
    );
    assert!(
        reader.snapshot().unwrap().shards.is_empty(),
        "the rows are free again"
    );

    let w2 = region.attach_shard(2, 0).unwrap();
    w2.add(c, 10);
    assert_eq!(value(&reader, "rq", &[]), Value::Counter(16));
    assert_eq!(
        region.retire_epoch(1).unwrap(),
        0,
        "nothing left of epoch 1"
    );
}

#[test]
fn gauges_count_live_shards_only() {
    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    let open = region.gauge(Spec::new("cx_active", &[], "")).unwrap();
    let epoch = region
        .gauge(Spec::new("epoch", &[], "").merge(Merge::Max))
        .unwrap();
    let old = region.attach_shard(1, 0).unwrap();
    let new = region.attach_shard(2, 0).unwrap();
    old.gauge_add(open, 3);
    old.gauge_add(open, -1);
    new.set(open, 4);
    old.set(epoch, 1);
    new.set(epoch, 2);
    let reader = Reader::open(&path).unwrap();
    assert_eq!(value(&reader, "cx_active", &[]), Value::Gauge(6));
    assert_eq!(value(&reader, "epoch", &[]), Value::Gauge(2));
    region.retire_epoch(2).unwrap();
    assert_eq!(
        value(&reader, "cx_active", &[]),
        Value::Gauge(2),
        "a retired generation's gauges stop counting"
    );
    assert_eq!(value(&reader, "epoch", &[]), Value::Gauge(1));
    region.retire_epoch(1).unwrap();
    assert_eq!(value(&reader, "cx_active", &[]), Value::Gauge(0));
}

#[test]
fn histograms_keep_their_shape_through_retirement() {
    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    let h = region
        .histogram(Spec::new("rq_time", &[], "").unit(Unit::Microseconds))
        .unwrap();
    let a = region.attach_shard(1, 0).unwrap();
    let b = region.attach_shard(1, 1).unwrap();
    for v in 1..=1000u64 {
        if v % 2 == 0 { &a } else { &b }.record(h, v);
    }
    let reader = Reader::open(&path).unwrap();
    let before = value(&reader, "rq_time", &[]);
    let Value::Histogram(summary) = &before else {
        panic!("{before:?}")
    };
    assert_eq!(summary.count(), 1000);
    assert_eq!(summary.sum, 500_500);
    assert_eq!(summary.max, 1000);
    let p50 = summary.quantile(0.5);
    assert!((500..=640).contains(&p50), "p50 {p50}");
    region.retire_epoch(1).unwrap();
    assert_eq!(value(&reader, "rq_time", &[]), before);
}

#[test]
fn full_tables_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, region) = region_in(
        dir.path(),
        Capacities {
            max_stats: 2,
            max_shards: 1,
            cells_per_shard: 8,
            ..Default::default()
        },
    );
    region.counter(Spec::new("a", &[], "")).unwrap();
    let err = region.histogram(Spec::new("h", &[], "")).unwrap_err();
    assert!(
        err.to_string().contains("a shard's cells is full (8)"),
        "{err}"
    );
    assert!(
        err.to_string().contains("raise stats.cells_per_shard"),
        "{err}"
    );
    region.counter(Spec::new("b", &[], "")).unwrap();
    let err = region.counter(Spec::new("c", &[], "")).unwrap_err();
    assert!(
        err.to_string().contains("the name table is full (2)"),
        "{err}"
    );
    let _shard = region.attach_shard(1, 0).unwrap();
    let err = region.attach_shard(1, 1).unwrap_err();
    assert!(
        err.to_string().contains("the shard table is full (1)"),
        "{err}"
    );
}

#[test]
fn a_region_is_created_with_mode_0640() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (path, _region) = region_in(dir.path(), small());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & !0o640, 0, "no more than 0640: {mode:o}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file is left behind"
    );
}

/// One writer thread's plan: (stat index, amount) pairs.
fn plans() -> impl Strategy<Value = Vec<Vec<(usize, u64)>>> {
    prop::collection::vec(prop::collection::vec((0usize..6, 0u64..5000), 0..200), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Threads write their own shards at once (counters and histograms), some generations are
    /// retired, and the reader's sums are exactly what was written.
    #[test]
    fn concurrent_writes_and_retirement_sum_exactly(plans in plans(), retire_mask in 0u8..16) {
        let dir = tempfile::tempdir().unwrap();
        let (path, region) = region_in(dir.path(), small());
        let counters: Vec<_> = (0..3)
            .map(|i| region.counter(Spec::new("c", &[("i", &i.to_string())], "")).unwrap())
            .collect();
        let hists: Vec<_> = (0..3)
            .map(|i| region.histogram(Spec::new("h", &[("i", &i.to_string())], "")).unwrap())
            .collect();
        let threads: Vec<_> = plans
            .iter()
            .cloned()
            .enumerate()
            .map(|(t, plan)| {
                let shard = region.attach_shard(t as u64, 0).unwrap();
                let (counters, hists) = (counters.clone(), hists.clone());
                std::thread::spawn(move || {
                    for (stat, amount) in plan {
                        if stat < 3 {
                            shard.add(counters[stat], amount);
                        } else {
                            shard.record(hists[stat - 3], amount);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for epoch in 0..plans.len() as u64 {
            if retire_mask & (1 << epoch) != 0 {
                region.retire_epoch(epoch).unwrap();
            }
        }

        let mut counts = [0u64; 3];
        let mut hist: Vec<Summary> = (0..3)
            .map(|_| Summary { buckets: vec![0; Bounds::default().buckets()], ..Default::default() })
            .collect();
        for plan in &plans {
            for &(stat, amount) in plan {
                if stat < 3 {
                    counts[stat] += amount;
                } else {
                    let h = &mut hist[stat - 3];
                    h.buckets[Bounds::default().bucket(amount)] += 1;
                    h.sum += amount;
                    h.max = h.max.max(amount);
                }
            }
        }
        let snap = Reader::open(&path).unwrap().snapshot().unwrap();
        let by_key: HashMap<(String, String), Value> = snap
            .stats
            .into_iter()
            .map(|s| {
                let key = (s.name().to_owned(), s.tags_str().trim_start_matches("i=").to_owned());
                (key, s.value)
            })
            .collect();
        for i in 0..3 {
            prop_assert_eq!(&by_key[&("c".to_owned(), i.to_string())], &Value::Counter(counts[i]));
            prop_assert_eq!(&by_key[&("h".to_owned(), i.to_string())], &Value::Histogram(hist[i].clone()));
        }
    }
}

/// A second real process writes the region concurrently, takes the log lock, and is killed with
/// SIGKILL while holding it. This process then takes the lock (recovering it), reclaims the dead
/// process's shard, and finds every write of both processes in the counter.
#[test]
fn a_process_killed_holding_a_lock_does_not_wedge_the_region() {
    use nix::sys::signal::{Signal, kill};
    use nix::sys::wait::waitpid;
    use nix::unistd::{ForkResult, fork, pipe, read, write};

    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    let c = region.counter(Spec::new("writes", &[], "")).unwrap();
    let (ready_r, ready_w) = pipe().unwrap();
    const CHILD_WRITES: u64 = 200_000;

    // SAFETY: the child only touches the already-mapped region (atomics, a pthread mutex), writes
    // to a pipe and pauses: no allocation, no lock another thread of the test could hold.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let shard = match region.attach_shard(7, 0) {
                Ok(s) => s,
                // SAFETY: _exit ends the child without running the parent's atexit handlers.
                Err(_) => unsafe { libc::_exit(2) },
            };
            for _ in 0..CHILD_WRITES {
                shard.inc(c);
            }
            let guard = region.lock(layout::locks::LOG);
            let _ = write(&ready_w, b"x");
            std::mem::forget(guard);
            loop {
                // SAFETY: pause only waits for a signal; the parent kills us.
                unsafe { libc::pause() };
            }
        }
        ForkResult::Parent { child } => {
            let shard = region.attach_shard(1, 0).unwrap();
            for _ in 0..100_000 {
                shard.inc(c);
            }
            let mut byte = [0u8; 1];
            assert_eq!(
                read(&ready_r, &mut byte).unwrap(),
                1,
                "the child holds the lock"
            );
            kill(child, Signal::SIGKILL).unwrap();
            waitpid(child, None).unwrap();

            let guard = region.lock(layout::locks::LOG).unwrap();
            assert_eq!(
                guard.acquired(),
                Acquired::OwnerDied,
                "the dead holder is detected"
            );
            drop(guard);
            assert_eq!(
                region.lock(layout::locks::LOG).unwrap().acquired(),
                Acquired::Clean
            );

            assert_eq!(
                region.reclaim_dead().unwrap(),
                1,
                "the dead process's shard is retired"
            );
            let reader = Reader::open(&path).unwrap();
            assert_eq!(
                value(&reader, "writes", &[]),
                Value::Counter(CHILD_WRITES + 100_000)
            );
            let shards = reader.snapshot().unwrap().shards;
            assert_eq!(shards.len(), 1);
            assert_eq!(shards[0].pid, std::process::id());
        }
    }
}

#[test]
fn a_reused_pid_does_not_keep_a_dead_writers_row_alive() {
    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    let c = region.counter(Spec::new("c", &[], "")).unwrap();
    let shard = region.attach_shard(1, 0).unwrap();
    shard.add(c, 5);
    assert_eq!(region.reclaim_dead().unwrap(), 0, "this process is alive");
    // Make the row look written by an earlier process that had our pid: another start time.
    let slot = layout::HEADER_SIZE as usize
        + 4 * 64
        + 32 * 8
        + 64 * 256
        + 64
        + layout::slot::START_TIME as usize;
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[slot..slot + 8].copy_from_slice(&1u64.to_ne_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(region.reclaim_dead().unwrap(), 1);
    assert_eq!(
        value(&Reader::open(&path).unwrap(), "c", &[]),
        Value::Counter(5)
    );
}

/// A region keeps the bucket bounds it was made with: a writer that asks for others (another
/// config) counts into the region's, says so, and readers and retirement agree.
#[test]
fn a_region_keeps_the_bucket_bounds_it_was_made_with() {
    let dir = tempfile::tempdir().unwrap();
    let made = Capacities {
        bounds: Bounds::new(&[10, 100]).unwrap(),
        ..small()
    };
    let (path, region) = region_in(dir.path(), made);
    let h = region.histogram(Spec::new("h", &[], "")).unwrap();
    let shard = region.attach_shard(1, 0).unwrap();
    for v in [5, 10, 11, 1000] {
        shard.record(h, v);
    }
    let other = Capacities {
        bounds: Bounds::new(&[1, 2, 3]).unwrap(),
        ..small()
    };
    let again = Region::create_or_open(&path, other).unwrap();
    let said = again.capacity_mismatch(other).expect("a mismatch");
    assert!(
        said.contains(
            "histogram_buckets=[0.01, 0.1], not the configured 64, 16, 2048, [0.001, 0.002, 0.003]"
        ),
        "{said}"
    );
    let h2 = again.histogram(Spec::new("h", &[], "")).unwrap();
    let shard2 = again.attach_shard(2, 0).unwrap();
    shard2.record(h2, 50);
    region.retire_epoch(1).unwrap();

    let Value::Histogram(got) = value(&Reader::open(&path).unwrap(), "h", &[]) else {
        panic!("a histogram");
    };
    assert_eq!(got.bounds.as_slice(), [10, 100]);
    assert_eq!(got.buckets, [2, 2, 1]);
    assert_eq!((got.sum, got.max), (5 + 10 + 11 + 1000 + 50, 1000));
    assert_eq!(got.cumulative(), [(10, 2), (100, 4), (u64::MAX, 5)]);
}
