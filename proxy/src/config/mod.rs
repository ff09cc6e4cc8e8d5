//! Configuration: a TOML file parsed once into a validated [`Config`].
//!
//! Parse, don't validate: [`raw`] mirrors the file, [`load`] checks every value and builds types
//! that cannot hold an invalid state (addresses are `SocketAddr`, routes point at clusters by
//! index, TLS material is loaded). Everything is checked before anything is bound or spawned, and
//! every error names the file, the line and the field.

mod cluster;
mod error;
mod listener;
mod raw;
mod route;
mod tls;
mod validate;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

pub use cluster::{
    CircuitBreakers, Cluster, Discovery, DnsName, Endpoint, HashKey, HealthCheck, HealthCheckKind,
    LookupFamily, OutlierDetection, UpstreamProtocol,
};
pub use error::ConfigError;
pub use listener::{
    EscapedSlashes, HttpListener, Listener, ListenerKind, Overflow, PathNormalization,
    RequestLimits,
};
pub use route::{
    ClusterRoute, DirectResponse, HeaderMatch, HeaderRule, HostPattern, Mirror, PathMatch,
    RateLimit, RetryOn, RetryPolicy, Route, RouteAction, Target,
};
pub use validate::{load, parse};

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

/// Index of a cluster in [`Config::clusters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterId(pub usize);

impl Config {
    pub fn cluster(&self, id: ClusterId) -> &Cluster {
        &self.clusters[id.0]
    }
}
