//! The binaries under test, built once per test process.
//!
//! Cargo only hands `CARGO_BIN_EXE_*` to the tests of a binary's own package, and `cargo test`
//! does not build other packages' binaries, so the harness runs `cargo build` itself, into the
//! same target folder and profile as the test binary. Cargo's own up-to-date check makes this
//! nearly free when nothing changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// `baton-proxy`, freshly built.
pub fn proxy() -> &'static Path {
    &built().proxy
}

/// `baton-stats`, freshly built.
pub fn stats() -> &'static Path {
    &built().stats
}

/// `baton`, the supervisor, freshly built.
pub fn supervisor() -> &'static Path {
    &built().supervisor
}

struct Built {
    proxy: PathBuf,
    stats: PathBuf,
    supervisor: PathBuf,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary knows its own path");
        // <target>/<profile>/deps/<test binary>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binaries live in <target>/<profile>/deps");
        let target_dir = profile_dir
            .parent()
            .expect("the profile folder is inside the target folder");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the tests package sits in the workspace root");
        let mut command = Command::new(cargo);
        // `cargo test` runs this binary with the tests package's own variables (CARGO_PKG_NAME,
        // CARGO_MANIFEST_DIR, OUT_DIR, ...); a build script that tracks them (ring's does) would see
        // them change between this build and the developer's, and each would rebuild ring and
        // all that depends on it. The developer's own settings (CARGO_HOME, ...) stay.
        for (name, _) in std::env::vars_os() {
            let set_by_cargo_test = name.to_str().is_some_and(|n| {
                ["CARGO_PKG_", "CARGO_MANIFEST_"]
                    .iter()
                    .any(|p| n.starts_with(p))
                    || [
                        "CARGO_CRATE_NAME",
                        "CARGO_PRIMARY_PACKAGE",
                        "CARGO_TARGET_TMPDIR",
                        "CARGO_BIN_NAME",
                        "OUT_DIR",
                    ]
                    .contains(&n)
            });
            if set_by_cargo_test {
                command.env_remove(name);
            }
        }
        command
            .current_dir(workspace)
            .args(["build", "--quiet", "--bins"])
            .args(["-p", "baton-proxy", "-p", "shm-stats", "-p", "baton"])
            .arg("--target-dir")
            .arg(target_dir);
        if profile == "release" {
            command.arg("--release");
        } else if profile != "debug" {
            command.args(["--profile", profile]);
        }
        let status = command
            .status()
            .expect("cargo can be run to build the binaries under test");
        assert!(status.success(), "building the binaries under test failed");
        Built {
            proxy: profile_dir.join("baton-proxy"),
            stats: profile_dir.join("baton-stats"),
            supervisor: profile_dir.join("baton"),
        }
    })
}
