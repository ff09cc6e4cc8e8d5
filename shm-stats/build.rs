//! Stamps each build of `baton-stats` with an id, shown by `baton-stats --version` as the other
//! binaries show theirs.

include!("../build-id.rs");

fn main() {
    emit_build_id();
}
