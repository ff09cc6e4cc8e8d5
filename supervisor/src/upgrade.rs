//! Upgrading the supervisor in place: the running supervisor writes what it knows into a memfd,
//! makes the fds it holds survive `execve`, and executes the `baton` binary on disk with the same
//! arguments. The new program finds the memfd in `BATON_UPGRADE_FD`, takes the fds over and
//! carries on: same pid (systemd sees the same main process), same children, same sockets.
//!
//! The new program takes over from the state it is handed, never from the config file on disk
//! (which may have changed, or be broken): the state holds the running config's text.
//!
//! Nothing is executed before the new binary has shown it can take over, without blocking the
//! supervisor's loop (`server/upgrading.rs` runs these as children, an [`Upgrading`], and waits
//! for them by SIGCHLD, with a deadline): `baton internal upgrade-check` prints the state
//! versions it reads (a binary that does not read this one's is never executed), and one that
//! says it can (`trial`) is then run as the supervisor would be, `baton run ...` with
//! `BATON_UPGRADE_TRIAL=1` and the state on its standard input, and must parse it and the config
//! and answer with the state's nonce.
//!
//! Should the new program still fail to take over, it executes the previous binary again (kept
//! open across the exec, `BATON_UPGRADE_PREVIOUS_FD`) with the same state, untouched: the new
//! program adopts copies of the handed-over descriptors and closes the originals only once it
//! has taken over, so the old program finds them all.
//!
//! This file holds the exec and the take-over; `state.rs` the state's format, `check.rs` the
//! checks of the new binary, `error.rs` why an upgrade or a take-over did not happen.

// Only this file holds unsafe code (descriptor numbers handed over across the exec).
#[forbid(unsafe_code)]
mod check;
#[forbid(unsafe_code)]
mod error;
#[forbid(unsafe_code)]
mod state;

use std::ffi::{CString, NulError};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

pub use check::{Step, UPGRADE_CHECK_TIMEOUT, Upgrading, check_answer, nonce, read_check_answer};
pub use error::{ExecError, HandoverError, UpgradeError};
pub use state::{
    HandedFds, Inherited, InheritedGeneration, InheritedLaunch, STATE_VERSION, to_json,
};

use crate::env::UPGRADE_FD_ENV;

/// Names the previous program's binary, kept open for a fallback.
pub const PREVIOUS_FD_ENV: &str = "BATON_UPGRADE_PREVIOUS_FD";
/// Set by a new program that could not take over, for the previous one it executes again.
pub const FAILED_ENV: &str = "BATON_UPGRADE_FAILED";
/// Asks `baton run` for a trial take-over (see the module's documentation).
pub const TRIAL_ENV: &str = "BATON_UPGRADE_TRIAL";

/// Makes `fd` survive (or not survive) `execve`.
fn set_inheritable(fd: BorrowedFd<'_>, inheritable: bool) -> std::io::Result<()> {
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))
        .map(|_| ())
        .map_err(std::io::Error::from)
}

/// The running program's own binary, opened (whatever replaced it on disk since), for the new
/// program to fall back to.
pub fn own_binary() -> std::io::Result<std::fs::File> {
    std::fs::File::open("/proc/self/exe")
}

/// Executes `binary` with `args`, handing over `state`, the fds it names (`fds`, whence its
/// numbers came) and `previous` (this program's binary). Returns only if the exec failed; every
/// fd is then close-on-exec again, as before.
pub fn exec(
    binary: &Path,
    args: &[String],
    state: &Inherited,
    fds: &HandedFds<'_>,
    previous: Option<BorrowedFd<'_>>,
) -> UpgradeError {
    let memfd = match nix::sys::memfd::memfd_create(
        c"baton-upgrade",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    ) {
        Ok(fd) => fd,
        Err(e) => return UpgradeError::StateMemfd(e),
    };
    let mut file = std::fs::File::from(memfd);
    if let Err(e) = to_json(state).and_then(|json| {
        file.write_all(&json)
            .and_then(|()| file.flush())
            .map_err(UpgradeError::WriteState)
    }) {
        return e;
    }
    let mut fds = fds.fds().to_vec();
    fds.extend(previous);
    fds.push(file.as_fd());

    let restore = |fds: &[BorrowedFd<'_>]| {
        for fd in fds {
            let _ = set_inheritable(*fd, false);
        }
    };
    for fd in &fds {
        if let Err(e) = set_inheritable(*fd, true) {
            restore(&fds);
            return UpgradeError::HandFd {
                fd: fd.as_raw_fd(),
                source: e,
            };
        }
    }
    let mut extra = vec![(UPGRADE_FD_ENV, file.as_raw_fd().to_string())];
    if let Some(previous) = previous {
        extra.push((PREVIOUS_FD_ENV, previous.as_raw_fd().to_string()));
    }
    let error = execve(binary, args, &extra);
    restore(&fds);
    error.into()
}

/// `execve` with this process's environment (without the upgrade's own variables) and `extra`.
/// Returns only with the reason it failed.
fn execve(binary: &Path, args: &[String], extra: &[(&str, String)]) -> ExecError {
    let built = (|| -> Result<(CString, Vec<CString>, Vec<CString>), NulError> {
        let path = CString::new(binary.to_string_lossy().as_bytes())?;
        let argv = args
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = Vec::new();
        for (key, value) in std::env::vars_os() {
            if [UPGRADE_FD_ENV, PREVIOUS_FD_ENV, FAILED_ENV, TRIAL_ENV]
                .iter()
                .any(|k| key == *k)
            {
                continue;
            }
            let mut pair = key.into_encoded_bytes();
            pair.push(b'=');
            pair.extend(value.into_encoded_bytes());
            env.push(CString::new(pair)?);
        }
        for (key, value) in extra {
            env.push(CString::new(format!("{key}={value}"))?);
        }
        Ok((path, argv, env))
    })();
    match built {
        Ok((path, argv, env)) => match nix::unistd::execve(&path, &argv, &env) {
            Ok(never) => match never {},
            Err(source) => ExecError::Exec {
                binary: binary.to_owned(),
                source,
            },
        },
        Err(e) => e.into(),
    }
}

/// What the supervisor this process replaced handed over: the state, and the descriptor numbers
/// it came with, which stay open (and inheritable) until [`Handover::release`], so that a
/// fallback to the previous program hands them on untouched.
pub struct Handover {
    pub state: Inherited,
    memfd: RawFd,
}

/// The fd number named by the variable `name`, if it is set and open.
fn fd_from_env(name: &'static str) -> Option<Result<RawFd, HandoverError>> {
    let value = std::env::var(name).ok()?;
    Some((|| {
        let not_an_fd = || HandoverError::NotAnFd {
            name,
            value: value.clone(),
        };
        let fd: RawFd = value.parse().map_err(|_| not_an_fd())?;
        if fd < 3 {
            return Err(not_an_fd());
        }
        is_open(fd).map_err(|source| HandoverError::FdNotOpen { name, fd, source })?;
        Ok(fd)
    })())
}

/// Whether this process has descriptor `fd` open, asked without borrowing the number (a
/// `BorrowedFd` may only be made of an open descriptor): `/proc/self/fd` lists the open ones.
fn is_open(fd: RawFd) -> Result<(), nix::errno::Errno> {
    match std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(nix::errno::Errno::EBADF),
        Err(e) => Err(e
            .raw_os_error()
            .map_or(nix::errno::Errno::EIO, nix::errno::Errno::from_raw)),
    }
}

/// A borrow of a descriptor the previous program handed over.
///
/// # Safety
/// `fd` must be open (checked with [`is_open`]) and stay open while the borrow lives: the
/// handed-over descriptors stay open until [`Handover::release`] or the exec of a fallback,
/// and no borrow is kept past the call it is made for.
#[allow(unsafe_code)]
unsafe fn borrow_handed<'a>(fd: RawFd) -> BorrowedFd<'a> {
    // SAFETY: as the caller promises (see above).
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// The state handed over by the supervisor this process replaced, if any.
pub fn inherited() -> Option<Result<Handover, HandoverError>> {
    let fd = match fd_from_env(UPGRADE_FD_ENV)? {
        Ok(fd) => fd,
        Err(e) => return Some(Err(e)),
    };
    Some((|| {
        let text = read_fd(fd).map_err(HandoverError::ReadState)?;
        let state = parse_state(&text)?;
        Ok(Handover { state, memfd: fd })
    })())
}

/// The state from its JSON, if this program reads its version.
fn parse_state(text: &[u8]) -> Result<Inherited, HandoverError> {
    let state: Inherited = serde_json::from_slice(text).map_err(HandoverError::ParseState)?;
    if state.version != STATE_VERSION {
        return Err(HandoverError::StateVersion {
            found: state.version,
            reads: STATE_VERSION,
        });
    }
    Ok(state)
}

/// Reads a whole file from offset 0 without moving its offset.
fn read_fd(fd: RawFd) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    is_open(fd)?;
    #[allow(unsafe_code)]
    // SAFETY: the state's memfd, open (checked just above) until `Handover::release`, which
    // comes after this read; the borrow ends with this statement.
    let copy = unsafe { borrow_handed(fd) }.try_clone_to_owned()?;
    let file = std::fs::File::from(copy);
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = file.read_at(&mut buf, bytes.len() as u64)?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes.extend_from_slice(&buf[..n]);
    }
}

/// A copy (close-on-exec) of a handed-over descriptor; `None` if it is not open. The original
/// stays as it is until [`Handover::release`].
pub fn adopt(fd: RawFd) -> Option<OwnedFd> {
    is_open(fd).ok()?;
    #[allow(unsafe_code)]
    // SAFETY: open (checked just above), handed over and kept open until `Handover::release`;
    // the borrow ends with this statement.
    unsafe { borrow_handed(fd) }.try_clone_to_owned().ok()
}

impl Handover {
    /// Taken over: the originals of the handed-over descriptors (this process holds copies of
    /// what it uses) and the state's memfd are closed.
    #[allow(unsafe_code)] // Closing descriptor numbers the previous program handed over.
    pub fn release(self) {
        let mut fds = self.state.fds();
        fds.push(self.memfd);
        if let Some(Ok(previous)) = fd_from_env(PREVIOUS_FD_ENV) {
            fds.push(previous);
        }
        fds.sort_unstable();
        fds.dedup();
        for fd in fds {
            if is_open(fd).is_ok() {
                // SAFETY: handed over to this process, used by nothing here (it holds its own
                // copies), and closed once (deduplicated above).
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
}

/// This program could not take over: execute the previous one again, with the same state and
/// descriptors, telling it why. Returns only if that could not be done.
pub fn fall_back(reason: &str) -> HandoverError {
    let previous = match fd_from_env(PREVIOUS_FD_ENV) {
        Some(Ok(fd)) => fd,
        Some(Err(e)) => return e,
        None => return HandoverError::NoPreviousBinary,
    };
    let memfd = match fd_from_env(UPGRADE_FD_ENV) {
        Some(Ok(fd)) => fd,
        Some(Err(e)) => return e,
        None => {
            return HandoverError::NoState {
                name: UPGRADE_FD_ENV,
            };
        }
    };
    let args: Vec<String> = std::env::args().collect();
    let binary = PathBuf::from(format!("/proc/self/fd/{previous}"));
    let one_line = reason.replace(['\n', '\r'], " ");
    execve(
        &binary,
        &args,
        &[
            (UPGRADE_FD_ENV, memfd.to_string()),
            (PREVIOUS_FD_ENV, previous.to_string()),
            (FAILED_ENV, one_line),
        ],
    )
    .into()
}

/// Why the upgrade that executed this program failed, if this program is the previous one
/// executed again by a new one that could not take over.
pub fn failed_upgrade() -> Option<String> {
    std::env::var(FAILED_ENV).ok()
}

/// Whether `baton run` is asked for a trial take-over.
pub fn trial_requested() -> bool {
    std::env::var_os(TRIAL_ENV).is_some()
}

/// A trial take-over: reads the state from standard input, checks that this program reads its
/// version and its config, and answers `ok <nonce>`. Touches nothing else.
pub fn trial(config_path: &Path) -> Result<String, HandoverError> {
    let mut text = Vec::new();
    std::io::stdin()
        .read_to_end(&mut text)
        .map_err(HandoverError::ReadTrialState)?;
    let state = parse_state(&text)?;
    // The config as the take-over finds it: handed over, else the file.
    match &state.last_good {
        Some(launch) => crate::config::parse(config_path, &launch.config_source).map(|_| ()),
        None => crate::config::load(config_path).map(|_| ()),
    }
    .map_err(HandoverError::Config)?;
    Ok(format!("ok {}", state.nonce))
}

/// Where the running binary was started from (for `execve` after it was replaced on disk).
pub fn binary_path() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("baton"))
}
