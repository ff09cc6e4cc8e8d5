//! The errors of a start: why `baton run` could not start or take over, and the two of its
//! steps whose caller acts on the kind (the control socket, sharing the stats region). A leaf:
//! the start's steps and the loop's `main` both name them, and it names neither.

use std::io;
use std::path::PathBuf;

use shm_stats::StatsError;

use crate::upgrade::HandoverError;

/// Why `baton run` could not start, or could not take over what the supervisor it replaced
/// handed over. Each says what is wrong and the way out.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file does not load: the operator fixes it (a fresh start exits 64).
    #[error("{0}")]
    Config(String),
    /// The launch handed over (the running config's text and the proxy binary) cannot be
    /// made again.
    #[error("{0}")]
    Launch(String),
    /// `supervisor.user` is set, but the supervisor was not started as root.
    #[error(
        "supervisor.user = \"{user}\": only a supervisor started as root can run generations as another user; start `baton run` as root (it binds the ports and starts generations as {user}), or leave supervisor.user out"
    )]
    NotRoot { user: String },
    /// The file at the stats path belongs to another user.
    #[error(
        "stats region {} belongs to uid {owner}, not to this supervisor's uid {me}; remove it, or set stats.path to a place of this user's",
        path.display()
    )]
    RegionNotOurs { path: PathBuf, owner: u32, me: u32 },
    /// The stats region cannot be made, opened or registered with.
    #[error(transparent)]
    Region(#[from] StatsError),
    /// The stats region cannot be given to the generations' group.
    #[error(transparent)]
    ShareRegion(#[from] ShareRegionError),
    /// The control socket cannot be made.
    #[error(transparent)]
    ControlSocket(#[from] ControlSocketError),
    /// The event loop cannot be made, or cannot watch what it must.
    #[error("cannot create the event loop: {0}")]
    EventLoop(#[source] io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] io::Error),
    #[error("cannot watch signals: {0}")]
    WatchSignals(#[source] io::Error),
    #[error("cannot watch the control socket: {0}")]
    WatchControl(#[source] io::Error),
    #[error("cannot watch generation {epoch}'s channel: {source}")]
    WatchChannel { epoch: u64, source: io::Error },
    /// What the replaced supervisor handed over cannot be taken over.
    #[error(transparent)]
    Handover(#[from] HandoverError),
}

/// Why the control socket could not be made at the start; each names the way out.
#[derive(Debug, thiserror::Error)]
pub enum ControlSocketError {
    /// Its folder did not exist and could not be made.
    #[error(
        "cannot create the folder of the control socket {}: {source}; set supervisor.control_socket to a writable place",
        socket.display()
    )]
    CreateFolder { socket: PathBuf, source: io::Error },
    /// Its folder could not be looked at.
    #[error("cannot look at the control socket's folder {}: {source}", folder.display())]
    InspectFolder { folder: PathBuf, source: io::Error },
    /// Its folder belongs to another user, who could put their own socket there.
    #[error(
        "the control socket's folder {} belongs to uid {owner}, not to this user (uid {me}): another user may have made it to take the control socket; remove it, or set supervisor.control_socket to a folder of yours",
        folder.display()
    )]
    FolderNotOurs {
        folder: PathBuf,
        owner: u32,
        me: u32,
    },
    /// Other users may write in its folder (and it is not sticky).
    #[error(
        "the control socket's folder {} is writable by other users (mode {mode:o}): they could put their own socket in its place; chmod go-w it, or set supervisor.control_socket to a folder of yours",
        folder.display()
    )]
    FolderWritable { folder: PathBuf, mode: u32 },
    /// A live supervisor listens there already.
    #[error(
        "another supervisor is listening on {}: stop it, or give this one another instance or supervisor.control_socket",
        socket.display()
    )]
    InUse { socket: PathBuf },
    /// The socket file of a supervisor that died could not be removed.
    #[error("cannot remove the stale control socket {}: {source}", socket.display())]
    RemoveStale { socket: PathBuf, source: io::Error },
    /// Binding failed.
    #[error(
        "cannot create the control socket {}: {source}; set supervisor.control_socket to a writable place",
        socket.display()
    )]
    Bind { socket: PathBuf, source: io::Error },
}

/// The stats region could not be given to the generations' group (`supervisor.user`).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot give the stats region {} to group {gid} of supervisor.user {user}: {source}; start `baton run` as root, with CAP_CHOWN, CAP_SETUID, CAP_SETGID and CAP_KILL (under systemd: in the unit's CapabilityBoundingSet, as the shipped unit has them)",
    path.display()
)]
pub struct ShareRegionError {
    pub(super) path: PathBuf,
    pub(super) gid: u32,
    pub(super) user: String,
    pub(super) source: nix::errno::Errno,
}
