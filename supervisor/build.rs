//! Stamps each build of `baton` with an id, so that `baton status` shows which supervisor binary
//! runs (after an in-place upgrade, the new one).

include!("../build-id.rs");

fn main() {
    emit_build_id();
}
