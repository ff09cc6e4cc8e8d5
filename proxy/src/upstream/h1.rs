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

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, request};
use http_body::{Body as _, Frame, SizeHint};
use shm_stats::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use baton_proxy::http1_wire::{
    Decoded, Decoder, Framing, Head, MAX_HEAD, WireError, parse_head_for,
};

use crate::config::Cluster;
use crate::runtime::context::WorkerContext;

use super::connect::{self, ConnectError, ConnectionSlot};
use super::request::TrackedBody;

/// A read asks the socket for at least this much room...
const READ_MIN: usize = 8 * 1024;
/// ... and, for a long body, at most this much.
const READ_MAX: usize = 256 * 1024;
/// A request body kept in memory up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;

/// Why a request got no (complete) response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    #[error("upstream sent an invalid response: {0}")]
    Invalid(&'static str),
    /// The client's request body failed (it broke off, or went past `max_request_body`).
    #[error("request body: {0}")]
    RequestBody(Box<dyn std::error::Error + Send + Sync>),
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Closed => Error::Closed,
            WireError::Invalid(what) => Error::Invalid(what),
        }
    }
}

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
/// `max_connections`, both for as long as the connection lives. The worker is not kept alive by
/// it: its pools hold connections, and a worker that exits drops them.
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

/// A request body streamed from the client to the upstream, chunked if its size is not known.
pub struct Upload {
    body: TrackedBody,
    chunked: bool,
    /// Bytes taken from the body (with their chunk framing) not written yet.
    out: Bytes,
    ended: bool,
}

impl Upload {
    /// Moves the body on as far as it goes without waiting; ready when all of it is written.
    fn poll<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            while !self.out.is_empty() {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())));
                }
                self.out.advance(n);
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            let frame = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    if self.chunked {
                        self.out = Bytes::from_static(b"0\r\n\r\n");
                    }
                    continue;
                }
                Some(Err(e)) => return Poll::Ready(Err(Error::RequestBody(e))),
                Some(Ok(frame)) => frame,
            };
            self.out = match frame.into_data() {
                Ok(data) if !self.chunked || data.is_empty() => data,
                Ok(data) => {
                    let mut out = BytesMut::with_capacity(data.len() + 20);
                    out.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.put_slice(&data);
                    out.put_slice(b"\r\n");
                    out.freeze()
                }
                Err(frame) => {
                    // Trailers end the body; only a chunked one can carry them.
                    self.ended = true;
                    match (self.chunked, frame.into_trailers()) {
                        (true, Ok(trailers)) => {
                            let mut out = BytesMut::from(&b"0\r\n"[..]);
                            put_fields(&mut out, &trailers);
                            out.put_slice(b"\r\n");
                            out.freeze()
                        }
                        (true, Err(_)) => Bytes::from_static(b"0\r\n\r\n"),
                        (false, _) => Bytes::new(),
                    }
                }
            };
        }
    }
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

/// A request as it goes on the wire: its head, and its body (kept, or streamed from the client).
pub struct Outgoing {
    head: Bytes,
    body: OutBody,
    head_request: bool,
    /// The request asks for an upgrade (it carries `Upgrade`): a `101` may answer it, and its
    /// connection is not used again whatever the answer.
    upgrade: bool,
    /// Set when the request was not all sent (the upstream answered first).
    unfinished: bool,
}

enum OutBody {
    /// What is left to write after the head (the body, unless it went with the head).
    Kept(Bytes),
    /// Streamed from the client.
    Streamed(Upload),
}

impl Outgoing {
    /// A request whose body is in memory (possibly empty): it can be written again as often as
    /// needed.
    pub fn kept(parts: &request::Parts, body: Bytes) -> Self {
        let len = body.len();
        let room = if len <= COALESCE { len } else { 0 };
        let (mut head, upgrade) = encode_head(parts, Some(len as u64), room);
        let rest = if len <= COALESCE {
            head.put_slice(&body);
            Bytes::new()
        } else {
            body
        };
        Outgoing {
            head: head.freeze(),
            body: OutBody::Kept(rest),
            head_request: parts.method == Method::HEAD,
            upgrade,
            unfinished: false,
        }
    }

    /// A request whose body streams from the client as it comes: sent with its length when the
    /// client declared one, chunked otherwise.
    pub fn streamed(parts: &request::Parts, body: TrackedBody) -> Self {
        let length = body.size_hint().exact();
        let (head, upgrade) = encode_head(parts, length, 0);
        Outgoing {
            head: head.freeze(),
            body: OutBody::Streamed(Upload {
                body,
                chunked: length.is_none(),
                out: Bytes::new(),
                ended: false,
            }),
            head_request: parts.method == Method::HEAD,
            upgrade,
            unfinished: false,
        }
    }
}

/// Methods whose requests carry a body by definition: an empty one is sent as
/// `content-length: 0` (as hyper and curl do).
fn expects_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// The request line and header fields; `length` is the body's `content-length`, `None` for a
/// chunked body. The client's own framing fields are replaced. Also says whether the request
/// asks for an upgrade (seen on the way, rather than by a lookup in every request's map).
fn encode_head(parts: &request::Parts, length: Option<u64>, room: usize) -> (BytesMut, bool) {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut head = BytesMut::with_capacity(256 + room);
    head.put_slice(parts.method.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(target.as_bytes());
    head.put_slice(b" HTTP/1.1\r\n");
    let mut upgrade = false;
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        upgrade |= name == UPGRADE;
        put_field(&mut head, name, value);
    }
    match length {
        Some(0) if !expects_body(&parts.method) => {}
        Some(n) => {
            use std::fmt::Write as _;
            let _ = write!(head, "content-length: {n}\r\n");
        }
        None => head.put_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.put_slice(b"\r\n");
    (head, upgrade)
}

fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

fn put_fields(out: &mut BytesMut, fields: &HeaderMap) {
    for (name, value) in fields {
        put_field(out, name, value);
    }
}

/// A response body read from its upstream connection as the client takes it. The connection
/// goes back to its pool (see [`Body::reusable`]) once the body has ended cleanly.
pub struct Body {
    conn: Option<Conn>,
    /// What is left of the request body, sent as the response is read.
    upload: Option<Box<Upload>>,
    decoder: Decoder,
    keep_alive: bool,
    length: Option<u64>,
}

impl Body {
    /// The body of the response whose head `head` is, to be read from `conn`.
    pub fn new(conn: Conn, head: &Head, request: Outgoing) -> Self {
        let upload = match request.body {
            OutBody::Streamed(upload) if !upload.ended || !upload.out.is_empty() => {
                Some(Box::new(upload))
            }
            _ => None,
        };
        Body {
            conn: Some(conn),
            upload,
            decoder: Decoder::new(head.framing),
            keep_alive: head.keep_alive && !request.unfinished && !request.upgrade,
            length: match head.framing {
                Framing::Empty => Some(0),
                Framing::Length(n) => Some(n),
                _ => None,
            },
        }
    }

    /// The connection, if the body has ended cleanly and the connection may carry another
    /// request.
    pub fn reusable(&mut self) -> Option<Conn> {
        let done = self.decoder == Decoder::Done && self.upload.is_none();
        let mut conn = self
            .conn
            .take_if(|conn| done && self.keep_alive && conn.buf.is_empty())?;
        conn.shrink();
        Some(conn)
    }

    /// The connection of a `101 Switching Protocols`, to carry the protocol switched to; `None`
    /// if part of the request body was still to be sent (the upstream switched too early).
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        if self.upload.is_some() {
            return None;
        }
        let conn = self.conn.take()?;
        Some(Upgraded {
            stream: conn.stream,
            read: conn.buf,
            _live: conn._live,
        })
    }
}

/// An upstream connection that switched protocols: from now on a tunnel's, never pooled. It
/// still counts in `upstream_cx_active` and holds its place under `max_connections`.
pub struct Upgraded {
    pub stream: TcpStream,
    /// Bytes of the new protocol that came with the `101`.
    pub read: BytesMut,
    _live: Live,
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        if let Some(upload) = &mut this.upload {
            match upload.poll(&mut conn.stream, cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => this.upload = None,
                Poll::Ready(Err(Error::Io(_))) => {
                    // The upstream stopped reading the request: its answer still counts, the
                    // connection does not carry another request.
                    this.upload = None;
                    this.keep_alive = false;
                }
                Poll::Ready(Err(e)) => {
                    // The client's body broke off: so does the exchange.
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
        loop {
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Frame(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::More) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::from(e))));
                }
            }
            if conn.buf.capacity() - conn.buf.len() < READ_MIN {
                conn.buf.reserve(read_room(&this.decoder, conn.read_size));
            }
            let room = conn.buf.capacity() - conn.buf.len();
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.buf
            ));
            let failed = match read {
                Ok(0) => this.decoder.closed().err().map(Error::from),
                Ok(n) => {
                    if n == room {
                        conn.read_size = (conn.read_size * 2).min(READ_MAX);
                    }
                    continue;
                }
                Err(e) => Some(Error::Io(e)),
            };
            // The connection is done with either way: closed by the upstream, or broken.
            this.conn = None;
            return Poll::Ready(failed.map(Err));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// How much room the next read should ask for: what the rest of a body of known length needs
/// (up to [`READ_MAX`]: the room fills with that body), else `size`, what reads have been
/// bringing.
fn read_room(decoder: &Decoder, size: usize) -> usize {
    match *decoder {
        Decoder::Length(n) => usize::try_from(n)
            .unwrap_or(READ_MAX)
            .clamp(READ_MIN, READ_MAX),
        _ => size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_carry_the_body_length_and_the_clients_framing_goes() {
        let (mut parts, ()) = http::Request::post("/up?x=1")
            .header("host", "example")
            .header("content-length", "999")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap()
            .into_parts();
        let kept = Outgoing::kept(&parts, Bytes::from_static(b"abc"));
        assert_eq!(
            &kept.head[..],
            b"POST /up?x=1 HTTP/1.1\r\nhost: example\r\ncontent-length: 3\r\n\r\nabc"
        );
        parts.method = Method::GET;
        let kept = Outgoing::kept(&parts, Bytes::new());
        assert_eq!(
            &kept.head[..],
            b"GET /up?x=1 HTTP/1.1\r\nhost: example\r\n\r\n"
        );
        assert!(!kept.upgrade);
    }

    #[test]
    fn a_request_with_upgrade_asks_for_one() {
        let (parts, ()) = http::Request::get("/chat")
            .header("host", "example")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap()
            .into_parts();
        let kept = Outgoing::kept(&parts, Bytes::new());
        assert!(kept.upgrade);
        assert_eq!(
            &kept.head[..],
            b"GET /chat HTTP/1.1\r\nhost: example\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
        );
    }
}
