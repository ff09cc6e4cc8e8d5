//! The costs that matter on the request path and for readers: one counter increment, one
//! histogram record, two threads writing their own shards at once, and a full snapshot; and at
//! a generation's start, registering its stats.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use shm_stats::{Capacities, Reader, Region, Spec, Unit};

fn writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::create_or_open(&dir.path().join("bench"), Capacities::default()).unwrap();
    let counter = region
        .counter(Spec::new("requests", &[("listener", "public")], ""))
        .unwrap();
    let histogram = region
        .histogram(Spec::new("rq_time", &[], "").unit(Unit::Microseconds))
        .unwrap();
    let shard = region.attach_shard(1, 0).unwrap();

    c.bench_function("counter inc (shard)", |b| {
        b.iter(|| shard.inc(black_box(counter)))
    });
    let plain = AtomicU64::new(0);
    c.bench_function("plain AtomicU64 fetch_add relaxed", |b| {
        b.iter(|| black_box(&plain).fetch_add(1, Ordering::Relaxed))
    });
    let mut v = 1u64;
    c.bench_function("histogram record (shard)", |b| {
        b.iter(|| {
            v = v.wrapping_mul(6364136223846793005).wrapping_add(1);
            shard.record(black_box(histogram), v >> 44)
        })
    });

    // Two threads, each on its own shard: any false sharing would show as a slowdown per op.
    for threads in [1u32, 2] {
        let name = format!("counter inc, {threads} thread(s) on own shards, per op");
        let mut epoch = 100;
        c.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                epoch += 1;
                let took = std::thread::scope(|scope| {
                    let handles: Vec<_> = (0..threads)
                        .map(|w| {
                            let shard = region.attach_shard(epoch, w).unwrap();
                            scope.spawn(move || {
                                let start = Instant::now();
                                for _ in 0..iters {
                                    shard.inc(black_box(counter));
                                }
                                start.elapsed()
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| h.join().unwrap())
                        .max()
                        .unwrap_or(Duration::ZERO)
                });
                region.retire_epoch(epoch).unwrap();
                took
            })
        });
    }
}

fn snapshot(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench");
    let region = Region::create_or_open(
        &path,
        Capacities {
            max_stats: 10_240,
            max_shards: 64,
            cells_per_shard: 10_240,
            ..Default::default()
        },
    )
    .unwrap();
    let counters: Vec<_> = (0..10_000)
        .map(|i| {
            region
                .counter(Spec::new(
                    &format!("stat_{i}"),
                    &[("listener", "public")],
                    "A stat.",
                ))
                .unwrap()
        })
        .collect();
    let shards: Vec<_> = (0..64)
        .map(|w| region.attach_shard(1, w).unwrap())
        .collect();
    for (i, shard) in shards.iter().enumerate() {
        for c in &counters {
            shard.add(*c, i as u64);
        }
    }
    let reader = Reader::open(&path).unwrap();
    let mut group = c.benchmark_group("reader");
    group.sample_size(20);
    group.bench_function("snapshot of 10,000 stats over 64 shards", |b| {
        b.iter(|| black_box(reader.snapshot().unwrap()))
    });
    // What a one-shot `baton-stats` does: map, validate, parse every entry, read every cell.
    group.bench_function(
        "open + first snapshot of 10,000 stats over 64 shards",
        |b| b.iter(|| black_box(Reader::open(&path).unwrap().snapshot().unwrap())),
    );
    group.finish();
}

fn registration(c: &mut Criterion) {
    let names: Vec<String> = (0..10_000).map(|i| format!("stat_{i}")).collect();
    let caps = Capacities {
        max_stats: 10_240,
        max_shards: 4,
        cells_per_shard: 10_240,
        ..Default::default()
    };
    let mut group = c.benchmark_group("registration");
    group.sample_size(10);
    // A generation of a config with hundreds of clusters registers about this many stats; each
    // registration looks its name up in the mapping's index of the table.
    group.bench_function("register 10,000 stats in a new region", |b| {
        b.iter_batched(
            || tempfile::tempdir().unwrap(),
            |dir| {
                let region = Region::create_or_open(&dir.path().join("bench"), caps).unwrap();
                for name in &names {
                    black_box(
                        region
                            .counter(Spec::new(name, &[("cluster", "origin")], "A stat."))
                            .unwrap(),
                    );
                }
                dir
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, writes, snapshot, registration);
criterion_main!(benches);
