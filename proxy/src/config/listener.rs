//! The listener types: where a listener listens, what it does past its connection limits, and
//! what an HTTP listener accepts of a request and does to its path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{ClusterId, Route};

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// Where to listen; `None` when the socket comes from systemd by `fd_name` alone.
    pub address: Option<SocketAddr>,
    /// The `FileDescriptorName` of a socket systemd passes (socket activation).
    pub fd_name: Option<String>,
    pub backlog: u32,
    pub access_log: Option<PathBuf>,
    /// Connections this listener holds at most, if limited.
    pub max_connections: Option<usize>,
    /// What happens to a connection past this listener's or the generation's limit.
    pub overflow: Overflow,
    pub kind: ListenerKind,
}

/// What a listener does with a connection past a connection limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Accept it and close it at once (an HTTP client is first answered 503), counting it in
    /// `downstream_cx_overflow`: clients learn at once, as with Envoy's `max_connections`.
    Close,
    /// Stop accepting until a connection closes; clients wait in the accept queue (bounded by
    /// the backlog), as with HAProxy's `maxconn`.
    Wait,
}

#[derive(Debug)]
pub enum ListenerKind {
    /// Bytes both ways between each accepted connection and an endpoint of the cluster.
    Tcp {
        cluster: ClusterId,
    },
    Http(HttpListener),
}

#[derive(Debug)]
pub struct HttpListener {
    pub routes: Vec<Route>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub idle_timeout: Duration,
    pub limits: RequestLimits,
    /// What is done to a request's path before it is routed and forwarded.
    pub path: PathNormalization,
}

/// How a listener normalises request paths (RFC 3986, section 6.2.2) before routing them; the
/// upstream gets the normalised path. Envoy's `normalize_path`, `merge_slashes` and
/// `path_with_escaped_slashes_action`, nginx's `merge_slashes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathNormalization {
    /// Decode percent-encoded unreserved characters, refuse invalid percent-encodings and
    /// remove `.` and `..` segments (RFC 3986, section 5.2.4).
    pub normalize: bool,
    /// Collapse runs of `/` into one.
    pub merge_slashes: bool,
    /// What to do with `%2F` and `%5C` in a path.
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathNormalization {
    fn default() -> Self {
        PathNormalization {
            normalize: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::Reject,
        }
    }
}

/// What a listener does with a path that holds an encoded slash (`%2F`) or backslash (`%5C`):
/// a backend that decodes it before resolving `..` sees another path than the routes did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Forward it as it is (for backends that give `%2F` a meaning, such as an encoded name).
    Keep,
    /// Answer 400.
    Reject,
    /// Decode it to `/`, then normalise and route the result.
    UnescapeAndForward,
    /// Decode it to `/`, normalise, and answer 307 with the result as `Location`.
    UnescapeAndRedirect,
}

/// What an HTTP listener accepts of a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Time to send the request line and headers (408 past it).
    pub header_timeout: Duration,
    /// Bytes of the request line and headers (431 past it).
    pub max_header_size: usize,
    /// Header fields (431 past it).
    pub max_headers: usize,
    /// Bytes of a request body, if limited (413 past it).
    pub max_body: Option<u64>,
}

impl Listener {
    /// How logs name where it listens.
    pub fn describe(&self) -> String {
        match (&self.address, &self.fd_name) {
            (Some(address), _) => address.to_string(),
            (None, Some(name)) => format!("fd:{name}"),
            (None, None) => "-".to_owned(),
        }
    }
}
