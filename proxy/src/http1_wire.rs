//! HTTP/1.1 responses as bytes on the wire: the head (status line and fields) and the body's
//! framing (RFC 9112, section 6), then the body itself, frame by frame.
//!
//! Heads are parsed by httparse, the parser hyper uses. What this module adds is the framing:
//! which bytes are the body (a length, chunked with trailers, or up to the close), and whether the
//! connection may carry another request; interim (1xx) answers are skipped, and a `101` is the
//! final answer to a request that asked for an upgrade ([`parse_head_for`]) and an error to any
//! other. Pure functions over buffers, in the library
//! so that a fuzz target can feed them any bytes an upstream may send (`fuzz/`); the proxy's
//! upstream client (`upstream::h1` in the binary) reads the sockets.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use http_body::Frame;

/// What is wrong with the bytes an upstream sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("upstream closed the connection before the response was complete")]
    Closed,
    #[error("upstream sent an invalid response: {0}")]
    Invalid(&'static str),
}

/// Longest response head (status line and header fields), and longest trailer section.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head or trailer section (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// A final response head, with the fields that concern the connection only taken out.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this response's body is read.
    pub keep_alive: bool,
}

/// Where a response body ends (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD request's answer, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Up to the close of the connection.
    Close,
}

/// Parses a response head at the start of `buf`, taking it (and any interim answers before it)
/// out of `buf`. `None` if the head is not complete yet.
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, WireError> {
    parse_head_for(buf, head_request, false)
}

/// [`parse_head`] for a request that may have asked for an upgrade (`upgrade`): then a `101
/// Switching Protocols` is its final answer, with no body, a connection that carries no other
/// request, and its `Upgrade` field kept (it names the protocol the connection now speaks; what
/// follows the head in `buf` is that protocol's). Without `upgrade`, a `101` is an error.
pub fn parse_head_for(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Option<Head>, WireError> {
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
                return Err(WireError::Invalid("response head larger than 64 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Invalid("more than 100 header fields"));
            }
            Err(_) => return Err(WireError::Invalid("malformed status line or header field")),
        };
        let code = response.code.unwrap_or_default();
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let switching = code == 101;
        if switching && !upgrade {
            return Err(WireError::Invalid(
                "101 Switching Protocols, which was not asked for",
            ));
        }
        if (100..200).contains(&code) && !switching {
            // An interim answer (100 Continue, 103 Early Hints): the final one follows.
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| WireError::Invalid("status code out of range"))?;
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
        let (framing, keep_alive) = if switching {
            (Framing::Empty, false)
        } else {
            framing(&head, fields, &hop, status, head_request)?
        };
        // The fields that concern this connection only (RFC 9110, 7.6.1) were read for the
        // framing and the connection's reuse; they do not go into the client's answer, nor
        // does a content-length beside a transfer coding (RFC 9112, 6.3).
        let mut headers = HeaderMap::with_capacity(count);
        for &(name_start, name_end, start, end) in fields {
            let raw = &head[name_start as usize..name_end as usize];
            if hop.drops(&head, raw) && !(switching && raw.eq_ignore_ascii_case(b"upgrade")) {
                continue;
            }
            let name = HeaderName::from_bytes(raw)
                .map_err(|_| WireError::Invalid("invalid header field name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(start as usize..end as usize))
                .map_err(|_| WireError::Invalid("invalid header field value"))?;
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
) -> Result<(Framing, bool), WireError> {
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
                return Err(WireError::Invalid("invalid content-length"));
            }
            let n: u64 = std::str::from_utf8(item)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(WireError::Invalid("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError::Invalid("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    match length {
        Some(n) => Ok((Framing::Length(n), true)),
        None => Err(WireError::Invalid("invalid content-length")),
    }
}

/// What the decoder found in the buffer.
#[derive(Debug)]
pub enum Decoded {
    Frame(Frame<Bytes>),
    /// More bytes are needed.
    More,
    /// The body is complete.
    End,
}

/// Takes a response body out of the bytes read, frame by frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Close,
    Done,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty | Framing::Length(0) => Decoder::Done,
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::ChunkSize,
            Framing::Close => Decoder::Close,
        }
    }

    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, WireError> {
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
                            return Err(WireError::Invalid("chunk-size line too long"));
                        }
                        return Ok(Decoded::More);
                    };
                    if end > MAX_CHUNK_LINE {
                        return Err(WireError::Invalid("chunk-size line too long"));
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
                        return Err(WireError::Invalid("chunk not followed by CRLF"));
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
                            return Err(WireError::Invalid("malformed trailer section"));
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
    pub fn closed(&mut self) -> Result<(), WireError> {
        match *self {
            Decoder::Close | Decoder::Done => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(WireError::Closed),
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A chunk-size line's size (hex digits, then optional extensions, which are ignored).
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // Then optional whitespace and extensions (RFC 9112, 7.1.1), nothing else, and no bare
    // CR or LF anywhere in the line.
    let rest = line[digits..].trim_ascii_start();
    if digits == 0
        || digits > 15
        || !(rest.is_empty() || rest[0] == b';')
        || line.iter().any(|&b| b == b'\r' || b == b'\n')
    {
        return Err(WireError::Invalid("invalid chunk size"));
    }
    let text =
        std::str::from_utf8(&line[..digits]).map_err(|_| WireError::Invalid("chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| WireError::Invalid("invalid chunk size"))
}

#[cfg(test)]
mod tests {
    use http::header::CONTENT_LENGTH;

    use super::*;

    fn head_of(text: &str) -> Result<Option<Head>, WireError> {
        parse_head(&mut BytesMut::from(text), false)
    }

    /// Feeds `wire` to a decoder `step` bytes at a time; the data and trailers it gave.
    fn decode_all(
        framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), WireError> {
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
    fn a_101_answers_only_a_request_that_asked_for_an_upgrade() {
        let wire: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
        assert!(
            parse_head(&mut BytesMut::from(wire), false).is_err(),
            "a 101 nobody asked for is refused"
        );
        let mut buf = BytesMut::from(wire);
        let head = parse_head_for(&mut buf, false, true).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!((head.framing, head.keep_alive), (Framing::Empty, false));
        assert_eq!(head.headers["upgrade"], "websocket");
        assert_eq!(
            head.headers["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(!head.headers.contains_key("connection"));
        assert_eq!(
            &buf[..],
            b"\x81\x02hi",
            "what follows is the new protocol's"
        );
        // A refusal is an ordinary answer, and interim answers before either are skipped.
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno",
        );
        let head = parse_head_for(&mut buf, false, true).unwrap().unwrap();
        assert_eq!(
            (head.status.as_u16(), head.framing),
            (403, Framing::Length(2))
        );
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
            Err(WireError::Closed)
        ));
        assert!(matches!(
            decode_all(Framing::Chunked, b"5\r\nhello\r\n", 3),
            Err(WireError::Closed)
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
                Err(WireError::Invalid(_))
            ));
        }
    }
}
