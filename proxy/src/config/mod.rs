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
/// Default time between two resolutions of a `strict_dns` cluster's names (Envoy's).
pub const DEFAULT_DNS_REFRESH_RATE: Duration = Duration::from_secs(5);
/// Default panic threshold, in percent of healthy endpoints (Envoy's).
pub const DEFAULT_PANIC_THRESHOLD: f64 = 50.0;
/// Default circuit-breaker limits (Envoy's).
pub const DEFAULT_BREAKERS: CircuitBreakers = CircuitBreakers {
    max_connections: 1024,
    max_pending_requests: 1024,
    max_requests: 1024,
    max_retries: 3,
};
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

/// Index of a cluster in [`Config::clusters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterId(pub usize);

#[derive(Debug)]
pub struct Route {
    pub hosts: Vec<HostPattern>,
    pub path: PathMatch,
    /// Every one must match.
    pub headers: Vec<HeaderMatch>,
    /// Requests past it are answered 429.
    pub rate_limit: Option<RateLimit>,
    pub action: RouteAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

/// A condition on a request header.
#[derive(Debug)]
pub struct HeaderMatch {
    pub name: http::HeaderName,
    pub rule: HeaderRule,
    /// The route matches when the rule does not.
    pub invert: bool,
}

#[derive(Debug)]
pub enum HeaderRule {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
    /// The header is there (any value).
    Present,
}

#[derive(Debug)]
pub enum RouteAction {
    Cluster(Box<ClusterRoute>),
    Direct(DirectResponse),
}

/// A route to one or more clusters, with what protects the request on its way.
#[derive(Debug)]
pub struct ClusterRoute {
    pub target: Target,
    /// All tries together; the cluster's `request_timeout` when not given.
    pub timeout: Option<Duration>,
    /// Each try.
    pub per_try_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub mirror: Option<Mirror>,
    /// Protocols an HTTP/1.1 client may switch to (`Upgrade`), in lower case, each a name with
    /// or without a version (`websocket`, `foo/2`); never `h2c`.
    pub upgrades: Vec<String>,
    /// How long a tunnel (after a `101`) may carry no byte either way; the listener's
    /// `idle_timeout` when not given.
    pub upgrade_idle_timeout: Option<Duration>,
}

/// Which cluster a request goes to.
#[derive(Debug, Clone)]
pub enum Target {
    One(ClusterId),
    /// Drawn by weight for each request (canary, blue/green).
    Weighted(Vec<(ClusterId, u32)>),
}

impl Target {
    /// The cluster for one request; `draw` is a random number.
    pub fn pick(&self, draw: u64) -> ClusterId {
        match self {
            Target::One(id) => *id,
            Target::Weighted(weights) => {
                let total: u64 = weights.iter().map(|&(_, w)| u64::from(w)).sum();
                let mut at = draw % total.max(1);
                for &(id, w) in weights {
                    if at < u64::from(w) {
                        return id;
                    }
                    at -= u64::from(w);
                }
                weights[0].0
            }
        }
    }

    pub fn clusters(&self) -> Vec<ClusterId> {
        match self {
            Target::One(id) => vec![*id],
            Target::Weighted(w) => w.iter().map(|&(id, _)| id).collect(),
        }
    }
}

/// When a failed try is made again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    /// Retry POST and PATCH too (they may have had an effect upstream).
    pub retry_non_idempotent: bool,
    /// Backoff before a retry: exponential from `base_interval`, with jitter, up to `max_interval`.
    pub base_interval: Duration,
    pub max_interval: Duration,
    /// Retries in flight at most, as a share (percent) of requests in flight to the cluster...
    pub budget_percent: f64,
    /// ...but always this many.
    pub min_retry_concurrency: u32,
}

/// What a retry is for (Envoy's `retry_on` values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// No connection could be made.
    pub connect_failure: bool,
    /// The connection broke before a response, or the try timed out.
    pub reset: bool,
    /// Any 5xx answer (and what `connect_failure` and `reset` cover).
    pub server_error: bool,
    /// 502, 503, 504 (and what `connect_failure` and `reset` cover).
    pub gateway_error: bool,
    /// Specific statuses.
    pub statuses: [u16; 4],
}

/// A token bucket per route, shared by the generation's workers: `max_tokens` at most, refilled
/// with `tokens_per_fill` every `fill_interval`; a request without a token is answered 429.
#[derive(Debug)]
pub struct RateLimit {
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval: Duration,
    /// (tokens, when the last fill was counted).
    pub bucket: std::sync::Mutex<(u64, std::time::Instant)>,
}

impl RateLimit {
    /// Takes a token if there is one; if not, says how long until the next fill.
    pub fn take(&self) -> Result<(), Duration> {
        let now = std::time::Instant::now();
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, since) = *bucket;
        let fills =
            now.saturating_duration_since(since).as_nanos() / self.fill_interval.as_nanos().max(1);
        let (mut tokens, since) = if fills > 0 {
            let added = u64::try_from(fills)
                .unwrap_or(u64::MAX)
                .saturating_mul(self.tokens_per_fill);
            let fills = u32::try_from(fills).unwrap_or(u32::MAX);
            (
                tokens.saturating_add(added).min(self.max_tokens),
                since + self.fill_interval.saturating_mul(fills),
            )
        } else {
            (tokens, since)
        };
        let taken = tokens > 0;
        if taken {
            tokens -= 1;
        }
        *bucket = (tokens, since);
        if taken {
            Ok(())
        } else {
            Err((since + self.fill_interval).saturating_duration_since(now))
        }
    }
}

/// A copy of a share of a route's requests, sent to another cluster; its answers are dropped.
#[derive(Debug, Clone, Copy)]
pub struct Mirror {
    pub cluster: ClusterId,
    pub percent: f64,
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
    /// Static clusters: the endpoints (host names were resolved once, when the file was read).
    /// `strict_dns` clusters: none; the cluster manager resolves [`Discovery::StrictDns`] names.
    pub endpoints: Vec<Endpoint>,
    pub discovery: Discovery,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    pub lb_policy: crate::lb::Policy,
    /// What ring hash and Maglev hash; `None` for other policies.
    pub hash_key: Option<HashKey>,
    /// Below this share of healthy endpoints (percent), requests go to all of them.
    pub panic_threshold: f64,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<OutlierDetection>,
    pub breakers: CircuitBreakers,
    /// How requests reach the endpoints; HTTP routes only (tcp listeners forward bytes).
    pub protocol: UpstreamProtocol,
}

/// An upstream address and its share of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
}

/// Where a cluster's endpoints come from.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// As written in the file.
    Static,
    /// Every address of each name, resolved again every `refresh`; the last good answer is
    /// kept when DNS fails.
    StrictDns {
        names: Vec<DnsName>,
        refresh: Duration,
        /// Name servers to ask; empty: the system's (`/etc/resolv.conf`, `/etc/hosts`).
        resolvers: Vec<SocketAddr>,
        family: LookupFamily,
    },
}

/// Which of a name's addresses become endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupFamily {
    /// The IPv4 ones if there are any, else the IPv6 ones.
    V4Preferred,
    V4Only,
    V6Only,
    All,
}

impl LookupFamily {
    /// Keeps the addresses of the family, in place.
    pub fn filter(self, addresses: &mut Vec<SocketAddr>) {
        match self {
            LookupFamily::All => {}
            LookupFamily::V4Only => addresses.retain(SocketAddr::is_ipv4),
            LookupFamily::V6Only => addresses.retain(SocketAddr::is_ipv6),
            LookupFamily::V4Preferred => {
                if addresses.iter().any(SocketAddr::is_ipv4) {
                    addresses.retain(SocketAddr::is_ipv4);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

/// What ring hash and Maglev hash to pick an endpoint. A request without the key goes to a
/// random endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    SourceIp,
}

/// Active health checking of every endpoint of a cluster, from the main thread.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Passes in a row that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
    /// Failures in a row that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone)]
pub enum HealthCheckKind {
    /// A TCP connection opens.
    Tcp,
    /// `GET path` answers one of `expected` statuses.
    Http {
        path: String,
        /// The `Host` header; the cluster's name when not given.
        host: String,
        expected: Vec<std::ops::RangeInclusive<u16>>,
    },
}

/// Passive health: endpoints that fail in a row are ejected for a while.
#[derive(Debug, Clone, Copy)]
pub struct OutlierDetection {
    /// 5xx answers (and connect failures, resets, timeouts) in a row that eject.
    pub consecutive_5xx: Option<u32>,
    /// 502, 503, 504 (and connect failures, resets, timeouts) in a row that eject.
    pub consecutive_gateway_failure: Option<u32>,
    /// The first ejection's length; the nth lasts n times as long, up to `max_ejection_time`.
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// The most of a cluster's endpoints ejected at once (percent; at least one is allowed).
    pub max_ejection_percent: f64,
}

/// A cluster's limits over all workers; past one, a request is answered 503 at once.
#[derive(Debug, Clone, Copy)]
pub struct CircuitBreakers {
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_requests: usize,
    pub max_retries: usize,
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
    /// Whether this route takes a request for `host` (without port), `path` and `headers`.
    pub fn matches(&self, host: &str, path: &str, headers: &HeaderMap) -> bool {
        let path_matches = match &self.path {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
        };
        path_matches
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host)))
            && self.headers.iter().all(|m| m.matches(headers, host))
    }
}

impl HeaderMatch {
    /// `host` is the request's host without port: a match on `host` reads it, so that it works
    /// for HTTP/2 requests too (their host is the `:authority`, not a header).
    pub fn matches(&self, headers: &HeaderMap, host: &str) -> bool {
        let test = |v: &str| match &self.rule {
            HeaderRule::Exact(e) => v == e,
            HeaderRule::Prefix(p) => v.starts_with(p.as_str()),
            HeaderRule::Regex(r) => r.is_match(v),
            HeaderRule::Present => true,
        };
        let hit = if self.name == http::header::HOST {
            !host.is_empty() && test(host)
        } else {
            let mut values = headers.get_all(&self.name).iter();
            match &self.rule {
                HeaderRule::Present => values.next().is_some(),
                _ => values.any(|v| v.to_str().is_ok_and(test)),
            }
        };
        hit != self.invert
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
    fn a_host_match_reads_the_host_of_http2_requests_too() {
        let m = HeaderMatch {
            name: http::header::HOST,
            rule: HeaderRule::Exact("api.test".into()),
            invert: false,
        };
        // An HTTP/2 request: no Host header, the host comes from :authority.
        assert!(m.matches(&HeaderMap::new(), "api.test"));
        assert!(!m.matches(&HeaderMap::new(), "web.test"));
        let other = HeaderMatch {
            name: http::HeaderName::from_static("x-a"),
            rule: HeaderRule::Present,
            invert: true,
        };
        assert!(other.matches(&HeaderMap::new(), "api.test"));
    }

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
