//! The checks a new binary passes before it is executed in the running supervisor's place:
//! its answer to `baton internal upgrade-check`, then a trial take-over, each run as a child
//! the event loop waits for ([`Upgrading`]).

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::debug;

use super::error::UpgradeError;
use super::state::STATE_VERSION;
use crate::lifecycle::Waiter;

/// What `baton internal upgrade-check` prints: the state versions this binary reads, and that
/// it does trial take-overs.
pub fn check_answer() -> String {
    format!("{STATE_VERSION} trial")
}

/// Whether `upgrade-check`'s answer says the binary can take over: it reads this state's
/// version and does trial take-overs (a binary from before trials is not executed blind: one
/// that answers the check and then fails would end the supervisor).
pub fn read_check_answer(binary: &Path, answer: &str) -> Result<(), UpgradeError> {
    let reads = answer
        .split_whitespace()
        .any(|v| v.parse::<u32>() == Ok(STATE_VERSION));
    if !reads {
        return Err(UpgradeError::StateVersion {
            binary: binary.to_owned(),
            reads: answer.trim().to_owned(),
            writes: STATE_VERSION,
        });
    }
    if !answer.split_whitespace().any(|w| w == "trial") {
        return Err(UpgradeError::NoTrial {
            binary: binary.to_owned(),
        });
    }
    Ok(())
}

/// How long the new binary has for each of its checks before an upgrade.
pub const UPGRADE_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Where an upgrade is: the new binary answers `internal upgrade-check`, then takes over on
/// trial.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Check,
    Trial,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Check => "self-check",
            Step::Trial => "trial take-over",
        }
    }
}

/// An upgrade under way: the child checking the new binary, and who waits for the outcome.
pub struct Upgrading {
    pub step: Step,
    pub child: std::process::Child,
    pub deadline: Instant,
    pub waiters: Vec<Waiter>,
    pub nonce: u64,
}

impl Upgrading {
    /// Starts a check of the new binary, its output read once it has exited (without
    /// blocking: a child it left behind may hold the pipes), `input` on its standard input.
    pub fn start(
        step: Step,
        mut command: std::process::Command,
        input: Option<&[u8]>,
    ) -> std::io::Result<std::process::Child> {
        use std::process::Stdio;
        // The state on standard input from a memfd, whatever its size (a pipe holds 64 KiB,
        // and a config can be larger).
        let stdin = match input {
            Some(input) => {
                let memfd = nix::sys::memfd::memfd_create(
                    c"baton-upgrade-trial",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )?;
                let mut file = std::fs::File::from(memfd);
                file.write_all(input)?;
                std::io::Seek::rewind(&mut file)?;
                Stdio::from(file)
            }
            None => Stdio::null(),
        };
        command
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The checks are not the supervisor: systemd's variables and the upgrade's are not
        // theirs.
        for var in crate::notify::SYSTEMD_ENV {
            command.env_remove(var);
        }
        command.env_remove(crate::env::UPGRADE_FD_ENV);
        let child = command.spawn()?;
        if let Some(stdout) = &child.stdout {
            set_nonblocking(stdout)?;
        }
        if let Some(stderr) = &child.stderr {
            set_nonblocking(stderr)?;
        }
        debug!("{} started", step.name());
        Ok(child)
    }

    /// What the child wrote (at most 64 KiB of each).
    pub fn output(&mut self) -> (String, String) {
        let read = |pipe: Option<&mut dyn Read>| {
            let mut out = Vec::new();
            if let Some(pipe) = pipe {
                let mut buf = [0u8; 4096];
                while out.len() < 64 * 1024 {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => out.extend_from_slice(&buf[..n]),
                    }
                }
            }
            String::from_utf8_lossy(&out).into_owned()
        };
        let stdout = read(self.child.stdout.as_mut().map(|p| p as &mut dyn Read));
        let stderr = read(self.child.stderr.as_mut().map(|p| p as &mut dyn Read));
        (stdout, stderr)
    }
}

fn set_nonblocking(fd: &impl AsFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )
    .map(|_| ())
    .map_err(std::io::Error::from)
}

/// A number nobody can guess ahead, for an upgrade's trial to answer with.
pub fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
