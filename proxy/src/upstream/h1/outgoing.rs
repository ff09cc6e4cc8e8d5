//! A request as it goes on the wire: its head encoded (the client's framing replaced), and its
//! body, kept in memory or streamed from the client (chunked when its size is not known).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, request};
use http_body::Body as _;

use super::Error;
use crate::upstream::request::TrackedBody;

/// A request body kept in memory up to this size goes out in the same write as the head.
const COALESCE: usize = 16 * 1024;

/// A request body streamed from the client to the upstream, chunked if its size is not known.
pub struct Upload {
    body: TrackedBody,
    chunked: bool,
    /// Bytes taken from the body (with their chunk framing) not written yet.
    pub(super) out: Bytes,
    pub(super) ended: bool,
}

impl Upload {
    /// Moves the body on as far as it goes without waiting; ready when all of it is written.
    pub(super) fn poll<W: tokio::io::AsyncWrite + Unpin>(
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

/// A request as it goes on the wire: its head, and its body (kept, or streamed from the client).
pub struct Outgoing {
    pub(super) head: Bytes,
    pub(super) body: OutBody,
    pub(super) head_request: bool,
    /// The request asks for an upgrade (it carries `Upgrade`): a `101` may answer it, and its
    /// connection is not used again whatever the answer.
    pub(super) upgrade: bool,
    /// Set when the request was not all sent (the upstream answered first).
    pub(super) unfinished: bool,
}

pub(super) enum OutBody {
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
