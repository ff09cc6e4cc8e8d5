//! Talking to systemd: `sd_notify` over the datagram socket in `NOTIFY_SOCKET` (a path or an
//! abstract address), the watchdog, and the fd store. A supervisor started by anything else has
//! no `NOTIFY_SOCKET`, and every call here does nothing.
//!
//! Written over a plain datagram socket rather than with a crate: the protocol is a few
//! `KEY=value` lines in one datagram (fds beside it for the fd store), documented in
//! sd_notify(3), and `nix` already gives the one `sendmsg` it needs.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket,
};
use tracing::debug;

/// Environment variables systemd sets for the supervisor that its generations must not see.
pub const SYSTEMD_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "FDSTORE",
];

pub struct Notifier {
    target: Option<(OwnedFd, UnixAddr)>,
    /// Half of `WATCHDOG_USEC`, when the watchdog is on.
    watchdog: Option<Duration>,
    /// Whether sockets go to the fd store.
    fd_store: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC`/`WATCHDOG_PID` and `FDSTORE`; `fd_store` forces
    /// the fd store on (systemd 252 does not set `FDSTORE`).
    pub fn from_env(fd_store: bool) -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_str()?.to_owned();
            let addr = match path.strip_prefix('@') {
                Some(name) => UnixAddr::new_abstract(name.as_bytes()).ok()?,
                None => UnixAddr::new(path.as_str()).ok()?,
            };
            let fd = socket(
                AddressFamily::Unix,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .ok()?;
            Some((fd, addr))
        });
        let ours = std::process::id().to_string();
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.parse::<u64>().ok())
            .filter(|usec| *usec > 0)
            .filter(|_| std::env::var("WATCHDOG_PID").map_or(true, |pid| pid == ours))
            .map(|usec| Duration::from_micros(usec / 2));
        let fd_store = target.is_some() && (fd_store || std::env::var_os("FDSTORE").is_some());
        Notifier {
            target,
            watchdog,
            fd_store,
        }
    }

    /// How often to ping the watchdog, if systemd asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.target.is_some())
    }

    /// Sends `state` (`KEY=value` lines) with `fds` beside it.
    pub fn send(&self, state: &str, fds: &[BorrowedFd<'_>]) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        if let Err(e) = sendmsg(
            socket.as_raw_fd(),
            &[IoSlice::new(state.as_bytes())],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(addr),
        ) {
            debug!("sd_notify failed: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(
            &format!(
                "READY=1\nSTATUS={}\nMAINPID={}",
                one_line(status),
                std::process::id()
            ),
            &[],
        );
    }

    pub fn reloading(&self) {
        self.send(
            &format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()),
            &[],
        );
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)), &[]);
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1", &[]);
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1", &[]);
    }

    /// Keeps `fd` in systemd's fd store under `name` (a supervisor restart gets it back in
    /// `LISTEN_FDS`).
    pub fn store_fd(&self, name: &str, fd: BorrowedFd<'_>) {
        if self.fd_store {
            self.send(&format!("FDSTORE=1\nFDNAME={name}"), &[fd]);
        }
    }

    /// Takes `name` out of the fd store.
    pub fn remove_fd(&self, name: &str) {
        if self.fd_store {
            self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), &[]);
        }
    }
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// When the next watchdog ping is due.
pub struct Watchdog {
    pub every: Duration,
    pub next: Instant,
}

/// A status for one `STATUS=` line: it quotes what generations and config files say (a
/// generation may run unprivileged, a config value may hold any character), and a line break
/// there would add fields of its own to the message (`MAINPID=`, `READY=1`...) on behalf of a
/// supervisor that may be root.
fn one_line(status: &str) -> String {
    status
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}
