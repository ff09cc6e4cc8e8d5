//! Starting a generation: find `baton-proxy` on disk (again at every spawn, so that a replaced
//! binary is picked up) and run it with its end of the control channel as fd 3.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use restart_protocol::{CONTROL_FD_ENV, Channel};

use crate::config::RunAs;

/// The fd number a generation finds its channel at.
const CHILD_CONTROL_FD: i32 = 3;

/// Where `baton-proxy` is: the configured path, else beside the running `baton`.
pub fn proxy_binary(configured: Option<&Path>) -> Result<PathBuf, String> {
    let (candidate, how) = match configured {
        Some(path) => (path.to_owned(), "supervisor.proxy_binary in the config"),
        None => {
            let exe = std::env::current_exe().map_err(|e| {
                format!("cannot tell where baton itself is ({e}); set supervisor.proxy_binary")
            })?;
            let dir = exe.parent().unwrap_or(Path::new("/"));
            (dir.join("baton-proxy"), "beside baton")
        }
    };
    match std::fs::metadata(&candidate) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(candidate),
        Ok(_) => Err(format!(
            "{} ({how}) is not an executable file; fix its permissions or set supervisor.proxy_binary",
            candidate.display()
        )),
        Err(e) => Err(format!(
            "baton-proxy not found: looked for {} ({how}): {e}; install baton-proxy there or set supervisor.proxy_binary",
            candidate.display()
        )),
    }
}

/// Starts `binary --config CONFIG --epoch EPOCH` with the other end of a fresh channel as fd 3,
/// as `run_as` when given (std drops the supplementary groups, then sets the group and user:
/// the generation can never become root again), and unable to gain privileges through exec.
#[allow(unsafe_code)] // pre_exec: the child must get the channel at a known fd number.
pub fn spawn(
    binary: &Path,
    config: &Path,
    epoch: u64,
    run_as: Option<&RunAs>,
) -> std::io::Result<(Child, Channel)> {
    let (ours, theirs) = Channel::pair()?;
    let theirs = OwnedFd::from(theirs);
    let raw = theirs.as_raw_fd();
    let mut command = Command::new(binary);
    command
        .arg("--config")
        .arg(config)
        .arg("--epoch")
        .arg(epoch.to_string())
        .env(CONTROL_FD_ENV, CHILD_CONTROL_FD.to_string())
        .env_remove(crate::UPGRADE_FD_ENV)
        .stdin(Stdio::null());
    // systemd's variables are for the supervisor (its main pid) alone.
    for var in crate::notify::SYSTEMD_ENV {
        command.env_remove(var);
    }
    let own_session = run_as.is_some();
    if let Some(run_as) = run_as {
        command.uid(run_as.uid).gid(run_as.gid);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, fcntl,
    // prctl and setsid, which are async-signal-safe; it touches no memory of the parent but the copied `raw`.
    unsafe {
        command.pre_exec(move || {
            // No setuid binary or file capability can raise what the generation may do.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            // An unprivileged generation loses root's terminal (it could push input into it).
            if own_session && libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if raw == CHILD_CONTROL_FD {
                // Already in place: clear close-on-exec, which dup2 would have cleared.
                if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, CHILD_CONTROL_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    // The child has its copy; ours must go, so that the channel closes when the child dies.
    drop(theirs);
    Ok((child, ours))
}
