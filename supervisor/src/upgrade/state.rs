//! The state a supervisor hands to the program that replaces it ([`Inherited`]), and the
//! descriptors it names ([`HandedFds`]).

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;

use restart_protocol::{Load, SocketKey};
use serde::{Deserialize, Serialize};

use super::error::UpgradeError;
use crate::lifecycle::{Counts, State};

/// The version of [`Inherited`]; a new binary that does not read it is not executed.
pub const STATE_VERSION: u32 = 1;

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
    pub fn fds(&self) -> Vec<RawFd> {
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

    /// What is handed over.
    pub fn fds(&self) -> &[BorrowedFd<'a>] {
        &self.0
    }
}

/// The state as JSON, for the memfd and for a trial's standard input.
pub fn to_json(state: &Inherited) -> Result<Vec<u8>, UpgradeError> {
    serde_json::to_vec(state).map_err(UpgradeError::EncodeState)
}
