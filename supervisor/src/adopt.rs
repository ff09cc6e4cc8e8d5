//! Adopting the generations a supervisor left serving when it died.
//!
//! A generation whose supervisor dies serves on, holding its listen sockets, and waits at the
//! rendezvous (see `restart_protocol::rendezvous`) for the next `baton run` of the instance.
//! That one, before it starts anything, connects there: each generation that accepts introduces
//! itself as at a spawn (`Hello`), hands over its listen sockets (`HeldSocket`) and says it is
//! `Ready`; it then is this supervisor's, and no connection was refused meanwhile.
//!
//! Who is at the other end: only a process holding the rendezvous's listening socket can accept
//! there, and only the active generation was given it. The pid it claims is checked to be a
//! process of the generations' user, so that the supervisor never signals another user's
//! process on its word.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use restart_protocol::rendezvous;
use restart_protocol::{
    Channel, FEATURE_BIND_SOCKET, FEATURES, PROTOCOL_VERSIONS, SocketKey, ToGeneration,
    ToSupervisor, negotiate,
};
use tracing::warn;

/// How long an orphan has for each step of its adoption.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// More orphans than this at one rendezvous is not a state baton makes.
const MOST: usize = 8;

/// A generation adopted at the rendezvous.
pub struct Orphan {
    pub epoch: u64,
    pub pid: u32,
    pub build: String,
    pub features: u64,
    pub channel: Channel,
    /// The listen sockets it holds, by key.
    pub sockets: Vec<(SocketKey, OwnedFd)>,
}

/// Adopts every generation waiting at the rendezvous at `path`, run by one of `uids`.
/// `bind_for_them`: this supervisor binds sockets for its generations (`supervisor.user`).
pub fn find(path: &Path, uids: &[u32], bind_for_them: bool) -> Vec<Orphan> {
    let mut found = Vec::new();
    while found.len() < MOST {
        let channel = match rendezvous::connect_to(path) {
            Ok(Some(channel)) => channel,
            Ok(None) => break,
            Err(e) => {
                warn!(
                    "cannot look for generations to adopt at {}: {e}",
                    path.display()
                );
                break;
            }
        };
        match adopt(channel, uids, bind_for_them) {
            Ok(orphan) => found.push(orphan),
            Err(e) => {
                warn!("did not adopt the generation at {}: {e}", path.display());
                break;
            }
        }
    }
    found
}

fn next(channel: &Channel) -> Result<restart_protocol::Received<ToSupervisor>, String> {
    rendezvous::recv_within::<ToSupervisor>(channel, STEP_TIMEOUT)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no answer within {STEP_TIMEOUT:?}"))
}

fn adopt(channel: Channel, uids: &[u32], bind_for_them: bool) -> Result<Orphan, String> {
    let ToSupervisor::Hello {
        versions,
        features,
        epoch,
        pid,
        build,
    } = next(&channel)?.msg
    else {
        return Err("it did not introduce itself".into());
    };
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .map_err(|e| format!("it claims pid {pid}, which is not running ({e})"))?;
    if !uids.contains(&owner) {
        let refusal =
            format!("pid {pid} runs as uid {owner}, not as a generation of this supervisor");
        let _ = channel.send(
            &ToGeneration::Refused {
                reason: refusal.clone(),
            },
            &[],
        );
        return Err(refusal);
    }
    let version = match negotiate(PROTOCOL_VERSIONS, versions) {
        Ok(version) => version,
        Err(e) => {
            let _ = channel.send(
                &ToGeneration::Refused {
                    reason: e.to_string(),
                },
                &[],
            );
            return Err(e.to_string());
        }
    };
    let offered = if bind_for_them {
        FEATURES
    } else {
        FEATURES & !FEATURE_BIND_SOCKET
    };
    let features = offered & features;
    channel
        .send(
            &ToGeneration::Welcome {
                version,
                features,
                supervisor_pid: std::process::id(),
            },
            &[],
        )
        .map_err(|e| e.to_string())?;
    let mut sockets = Vec::new();
    loop {
        let mut received = next(&channel)?;
        match received.msg {
            ToSupervisor::HeldSocket { key } => {
                let fd = received
                    .fds
                    .pop()
                    .ok_or_else(|| format!("no socket came with {key}"))?;
                sockets.push((key, fd));
            }
            ToSupervisor::Ready { sockets: keys } => {
                if keys.len() != sockets.len() || sockets.iter().any(|(k, _)| !keys.contains(k)) {
                    return Err("the sockets it listed are not those it handed over".into());
                }
                return Ok(Orphan {
                    epoch,
                    pid,
                    build,
                    features,
                    channel,
                    sockets,
                });
            }
            ToSupervisor::Load(_) => {}
            other => return Err(format!("it sent {other:?} while being adopted")),
        }
    }
}
