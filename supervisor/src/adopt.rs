//! Adopting the generations a supervisor left serving when it died.
//!
//! A generation whose supervisor dies serves on, holding its listen sockets, and waits at the
//! rendezvous (see `restart_protocol::rendezvous`) for the next `baton run` of the instance.
//! That one, before it starts anything, connects there: each generation that accepts introduces
//! itself as at a spawn (`Hello`), hands over its listen sockets (`HeldSocket`) and the config it
//! runs (`HeldConfig`), and says it is `Ready`; it then is this supervisor's, and no connection
//! was refused meanwhile.
//!
//! Who is at the other end: the rendezvous is a socket this user made in the control socket's
//! folder (its owner is checked before connecting), and only a process holding its listening
//! socket can accept there: the active generation it was given to. The pid a generation claims
//! must be a process of the generations' user (`supervisor.user`, else this supervisor's own),
//! never root's when generations run unprivileged, so that the supervisor never signals another
//! user's process on a generation's word.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use restart_protocol::rendezvous;
use restart_protocol::{
    Channel, DrainStrategy, FEATURE_BIND_SOCKET, FEATURES, PROTOCOL_VERSIONS, SocketKey,
    ToGeneration, ToSupervisor, negotiate,
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
    /// The config it runs (a sealed memfd), if it was started with one.
    pub config: Option<OwnedFd>,
}

/// What an orphan said while being adopted.
struct Said {
    epoch: u64,
    pid: u32,
    build: String,
    features: u64,
    sockets: Vec<(SocketKey, OwnedFd)>,
    config: Option<OwnedFd>,
}

/// Adopts every generation waiting at the rendezvous at `path`, run by `uid`.
/// `bind_for_them`: this supervisor binds sockets for its generations (`supervisor.user`).
pub fn find(path: &Path, uid: u32, bind_for_them: bool) -> Vec<Orphan> {
    match std::fs::symlink_metadata(path) {
        Err(_) => return Vec::new(),
        Ok(meta) => {
            let mine = nix::unistd::geteuid().as_raw();
            if !meta.file_type().is_socket() || meta.uid() != mine {
                warn!(
                    "{} is not a socket of uid {mine}: not looking for generations to adopt there (remove it)",
                    path.display()
                );
                return Vec::new();
            }
        }
    }
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
        match adopt(&channel, uid, bind_for_them) {
            Ok(said) => found.push(Orphan {
                epoch: said.epoch,
                pid: said.pid,
                build: said.build,
                features: said.features,
                channel,
                sockets: said.sockets,
                config: said.config,
            }),
            Err(e) => {
                // It drains when its adoption fails; tell it so too, in case it waits.
                let _ = channel.send(
                    &ToGeneration::Drain {
                        timeout_ms: 30_000,
                        strategy: DrainStrategy::Immediate,
                    },
                    &[],
                );
                warn!(
                    "did not adopt the generation at {}: {e}; it drains, and a new one starts",
                    path.display()
                );
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

fn refuse(channel: &Channel, reason: String) -> String {
    let _ = channel.send(
        &ToGeneration::Refused {
            reason: reason.clone(),
        },
        &[],
    );
    reason
}

fn adopt(channel: &Channel, uid: u32, bind_for_them: bool) -> Result<Said, String> {
    let ToSupervisor::Hello {
        versions,
        features,
        epoch,
        pid,
        build,
    } = next(channel)?.msg
    else {
        return Err("it did not introduce itself".into());
    };
    let owner = std::fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid())
        .map_err(|e| format!("it claims pid {pid}, which is not running ({e})"))?;
    if owner != uid {
        return Err(refuse(
            channel,
            format!("pid {pid} runs as uid {owner}, not as the generations' uid {uid}"),
        ));
    }
    let version =
        negotiate(PROTOCOL_VERSIONS, versions).map_err(|e| refuse(channel, e.to_string()))?;
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
    let mut config = None;
    loop {
        let mut received = next(channel)?;
        match received.msg {
            ToSupervisor::HeldSocket { key } => {
                let fd = received
                    .fds
                    .pop()
                    .ok_or_else(|| format!("no socket came with {key}"))?;
                sockets.push((key, fd));
            }
            ToSupervisor::HeldConfig => config = received.fds.pop(),
            ToSupervisor::Ready { sockets: keys } => {
                if keys.len() != sockets.len() || sockets.iter().any(|(k, _)| !keys.contains(k)) {
                    return Err("the sockets it listed are not those it handed over".into());
                }
                return Ok(Said {
                    epoch,
                    pid,
                    build,
                    features,
                    sockets,
                    config,
                });
            }
            ToSupervisor::Load(_) => {}
            other => return Err(format!("it sent {other:?} while being adopted")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(pid: u32) -> ToSupervisor {
        ToSupervisor::Hello {
            versions: PROTOCOL_VERSIONS,
            features: FEATURES,
            epoch: 3,
            pid,
            build: "test".into(),
        }
    }

    #[test]
    fn a_generation_claiming_another_users_pid_is_refused() {
        let (supervisor, generation) = Channel::pair().unwrap();
        // pid 1 is root's; the generations run as some other user.
        generation.send(&hello(1), &[]).unwrap();
        let e = adopt(&supervisor, 65_534, false).err().expect("refused");
        assert!(e.contains("not as the generations' uid 65534"), "{e}");
        let refusal = generation.recv::<ToGeneration>().unwrap().unwrap().msg;
        assert!(
            matches!(refusal, ToGeneration::Refused { .. }),
            "{refusal:?}"
        );
    }

    #[test]
    fn a_generation_hands_over_its_sockets_and_config_then_is_ready() {
        let (supervisor, generation) = Channel::pair().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        generation.send(&hello(std::process::id()), &[]).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let key = SocketKey::tcp(listener.local_addr().unwrap());
        let handed = std::thread::spawn(move || adopt(&supervisor, me, false));
        let welcome = rendezvous::recv_within::<ToGeneration>(&generation, STEP_TIMEOUT)
            .unwrap()
            .unwrap();
        assert!(matches!(welcome.msg, ToGeneration::Welcome { .. }));
        use std::os::fd::AsFd;
        generation
            .send(&ToSupervisor::HeldSocket { key }, &[listener.as_fd()])
            .unwrap();
        generation
            .send(&ToSupervisor::Ready { sockets: vec![key] }, &[])
            .unwrap();
        let said = handed.join().unwrap().unwrap();
        assert_eq!(said.epoch, 3);
        assert_eq!(said.sockets.len(), 1);
        assert!(said.config.is_none());
    }
}
