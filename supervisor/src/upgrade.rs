//! Upgrading the supervisor in place: the running supervisor writes what it knows into a memfd,
//! makes the fds it holds survive `execve`, and executes the `baton` binary on disk with the same
//! arguments. The new program finds the memfd in `BATON_UPGRADE_FD`, takes the fds over and
//! carries on: same pid (systemd sees the same main process), same children, same sockets.
//!
//! Before it executes anything, the old supervisor asks the new binary which state versions it
//! reads (`baton internal upgrade-check`): a binary that cannot take over is never executed, and
//! nothing changes.

use std::ffi::CString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use restart_protocol::{Load, SocketKey};
use serde::{Deserialize, Serialize};

use crate::UPGRADE_FD_ENV;
use crate::lifecycle::{Counts, State};

/// The version of [`Inherited`]; a new binary that does not read it is not executed.
pub const STATE_VERSION: u32 = 1;

/// Everything a supervisor hands to the program that replaces it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Inherited {
    pub version: u32,
    pub control_fd: RawFd,
    pub region_fd: RawFd,
    pub sockets: Vec<(SocketKey, RawFd)>,
    pub names: Vec<(String, SocketKey)>,
    pub activated: Vec<SocketKey>,
    pub generations: Vec<InheritedGeneration>,
    pub next_epoch: u64,
    pub counts: (u64, u64, u64),
    pub last_reload: Option<String>,
    /// Drained on request (`baton drain`): nothing is to be started until a reload. Absent
    /// from the state of a supervisor that did not know drains.
    #[serde(default)]
    pub drained: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InheritedGeneration {
    pub epoch: u64,
    pub pid: u32,
    /// `active` or `draining` (a reload in progress blocks an upgrade, so none is starting).
    pub state: String,
    pub channel_fd: RawFd,
    pub started_unix_ms: u64,
    pub build: String,
    pub sockets: Vec<SocketKey>,
    pub load: (u64, u64),
}

impl Inherited {
    pub fn counts(&self) -> Counts {
        Counts {
            reloads: self.counts.0,
            reload_failures: self.counts.1,
            crashes: self.counts.2,
        }
    }
}

impl InheritedGeneration {
    pub fn state(&self) -> Option<State> {
        match self.state.as_str() {
            "active" => Some(State::Active),
            "draining" => Some(State::Draining),
            _ => None,
        }
    }

    pub fn load(&self) -> Load {
        Load {
            connections: self.load.0,
            requests: self.load.1,
        }
    }
}

/// Asks `binary` whether it can take over; `Err` says why not.
pub fn check(binary: &Path) -> Result<(), String> {
    let output = std::process::Command::new(binary)
        .args(["internal", "upgrade-check"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let versions = String::from_utf8_lossy(&output.stdout);
    let reads = versions
        .split_whitespace()
        .any(|v| v.parse::<u32>() == Ok(STATE_VERSION));
    if output.status.success() && reads {
        Ok(())
    } else {
        Err(format!(
            "{} cannot take over from this supervisor (it reads state versions `{}`, this one writes {STATE_VERSION})",
            binary.display(),
            versions.trim()
        ))
    }
}

/// Makes `fd` survive (or not survive) `execve`.
#[allow(unsafe_code)] // A borrowed fd for one fcntl call.
fn set_inheritable(fd: RawFd, inheritable: bool) -> std::io::Result<()> {
    // SAFETY: a borrowed fd for one fcntl call; the caller holds the fd open.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(borrowed, FcntlArg::F_SETFD(flags))
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// Executes `binary` with `args`, handing over `state` and the fds it names. Returns only if
/// the exec failed; every fd is then close-on-exec again, as before.
#[allow(unsafe_code)] // borrow_raw in set_inheritable: the fds are ours and open.
pub fn exec(binary: &Path, args: &[String], state: &Inherited) -> String {
    let mut fds: Vec<RawFd> = vec![state.control_fd, state.region_fd];
    fds.extend(state.sockets.iter().map(|(_, fd)| *fd));
    fds.extend(state.generations.iter().map(|g| g.channel_fd));

    let memfd =
        match nix::sys::memfd::memfd_create(c"baton-upgrade", nix::sys::memfd::MFdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => return format!("cannot create the state memfd: {e}"),
        };
    let mut file = std::fs::File::from(memfd);
    if let Err(e) = serde_json::to_writer(&mut file, state)
        .map_err(|e| e.to_string())
        .and_then(|()| file.flush().map_err(|e| e.to_string()))
    {
        return format!("cannot write the state: {e}");
    }
    let memfd = file.as_raw_fd();
    fds.push(memfd);

    let restore = |fds: &[RawFd]| {
        for fd in fds {
            let _ = set_inheritable(*fd, false);
        }
    };
    for fd in &fds {
        if let Err(e) = set_inheritable(*fd, true) {
            restore(&fds);
            return format!("cannot hand fd {fd} over: {e}");
        }
    }

    let to_c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let built = (|| -> Result<(CString, Vec<CString>, Vec<CString>), String> {
        let path = to_c(&binary.to_string_lossy())?;
        let argv = args
            .iter()
            .map(|a| to_c(a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            if key == UPGRADE_FD_ENV {
                continue;
            }
            let mut pair = key.into_encoded_bytes();
            pair.push(b'=');
            pair.extend(value.into_encoded_bytes());
            env.push(CString::new(pair).map_err(|e| e.to_string())?);
        }
        env.push(to_c(&format!("{UPGRADE_FD_ENV}={memfd}"))?);
        Ok((path, argv, env))
    })();
    let error = match built {
        Ok((path, argv, env)) => match nix::unistd::execve(&path, &argv, &env) {
            Ok(never) => match never {},
            Err(e) => format!("cannot execute {}: {e}", binary.display()),
        },
        Err(e) => e,
    };
    restore(&fds);
    drop(file);
    error
}

/// The state handed over by the supervisor this process replaced, if any.
#[allow(unsafe_code)] // Taking ownership of the inherited memfd.
pub fn inherited() -> Option<Result<Inherited, String>> {
    let fd: RawFd = std::env::var(UPGRADE_FD_ENV).ok()?.parse().ok()?;
    Some((|| {
        if fcntl(
            // SAFETY: a borrowed fd for one fcntl call, to check that it is open.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            FcntlArg::F_GETFD,
        )
        .is_err()
        {
            return Err(format!("{UPGRADE_FD_ENV}={fd} is not open"));
        }
        // SAFETY: the supervisor we replace opened this memfd for us and named it in the
        // variable; nothing else here has taken it.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut text = String::new();
        file.rewind()
            .and_then(|()| file.read_to_string(&mut text))
            .map_err(|e| format!("cannot read the handed-over state: {e}"))?;
        let state: Inherited = serde_json::from_str(&text)
            .map_err(|e| format!("cannot understand the handed-over state: {e}"))?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "the handed-over state is version {}, this supervisor reads {STATE_VERSION}",
                state.version
            ));
        }
        Ok(state)
    })())
}

/// Takes ownership of an inherited fd, making it close-on-exec again; `None` if it is not open.
#[allow(unsafe_code)] // Taking ownership of fds the replaced supervisor handed over.
pub fn adopt(fd: RawFd) -> Option<OwnedFd> {
    set_inheritable(fd, false).ok()?;
    // SAFETY: the replaced supervisor handed this fd over (it is named in the state), it is
    // open (fcntl above succeeded), and it is taken once.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Where the running binary was started from (for `execve` after it was replaced on disk).
pub fn binary_path() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("baton"))
}
