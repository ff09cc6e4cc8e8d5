//! The messages, one enum per direction. Each variant says who sends it and when.

#![forbid(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::version::VersionRange;

/// The transport of a listen socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
}

/// How the supervisor's socket store names a listen socket: `tcp:127.0.0.1:8080`, with a worker
/// index when a listener has one socket per worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SocketKey {
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub worker: Option<u32>,
}

impl SocketKey {
    pub fn tcp(address: SocketAddr) -> SocketKey {
        SocketKey {
            protocol: Protocol::Tcp,
            address,
            worker: None,
        }
    }
}

impl fmt::Display for SocketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "tcp",
        };
        write!(f, "{protocol}:{}", self.address)?;
        if let Some(worker) = self.worker {
            write!(f, "#{worker}")?;
        }
        Ok(())
    }
}

/// How a draining generation lets its connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DrainStrategy {
    /// Each HTTP/1.1 answer carries `Connection: close` with a probability that grows over the
    /// drain time, so clients reconnect spread out, not in one storm (Envoy's default).
    Gradual,
    /// Every answer carries `Connection: close` from the start.
    Immediate,
}

impl DrainStrategy {
    /// The name the config file uses, for logs.
    pub fn name(self) -> &'static str {
        match self {
            DrainStrategy::Gradual => "gradual",
            DrainStrategy::Immediate => "immediate",
        }
    }
}

/// What a generation holds, reported while it runs and while it drains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Downstream connections open.
    pub connections: u64,
    /// Requests received and not yet answered in full.
    pub requests: u64,
}

/// From a generation to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToSupervisor {
    /// The generation's first message: who it is and which protocol versions it speaks.
    /// Answered by `Welcome` or `Refused`.
    Hello {
        versions: VersionRange,
        features: u64,
        epoch: u64,
        pid: u32,
        /// The build id of the binary, so an upgrade shows in `baton status`.
        build: String,
    },
    /// Asks for a listen socket by key. Answered by `Socket` (the fd attached) or `NotFound`.
    GetSocket { id: u32, key: SocketKey },
    /// Hands over a socket the generation bound after `NotFound` (the fd attached), so that the
    /// next generation gets it and it outlives this one. Answered by `Deposited`.
    DepositSocket { id: u32, key: SocketKey },
    /// Asks for the stats region. Answered by `StatsRegion` (the fd attached).
    GetStatsRegion { id: u32 },
    /// Initialised and accepting on `sockets`, every key it uses. The supervisor now makes it
    /// the active generation and drains the previous one.
    Ready { sockets: Vec<SocketKey> },
    /// Cannot start; `reason` is for the operator (a config error with its line, a bind error).
    /// The generation exits after sending it.
    Failed { reason: String },
    /// What it holds, sent about twice a second.
    Load(Load),
    /// Told to drain, it no longer accepts on any socket: from now on only newer generations
    /// take new connections. The supervisor answers `baton reload` only after this.
    Draining,
    /// Done draining (or stopped), about to exit.
    Exiting { connections_left: u64 },
    /// Asks for a socket systemd passed under `FileDescriptorName=name` (socket activation).
    /// Answered by `Socket` (the fd attached, with its key) or `Error`.
    GetNamedSocket { id: u32, name: String },
    /// The generation's admin was asked to drain it (`/drain_listeners`): the supervisor drains
    /// it as `baton drain` does, with `Drain`. Sent only when both sides have
    /// [`FEATURE_DRAIN_REQUEST`](crate::FEATURE_DRAIN_REQUEST).
    DrainRequested,
    /// Asks the supervisor to bind a listen socket this generation may not bind itself (a port
    /// below 1024, the generation running as an unprivileged user). Answered by `Socket` (the
    /// fd attached; the supervisor stores it) or `Error`. Sent only when both sides have
    /// [`FEATURE_BIND_SOCKET`](crate::FEATURE_BIND_SOCKET).
    BindSocket {
        id: u32,
        key: SocketKey,
        backlog: u32,
    },
    /// A generation being adopted by a new supervisor (at the rendezvous, see
    /// [`crate::rendezvous`]) hands over a listen socket it holds (the fd attached), after the
    /// handshake and before its `Ready`, which lists every key. Sent only when both sides have
    /// [`FEATURE_ADOPT`](crate::FEATURE_ADOPT).
    HeldSocket { key: SocketKey },
    /// A generation being adopted hands over the config it runs (the fd attached: the sealed
    /// memfd it was started with), so that a crash of it is replaced from that config, not from
    /// the file on disk. Sent, when it has one, before its `Ready`.
    HeldConfig,
}

/// From the supervisor to a generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToGeneration {
    /// Accepts a `Hello` at the negotiated `version`, with the features both sides have.
    Welcome {
        version: u16,
        features: u64,
        supervisor_pid: u32,
    },
    /// Refuses a `Hello` (no common version); the generation exits.
    Refused { reason: String },
    /// The socket asked for by `GetSocket` (the fd attached).
    Socket { id: u32, key: SocketKey },
    /// No socket under that key: the generation binds it and deposits it.
    NotFound { id: u32, key: SocketKey },
    /// A deposited socket is in the store.
    Deposited { id: u32 },
    /// The stats region (the fd attached), and where it lives, for logs.
    StatsRegion { id: u32, path: String },
    /// Stop accepting and drain, closing what is left after `timeout_ms`.
    Drain {
        timeout_ms: u64,
        strategy: DrainStrategy,
    },
    /// Close every connection now and exit.
    Stop,
    /// Reopen the access logs (log rotation).
    ReopenLogs,
    /// A request the supervisor could not serve, with the reason.
    Error { id: u32, message: String },
    /// The rendezvous (the fd attached: a listening socket), sent to the generation that becomes
    /// active: should the supervisor die, the generation serves on and lets the next one adopt
    /// it there. A generation told to drain closes it. Sent only when both sides have
    /// [`FEATURE_ADOPT`](crate::FEATURE_ADOPT).
    Rendezvous,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_keys_read_like_addresses() {
        let key = SocketKey::tcp("127.0.0.1:8080".parse().unwrap());
        assert_eq!(key.to_string(), "tcp:127.0.0.1:8080");
        let sharded = SocketKey {
            worker: Some(3),
            ..SocketKey::tcp("[::1]:443".parse().unwrap())
        };
        assert_eq!(sharded.to_string(), "tcp:[::1]:443#3");
    }
}
