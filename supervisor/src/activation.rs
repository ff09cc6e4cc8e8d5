//! Sockets systemd hands the supervisor at start (`LISTEN_FDS`, sd_listen_fds(3)): from a
//! `.socket` unit (socket activation), or from the fd store where an earlier run of the
//! supervisor kept its listen sockets. They seed the socket store.

use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{SockType, getsockopt, sockopt};
use restart_protocol::{Protocol, SocketKey};
use tracing::warn;

/// The first fd systemd passes.
const SD_LISTEN_FDS_START: i32 = 3;
/// The prefix of the names the supervisor gives sockets it puts in the fd store.
const STORE_PREFIX: &str = "baton_";

/// A socket systemd passed.
pub struct Passed {
    pub fd: OwnedFd,
    pub key: SocketKey,
    /// Its `FileDescriptorName`, unless it came back from our own fd store.
    pub name: Option<String>,
}

/// The name under which a socket goes to the fd store (`FDNAME` may not hold `:`).
pub fn store_name(key: &SocketKey) -> String {
    format!("{STORE_PREFIX}{}", key.to_string().replace(':', "_"))
}

fn from_store_name(name: &str) -> Option<SocketKey> {
    let text = name.strip_prefix(STORE_PREFIX)?.replace('_', ":");
    let rest = text.strip_prefix("tcp:")?;
    let (address, worker) = match rest.split_once('#') {
        Some((a, w)) => (a, Some(w.parse().ok()?)),
        None => (rest, None),
    };
    Some(SocketKey {
        protocol: Protocol::Tcp,
        address: address.parse().ok()?,
        worker,
    })
}

/// The sockets passed to this process, if `LISTEN_PID` names it.
#[allow(unsafe_code)] // Taking ownership of the fds systemd passed is what sd_listen_fds means.
pub fn passed() -> Vec<Passed> {
    let ours = std::process::id().to_string();
    if std::env::var("LISTEN_PID").ok().as_deref() != Some(ours.as_str()) {
        return Vec::new();
    }
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut passed = Vec::new();
    for i in 0..count.max(0) {
        let raw = SD_LISTEN_FDS_START + i;
        // SAFETY: systemd passed fds 3..3+LISTEN_FDS to this process (LISTEN_PID is ours), and
        // nothing in it has taken them before.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Not for the generations: they get sockets through the restart protocol.
        let _ = fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        let name = names.get(i as usize).cloned().filter(|n| !n.is_empty());
        match listen_address(&fd) {
            Ok(address) => {
                let (key, name) = match name.as_deref().and_then(from_store_name) {
                    Some(key) => (key, None),
                    None => (SocketKey::tcp(address), name),
                };
                passed.push(Passed { fd, key, name });
            }
            Err(reason) => {
                warn!(
                    fd = raw,
                    name = name.as_deref(),
                    "ignored a socket systemd passed: {reason}"
                )
            }
        }
    }
    passed
}

/// The address a passed fd listens on, if it is a listening TCP socket.
fn listen_address(fd: &OwnedFd) -> Result<SocketAddr, String> {
    match getsockopt(&fd.as_fd(), sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(other) => return Err(format!("it is a {other:?} socket, not TCP")),
        Err(e) => return Err(format!("it is not a socket ({e})")),
    }
    if !getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false) {
        return Err("it is not listening".into());
    }
    // A listening TCP socket (checked above): std reads its address.
    let copy = fd
        .try_clone()
        .map_err(|e| format!("cannot copy it ({e})"))?;
    std::net::TcpListener::from(copy)
        .local_addr()
        .map_err(|e| format!("cannot read its address ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_have_no_colon_and_come_back_as_keys() {
        for key in [
            SocketKey::tcp("127.0.0.1:8080".parse().unwrap()),
            SocketKey::tcp("[::1]:443".parse().unwrap()),
            SocketKey {
                worker: Some(3),
                ..SocketKey::tcp("0.0.0.0:80".parse().unwrap())
            },
        ] {
            let name = store_name(&key);
            assert!(!name.contains(':'), "{name}");
            assert_eq!(from_store_name(&name), Some(key));
        }
        assert_eq!(from_store_name("public"), None);
    }
}
