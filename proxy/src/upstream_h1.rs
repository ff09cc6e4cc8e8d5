//! Upstream HTTP/1.1, spoken on the request's own task.
//!
//! hyper's client runs each connection as a task of its own and hands every request, its
//! response and each chunk of the response body between that task and the request's over
//! channels: several task wake-ups and hand-overs per proxied request. Measured with callgrind on
//! keep-alive requests, that machinery was a third of the proxy's instructions per request. Here
//! the request's own task writes the request and reads the response, and the response body is
//! read from the socket as the client's connection asks for it.
//!
//! Heads are parsed by httparse, the parser hyper uses. What this module adds is HTTP/1.1's
//! message framing (RFC 9112, section 6): which bytes are the body (length, chunked, or up to the
//! close), and whether the connection may carry another request. Interim (1xx) answers are
//! dropped; a `101` is an error, since the proxy never asks for an upgrade.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, request};
use http_body::{Body as _, Frame, SizeHint};
use shm_stats::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Cluster;
use crate::upstream::{self, ConnectError, ConnectionSlot, TrackedBody};
use crate::worker::Worker;

/// Longest response head (status line and header fields), and longest trailer section.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head or trailer section (hyper's default).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
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
    worker: Weak<Worker>,
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
        worker: &Rc<Worker>,
        cluster_index: usize,
        slot: ConnectionSlot,
    ) -> Result<Conn, ConnectError> {
        let stream =
            upstream::connect_tcp(addr, cluster.connect_timeout, worker, cluster_index).await?;
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
        let head_request = request.head_request;
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
                    head = read_head(&mut reader, buf, head_request) => Err(head),
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
        match read_head(&mut self.stream, &mut self.buf, head_request).await {
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

/// Reads until `buf` holds a complete final response head, and parses it.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Head, Error> {
    loop {
        if !buf.is_empty()
            && let Some(head) = parse_head(buf, head_request)?
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
        let mut head = encode_head(parts, Some(len as u64), room);
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
            unfinished: false,
        }
    }

    /// A request whose body streams from the client as it comes: sent with its length when the
    /// client declared one, chunked otherwise.
    pub fn streamed(parts: &request::Parts, body: TrackedBody) -> Self {
        let length = body.size_hint().exact();
        let head = encode_head(parts, length, 0);
        Outgoing {
            head: head.freeze(),
            body: OutBody::Streamed(Upload {
                body,
                chunked: length.is_none(),
                out: Bytes::new(),
                ended: false,
            }),
            head_request: parts.method == Method::HEAD,
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
/// chunked body. The client's own framing fields are replaced.
fn encode_head(parts: &request::Parts, length: Option<u64>, room: usize) -> BytesMut {
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut head = BytesMut::with_capacity(256 + room);
    head.put_slice(parts.method.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(target.as_bytes());
    head.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
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
    head
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

/// A final response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    framing: Framing,
    /// The connection may carry another request once this response's body is read.
    keep_alive: bool,
}

/// Where a response body ends (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body: a HEAD request's answer, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Up to the close of the connection.
    Close,
}

/// Parses a response head at the start of `buf`, taking it (and any interim answers before it)
/// out of `buf`. `None` if the head is not complete yet.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Error> {
    loop {
        // Uninitialised slots: httparse fills as many as the head has (no 3 KiB of zeroes to
        // write per response).
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Complete(_)) => {
                return Err(Error::Invalid("response head larger than 64 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Invalid("more than 100 header fields"));
            }
            Err(_) => return Err(Error::Invalid("malformed status line or header field")),
        };
        let code = response.code.unwrap_or_default();
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        if code == 101 {
            return Err(Error::Invalid(
                "101 Switching Protocols, which was not asked for",
            ));
        }
        if (100..200).contains(&code) {
            // An interim answer (100 Continue, 103 Early Hints): the final one follows.
            buf.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Invalid("status code out of range"))?;
        // Where each field lies in `buf`, so that values are taken as slices of it, uncopied.
        let base = buf.as_ptr() as usize;
        let mut found = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let count = response.headers.len();
        for (slot, field) in found.iter_mut().zip(response.headers.iter()) {
            let name = (field.name.as_ptr() as usize - base) as u32;
            let value = (field.value.as_ptr() as usize - base) as u32;
            *slot = (
                name,
                name + field.name.len() as u32,
                value,
                value + field.value.len() as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        let fields = &found[..count];
        let hop = Hop::scan(&head, fields);
        let (framing, keep_alive) = framing(&head, fields, &hop, status, head_request)?;
        // The fields that concern this connection only (RFC 9110, 7.6.1) were read for the
        // framing and the connection's reuse; they do not go into the client's answer, nor
        // does a content-length beside a transfer coding (RFC 9112, 6.3).
        let mut headers = HeaderMap::with_capacity(count);
        for &(name_start, name_end, start, end) in fields {
            let raw = &head[name_start as usize..name_end as usize];
            if hop.drops(&head, raw) {
                continue;
            }
            let name = HeaderName::from_bytes(raw)
                .map_err(|_| Error::Invalid("invalid header field name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(start as usize..end as usize))
                .map_err(|_| Error::Invalid("invalid header field value"))?;
            headers.append(name, value);
        }
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive: keep_alive && version == Version::HTTP_11 && !hop.close,
        }));
    }
}

/// A field's place in a response head: where its name starts and ends, then its value.
type Field = (u32, u32, u32, u32);

fn bytes_of(head: &[u8], start: u32, end: u32) -> &[u8] {
    &head[start as usize..end as usize]
}

/// What a response head's connection-level fields say, read from its bytes.
///
/// Read from the field names as they came rather than looked up in the header map once built:
/// every lookup there hashes a name, and the usual head (`Connection: keep-alive` and a length)
/// needs no lookup at all this way. Names are compared by length first.
#[derive(Default)]
struct Hop {
    /// `Connection: close`.
    close: bool,
    transfer_encoding: bool,
    content_length: bool,
    /// Where the field names that `Connection` lists lie (other than `keep-alive` and
    /// `close`): those fields go too. Rare, so a `Vec`.
    named: Vec<(u32, u32)>,
}

impl Hop {
    fn scan(head: &[u8], fields: &[Field]) -> Hop {
        let mut hop = Hop::default();
        for &(name_start, name_end, start, end) in fields {
            let name = bytes_of(head, name_start, name_end);
            match name.len() {
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in tokens(bytes_of(head, start, end)) {
                        if token.eq_ignore_ascii_case(b"close") {
                            hop.close = true;
                        } else if !token.eq_ignore_ascii_case(b"keep-alive")
                            && !token.eq_ignore_ascii_case(b"host")
                        {
                            // Within the head, as the field offsets are.
                            let at = (token.as_ptr() as usize - head.as_ptr() as usize) as u32;
                            hop.named.push((at, at + token.len() as u32));
                        }
                    }
                }
                14 if name.eq_ignore_ascii_case(b"content-length") => hop.content_length = true,
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    hop.transfer_encoding = true;
                }
                _ => {}
            }
        }
        hop
    }

    /// Whether the field `name` stays out of the client's answer.
    fn drops(&self, head: &[u8], name: &[u8]) -> bool {
        is_hop_by_hop(name)
            || (self.transfer_encoding && name.eq_ignore_ascii_case(b"content-length"))
            || self
                .named
                .iter()
                .any(|&(start, end)| bytes_of(head, start, end).eq_ignore_ascii_case(name))
    }
}

/// The fields that concern one connection only (RFC 9110, 7.6.1).
fn is_hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => name.eq_ignore_ascii_case(b"te"),
        7 => name.eq_ignore_ascii_case(b"upgrade"),
        10 => name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive"),
        16 => name.eq_ignore_ascii_case(b"proxy-connection"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    }
}

/// The items of a comma-separated field value, trimmed, empty ones left out.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// The body's framing, and whether it leaves the connection fit for another request.
fn framing(
    head: &[u8],
    fields: &[Field],
    hop: &Hop,
    status: StatusCode,
    head_request: bool,
) -> Result<(Framing, bool), Error> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, true));
    }
    let values = |wanted: &'static [u8]| {
        fields
            .iter()
            .filter(move |&&(name_start, name_end, _, _)| {
                bytes_of(head, name_start, name_end).eq_ignore_ascii_case(wanted)
            })
            .map(move |&(_, _, start, end)| bytes_of(head, start, end))
    };
    if hop.transfer_encoding {
        let mut last: &[u8] = b"";
        for value in values(b"transfer-encoding") {
            if let Some(token) = tokens(value).last() {
                last = token;
            }
        }
        if last.eq_ignore_ascii_case(b"chunked") {
            // With a content-length as well, the message is suspect (RFC 9112, 6.3): its
            // connection is not used again.
            return Ok((Framing::Chunked, !hop.content_length));
        }
        return Ok((Framing::Close, false));
    }
    if !hop.content_length {
        return Ok((Framing::Close, false));
    }
    let mut length = None;
    for value in values(b"content-length") {
        // Strict: an empty item is malformed too (RFC 9110, 8.6).
        for item in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(Error::Invalid("invalid content-length"));
            }
            let n: u64 = std::str::from_utf8(item)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(Error::Invalid("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    match length {
        Some(n) => Ok((Framing::Length(n), true)),
        None => Err(Error::Invalid("invalid content-length")),
    }
}

/// What the decoder found in the buffer.
#[derive(Debug)]
enum Decoded {
    Frame(Frame<Bytes>),
    /// More bytes are needed.
    More,
    /// The body is complete.
    End,
}

/// Takes a response body out of the bytes read, frame by frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Close,
    Done,
}

impl Decoder {
    fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Length(0) => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::ChunkSize,
            Framing::Close => Decoder::Close,
        }
    }

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match *self {
                Decoder::Done => return Ok(Decoded::End),
                Decoder::Length(n) | Decoder::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = n - take as u64;
                    *self = match (*self, left) {
                        (Decoder::Length(_), 0) => Decoder::Done,
                        (Decoder::Length(_), _) => Decoder::Length(left),
                        (_, 0) => Decoder::ChunkEnd,
                        (_, _) => Decoder::ChunkData(left),
                    };
                    return Ok(Decoded::Frame(Frame::data(data)));
                }
                Decoder::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let data = buf.split().freeze();
                    return Ok(Decoded::Frame(Frame::data(data)));
                }
                Decoder::ChunkSize => {
                    let Some(end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(Error::Invalid("chunk-size line too long"));
                        }
                        return Ok(Decoded::More);
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(Error::Invalid("chunk-size line too long"));
                    }
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = if size == 0 {
                        Decoder::Trailers
                    } else {
                        Decoder::ChunkData(size)
                    };
                }
                Decoder::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Invalid("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = Decoder::ChunkSize;
                }
                Decoder::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Decoder::Done;
                        return Ok(Decoded::End);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for field in fields {
                                let name = HeaderName::from_bytes(field.name.as_bytes());
                                let value = HeaderValue::from_bytes(field.value);
                                if let (Ok(name), Ok(value)) = (name, value) {
                                    trailers.append(name, value);
                                }
                            }
                            (len, trailers)
                        }
                        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {
                            return Ok(Decoded::More);
                        }
                        Ok(httparse::Status::Partial) | Err(_) => {
                            return Err(Error::Invalid("malformed trailer section"));
                        }
                    };
                    buf.advance(len);
                    *self = Decoder::Done;
                    return Ok(Decoded::Frame(Frame::trailers(trailers)));
                }
            }
        }
    }

    /// The connection closed: the end of a body that runs to the close, an error otherwise.
    fn closed(&mut self) -> Result<(), Error> {
        match *self {
            Decoder::Close | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(Error::Closed),
        }
    }

    /// How much room the next read should ask for: what the rest of a body of known length
    /// needs (up to [`READ_MAX`]: the room fills with that body), else `size`, what reads have
    /// been bringing.
    fn want(&self, size: usize) -> usize {
        match *self {
            Decoder::Length(n) => usize::try_from(n)
                .unwrap_or(READ_MAX)
                .clamp(READ_MIN, READ_MAX),
            _ => size,
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A chunk-size line's size (hex digits, then optional extensions, which are ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Then optional whitespace and extensions (RFC 9112, 7.1.1), nothing else, and no bare
    // CR or LF anywhere in the line.
    let rest = line[digits..].trim_ascii_start();
    if digits == 0
        || digits > 15
        || !(rest.is_empty() || rest[0] == b';')
        || line.iter().any(|&b| b == b'\r' || b == b'\n')
    {
        return Err(Error::Invalid("invalid chunk size"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| Error::Invalid("chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| Error::Invalid("invalid chunk size"))
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
            keep_alive: head.keep_alive && !request.unfinished,
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
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if conn.buf.capacity() - conn.buf.len() < READ_MIN {
                conn.buf.reserve(this.decoder.want(conn.read_size));
            }
            let room = conn.buf.capacity() - conn.buf.len();
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.buf
            ));
            let failed = match read {
                Ok(0) => this.decoder.closed().err(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(text: &str) -> Result<Option<Head>, Error> {
        parse_head(&mut BytesMut::from(text), false)
    }

    /// Feeds `wire` to a decoder `step` bytes at a time; the data and trailers it gave.
    fn decode_all(
        framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut decoder = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut chunks = wire.chunks(step.max(1));
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Frame(frame) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                },
                Decoded::End => return Ok((data, trailers)),
                Decoded::More => match chunks.next() {
                    Some(chunk) => buf.extend_from_slice(chunk),
                    None => {
                        decoder.closed()?;
                        return Ok((data, trailers));
                    }
                },
            }
        }
    }

    #[test]
    fn heads_are_parsed_and_interim_answers_skipped() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
        );
        let head = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["x-a"], "b");
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"hello");
        assert!(head_of("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |text: &str| {
            let head = head_of(text).unwrap().unwrap();
            (head.framing, head.keep_alive)
        };
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Framing::Close, false));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            (Framing::Chunked, true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
            (Framing::Chunked, false)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            (Framing::Close, false)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n"),
            (Framing::Length(4), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\n"),
            (Framing::Length(4), false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\n"),
            (Framing::Length(4), false)
        );
        let head =
            head_of("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
        let headers = head.unwrap().unwrap().headers;
        assert!(
            !headers.contains_key(CONTENT_LENGTH),
            "a length beside a coding goes"
        );
        let head = parse_head(
            &mut BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"),
            true,
        );
        assert_eq!(head.unwrap().unwrap().framing, Framing::Empty);
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +4\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
        ] {
            assert!(head_of(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn connection_fields_stay_out_of_the_answer() {
        let head = head_of(
            "HTTP/1.1 200 OK\r\nConnection: Keep-Alive, X-Hop,\tx-other \r\nKeep-Alive: timeout=5\r\n\
             X-Hop: 1\r\nx-other: 2\r\nX-Kept: 3\r\nTransfer-Encoding: chunked\r\n\
             Content-Length: 7\r\nUpgrade: h2c\r\nProxy-Connection: x\r\nTE: trailers\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let names: Vec<&str> = head.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!((head.framing, head.keep_alive), (Framing::Chunked, false));
        let head = head_of(
            "HTTP/1.1 200 OK\r\nconnection: host, close\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.headers["host"], "a", "Connection cannot strip host");
        assert_eq!((head.framing, head.keep_alive), (Framing::Length(0), false));
        let framing = |text: &str| {
            let head = head_of(text).unwrap().unwrap();
            (head.framing, head.keep_alive, head.headers)
        };
        let (framing_of, reused, _) =
            framing("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\ncontent-length: 1\r\n\r\n");
        assert_eq!((framing_of, reused), (Framing::Length(1), true));
        let (_, reused, _) =
            framing("HTTP/1.1 200 OK\r\nConnection: CLOSE\r\ncontent-length: 1\r\n\r\n");
        assert!(!reused);
        // The last coding of all the transfer-encoding fields decides.
        let (framing_of, reused, _) = framing(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n",
        );
        assert_eq!((framing_of, reused), (Framing::Close, false));
        let (framing_of, reused, _) = framing(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked,\r\n\r\n",
        );
        assert_eq!((framing_of, reused), (Framing::Chunked, true));
        // A length that Connection names still frames the body, and does not reach the client.
        let (framing_of, reused, headers) =
            framing("HTTP/1.1 200 OK\r\nconnection: Content-Length\r\ncontent-length: 3\r\n\r\n");
        assert_eq!((framing_of, reused), (Framing::Length(3), true));
        assert!(headers.is_empty());
        for bad in [
            "content-length:",
            "content-length: 4,",
            "content-length: ,4",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n");
            assert!(head_of(&text).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn bodies_decode_however_the_bytes_arrive() {
        let chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n";
        for step in 1..chunked.len() {
            let (data, trailers) = decode_all(Framing::Chunked, chunked, step).unwrap();
            assert_eq!(data, b"hello world");
            assert_eq!(trailers.unwrap()["x-checksum"], "42");
            let (data, _) = decode_all(Framing::Length(11), b"hello world", step).unwrap();
            assert_eq!(data, b"hello world");
            let (data, _) = decode_all(Framing::Close, b"hello world", step).unwrap();
            assert_eq!(data, b"hello world");
        }
        let (data, trailers) = decode_all(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!((data.as_slice(), trailers), (&b"abc"[..], None));
    }

    #[test]
    fn broken_bodies_are_errors() {
        assert!(matches!(
            decode_all(Framing::Length(11), b"hello", 3),
            Err(Error::Closed)
        ));
        assert!(matches!(
            decode_all(Framing::Chunked, b"5\r\nhello\r\n", 3),
            Err(Error::Closed)
        ));
        for bad in [
            &b"z\r\n"[..],
            b"5\r\nhelloXY",
            b"ffffffffffffffffff\r\n",
            b"5 junk\r\nhello\r\n",
            b"5;a=\nb\r\nhello\r\n",
        ] {
            assert!(matches!(
                decode_all(Framing::Chunked, bad, 64),
                Err(Error::Invalid(_))
            ));
        }
    }

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
    }
}
