//! The restart protocol between the baton supervisor and its proxy generations.
//!
//! Each generation gets one end of a `SOCK_SEQPACKET` socketpair: one datagram is one message,
//! so framing comes free, and file descriptors travel beside a message with `SCM_RIGHTS`. Over it
//! a new generation introduces itself ([`ToSupervisor::Hello`], answered by
//! [`ToGeneration::Welcome`] after version negotiation), asks for its listen sockets and the stats
//! region by key, says when it is ready, and later is told to drain.
//!
//! Who depends on it: the supervisor (which registers the channel with its mio loop) and the proxy
//! (which wraps it in tokio's `AsyncFd`). It depends on neither, nor on any async runtime: a
//! [`Channel`] is a plain non-blocking fd.
//!
//! What it promises:
//! - Messages are encoded with `postcard` (serde, a frozen wire format), at most
//!   [`MAX_MESSAGE`] bytes, decoded strictly: trailing bytes, oversize or truncated datagrams and
//!   unknown variants are [`ChannelError`] values, never panics.
//! - Versions are negotiated, not matched exactly: each side sends the range it speaks, and the
//!   highest version both speak wins ([`negotiate`]).
//! - A peer that closes its end is reported as [`ChannelError::Closed`], an event like any other.

// Unsafe only where descriptors pass between processes, each place allowed by name: taking
// ownership of the descriptors a message brought (`Channel::recv`) and of an accepted connection
// (`rendezvous::accept`). The modules without it (`listen`, `messages`, `version`) forbid it.
#![deny(unsafe_code)]

mod channel;
pub mod listen;
mod messages;
pub mod rendezvous;
mod version;

pub use channel::{Channel, ChannelError, MAX_FDS, MAX_MESSAGE, Received, decode};
pub use messages::{DrainStrategy, Load, Protocol, SocketKey, ToGeneration, ToSupervisor};
pub use version::{
    FEATURE_ADOPT, FEATURE_BIND_SOCKET, FEATURE_DRAIN_REQUEST, FEATURES, NoCommonVersion,
    PROTOCOL_VERSIONS, VersionRange, negotiate,
};

/// The environment variable that tells a generation which fd is its end of the channel.
pub const CONTROL_FD_ENV: &str = "BATON_CONTROL_FD";

/// The environment variable that tells a generation which fd holds its config file's bytes, as
/// the supervisor read them (a sealed memfd): the generation parses those, not the file on disk,
/// whose path it is still given for messages and relative paths.
pub const CONFIG_FD_ENV: &str = "BATON_CONFIG_FD";

/// The environment variable that tells a generation to log JSON objects (`json`) like its
/// supervisor, rather than text.
pub const LOG_FORMAT_ENV: &str = "BATON_LOG_FORMAT";
