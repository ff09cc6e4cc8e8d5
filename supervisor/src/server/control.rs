//! The control socket (`baton status`, `reload`, `drain`, `stop`, ...): made safely at the start
//! (mode 0600, in a folder no other user controls), its clients accepted (only root and the
//! supervisor's own user), their requests read and answered, one JSON line each way (the
//! protocol itself is in the crate's `control.rs`).

use std::io::{ErrorKind, Read, Write};
use std::path::Path;

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Token};
use tracing::{info, warn};

use super::error::ControlSocketError;
use super::{CLIENTS, Client, Supervisor, now_ms};
use crate::control::{GenerationStatus, Request, Response, Status};
use crate::lifecycle::{Event, Waiter};

impl Supervisor {
    pub(super) fn accept(&mut self) {
        loop {
            match self.control.accept() {
                Ok((mut stream, _)) => {
                    if let Err(reason) = peer_allowed(&stream) {
                        warn!("refused a control connection: {reason}");
                        let refusal = Response {
                            ok: false,
                            message: reason.to_string(),
                            status: None,
                        };
                        let mut line = serde_json::to_vec(&refusal).unwrap_or_default();
                        line.push(b'\n');
                        let _ = stream.write(&line);
                        continue;
                    }
                    let id = self.next_client;
                    self.next_client += 1;
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(CLIENTS + id as usize),
                        Interest::READABLE,
                    ) {
                        warn!("cannot watch a control connection: {e}");
                        continue;
                    }
                    self.clients.insert(
                        id,
                        Client {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            waits_for_exit: false,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    return;
                }
            }
        }
    }

    pub(super) fn client_ready(&mut self, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if !client.output.is_empty() {
            self.flush(id);
            return;
        }
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => client.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if client.input.len() > 64 * 1024 {
                closed = true;
                break;
            }
        }
        if client.waits_for_exit {
            // Answered already: nothing more is read from a `baton stop` that waits.
            client.input.clear();
            if closed {
                self.drop_client(id);
            }
            return;
        }
        let Some(end) = client.input.iter().position(|b| *b == b'\n') else {
            if closed {
                self.drop_client(id);
            }
            return;
        };
        let line = client.input[..end].to_vec();
        client.input.clear();
        match serde_json::from_slice::<Request>(&line) {
            Ok(request) => self.request(id, request),
            Err(e) => self.respond(
                id,
                Response {
                    ok: false,
                    message: format!("bad request: {e}"),
                    status: None,
                },
            ),
        }
    }

    fn request(&mut self, client: Waiter, request: Request) {
        match request {
            Request::Status => {
                let status = self.status();
                self.respond(
                    client,
                    Response {
                        ok: true,
                        message: String::new(),
                        status: Some(status),
                    },
                );
            }
            Request::Drain => {
                info!("drain requested over the control socket");
                self.apply(Event::Drain {
                    waiter: Some(client),
                });
            }
            Request::Reload => {
                info!("reload requested over the control socket");
                self.apply(Event::Reload {
                    waiter: Some(client),
                });
            }
            Request::Stop => {
                info!("stop requested over the control socket: drain every generation, then exit");
                if let Some(c) = self.clients.get_mut(&client) {
                    c.waits_for_exit = true;
                }
                self.respond(
                    client,
                    Response {
                        ok: true,
                        message: "stopping: every generation drains, then the supervisor exits"
                            .into(),
                        status: None,
                    },
                );
                self.apply(Event::Stop { graceful: true });
            }
            Request::UpgradeSupervisor => {
                info!("supervisor upgrade requested over the control socket");
                // Answered once the new binary passed its checks, right before it is executed,
                // or with why it was not.
                self.start_upgrade(Some(client));
            }
            Request::ReopenLogs => {
                self.reopen_logs();
                let count = self.generations.len();
                self.respond(
                    client,
                    Response {
                        ok: true,
                        message: format!("asked {count} generation(s) to reopen their logs"),
                        status: None,
                    },
                );
            }
        }
    }

    fn status(&self) -> Status {
        let generations = self
            .lifecycle
            .generations()
            .filter_map(|g| {
                let io = self.generations.get(&g.epoch)?;
                Some(GenerationStatus {
                    epoch: g.epoch,
                    pid: io.pid,
                    state: g.state.name().to_owned(),
                    started_unix_ms: now_ms(io.started),
                    uptime_seconds: io.started.elapsed().map_or(0, |d| d.as_secs()),
                    connections: io.load.connections,
                    requests: io.load.requests,
                    build: io.build.clone(),
                })
            })
            .collect();
        let counts = self.lifecycle.counts;
        Status {
            supervisor_pid: std::process::id(),
            supervisor_build: env!("BATON_BUILD_ID").to_owned(),
            instance: self.config.instance.clone(),
            // Absolute, so that a client in another directory can tell whether it names it.
            config: std::fs::canonicalize(&self.config.path)
                .unwrap_or_else(|_| self.config.path.clone())
                .display()
                .to_string(),
            active_epoch: self.lifecycle.active(),
            drained: self.lifecycle.drained(),
            generations,
            reloads: counts.reloads,
            reload_failures: counts.reload_failures,
            crashes: counts.crashes,
            last_reload: self.last_reload.clone(),
            sockets: self.store.len(),
            supervisor_upgrades: self.upgrades,
            last_upgrade: self.last_upgrade.clone(),
        }
    }

    /// Answers every waiter of a reload or a drain alike.
    pub(super) fn respond_all(&mut self, waiters: Vec<Waiter>, ok: bool, message: &str) {
        for waiter in waiters {
            self.respond(
                waiter,
                Response {
                    ok,
                    message: message.to_owned(),
                    status: None,
                },
            );
        }
    }

    fn respond(&mut self, id: Waiter, response: Response) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let mut line = serde_json::to_vec(&response).unwrap_or_default();
        line.push(b'\n');
        client.output = line;
        self.flush(id);
    }

    /// Writes what is pending; closes the connection once all is written.
    fn flush(&mut self, id: u64) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        while !client.output.is_empty() {
            match client.stream.write(&client.output) {
                Ok(n) => {
                    client.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let _ = self.poll.registry().reregister(
                        &mut client.stream,
                        Token(CLIENTS + id as usize),
                        Interest::WRITABLE,
                    );
                    return;
                }
                Err(_) => {
                    self.drop_client(id);
                    return;
                }
            }
        }
        if client.waits_for_exit {
            // Kept open until the exit; its closing is noticed by reading.
            let _ = self.poll.registry().reregister(
                &mut client.stream,
                Token(CLIENTS + id as usize),
                Interest::READABLE,
            );
            return;
        }
        self.drop_client(id);
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(mut client) = self.clients.remove(&id) {
            let _ = self.poll.registry().deregister(&mut client.stream);
        }
    }
}

/// Why a peer may not use the control socket: it is told this before the connection closes.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefused {
    /// Its credentials could not be read.
    #[error("cannot read the peer's credentials: {0}")]
    Credentials(#[source] nix::errno::Errno),
    /// It runs as a user other than root and the supervisor's own.
    #[error("user {uid} may not control this supervisor (only root and user {own} may)")]
    User { uid: u32, own: u32 },
}

/// Binds the control socket, mode 0600. A live supervisor already there is an error; a stale
/// socket file from one that died is replaced.
pub(super) fn bind_control(path: &Path) -> Result<UnixListener, ControlSocketError> {
    let socket = || path.to_owned();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ControlSocketError::CreateFolder {
                    socket: socket(),
                    source,
                })?;
        }
        safe_folder(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlSocketError::InUse { socket: socket() });
        }
        std::fs::remove_file(path).map_err(|source| ControlSocketError::RemoveStale {
            socket: socket(),
            source,
        })?;
    }
    // Created with no permissions for others from the start: no window where another user
    // could connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    bound.map_err(|source| ControlSocketError::Bind {
        socket: socket(),
        source,
    })
}

/// The control socket's folder must be this user's (or root's), and writable by nobody else
/// unless sticky (as `/tmp` is): another local user who made `/tmp/baton-<uid>` first, or who
/// may write in the folder, could put their own socket (and the rendezvous) in its place.
fn safe_folder(dir: &Path) -> Result<(), ControlSocketError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let folder = || dir.to_owned();
    let meta = std::fs::metadata(dir).map_err(|source| ControlSocketError::InspectFolder {
        folder: folder(),
        source,
    })?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(ControlSocketError::FolderNotOurs {
            folder: folder(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(ControlSocketError::FolderWritable {
            folder: folder(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Only root and the supervisor's own user may control it.
fn peer_allowed(stream: &UnixStream) -> Result<(), PeerRefused> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(PeerRefused::Credentials)?;
    let own = nix::unistd::geteuid().as_raw();
    if creds.uid() == 0 || creds.uid() == own {
        Ok(())
    } else {
        Err(PeerRefused::User {
            uid: creds.uid(),
            own,
        })
    }
}
