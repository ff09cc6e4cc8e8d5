//! A response body read from its upstream connection as the client takes it (what is left of
//! the upload going on from the same body), the connection given back for the pool once the body
//! has ended cleanly, or kept for a tunnel after a `101`.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::net::TcpStream;

use baton_proxy::http1_wire::{Decoded, Decoder, Framing, Head};

use super::outgoing::{OutBody, Outgoing, Upload};
use super::{Conn, Error, Live, READ_MAX, READ_MIN};

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
