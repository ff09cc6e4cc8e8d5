//! One end of a `SOCK_SEQPACKET` socketpair: a message per datagram, fds beside it.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, getsockopt,
    recvmsg, sendmsg, socketpair, sockopt,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest encoded message.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most fds one message carries.
pub const MAX_FDS: usize = 8;
/// Most fds Linux passes with one message.
const SCM_MAX_FD: usize = 253;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The peer closed its end: it exited, or crashed.
    #[error("the peer closed the channel")]
    Closed,
    /// The peer sent something this side cannot decode: a bug, or a peer of another release.
    #[error("malformed message from the peer: {0}")]
    Malformed(String),
    /// A message larger than [`MAX_MESSAGE`] (sent or received).
    #[error("message of {0} bytes or more exceeds the {MAX_MESSAGE}-byte limit")]
    Oversize(usize),
    /// More fds than [`MAX_FDS`] beside one message.
    #[error("more than {MAX_FDS} file descriptors beside one message")]
    TooManyFds,
    /// The fd is not a `SOCK_SEQPACKET` socket.
    #[error("the control fd is not a SOCK_SEQPACKET socket")]
    NotSeqPacket,
    /// The system call failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A received message and the fds that came with it (close-on-exec, owned).
#[derive(Debug)]
pub struct Received<M> {
    pub msg: M,
    pub fds: Vec<OwnedFd>,
}

/// One end of the channel. Non-blocking: register it with an event loop and call
/// [`Channel::recv`] when it is readable.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair, both ends close-on-exec and non-blocking.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        )?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    /// Takes an inherited end (from [`crate::CONTROL_FD_ENV`]), checks that it is a seqpacket
    /// socket, and makes it non-blocking and close-on-exec.
    pub fn from_fd(fd: OwnedFd) -> Result<Channel, ChannelError> {
        match getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::SeqPacket) => {}
            Ok(_) => return Err(ChannelError::NotSeqPacket),
            Err(e) => return Err(ChannelError::Io(e.into())),
        }
        let flags =
            OFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
        fcntl(&fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
        Ok(Channel { fd })
    }

    /// Sends one message with `fds` beside it. A full socket buffer is an error
    /// (`WouldBlock`): messages are small and rare, so a peer that lets them pile up is stuck.
    pub fn send<M: Serialize>(&self, msg: &M, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        let bytes = postcard::to_stdvec(msg).map_err(|e| ChannelError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ChannelError::Oversize(bytes.len()));
        }
        if fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds);
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &[IoSlice::new(&bytes)],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN) => {
                    return Err(ChannelError::Closed);
                }
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
        }
    }

    /// Receives one message if one is waiting; `Ok(None)` if none is.
    #[allow(unsafe_code)] // Owning the descriptors the kernel installed (SCM_RIGHTS).
    pub fn recv<M: DeserializeOwned>(&self) -> Result<Option<Received<M>>, ChannelError> {
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        // Room for the most fds the kernel passes in one message (SCM_MAX_FD), so that an
        // excess is never truncated away by the kernel, where it could not be closed, but
        // received, owned, and closed by the refusal below.
        let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
        let (bytes, flags, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(r) => {
                    let mut fds = Vec::new();
                    for c in r.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for fd in raw {
                                // SAFETY: the kernel just installed `fd` in this process for
                                // us (SCM_RIGHTS); nothing else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                    break (r.bytes, r.flags, fds);
                }
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET) => return Err(ChannelError::Closed),
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
        };
        // Received fds are owned by `fds` from here on, and closed if we refuse the message.
        if flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > MAX_FDS {
            return Err(ChannelError::TooManyFds);
        }
        if flags.contains(MsgFlags::MSG_TRUNC) || bytes > MAX_MESSAGE {
            return Err(ChannelError::Oversize(bytes));
        }
        if bytes == 0 {
            // A seqpacket socket reads zero bytes only at end of stream; no message is empty.
            return Err(ChannelError::Closed);
        }
        let msg = decode(&buf[..bytes])?;
        Ok(Some(Received { msg, fds }))
    }
}

/// Decodes exactly one message from `bytes`: trailing bytes are an error. Public for the fuzz
/// targets (`fuzz/`), which feed it arbitrary bytes.
pub fn decode<M: DeserializeOwned>(bytes: &[u8]) -> Result<M, ChannelError> {
    match postcard::take_from_bytes::<M>(bytes) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(ChannelError::Malformed(format!(
            "{} bytes after the end of the message",
            rest.len()
        ))),
        Err(e) => Err(ChannelError::Malformed(e.to_string())),
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Channel> for OwnedFd {
    fn from(channel: Channel) -> OwnedFd {
        channel.fd
    }
}
