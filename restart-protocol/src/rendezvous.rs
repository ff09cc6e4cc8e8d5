//! The rendezvous: where a new supervisor finds a generation whose supervisor died, to adopt
//! it instead of starting cold.
//!
//! The supervisor binds a listening `SOCK_SEQPACKET` socket beside its control socket and hands
//! it to the active generation (`ToGeneration::Rendezvous`). It never accepts on it itself: the
//! generation does, once its channel to the supervisor has closed, and only then. A new
//! supervisor for the same instance connects to the path: if a generation accepts, the
//! connection becomes that generation's channel (the handshake as at a spawn, then the listen
//! sockets it holds, `ToSupervisor::HeldSocket`, and `Ready`); a refused or absent socket means
//! nothing is left to adopt. Only the supervisor's user can connect (the socket file is mode
//! 0600 in the control socket's folder). Peer credentials cannot tell the supervisor who
//! accepted (`SO_PEERCRED` names whoever called `listen`), so the supervisor checks instead that
//! the socket file is its own and that the pid the generation claims runs as the generations'
//! user (`adopt.rs` in the supervisor).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, accept4, bind, connect, getsockopt,
    listen, socket, sockopt,
};
use serde::de::DeserializeOwned;

use crate::{Channel, ChannelError, Received};

/// The rendezvous path of a control socket: `<control socket>.adopt`.
pub fn path_for(control_socket: &Path) -> PathBuf {
    let mut path = control_socket.as_os_str().to_owned();
    path.push(".adopt");
    PathBuf::from(path)
}

/// Binds a new rendezvous at `path` (replacing what is there: a rendezvous of a supervisor
/// that is gone), mode 0600 from the start. Close-on-exec and non-blocking.
pub fn listen_at(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let address = UnixAddr::new(path)?;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = bind(fd.as_raw_fd(), &address);
    nix::sys::stat::umask(old);
    bound?;
    listen(&fd, Backlog::new(16).map_err(io::Error::from)?)?;
    Ok(fd)
}

/// Accepts one supervisor on a rendezvous, if one is waiting.
#[allow(unsafe_code)] // Owning the descriptor the kernel just made for this process.
pub fn accept(listener: &impl AsFd) -> io::Result<Option<Channel>> {
    match accept4(
        listener.as_fd().as_raw_fd(),
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    ) {
        Ok(fd) => {
            use std::os::fd::FromRawFd;
            // SAFETY: `accept4` just returned this descriptor; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Channel::from_fd(fd)
                .map(Some)
                .map_err(|e| io::Error::other(e.to_string()))
        }
        Err(Errno::EAGAIN | Errno::ECONNABORTED | Errno::EINTR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Connects to the rendezvous at `path`: `None` when nobody holds it (no file, or refused).
pub fn connect_to(path: &Path) -> io::Result<Option<Channel>> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let address = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &address) {
        Ok(()) => {}
        Err(Errno::ENOENT | Errno::ECONNREFUSED) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    Channel::from_fd(fd)
        .map(Some)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// The process (pid, uid) at the other end of a channel.
pub fn peer(channel: &Channel) -> io::Result<(u32, u32)> {
    let creds = getsockopt(channel, sockopt::PeerCredentials)?;
    Ok((u32::try_from(creds.pid()).unwrap_or(0), creds.uid()))
}

/// Waits up to `timeout` for the next message; `Ok(None)` when none came in time.
pub fn recv_within<M: DeserializeOwned>(
    channel: &Channel,
    timeout: Duration,
) -> Result<Option<Received<M>>, ChannelError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(received) = channel.recv()? {
            return Ok(Some(received));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(channel.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(ChannelError::Io(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ToGeneration, ToSupervisor};

    #[test]
    fn a_holder_of_the_rendezvous_is_reached_and_nobody_else() {
        let dir = std::env::temp_dir().join(format!("rendezvous-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = path_for(&dir.join("baton.sock"));
        assert!(
            connect_to(&path).unwrap().is_none(),
            "no file: nothing to adopt"
        );
        let listener = listen_at(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let supervisor = connect_to(&path).unwrap().expect("connected");
        let generation = accept(&listener).unwrap().expect("accepted");
        generation.send(&ToSupervisor::Draining, &[]).unwrap();
        let got = recv_within::<ToSupervisor>(&supervisor, Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(got.msg, ToSupervisor::Draining);
        assert_eq!(peer(&supervisor).unwrap().0, std::process::id());
        assert!(
            recv_within::<ToGeneration>(&generation, Duration::from_millis(10))
                .unwrap()
                .is_none()
        );
        drop(listener);
        assert!(connect_to(&path).unwrap().is_none(), "closed: refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
