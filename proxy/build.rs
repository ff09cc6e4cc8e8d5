//! Stamps each build of `baton-proxy` with an id, so that `/server_info` (and later the restart
//! protocol's `Hello`) can tell an upgraded binary from the one it replaced.

include!("../build-id.rs");

fn main() {
    emit_build_id();
}
