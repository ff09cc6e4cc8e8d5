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

mod body;
mod head;
#[cfg(test)]
mod tests;

use http::{HeaderMap, StatusCode, Version};

pub use body::{Decoded, Decoder};
pub use head::{parse_head, parse_head_for};

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
