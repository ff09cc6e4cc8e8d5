//! The control socket's protocol: one JSON request per line, one JSON response per line, then
//! the supervisor closes the connection. A stop is the exception: the supervisor answers at
//! once, keeps the connection open while its generations drain, and writes a second line as it
//! exits. Shared by the supervisor and the `baton` subcommands.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// The generations and counters.
    Status,
    /// Start a new generation; answered when it is active, or with why it failed.
    Reload,
    /// SIGWINCH's job: the active generation drains and none replaces it until the next
    /// reload; answered once it no longer accepts.
    Drain,
    /// Drain every generation and exit.
    Stop,
    /// Forward SIGUSR1's job: every generation reopens its access logs.
    ReopenLogs,
    /// SIGUSR2's job: the supervisor executes the `baton` binary on disk in its place.
    UpgradeSupervisor,
}

/// What the supervisor answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

/// `baton status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub supervisor_pid: u32,
    /// The build of the running supervisor binary.
    pub supervisor_build: String,
    pub instance: String,
    pub config: String,
    pub active_epoch: Option<u64>,
    /// Drained by `baton drain` (or SIGWINCH, or `/drain_listeners`): no generation accepts
    /// until the next reload.
    #[serde(default)]
    pub drained: bool,
    pub generations: Vec<GenerationStatus>,
    pub reloads: u64,
    pub reload_failures: u64,
    pub crashes: u64,
    /// The outcome of the last reload, if any.
    pub last_reload: Option<String>,
    /// Listen sockets held in the store.
    pub sockets: usize,
    /// In-place upgrades (`baton upgrade-supervisor`) this supervisor has had.
    #[serde(default)]
    pub supervisor_upgrades: u64,
    /// The outcome of the last upgrade asked for, if any.
    #[serde(default)]
    pub last_upgrade: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub epoch: u64,
    pub pid: u32,
    /// `starting`, `active` or `draining`.
    pub state: String,
    pub started_unix_ms: u64,
    pub uptime_seconds: u64,
    pub connections: u64,
    pub requests: u64,
    pub build: String,
}

/// Why a `baton` command got no answer from the supervisor. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket: no supervisor runs with this config, or it uses another
    /// socket.
    #[error(
        "no supervisor is listening on {} ({source}); is `baton run` running with this config? (or pass --socket PATH)",
        socket.display()
    )]
    NotListening { socket: PathBuf, source: io::Error },
    /// The command's user may not use the socket: the supervisor runs as another user.
    #[error(
        "not allowed to use {} ({source}); run as the user that runs `baton run`, or as root",
        socket.display()
    )]
    NotAllowed { socket: PathBuf, source: io::Error },
    /// Connecting failed otherwise.
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect { socket: PathBuf, source: io::Error },
    /// The request could not be written as JSON (a bug of this program).
    #[error(transparent)]
    Encode(serde_json::Error),
    /// The request could not be sent, though the supervisor had not closed the connection.
    #[error("cannot send to the supervisor: {0}")]
    Send(#[source] io::Error),
    /// The supervisor answered something that is not a response: another program on the
    /// socket, or a supervisor of another protocol.
    #[error("unreadable answer from the supervisor: {0}")]
    Unreadable(#[source] serde_json::Error),
    /// The supervisor went away without answering: the request met a closed connection.
    #[error("cannot send to the supervisor: {0}")]
    GoneBeforeRequest(#[source] io::Error),
    /// The supervisor went away without answering: reading the answer failed.
    #[error("no answer from the supervisor: {0}")]
    GoneBeforeAnswer(#[source] io::Error),
    /// The supervisor closed the connection without answering.
    #[error("the supervisor closed the connection without an answer (did it stop?)")]
    Closed,
    /// A `baton stop` was answered, but the connection closed before the supervisor said it
    /// had stopped.
    #[error(
        "the supervisor closed the connection before it said it had stopped (killed, or a supervisor that does not wait); `baton status --socket {}` tells whether it still runs",
        socket.display()
    )]
    StopUnconfirmed { socket: PathBuf },
}

impl ClientError {
    /// Whether the supervisor went away without answering: an upgrade's exec closes the
    /// connections it had not answered yet, so a status request may ask again.
    fn went_away(&self) -> bool {
        matches!(
            self,
            ClientError::GoneBeforeRequest(_)
                | ClientError::GoneBeforeAnswer(_)
                | ClientError::Closed
        )
    }
}

/// Sends `request` to the supervisor listening at `socket` and waits for the answer. A status
/// request that meets a supervisor in the instant it executes its upgrade (which closes the
/// connections it had not answered yet) is asked again.
pub fn call(socket: &Path, request: Request) -> Result<Response, ClientError> {
    let mut tries = 0;
    loop {
        match exchange(socket, request) {
            Err(e) if e.went_away() && request == Request::Status && tries < 10 => {
                tries += 1;
                // A command-line client, not an event loop: it waits for the upgraded
                // supervisor to answer on the same socket.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            result => return result.map(|(response, _)| response),
        }
    }
}

/// Asks for a stop; `started` is told of the first answer. Then waits for the supervisor's
/// last line, written as it exits once every generation has gone, and returns it.
pub fn stop_and_wait(
    socket: &Path,
    started: impl FnOnce(&Response),
) -> Result<Response, ClientError> {
    let (first, mut reader) = exchange(socket, Request::Stop)?;
    if !first.ok {
        return Ok(first);
    }
    started(&first);
    let mut last = String::new();
    match reader.read_line(&mut last) {
        Ok(n) if n > 0 => serde_json::from_str(&last).map_err(ClientError::Unreadable),
        _ => Err(ClientError::StopUnconfirmed {
            socket: socket.to_owned(),
        }),
    }
}

/// Sends one request and reads the first answer; the connection is left to read more from.
fn exchange(
    socket: &Path,
    request: Request,
) -> Result<(Response, BufReader<UnixStream>), ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| {
        let socket = socket.to_owned();
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotListening { socket, source }
            }
            io::ErrorKind::PermissionDenied => ClientError::NotAllowed { socket, source },
            _ => ClientError::Connect { socket, source },
        }
    })?;
    let mut line = serde_json::to_string(&request).map_err(ClientError::Encode)?;
    line.push('\n');
    // A supervisor that refuses this peer writes its reason and closes without reading, so the
    // request may meet a closed socket (EPIPE): the reason is still there to read, and it is
    // what the operator needs, not the pipe's error.
    let sent = match (&stream).write_all(line.as_bytes()) {
        Err(e)
            if !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Err(ClientError::Send(e));
        }
        sent => sent,
    };
    let mut answer = String::new();
    let mut reader = BufReader::new(stream);
    let read = reader.read_line(&mut answer);
    if !answer.is_empty() {
        return serde_json::from_str(&answer)
            .map(|response| (response, reader))
            .map_err(ClientError::Unreadable);
    }
    // No answer: the supervisor went away without one (an upgrade's exec closes the
    // connections it had not answered yet), which a status request may ask again.
    match (sent, read) {
        (Err(e), _) => Err(ClientError::GoneBeforeRequest(e)),
        (Ok(()), Err(e)) => Err(ClientError::GoneBeforeAnswer(e)),
        (Ok(()), Ok(_)) => Err(ClientError::Closed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_readable_json_line() {
        assert_eq!(
            serde_json::to_string(&Request::ReopenLogs).unwrap(),
            r#"{"command":"reopen-logs"}"#
        );
        let back: Request = serde_json::from_str(r#"{"command":"reload"}"#).unwrap();
        assert_eq!(back, Request::Reload);
        assert!(serde_json::from_str::<Request>(r#"{"command":"explode"}"#).is_err());
    }
}
