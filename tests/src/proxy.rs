//! A `baton-proxy` process started from a generated config in its own temporary folder.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{binaries, wait_until};

/// How long a debug build on a busy 2-core machine may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Proxy {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    pub config_path: PathBuf,
}

impl Proxy {
    /// Starts `baton-proxy` on `config` and waits for its readiness line; panics with the
    /// proxy's log if it does not come up.
    pub fn start(config: &str) -> Proxy {
        Self::start_with(config, &[])
            .unwrap_or_else(|log| panic!("baton-proxy did not start:\n{log}"))
    }

    /// Like [`Proxy::start`], with `files` (name, content) written beside the config first.
    pub fn start_with_files(config: &str, files: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().expect("a temporary folder");
        for (name, content) in files {
            std::fs::write(dir.path().join(name), content).expect("a file beside the config");
        }
        Self::start_in(dir, config, &[])
            .unwrap_or_else(|log| panic!("baton-proxy did not start:\n{log}"))
    }

    /// Like [`Proxy::start`], run from the config's folder with the config named relatively
    /// (`--config baton.toml`), as an operator in that folder would.
    pub fn start_from_its_folder(config: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("a temporary folder");
        Self::start_at(dir, config, &[], true)
            .unwrap_or_else(|log| panic!("baton-proxy did not start:\n{log}"))
    }

    /// Like [`Proxy::start`] with extra command-line arguments; on failure returns the log.
    pub fn start_with(config: &str, args: &[&str]) -> Result<Proxy, String> {
        Self::start_in(
            tempfile::tempdir().expect("a temporary folder"),
            config,
            args,
        )
    }

    fn start_in(dir: tempfile::TempDir, config: &str, args: &[&str]) -> Result<Proxy, String> {
        Self::start_at(dir, config, args, false)
    }

    fn start_at(
        dir: tempfile::TempDir,
        config: &str,
        args: &[&str],
        relative: bool,
    ) -> Result<Proxy, String> {
        let config_path = dir.path().join("baton.toml");
        std::fs::write(&config_path, with_private_stats(config))
            .expect("the config can be written");
        let log = dir.path().join("proxy.log");
        let stderr = File::create(&log).expect("the log file can be created");
        let mut command = Command::new(binaries::proxy());
        if relative {
            command
                .current_dir(dir.path())
                .arg("--config")
                .arg("baton.toml");
        } else {
            command.arg("--config").arg(&config_path);
        }
        let child = command
            .args(args)
            .env("BATON_LOG", "info,baton_proxy=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("baton-proxy can be started");
        let mut proxy = Proxy {
            child,
            dir,
            log,
            config_path,
        };
        let ready = wait_until(START_TIMEOUT, || {
            proxy.log().contains(" ready ") || proxy.exited()
        });
        if !ready || proxy.exited() || !proxy.log().contains(" ready ") {
            return Err(proxy.log());
        }
        Ok(proxy)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the proxy has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// The text of a file in the proxy's folder (empty if it does not exist).
    pub fn read_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Waits until the file `name` in the proxy's folder holds `needle`.
    pub fn wait_for_log_file(&self, name: &str, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.read_file(name).contains(needle))
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("the proxy can be signalled");
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `baton-proxy --check` (or, with `check` false, a plain start that is expected to fail)
/// on `config` written to a temporary folder, and returns its output. Panics if it runs for
/// longer than a start-up may take.
pub fn run_once(config: &str, check: bool) -> Output {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("baton.toml");
    std::fs::write(&path, with_private_stats(config)).expect("the config can be written");
    let mut command = Command::new(binaries::proxy());
    command.arg("--config").arg(&path);
    if check {
        command.arg("--check");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("baton-proxy can be run");
    let exited = wait_until(START_TIMEOUT, || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
        let output = child.wait_with_output().expect("the output can be read");
        panic!(
            "baton-proxy kept running; stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    child.wait_with_output().expect("the output can be read")
}

/// Gives a test's proxy a stats region of its own in its folder (unless the config places it), so
/// that tests running at once do not share counters.
pub fn with_private_stats(config: &str) -> String {
    if config.contains("[stats]") {
        config.to_owned()
    } else {
        format!("{config}\n[stats]\npath = \"stats.shm\"\n")
    }
}
