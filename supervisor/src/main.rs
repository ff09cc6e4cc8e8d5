//! `baton`, the supervisor of proxy generations.
//!
//! The supervisor (generation lifecycle, socket store, restart protocol, control socket) is the
//! subject of a later issue. Until it exists this binary only tells the user how to run the proxy
//! on its own, so that nobody mistakes it for a working supervisor.

#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "baton: the supervisor is not built yet; run the proxy on its own with \
         `baton-proxy --config FILE` (see README.md)"
    );
    ExitCode::from(69) // EX_UNAVAILABLE
}
