//! Stamps each build of `baton-stats` with an id, shown by `baton-stats --version` as the other
//! binaries show theirs.

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let profile = std::env::var("PROFILE").unwrap_or_default();
    println!("cargo:rustc-env=BATON_BUILD_ID={version}-{profile}-{nanos:x}");
}
