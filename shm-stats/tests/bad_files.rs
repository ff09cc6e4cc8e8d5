//! Readers and writers on files that are not good regions: missing, not regular files,
//! foreign, cut short, of a newer layout, damaged before or after they were read.

mod common;

use common::{region_in, small};
use shm_stats::{ReadError, Reader, Region, Spec, layout};

#[test]
fn readers_refuse_bad_files_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    region.counter(Spec::new("a", &[], "")).unwrap();
    let good = std::fs::read(&path).unwrap();

    let missing = Reader::open(&dir.path().join("nothing")).err().unwrap();
    assert!(matches!(missing, ReadError::Open { .. }), "{missing}");
    assert!(
        missing.to_string().contains("no stats region here"),
        "{missing}"
    );

    // Not a regular file: refused at once (a named pipe would block a plain open forever).
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = Reader::open(&fifo).err().unwrap();
    assert!(
        matches!(
            err,
            ReadError::NotAFile {
                kind: "named pipe (FIFO)",
                ..
            }
        ),
        "{err}"
    );
    let err = Reader::open(dir.path()).err().unwrap();
    assert!(
        matches!(err, ReadError::NotAFile { kind: "folder", .. }),
        "{err}"
    );

    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let random: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let err = Reader::open(&write("random", &random)).err().unwrap();
    assert!(matches!(err, ReadError::Foreign { .. }), "{err}");
    let err = Reader::open(&write("tiny", b"hello")).err().unwrap();
    assert!(matches!(err, ReadError::Foreign { .. }), "{err}");
    let err = Reader::open(&write("empty", b"")).err().unwrap();
    assert!(matches!(err, ReadError::Truncated { .. }), "{err}");

    let err = Reader::open(&write("truncated", &good[..good.len() / 2]))
        .err()
        .unwrap();
    assert!(matches!(err, ReadError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");

    let mut newer = good.clone();
    newer[layout::header::LAYOUT_VERSION as usize..][..4].copy_from_slice(&99u32.to_ne_bytes());
    let err = Reader::open(&write("newer", &newer)).err().unwrap();
    assert!(
        matches!(err, ReadError::UnknownVersion { found: 99, .. }),
        "{err}"
    );

    let mut bent = good.clone();
    bent[layout::header::NAMES_OFFSET as usize..][..8].copy_from_slice(&12345u64.to_ne_bytes());
    let err = Reader::open(&write("bent", &bent)).err().unwrap();
    assert!(matches!(err, ReadError::Corrupt { .. }), "{err}");

    // Histogram bucket bounds: none, more than the area holds, or not increasing.
    let bounds_at = layout::HEADER_SIZE as usize + 4 * 64;
    for (name, count, second) in [
        ("no-bounds", 0u32, None),
        ("many-bounds", 33, None),
        ("bounds-down", 2, Some(1u64)),
    ] {
        let mut bad = good.clone();
        bad[layout::header::BOUND_COUNT as usize..][..4].copy_from_slice(&count.to_ne_bytes());
        if let Some(v) = second {
            bad[bounds_at + 8..][..8].copy_from_slice(&v.to_ne_bytes());
        }
        let err = Reader::open(&write(name, &bad)).err().unwrap();
        assert!(matches!(err, ReadError::Corrupt { .. }), "{name}: {err}");
        assert!(
            err.to_string().contains("histogram bucket bounds"),
            "{name}: {err}"
        );
    }

    // An entry whose cells point past what was handed out.
    let mut lying = good.clone();
    let first_cell =
        layout::HEADER_SIZE as usize + 4 * 64 + 32 * 8 + layout::entry::FIRST_CELL as usize;
    lying[first_cell..first_cell + 4].copy_from_slice(&4000u32.to_ne_bytes());
    let reader = Reader::open(&write("lying", &lying)).unwrap();
    let err = reader.snapshot().unwrap_err();
    assert!(
        err.to_string().contains("entry 0 has cells out of bounds"),
        "{err}"
    );

    // A writer refuses to adopt a file it cannot read, and leaves it alone.
    let foreign = write("foreign", &random);
    let err = Region::create_or_open(&foreign, small()).err().unwrap();
    assert!(
        err.to_string().contains("not a baton stats region"),
        "{err}"
    );
    assert_eq!(std::fs::read(&foreign).unwrap(), random);
}

#[test]
fn a_region_damaged_after_it_was_read_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (path, region) = region_in(dir.path(), small());
    region.histogram(Spec::new("h", &[], "")).unwrap();
    let reader = Reader::open(&path).unwrap();
    reader.snapshot().unwrap();
    // Another process lowers the cells handed out below what the cached entry uses.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[layout::header::CELLS_USED as usize..][..4].copy_from_slice(&1u32.to_ne_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = reader.snapshot().unwrap_err();
    assert!(err.to_string().contains("cells out of bounds"), "{err}");
    // And one cuts the file short under the mapping: refused before it could fault.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = reader.snapshot().unwrap_err();
    assert!(matches!(err, ReadError::Truncated { .. }), "{err}");
    // A folder is not a region.
    let err = Reader::open(dir.path()).err().unwrap();
    assert!(
        err.to_string().contains("is a folder, not a stats region"),
        "{err}"
    );
}
