//! Configuration: a TOML file parsed once into a validated [`Config`].
//!
//! Parse, don't validate: [`raw`] mirrors the file, [`load`] checks every value and builds types
//! that cannot hold an invalid state (addresses are `SocketAddr`, routes point at clusters by
//! index, TLS material is loaded). Everything is checked before anything is bound or spawned, and
//! every error names the file, the line and the field.

mod error;
mod raw;
mod tls;
mod validate;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

pub use error::ConfigError;

/// Default time a draining generation gives its connections before closing the rest.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time an HTTP/1.1 connection must have been idle before a drain closes it.
pub const DEFAULT_DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);
/// Default keep-alive idle timeout of downstream HTTP connections.
pub const DEFAULT_LISTENER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default listen backlog, as nginx uses on Linux.
pub const DEFAULT_BACKLOG: u32 = 511;
/// Default upstream connect timeout (Envoy's default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time to wait for an upstream's response headers (Envoy's route timeout).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Default lifetime of an idle pooled upstream connection.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of idle connections a worker keeps per upstream endpoint.
pub const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 128;
/// Default time a client may take to send a request's line and headers, from its first byte
/// (from the accept for a connection's first request): HAProxy's advised `timeout http-request`.
pub const DEFAULT_REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest request line and headers, in bytes (Envoy's 60 KiB).
pub const DEFAULT_MAX_REQUEST_HEADER_SIZE: usize = 60 * 1024;
/// Default most header fields in a request (Envoy's and hyper's 100).
pub const DEFAULT_MAX_REQUEST_HEADERS: usize = 100;
/// Default time a worker's event loop may stall before the guard dog counts a miss (Envoy's).
pub const DEFAULT_GUARD_DOG_MISS: Duration = Duration::from_millis(200);
/// Default time for a mega miss (Envoy's).
pub const DEFAULT_GUARD_DOG_MEGA_MISS: Duration = Duration::from_secs(1);
/// Default time after which a stalled worker aborts its generation: no worker of baton blocks
/// for long on purpose, so one stalled this long is wedged, and its connections with it.
pub const DEFAULT_GUARD_DOG_KILL: Duration = Duration::from_secs(30);

/// A validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// Names this instance: its stats region, its control socket.
    pub instance: String,
    /// Worker threads, when the file sets them.
    pub concurrency: Option<NonZeroUsize>,
    pub drain: DrainSettings,
    pub admin: Option<Admin>,
    pub stats: StatsSettings,
    pub guard_dog: GuardDogSettings,
    /// Add `x-baton-epoch: <epoch>` to every HTTP response (to see which generation answered).
    pub epoch_header: bool,
    /// Downstream connections the generation holds over all its listeners, if limited.
    pub max_connections: Option<usize>,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    /// Connections still open this long after a drain began are closed.
    pub timeout: Duration,
    /// An idle HTTP/1.1 connection is closed by a drain only once it has been idle this long.
    pub idle_grace: Duration,
}

/// When the guard dog on the main thread says a worker's event loop is stalled.
#[derive(Debug, Clone, Copy)]
pub struct GuardDogSettings {
    /// Counted in `server.watchdog_miss`.
    pub miss: Duration,
    /// Counted in `server.watchdog_mega_miss`, and logged.
    pub mega_miss: Duration,
    /// The generation aborts, so that the supervisor replaces it; `None`: never.
    pub kill: Option<Duration>,
}

/// Where the shared-memory stats region is, and its sizes when this process creates it.
#[derive(Debug, Clone)]
pub struct StatsSettings {
    pub path: PathBuf,
    pub capacities: shm_stats::Capacities,
}

#[derive(Debug)]
pub struct Admin {
    pub address: SocketAddr,
}

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

/// Index of a cluster in [`Config::clusters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterId(pub usize);

#[derive(Debug)]
pub struct Route {
    pub hosts: Vec<HostPattern>,
    pub path_prefix: String,
    pub action: RouteAction,
}

#[derive(Debug)]
pub enum RouteAction {
    Cluster(ClusterId),
    Direct(DirectResponse),
}

#[derive(Debug)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A host that a route answers for; ports are ignored and case does not matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`
    Any,
    /// `example.com`, kept in lower case.
    Exact(String),
    /// `*.example.com`, kept as `.example.com` in lower case.
    Suffix(String),
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    /// How requests reach the endpoints; HTTP routes only (tcp listeners forward bytes).
    pub protocol: UpstreamProtocol,
}

/// The protocol a cluster speaks to its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, one request at a time per connection, idle connections pooled.
    #[default]
    Http1,
    /// Cleartext HTTP/2 with prior knowledge (h2c): one connection per endpoint and worker,
    /// every request a stream on it. What gRPC servers speak.
    Http2,
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

impl Config {
    pub fn cluster(&self, id: ClusterId) -> &Cluster {
        &self.clusters[id.0]
    }
}

impl Route {
    /// Whether this route takes a request for `host` (without port) and `path`.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        path.starts_with(self.path_prefix.as_str())
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host)))
    }
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &source)
}

/// Validates `source` as if it had been read from `path` (which relative paths start from).
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
    validate::validate(path, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_case_insensitively() {
        assert!(HostPattern::Exact("example.com".into()).matches("EXAMPLE.com"));
        assert!(!HostPattern::Exact("example.com".into()).matches("www.example.com"));
        let wildcard = HostPattern::Suffix(".example.com".into());
        assert!(wildcard.matches("www.Example.com"));
        assert!(!wildcard.matches(".example.com"));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches("wwwexample.com"));
        assert!(HostPattern::Any.matches(""));
    }
}
