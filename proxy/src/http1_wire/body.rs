//! A response body taken out of the bytes read, frame by frame: a length, chunks and their
//! trailers, or up to the close.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;

use super::{Framing, MAX_HEAD, MAX_HEADERS, WireError};

/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

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
