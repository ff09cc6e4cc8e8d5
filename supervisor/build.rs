//! Stamps each build of `baton` with an id, so that `baton status` shows which supervisor binary
//! runs (after an in-place upgrade, the new one).

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
