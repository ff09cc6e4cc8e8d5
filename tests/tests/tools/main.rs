//! Tests that run baton under the real tools operators use: `systemd-analyze`,
//! `systemd-socket-activate` (Debian's `systemd` package), runit's `runsv` and `sv`, `openssl`
//! and `logrotate`.
//! `.ci/system-tests` installs them and runs `cargo test -p baton-tests --test tools`.

/// Socket activation: systemd binds, baton serves.
mod activation;
/// The examples' helpers: the certificate script (openssl), the logrotate snippet, socket
/// activation.
mod examples;
/// runit: run, `sv hup`, `sv down`, `sv up`.
mod runit;
/// The unit files, as systemd reads them.
mod units;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(20);

/// The path of a tool, or a panic that says how to install it.
pub fn tool(name: &str, package: &str) -> PathBuf {
    baton_tests::on_path(name).unwrap_or_else(|| {
            panic!("{name} is not installed: apt-get install -y --no-install-recommends {package} (or run .ci/system-tests)")
        })
}

/// A file of the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A shipped file with `/usr/local/bin/baton...` pointing at the binaries under test and
/// `/etc/baton/baton.toml` at `config`, wherever the file names them. Not a checked
/// [`baton_tests::config::Edit`]: this rewrites every shipped file, and some name neither path
/// (`baton.socket`) or only the config (runit's `finish`).
pub fn shipped(path: &str, config: &Path) -> String {
    let bin = baton_tests::binaries::supervisor()
        .parent()
        .unwrap()
        .display()
        .to_string();
    std::fs::read_to_string(repo(path))
        .unwrap()
        .replace("/usr/local/bin", &bin)
        .replace("/etc/baton/baton.toml", &config.display().to_string())
}
