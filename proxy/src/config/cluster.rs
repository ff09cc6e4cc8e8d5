//! The cluster types: a cluster's endpoints and how they are found (static or `strict_dns`), its
//! balancer, health checks, outlier detection, circuit breakers and protocol.

use std::net::SocketAddr;
use std::time::Duration;

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
