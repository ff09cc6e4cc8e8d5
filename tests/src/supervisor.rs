//! A `baton run` supervisor process, with its own folder, control socket and stats region.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::proxy::{START_TIMEOUT, with_private_stats};
use crate::{binaries, blocking, wait_until};

/// How to start a supervisor.
#[derive(Debug, Default)]
pub struct Options {
    /// A `baton` binary among the files written beside the config, instead of the built one.
    pub binary: Option<String>,
    pub env: Vec<(String, String)>,
    /// Make the folder readable by every user (for generations that run as another user).
    pub shared_dir: bool,
}

pub struct Supervisor {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    pub config_path: PathBuf,
    pub socket: PathBuf,
}

/// What a `baton` client command printed.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Supervisor {
    /// Starts `baton run` on `config` (a `[supervisor]` table with the control socket is added
    /// unless the config has one, which must then put the socket at `baton.sock` beside the
    /// config) and waits until generation 0 is active.
    pub fn start(config: &str) -> Supervisor {
        Self::start_with_files(config, &[])
    }

    /// Like [`Supervisor::start`], with `files` (name, bytes) written beside the config first
    /// (a name may hold folders: `tls/cert.pem`).
    pub fn start_with_files(config: &str, files: &[(&str, &[u8])]) -> Supervisor {
        Self::start_with(config, files, &Options::default())
    }

    /// The most general start: files beside the config, another `baton` binary, more
    /// environment variables.
    pub fn start_with(config: &str, files: &[(&str, &[u8])], options: &Options) -> Supervisor {
        let dir = tempfile::tempdir().expect("a temporary folder");
        if options.shared_dir {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        for (name, content) in files {
            let path = dir.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("a folder beside the config");
            }
            if content.starts_with(b"\x7fELF") {
                crate::write_executable(&path, content);
                continue;
            }
            std::fs::write(&path, content).expect("a file beside the config");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let socket = dir.path().join("baton.sock");
        let config_path = dir.path().join("baton.toml");
        std::fs::write(&config_path, Self::complete(config, &socket))
            .expect("the config can be written");
        let log = dir.path().join("supervisor.log");
        let binary = options
            .binary
            .as_ref()
            .map(|b| dir.path().join(b))
            .unwrap_or_else(|| binaries::supervisor().to_owned());
        let child = Command::new(binary)
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("BATON_LOG", "info,baton=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                // Appending: generations write to it too, and may outlive this supervisor
                // while another one writes (adoption); each line lands whole at the end.
                File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("the log file can be created"),
            )
            .spawn()
            .expect("baton can be started");
        let mut supervisor = Supervisor {
            child,
            dir,
            log,
            config_path,
            socket,
        };
        let up = wait_until(START_TIMEOUT, || {
            supervisor.log().contains(" active epoch=0") || supervisor.exited()
        });
        assert!(
            up && !supervisor.exited(),
            "baton run did not come up:\n{}",
            supervisor.log()
        );
        supervisor
    }

    fn complete(config: &str, socket: &Path) -> String {
        let config = with_private_stats(config);
        if config.contains("[supervisor]") {
            config
        } else {
            format!(
                "{config}\n[supervisor]\ncontrol_socket = \"{}\"\n",
                socket.display()
            )
        }
    }

    /// Starts `baton run` again on the same config and folder, once the previous supervisor
    /// process has gone (killed by the test), and waits until `baton status` names an active
    /// generation: one it adopted, or one it started. Its log goes on in the same file.
    pub fn respawn(&mut self) {
        assert!(
            self.wait_exit(START_TIMEOUT).is_some(),
            "the previous supervisor is still running"
        );
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .expect("the log file can be opened");
        self.child = Command::new(binaries::supervisor())
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("BATON_LOG", "info,baton=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("baton can be started");
        let up = wait_until(START_TIMEOUT, || {
            self.try_status()
                .is_some_and(|status| !status["active_epoch"].is_null())
                || self.exited()
        });
        assert!(
            up && !self.exited(),
            "baton run did not come up again:\n{}",
            self.log()
        );
    }

    /// Replaces the config file (the next reload reads it).
    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, Self::complete(config, &self.socket))
            .expect("the config can be written");
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal)
            .expect("the supervisor can be signalled");
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// Runs `baton <command> --socket <socket> [args]`.
    pub fn command(&self, command: &str, args: &[&str]) -> Outcome {
        let output = blocking(|| {
            Command::new(binaries::supervisor())
                .arg(command)
                .arg("--socket")
                .arg(&self.socket)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("baton can be run")
        });
        Outcome {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `baton reload`, waiting for its outcome.
    pub fn reload(&self) -> Outcome {
        self.command("reload", &[])
    }

    /// `baton status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.command("status", &["--json"]);
        assert_eq!(out.code, Some(0), "baton status failed: {}", out.stderr);
        serde_json::from_str(&out.stdout).expect("status is JSON")
    }

    /// `baton status --json`, or `None` while no supervisor answers on the socket.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let out = self.command("status", &["--json"]);
        if out.code != Some(0) {
            return None;
        }
        serde_json::from_str(&out.stdout).ok()
    }

    /// `(epoch, pid, state)` of every generation.
    pub fn generations(&self) -> Vec<(u64, u32, String)> {
        self.status()["generations"]
            .as_array()
            .expect("a list of generations")
            .iter()
            .map(|g| {
                (
                    g["epoch"].as_u64().unwrap(),
                    g["pid"].as_u64().unwrap() as u32,
                    g["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// The pid of the active generation.
    pub fn active_pid(&self) -> Option<u32> {
        self.generations()
            .into_iter()
            .find(|(_, _, state)| state == "active")
            .map(|(_, pid, _)| pid)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if !self.exited() {
            // SIGINT stops the generations too; then make sure of the supervisor itself.
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}
