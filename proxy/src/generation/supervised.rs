//! The proxy's side of the restart protocol, when a supervisor started it: the handshake, the
//! listen sockets and stats region fetched by key, and the messages that drive its life.

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use restart_protocol::{
    CONFIG_FD_ENV, CONTROL_FD_ENV, Channel, ChannelError, FEATURE_BIND_SOCKET, FEATURES,
    PROTOCOL_VERSIONS, Received, SocketKey, ToGeneration, ToSupervisor, VersionRange,
};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info};

use super::listen;
use crate::config::Config;

/// The channel named by `BATON_CONTROL_FD`, if the proxy was started by a supervisor.
#[allow(unsafe_code)] // Taking ownership of an inherited fd is what the OS demands here.
pub fn channel_from_env() -> Result<Option<Channel>, String> {
    let Some(value) = std::env::var_os(CONTROL_FD_ENV) else {
        return Ok(None);
    };
    let fd: i32 = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd >= 3)
        .ok_or_else(|| format!("{CONTROL_FD_ENV}={value:?} is not a file descriptor number"))?;
    // The fd must be open: checking before taking ownership keeps a stray variable from making
    // us own (and later close) a number that means something else.
    nix::fcntl::fcntl(
        // SAFETY: a borrowed fd only for this one check; F_GETFD fails cleanly on a closed fd.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(|e| {
        format!("{CONTROL_FD_ENV}={fd} is not open ({e}); is this process started by `baton run`?")
    })?;
    // SAFETY: the supervisor passed this fd to us (the variable names it) and nothing else in
    // this process has taken it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Channel::from_fd(fd)
        .map(Some)
        .map_err(|e| format!("{CONTROL_FD_ENV}: {e}"))
}

/// The config's bytes as the supervisor read them, from the memfd named by `BATON_CONFIG_FD`,
/// if the proxy was started by a supervisor that sends them (see `restart_protocol::CONFIG_FD_ENV`).
/// The memfd is kept (returned beside the text), to be handed to a supervisor that adopts this
/// generation.
#[allow(unsafe_code)] // Taking ownership of an inherited fd is what the OS demands here.
pub fn config_from_env() -> Result<Option<(String, OwnedFd)>, String> {
    use std::os::unix::fs::FileExt;
    let Some(value) = std::env::var_os(CONFIG_FD_ENV) else {
        return Ok(None);
    };
    let fd: i32 = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .filter(|fd| *fd >= 3)
        .ok_or_else(|| format!("{CONFIG_FD_ENV}={value:?} is not a file descriptor number"))?;
    nix::fcntl::fcntl(
        // SAFETY: a borrowed fd only for this one check; F_GETFD fails cleanly on a closed fd.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .map_err(|e| {
        format!("{CONFIG_FD_ENV}={fd} is not open ({e}); is this process started by `baton run`?")
    })?;
    // SAFETY: the supervisor passed this fd to us (the variable names it) and nothing else in
    // this process has taken it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Close-on-exec: nothing this process runs needs it.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| format!("{CONFIG_FD_ENV}: {e}"))?;
    // Read from offset 0 with pread: the file's offset is shared with every generation
    // started from the same copy.
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file
            .read_at(&mut buf, bytes.len() as u64)
            .map_err(|e| format!("{CONFIG_FD_ENV}: cannot read the config: {e}"))?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(bytes)
        .map(|text| Some((text, OwnedFd::from(file))))
        .map_err(|e| format!("{CONFIG_FD_ENV}: the config is not UTF-8: {e}"))
}

/// Debug builds only: the protocol versions a generation offers, as `MIN-MAX`, in place of its
/// own, so that the system tests can run a proxy that speaks another release's protocol.
#[cfg(debug_assertions)]
const TEST_VERSIONS_ENV: &str = "BATON_TEST_PROTOCOL_VERSIONS";

/// The protocol versions this generation offers in its hello.
fn offered_versions() -> VersionRange {
    #[cfg(debug_assertions)]
    if let Some(value) = std::env::var_os(TEST_VERSIONS_ENV) {
        let range = value.to_str().and_then(|v| {
            let (min, max) = v.split_once('-')?;
            Some(VersionRange {
                min: min.parse().ok()?,
                max: max.parse().ok()?,
            })
        });
        match range {
            Some(range) => {
                tracing::warn!(
                    ?range,
                    "{TEST_VERSIONS_ENV}: offering other protocol versions"
                );
                return range;
            }
            None => tracing::warn!("{TEST_VERSIONS_ENV}={value:?} is not MIN-MAX; ignored"),
        }
    }
    PROTOCOL_VERSIONS
}

/// A handshaken channel to the supervisor.
pub struct Link {
    channel: AsyncFd<Channel>,
    next_id: u32,
    /// The features both sides have (see `restart_protocol::FEATURES`).
    pub features: u64,
}

impl Link {
    /// Introduces this generation and waits for the supervisor's welcome.
    #[allow(unsafe_code)] // Registering an fd with the reactor is unsafe in tokio's API.
    pub async fn handshake(channel: Channel, epoch: u64) -> Result<Link, String> {
        // SAFETY: a Channel owns its fd (an OwnedFd), keeps it open for its whole life and
        // always returns the same number from as_raw_fd.
        let registered = unsafe { AsyncFd::register(channel) };
        let mut link = Link {
            channel: registered.map_err(|e| format!("cannot watch the control channel: {e}"))?,
            next_id: 1,
            features: 0,
        };
        link.send(&ToSupervisor::Hello {
            versions: offered_versions(),
            features: FEATURES,
            epoch,
            pid: std::process::id(),
            build: super::admin::BUILD_ID.to_owned(),
        })?;
        match link
            .recv()
            .await
            .map_err(|e| format!("no welcome from the supervisor: {e}"))?
            .msg
        {
            ToGeneration::Welcome {
                version,
                supervisor_pid,
                features,
            } => {
                info!(epoch, version, supervisor_pid, "joined the supervisor");
                link.features = features;
                Ok(link)
            }
            ToGeneration::Refused { reason } => {
                Err(format!("the supervisor refused this generation: {reason}"))
            }
            other => Err(format!("the supervisor answered the hello with {other:?}")),
        }
    }

    /// Lets a new supervisor, connected at the rendezvous, adopt this generation: the handshake
    /// as at a spawn, then every listen socket it holds (`HeldSocket`). The caller then closes
    /// its rendezvous (so that the supervisor, looking for more, is refused at once) and sends
    /// [`Link::adopted`], after which the supervisor takes it for its active generation.
    pub async fn adopting(
        channel: Channel,
        epoch: u64,
        held: &[(SocketKey, OwnedFd)],
        config: Option<&OwnedFd>,
    ) -> Result<Link, String> {
        let link = Link::handshake(channel, epoch).await?;
        if link.features & restart_protocol::FEATURE_ADOPT == 0 {
            return Err("the supervisor does not adopt generations".into());
        }
        for (key, fd) in held {
            link.channel
                .get_ref()
                .send(&ToSupervisor::HeldSocket { key: *key }, &[fd.as_fd()])
                .map_err(|e| format!("cannot hand socket {key} over: {e}"))?;
        }
        if let Some(config) = config {
            link.channel
                .get_ref()
                .send(&ToSupervisor::HeldConfig, &[config.as_fd()])
                .map_err(|e| format!("cannot hand the config over: {e}"))?;
        }
        Ok(link)
    }

    /// The end of an adoption (see [`Link::adopting`]): `Ready`, with every key handed over.
    pub fn adopted(&self, held: &[(SocketKey, OwnedFd)]) -> Result<(), String> {
        self.send(&ToSupervisor::Ready {
            sockets: held.iter().map(|(key, _)| *key).collect(),
        })
    }

    pub fn send(&self, msg: &ToSupervisor) -> Result<(), String> {
        self.channel
            .get_ref()
            .send(msg, &[])
            .map_err(|e| format!("cannot talk to the supervisor: {e}"))
    }

    /// The next message from the supervisor.
    pub async fn recv(&self) -> Result<Received<ToGeneration>, ChannelError> {
        loop {
            let mut guard = self.channel.readable().await?;
            let got = guard.try_io(|c| match c.get_ref().recv() {
                Ok(Some(received)) => Ok(Ok(received)),
                Ok(None) => Err(std::io::ErrorKind::WouldBlock.into()),
                Err(ChannelError::Io(e)) => Err(e),
                Err(other) => Ok(Err(other)),
            });
            match got {
                Ok(Ok(result)) => return result,
                Ok(Err(e)) => return Err(ChannelError::Io(e)),
                // Not readable after all; the guard cleared readiness, so wait again.
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends a request and waits for the answer with its id. Messages of another kind while
    /// starting up mean the supervisor gave up on this generation.
    async fn request(
        &mut self,
        make: impl FnOnce(u32) -> ToSupervisor,
    ) -> Result<Received<ToGeneration>, String> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&make(id))?;
        let received = self
            .recv()
            .await
            .map_err(|e| format!("lost the supervisor while starting: {e}"))?;
        let answered = match &received.msg {
            ToGeneration::Socket { id: got, .. }
            | ToGeneration::NotFound { id: got, .. }
            | ToGeneration::Deposited { id: got }
            | ToGeneration::StatsRegion { id: got, .. }
            | ToGeneration::Error { id: got, .. } => *got == id,
            _ => false,
        };
        if !answered {
            return Err(format!(
                "the supervisor sent {:?} while this generation was starting",
                received.msg
            ));
        }
        if let ToGeneration::Error { message, .. } = &received.msg {
            return Err(format!("the supervisor refused a request: {message}"));
        }
        Ok(received)
    }

    /// The stats region the supervisor created.
    pub async fn stats_region(&mut self) -> Result<(File, PathBuf), String> {
        let mut received = self
            .request(|id| ToSupervisor::GetStatsRegion { id })
            .await?;
        let ToGeneration::StatsRegion { path, .. } = received.msg else {
            return Err("the supervisor did not send the stats region".into());
        };
        let fd = received
            .fds
            .pop()
            .ok_or("the supervisor sent no file with the stats region")?;
        Ok((File::from(fd), PathBuf::from(path)))
    }

    /// The socket stored under `key`, or one bound here and deposited for the generations to
    /// come.
    pub async fn listen_socket(
        &mut self,
        key: SocketKey,
        backlog: u32,
    ) -> Result<TcpListener, String> {
        let mut received = self
            .request(|id| ToSupervisor::GetSocket { id, key })
            .await?;
        if let ToGeneration::Socket { .. } = received.msg {
            let fd = received
                .fds
                .pop()
                .ok_or_else(|| format!("the supervisor sent no socket for {key}"))?;
            let listener = TcpListener::from(fd);
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("socket {key}: {e}"))?;
            debug!(%key, "listen socket from the supervisor");
            return Ok(listener);
        }
        let listener = match listen::bind_tcp(key.address, backlog) {
            Ok(listener) => listener,
            Err(e)
                if e.kind() == std::io::ErrorKind::PermissionDenied
                    && self.features & FEATURE_BIND_SOCKET != 0 =>
            {
                // Running as an unprivileged user: the supervisor binds it, and keeps it.
                let mut received = self
                    .request(|id| ToSupervisor::BindSocket { id, key, backlog })
                    .await?;
                let fd = match received.msg {
                    ToGeneration::Socket { .. } => received.fds.pop(),
                    _ => None,
                }
                .ok_or_else(|| format!("the supervisor sent no socket for {key}"))?;
                let listener = TcpListener::from(fd);
                listener
                    .set_nonblocking(true)
                    .map_err(|e| format!("socket {key}: {e}"))?;
                debug!(%key, "listen socket bound by the supervisor");
                return Ok(listener);
            }
            Err(e) => {
                return Err(format!(
                    "cannot listen on {}: {e}; {}",
                    key.address,
                    listen::bind_advice(&e)
                ));
            }
        };
        let deposited = self
            .request_with_fd(
                |id| ToSupervisor::DepositSocket { id, key },
                listener.as_fd(),
            )
            .await?;
        if !matches!(deposited.msg, ToGeneration::Deposited { .. }) {
            return Err(format!("the supervisor did not take socket {key}"));
        }
        debug!(%key, "listen socket bound and deposited");
        Ok(listener)
    }

    /// The socket systemd passed under `FileDescriptorName=name`, and its key.
    pub async fn named_socket(&mut self, name: &str) -> Result<(TcpListener, SocketKey), String> {
        let name = name.to_owned();
        let mut received = self
            .request(|id| ToSupervisor::GetNamedSocket { id, name })
            .await?;
        let ToGeneration::Socket { key, .. } = received.msg else {
            return Err("the supervisor sent no socket".into());
        };
        let fd = received
            .fds
            .pop()
            .ok_or("the supervisor sent no socket with its answer")?;
        let listener = TcpListener::from(fd);
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("socket {key}: {e}"))?;
        Ok((listener, key))
    }

    async fn request_with_fd(
        &mut self,
        make: impl FnOnce(u32) -> ToSupervisor,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Received<ToGeneration>, String> {
        let id = self.next_id;
        let msg = make(id);
        self.channel
            .get_ref()
            .send(&msg, &[fd])
            .map_err(|e| format!("cannot talk to the supervisor: {e}"))?;
        self.next_id += 1;
        let received = self
            .recv()
            .await
            .map_err(|e| format!("lost the supervisor while starting: {e}"))?;
        match &received.msg {
            ToGeneration::Deposited { id: got } if *got == id => Ok(received),
            ToGeneration::Error { message, .. } => {
                Err(format!("the supervisor refused a request: {message}"))
            }
            other => Err(format!(
                "the supervisor sent {other:?} while this generation was starting"
            )),
        }
    }
}

/// Every listen socket of `config` and the admin socket, fetched from the supervisor's store or
/// bound and deposited; returns the sockets (in config order), the admin socket, and every key.
pub async fn sockets(
    link: &mut Link,
    config: &Config,
) -> Result<(Vec<TcpListener>, Option<TcpListener>, Vec<SocketKey>), String> {
    let mut keys = Vec::new();
    let mut sockets = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let (socket, key) = match (&l.fd_name, l.address) {
            (Some(name), _) => link.named_socket(name).await,
            (None, Some(address)) => {
                let key = SocketKey::tcp(address);
                link.listen_socket(key, l.backlog).await.map(|s| (s, key))
            }
            (None, None) => Err("no address and no fd_name".to_owned()),
        }
        .map_err(|e| format!("listener `{}`: {e}", l.name))?;
        sockets.push(socket);
        keys.push(key);
    }
    let admin = match &config.admin {
        Some(admin) => {
            let key = SocketKey::tcp(admin.address);
            keys.push(key);
            Some(
                link.listen_socket(key, 128)
                    .await
                    .map_err(|e| format!("admin: {e}"))?,
            )
        }
        None => None,
    };
    Ok((sockets, admin, keys))
}
