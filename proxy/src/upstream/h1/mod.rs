//! Upstream HTTP/1.1, spoken on the request's own task.
//!
//! hyper's client runs each connection as a task of its own and hands every request, its
//! response and each chunk of the response body between that task and the request's over
//! channels: several task wake-ups and hand-overs per proxied request. Measured with callgrind on
//! keep-alive requests, that machinery was a third of the proxy's instructions per request. Here
//! the request's own task writes the request and reads the response, and the response body is
//! read from the socket as the client's connection asks for it.
//!
//! Heads and bodies are taken out of the bytes read by `baton_proxy::http1_wire` (httparse and
//! RFC 9112's framing, in the library so that it can be fuzzed); this module does the I/O: the
//! connection, the request's upload, and reads as the client takes the body (its idle pool is
//! `pool`).

mod body;
mod error;
mod outgoing;

use std::io;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};

use bytes::BytesMut;
use shm_stats::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use baton_proxy::http1_wire::{Head, MAX_HEAD, parse_head_for};

use crate::config::Cluster;
use crate::runtime::context::WorkerContext;

use super::connect::{self, ConnectError, ConnectionSlot};

pub use body::{Body, Upgraded};
pub use error::Error;
use outgoing::OutBody;
pub use outgoing::Outgoing;

/// A read asks the socket for at least this much room...
const READ_MIN: usize = 8 * 1024;
/// ... and, for a long body, at most this much.
const READ_MAX: usize = 256 * 1024;

/// A request that failed, and how far it got: whether it may be sent again on another
/// connection.
#[derive(Debug)]
pub struct Failure {
    pub error: Error,
    /// The head was written whole (the upstream may have acted on it).
    pub head_sent: bool,
    /// Some of a streamed body was taken from the client: it cannot be sent again.
    pub body_taken: bool,
    /// Some of a response arrived.
    pub answered: bool,
}

/// An upstream connection: the socket and what was read from it but not yet used.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// How much room a read of a body of unknown length asks for: doubled when a read fills
    /// it, so that a long body is read in large pieces.
    read_size: usize,
    _live: Live,
}

/// Counts the connection in `upstream_cx_active` and holds its place under the cluster's
/// `max_connections`, both for as long as the connection lives. It does not keep the worker's
/// context alive: a connection may outlive its worker (in a pool being dropped), and the
/// gauge is counted only while the context, and so the worker's stats row, exists.
struct Live {
    worker: Weak<WorkerContext>,
    gauge: Gauge,
    _slot: ConnectionSlot,
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(worker) = self.worker.upgrade() {
            worker.stats.shard.gauge_add(self.gauge, -1);
        }
    }
}

impl Conn {
    /// Opens a connection to `addr` within the cluster's connect timeout. `slot` is its place
    /// under `max_connections`, given back when the connection closes.
    pub async fn connect(
        addr: SocketAddr,
        cluster: &Cluster,
        worker: &Rc<WorkerContext>,
        cluster_index: usize,
        slot: ConnectionSlot,
    ) -> Result<Conn, ConnectError> {
        let stream =
            connect::connect_tcp(addr, cluster.connect_timeout, &worker.stats, cluster_index)
                .await?;
        let gauge = worker.stats.ids.clusters[cluster_index].upstream_cx_active;
        worker.stats.shard.gauge_add(gauge, 1);
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
            read_size: READ_MIN,
            _live: Live {
                worker: Rc::downgrade(worker),
                gauge,
                _slot: slot,
            },
        })
    }

    /// Whether an idle connection can carry a request: nothing has arrived on it. An upstream
    /// closes an idle connection by sending its FIN, and must send nothing else while idle.
    /// `try_read` makes no system call while tokio has not seen the socket become readable
    /// (and, unlike polling readiness, is not subject to the task's cooperative budget).
    pub fn is_usable(&self) -> bool {
        self.buf.is_empty()
            && matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            )
    }

    /// Lets go of a large read buffer before the connection idles in a pool.
    fn shrink(&mut self) {
        if self.buf.capacity() > 2 * READ_MIN {
            self.buf = BytesMut::new();
        }
    }

    /// Writes `request` and reads the response's head (interim answers skipped). The body
    /// follows in [`Body`].
    pub async fn send(&mut self, request: &mut Outgoing) -> Result<Head, Failure> {
        let mut failure = Failure {
            error: Error::Closed,
            head_sent: false,
            body_taken: false,
            answered: false,
        };
        let (head_request, upgrade) = (request.head_request, request.upgrade);
        let written = match &mut request.body {
            OutBody::Kept(rest) => {
                if let Err(e) = self.stream.write_all(&request.head).await {
                    // Not even the head went: whatever the connection holds is no answer to it.
                    failure.error = Error::Io(e);
                    return Err(failure);
                }
                failure.head_sent = true;
                if rest.is_empty() {
                    Ok(())
                } else {
                    self.stream.write_all(rest).await.map_err(Error::Io)
                }
            }
            OutBody::Streamed(upload) => {
                if let Err(e) = self.stream.write_all(&request.head).await {
                    failure.error = Error::Io(e);
                    return Err(failure);
                }
                failure.head_sent = true;
                failure.body_taken = true;
                // An upstream may answer before the body is all sent: one that refuses it (a
                // 413), or one that streams its answer as the body comes (an echo, a gRPC-like
                // exchange). The rest of the body then goes as the answer's body is read.
                let Conn { stream, buf, .. } = &mut *self;
                let (mut reader, mut writer) = stream.split();
                let raced = tokio::select! {
                    biased;
                    head = read_head(&mut reader, buf, head_request, upgrade) => Err(head),
                    sent = std::future::poll_fn(|cx| upload.poll(&mut writer, cx)) => Ok(sent),
                };
                match raced {
                    Ok(sent) => sent,
                    Err(head) => {
                        return head.map_err(|error| Failure {
                            answered: answered(&error, &self.buf),
                            error,
                            ..failure
                        });
                    }
                }
            }
        };
        let write_error = match written {
            Ok(()) => None,
            Err(error @ Error::RequestBody(_)) => {
                // The client's body broke off: no answer is coming to an incomplete request.
                failure.error = error;
                return Err(failure);
            }
            Err(error) => Some(error),
        };
        // A write that failed may still have an answer behind it (an upstream that refuses a
        // request it will not read sends its answer, then closes): read it.
        match read_head(&mut self.stream, &mut self.buf, head_request, upgrade).await {
            Ok(head) => {
                if write_error.is_some() {
                    request.unfinished = true;
                }
                Ok(head)
            }
            Err(error) => {
                failure.answered = answered(&error, &self.buf);
                failure.error = match (write_error, error) {
                    (Some(write), Error::Closed | Error::Io(_)) => write,
                    (_, error) => error,
                };
                Err(failure)
            }
        }
    }
}

/// Whether a request that failed with `error` had begun to be answered.
fn answered(error: &Error, buf: &BytesMut) -> bool {
    !buf.is_empty() || matches!(error, Error::Invalid(_))
}

/// Reads until `buf` holds a complete final response head (a `101` too, when the request asked
/// for an `upgrade`), and parses it.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Head, Error> {
    loop {
        if !buf.is_empty()
            && let Some(head) = parse_head_for(buf, head_request, upgrade)?
        {
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD {
            return Err(Error::Invalid("response head larger than 64 KiB"));
        }
        if buf.capacity() - buf.len() < READ_MIN {
            buf.reserve(READ_MIN);
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(Error::Closed);
        }
    }
}
