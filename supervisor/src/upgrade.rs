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

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use restart_protocol::{Load, SocketKey};
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::UPGRADE_FD_ENV;
use crate::lifecycle::{Counts, State, Waiter};

/// The version of [`Inherited`]; a new binary that does not read it is not executed.
pub const STATE_VERSION: u32 = 1;

/// Names the previous program's binary, kept open for a fallback.
pub const PREVIOUS_FD_ENV: &str = "BATON_UPGRADE_PREVIOUS_FD";
/// Set by a new program that could not take over, for the previous one it executes again.
pub const FAILED_ENV: &str = "BATON_UPGRADE_FAILED";
/// Asks `baton run` for a trial take-over (see the module's documentation).
pub const TRIAL_ENV: &str = "BATON_UPGRADE_TRIAL";

/// What `baton internal upgrade-check` prints: the state versions this binary reads, and that
/// it does trial take-overs.
pub fn check_answer() -> String {
    format!("{STATE_VERSION} trial")
}

/// Everything a supervisor hands to the program that replaces it. Fields added since the first
/// version have defaults, so that a newer program reads an older one's state and the other way
/// round.
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
    /// The running config's text (what the active generation was started from) and the proxy
    /// binary it runs: the new program's config, and its last good launch.
    #[serde(default)]
    pub last_good: Option<InheritedLaunch>,
    /// In-place upgrades so far, and the outcome of the last one.
    #[serde(default)]
    pub upgrades: u64,
    #[serde(default)]
    pub last_upgrade: Option<String>,
    /// A number the trial take-over answers with, to show it read this state.
    #[serde(default)]
    pub nonce: u64,
    /// The rendezvous's listening socket (see `adopt.rs`), if there is one.
    #[serde(default)]
    pub rendezvous_fd: Option<RawFd>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InheritedLaunch {
    pub config_source: String,
    pub binary_fd: RawFd,
    pub binary_path: PathBuf,
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
    /// The protocol features both sides have.
    #[serde(default)]
    pub features: u64,
    /// Adopted from a supervisor that died (not a child: its exit is seen on its channel).
    #[serde(default)]
    pub adopted: bool,
}

impl Inherited {
    pub fn counts(&self) -> Counts {
        Counts {
            reloads: self.counts.0,
            reload_failures: self.counts.1,
            crashes: self.counts.2,
        }
    }

    /// Every descriptor the state names.
    fn fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.control_fd, self.region_fd];
        fds.extend(self.sockets.iter().map(|(_, fd)| *fd));
        fds.extend(self.generations.iter().map(|g| g.channel_fd));
        fds.extend(self.last_good.as_ref().map(|l| l.binary_fd));
        fds.extend(self.rendezvous_fd);
        fds
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

/// Whether `upgrade-check`'s answer says the binary can take over: it reads this state's
/// version and does trial take-overs (a binary from before trials is not executed blind: one
/// that answers the check and then fails would end the supervisor).
pub fn read_check_answer(binary: &Path, answer: &str) -> Result<(), String> {
    let reads = answer
        .split_whitespace()
        .any(|v| v.parse::<u32>() == Ok(STATE_VERSION));
    if !reads {
        return Err(format!(
            "{} cannot take over from this supervisor (it reads state versions `{}`, this one writes {STATE_VERSION})",
            binary.display(),
            answer.trim()
        ));
    }
    if !answer.split_whitespace().any(|w| w == "trial") {
        return Err(format!(
            "{} cannot show that it can take over (it does no trial take-over: a build older than this one's upgrade protocol); restart the service to run it",
            binary.display()
        ));
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
        command.env_remove(crate::UPGRADE_FD_ENV);
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

/// The descriptors a state names, borrowed from their owners for as long as the state is being
/// handed over. Every number written into an [`Inherited`] is taken through [`HandedFds::hand`],
/// so that the numbers and the descriptors made to survive the exec are the same.
#[derive(Default)]
pub struct HandedFds<'a>(Vec<BorrowedFd<'a>>);

impl<'a> HandedFds<'a> {
    /// Adds `fd` to what is handed over; its number, for the state.
    pub fn hand(&mut self, fd: BorrowedFd<'a>) -> RawFd {
        self.0.push(fd);
        fd.as_raw_fd()
    }
}

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

/// The state as JSON, for the memfd and for a trial's standard input.
pub fn to_json(state: &Inherited) -> Result<Vec<u8>, String> {
    serde_json::to_vec(state).map_err(|e| format!("cannot write the state: {e}"))
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
) -> String {
    let memfd = match nix::sys::memfd::memfd_create(
        c"baton-upgrade",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    ) {
        Ok(fd) => fd,
        Err(e) => return format!("cannot create the state memfd: {e}"),
    };
    let mut file = std::fs::File::from(memfd);
    if let Err(e) = to_json(state).and_then(|json| {
        file.write_all(&json)
            .and_then(|()| file.flush())
            .map_err(|e| format!("cannot write the state: {e}"))
    }) {
        return e;
    }
    let mut fds = fds.0.clone();
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
            return format!("cannot hand fd {} over: {e}", fd.as_raw_fd());
        }
    }
    let mut extra = vec![(UPGRADE_FD_ENV, file.as_raw_fd().to_string())];
    if let Some(previous) = previous {
        extra.push((PREVIOUS_FD_ENV, previous.as_raw_fd().to_string()));
    }
    let error = execve(binary, args, &extra);
    restore(&fds);
    error
}

/// `execve` with this process's environment (without the upgrade's own variables) and `extra`.
/// Returns only with the reason it failed.
fn execve(binary: &Path, args: &[String], extra: &[(&str, String)]) -> String {
    let to_c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let built = (|| -> Result<(CString, Vec<CString>, Vec<CString>), String> {
        let path = to_c(&binary.to_string_lossy())?;
        let argv = args
            .iter()
            .map(|a| to_c(a))
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
            env.push(CString::new(pair).map_err(|e| e.to_string())?);
        }
        for (key, value) in extra {
            env.push(to_c(&format!("{key}={value}"))?);
        }
        Ok((path, argv, env))
    })();
    match built {
        Ok((path, argv, env)) => match nix::unistd::execve(&path, &argv, &env) {
            Ok(never) => match never {},
            Err(e) => format!("cannot execute {}: {e}", binary.display()),
        },
        Err(e) => e,
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
fn fd_from_env(name: &str) -> Option<Result<RawFd, String>> {
    let value = std::env::var(name).ok()?;
    Some((|| {
        let fd: RawFd = value
            .parse()
            .map_err(|_| format!("{name}={value} is not a descriptor number"))?;
        if fd < 3 {
            return Err(format!("{name}={value} is not a descriptor number"));
        }
        fcntl(unsafe_borrow(fd), FcntlArg::F_GETFD)
            .map_err(|e| format!("{name}={fd} is not open: {e}"))?;
        Ok(fd)
    })())
}

#[allow(unsafe_code)] // Borrowing a descriptor number handed over by the previous program.
fn unsafe_borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: only for descriptors the previous program handed over and that stay open until
    // `Handover::release` (or the exec of a fallback), past every use of the borrow.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// The state handed over by the supervisor this process replaced, if any.
pub fn inherited() -> Option<Result<Handover, String>> {
    let fd = match fd_from_env(UPGRADE_FD_ENV)? {
        Ok(fd) => fd,
        Err(e) => return Some(Err(e)),
    };
    Some((|| {
        let text = read_fd(fd).map_err(|e| format!("cannot read the handed-over state: {e}"))?;
        let state: Inherited = serde_json::from_slice(&text)
            .map_err(|e| format!("cannot understand the handed-over state: {e}"))?;
        if state.version != STATE_VERSION {
            return Err(format!(
                "the handed-over state is version {}, this supervisor reads {STATE_VERSION}",
                state.version
            ));
        }
        Ok(Handover { state, memfd: fd })
    })())
}

/// Reads a whole file from offset 0 without moving its offset.
fn read_fd(fd: RawFd) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let copy = unsafe_borrow(fd).try_clone_to_owned()?;
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
    fcntl(unsafe_borrow(fd), FcntlArg::F_GETFD).ok()?;
    unsafe_borrow(fd).try_clone_to_owned().ok()
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
            if fcntl(unsafe_borrow(fd), FcntlArg::F_GETFD).is_ok() {
                // SAFETY: handed over to this process, used by nothing here (it holds its own
                // copies), and closed once (deduplicated above).
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
}

/// This program could not take over: execute the previous one again, with the same state and
/// descriptors, telling it why. Returns only if that could not be done.
pub fn fall_back(reason: &str) -> String {
    let previous = match fd_from_env(PREVIOUS_FD_ENV) {
        Some(Ok(fd)) => fd,
        Some(Err(e)) => return e,
        None => return "the previous supervisor left no binary to go back to".into(),
    };
    let memfd = match fd_from_env(UPGRADE_FD_ENV) {
        Some(Ok(fd)) => fd,
        Some(Err(e)) => return e,
        None => return format!("{UPGRADE_FD_ENV} is not set"),
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
pub fn trial(config_path: &Path) -> Result<String, String> {
    let mut text = Vec::new();
    std::io::stdin()
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read the state: {e}"))?;
    let state: Inherited = serde_json::from_slice(&text)
        .map_err(|e| format!("cannot understand the handed-over state: {e}"))?;
    if state.version != STATE_VERSION {
        return Err(format!(
            "the handed-over state is version {}, this supervisor reads {STATE_VERSION}",
            state.version
        ));
    }
    // The config as the take-over finds it: handed over, else the file.
    match &state.last_good {
        Some(launch) => crate::config::parse(config_path, &launch.config_source).map(|_| ())?,
        None => crate::config::load(config_path).map(|_| ())?,
    }
    Ok(format!("ok {}", state.nonce))
}

/// Where the running binary was started from (for `execve` after it was replaced on disk).
pub fn binary_path() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("baton"))
}
