//! A region file cut short under a writer: the writer lives on and says so; a SIGBUS that is not
//! the region's still ends the process as it would have.

use std::os::unix::process::ExitStatusExt;

use shm_stats::{Capacities, Region, Spec};

fn small() -> Capacities {
    Capacities {
        max_stats: 64,
        max_shards: 16,
        cells_per_shard: 2048,
        ..Default::default()
    }
}

#[test]
fn a_truncated_region_does_not_kill_its_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats");
    let region = Region::create_or_open(&path, small()).unwrap();
    let requests = region.counter(Spec::new("requests", &[], "")).unwrap();
    let shard = region.attach_shard(1, 0).unwrap();
    shard.inc(requests);
    assert!(!region.lost());
    // Another process (or a cleanup script) cuts the file short.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    for _ in 0..1000 {
        shard.inc(requests);
    }
    region.set_current_epoch(2);
    assert!(region.lost(), "the writer knows its region is gone");
    // Retiring touches the whole table: still no crash.
    let _ = region.retire_epoch(1);
    drop(shard);
    drop(region);
    // A new region at the path works again.
    std::fs::remove_file(&path).unwrap();
    let again = Region::create_or_open(&path, small()).unwrap();
    assert!(!again.lost());
}

#[test]
fn a_sigbus_elsewhere_still_ends_the_process() {
    if std::env::var_os("TRUNCATED_CHILD").is_some() {
        // In the child: a region guards its mapping, then another mapped file is cut short and
        // touched.
        let dir = tempfile::tempdir().unwrap();
        let _region = Region::create_or_open(&dir.path().join("stats"), small()).unwrap();
        let other = dir.path().join("other");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&other)
            .unwrap();
        file.set_len(4096).unwrap();
        let mut map = unsafe_map(&file);
        file.set_len(0).unwrap();
        map[0] = 1;
        unreachable!("the access past the end raised SIGBUS");
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_sigbus_elsewhere_still_ends_the_process",
            "--nocapture",
        ])
        .env("TRUNCATED_CHILD", "1")
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status}");
}

#[allow(unsafe_code)]
fn unsafe_map(file: &std::fs::File) -> memmap2::MmapMut {
    // SAFETY: the test owns the file and is the only one touching the mapping.
    unsafe { memmap2::MmapMut::map_mut(file).unwrap() }
}
