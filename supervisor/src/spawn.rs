//! Starting a generation: run the binary of its [`Launch`] (found on disk again at every reload,
//! so that a replaced binary is picked up; see `launch.rs`) with its end of the control channel
//! as fd 3 and its config's bytes as fd 4.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use restart_protocol::{CONFIG_FD_ENV, CONTROL_FD_ENV, Channel};

use crate::config::RunAs;
use crate::launch::Launch;

/// The fd number a generation finds its channel at.
const CHILD_CONTROL_FD: i32 = 3;
/// The fd number a generation finds its config's bytes at.
const CHILD_CONFIG_FD: i32 = 4;
/// Descriptors a spawn moves around are first copied to this number or above.
const HIGH_FD: i32 = 10;

/// Starts the launch's binary as `--config CONFIG --epoch EPOCH`, with the other end of a fresh
/// channel as fd 3 and the launch's config bytes as fd 4, as `run_as` when given (std drops the
/// supplementary groups, then sets the group and user: the generation can never become root
/// again), and unable to gain privileges through exec.
///
/// The binary is executed through the descriptor the launch holds (`/proc/self/fd/N`), so that
/// a launch kept for replacing a crashed generation runs the binary it was taken with even if
/// the file on disk was replaced since.
#[allow(unsafe_code)] // pre_exec: the child must get its descriptors at known numbers.
pub fn spawn(
    launch: &Launch,
    epoch: u64,
    run_as: Option<&RunAs>,
) -> std::io::Result<(Child, Channel)> {
    let (ours, theirs) = Channel::pair()?;
    let theirs = OwnedFd::from(theirs);
    let channel_raw = theirs.as_raw_fd();
    let config_raw = launch.config_fd.as_raw_fd();
    // The binary's descriptor, above the numbers the child's own are moved to, so that moving
    // them cannot overwrite it.
    let binary = nix::fcntl::fcntl(
        launch.binary.as_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD),
    )
    .map_err(std::io::Error::from)?;
    let binary_raw = binary;
    // SAFETY: fcntl just made this descriptor; nothing else owns it.
    let binary = unsafe { OwnedFd::from_raw_fd(binary) };
    let through_fd = Path::new("/proc/self/fd").is_dir();
    let script = launch.script;
    let program = if through_fd {
        PathBuf::from(format!("/proc/self/fd/{binary_raw}"))
    } else {
        launch.binary_path.clone()
    };
    let mut command = Command::new(&program);
    command
        .arg0(&launch.binary_path)
        .arg("--config")
        .arg(&launch.config.path)
        .arg("--epoch")
        .arg(epoch.to_string())
        .env(CONTROL_FD_ENV, CHILD_CONTROL_FD.to_string())
        .env(CONFIG_FD_ENV, CHILD_CONFIG_FD.to_string())
        .env_remove(crate::env::UPGRADE_FD_ENV)
        .env_remove(crate::upgrade::PREVIOUS_FD_ENV)
        .env_remove(crate::upgrade::FAILED_ENV)
        .stdin(Stdio::null());
    if crate::env::LOG_JSON.load(std::sync::atomic::Ordering::Relaxed) {
        command.env(restart_protocol::LOG_FORMAT_ENV, "json");
    }
    // systemd's variables are for the supervisor (its main pid) alone.
    for var in crate::notify::SYSTEMD_ENV {
        command.env_remove(var);
    }
    let own_session = run_as.is_some();
    if let Some(run_as) = run_as {
        command.uid(run_as.uid).gid(run_as.gid);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, fcntl,
    // prctl and setsid, which are async-signal-safe; it touches no memory of the parent but the
    // copied descriptor numbers.
    unsafe {
        command.pre_exec(move || {
            let check = |r: libc::c_int| {
                if r == -1 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r)
                }
            };
            // No setuid binary or file capability can raise what the generation may do.
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            // An unprivileged generation loses root's terminal (it could push input into it).
            if own_session {
                check(libc::setsid())?;
            }
            // Copies above the target numbers first, so that placing one cannot overwrite the
            // other; dup2 leaves the targets open across exec.
            let channel = check(libc::fcntl(channel_raw, libc::F_DUPFD_CLOEXEC, HIGH_FD))?;
            let config = check(libc::fcntl(config_raw, libc::F_DUPFD_CLOEXEC, HIGH_FD))?;
            check(libc::dup2(channel, CHILD_CONTROL_FD))?;
            check(libc::dup2(config, CHILD_CONFIG_FD))?;
            if through_fd && script {
                // A script's interpreter opens `/proc/self/fd/N` after the exec; a binary is
                // opened by the exec itself, and its descriptor closes then.
                check(libc::fcntl(binary_raw, libc::F_SETFD, 0))?;
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    // The child has its copies; ours must go, so that the channel closes when the child dies.
    drop(theirs);
    drop(binary);
    Ok((child, ours))
}
