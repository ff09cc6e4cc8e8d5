//! Stamps each build of `baton-proxy` with an id, so that `/server_info` (and later the restart
//! protocol's `Hello`) can tell an upgraded binary from the one it replaced.

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
