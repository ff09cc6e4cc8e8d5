//! The configuration file as written: serde structs that mirror the TOML and reject unknown fields.
//!
//! Every value that is checked after parsing keeps its span, so that an error found during
//! validation can name the line it came from. Nothing here is used past [`super::validate`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

/// A duration as written: `"250ms"`, `"5s"`, `"1m 30s"`, or a bare number of seconds (as in
/// nginx's `keepalive_timeout 75;`).
#[derive(Debug, Clone, PartialEq)]
pub enum RawDuration {
    Text(String),
    Seconds(i64),
    /// `0.25`: a fraction of seconds.
    Fraction(f64),
}

impl<'de> serde::Deserialize<'de> for RawDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDuration;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"5s\" or \"250ms\", or a number of seconds")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration::Text(v.to_owned()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawDuration, E> {
                Ok(RawDuration::Seconds(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RawDuration, E> {
                Ok(RawDuration::Fraction(v))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The keys of [`RawConfig`], in its order (what serde's `expected one of` lists; a test holds
/// them equal).
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "instance",
    "concurrency",
    "drain_timeout",
    "drain_idle_grace",
    "drain_strategy",
    "epoch_header",
    "max_connections",
    "supervisor",
    "admin",
    "stats",
    "guard_dog",
    "listener",
    "cluster",
];

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub instance: Option<Spanned<String>>,
    pub concurrency: Option<Spanned<i64>>,
    pub drain_timeout: Option<Spanned<RawDuration>>,
    pub drain_idle_grace: Option<Spanned<RawDuration>>,
    /// Read by the supervisor, which sends it with each drain; checked here all the same.
    #[serde(default, rename = "drain_strategy")]
    pub _drain_strategy: Option<RawDrainStrategy>,
    pub epoch_header: Option<Spanned<bool>>,
    /// Downstream connections a generation holds over all its listeners.
    pub max_connections: Option<Spanned<i64>>,
    /// Read and checked by the supervisor (`baton`); the proxy only lets it be.
    #[serde(default, rename = "supervisor")]
    pub _supervisor: Option<serde::de::IgnoredAny>,
    pub admin: Option<Spanned<RawAdmin>>,
    pub stats: Option<Spanned<RawStats>>,
    pub guard_dog: Option<Spanned<RawGuardDog>>,
    #[serde(default)]
    pub listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pub cluster: Vec<Spanned<RawCluster>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuardDog {
    pub miss_timeout: Option<Spanned<RawDuration>>,
    pub mega_miss_timeout: Option<Spanned<RawDuration>>,
    pub kill_timeout: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStats {
    pub path: Option<Spanned<String>>,
    pub max_stats: Option<Spanned<i64>>,
    pub max_shards: Option<Spanned<i64>>,
    pub cells_per_shard: Option<Spanned<i64>>,
    /// Histogram bucket bounds in milliseconds.
    pub histogram_buckets: Option<Spanned<Vec<Spanned<f64>>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawDrainStrategy {
    Gradual,
    Immediate,
}

/// What a listener does with a connection past its `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawOverflow {
    Close,
    Wait,
}

/// A size as written: `65536`, `"64KiB"`, `"1MiB"`, `"10m"` (as in nginx's `client_max_body_size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSize {
    Text(String),
    Bytes(i64),
}

impl<'de> serde::Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawSize;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as \"64KiB\" or \"1MiB\", or a number of bytes")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// What an http listener does with `%2F` and `%5C` in a path (Envoy's
/// `path_with_escaped_slashes_action`, in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEscapedSlashes {
    Keep,
    Reject,
    UnescapeAndForward,
    UnescapeAndRedirect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawProtocol {
    Http,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Spanned<String>,
    pub address: Option<Spanned<String>>,
    /// Under systemd socket activation: the `FileDescriptorName` of the socket to use.
    pub fd_name: Option<Spanned<String>>,
    pub protocol: Spanned<RawProtocol>,
    /// `tcp` listeners only: the cluster that takes every connection.
    pub cluster: Option<Spanned<String>>,
    pub access_log: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<RawDuration>>,
    pub backlog: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_connections_action: Option<Spanned<RawOverflow>>,
    pub request_header_timeout: Option<Spanned<RawDuration>>,
    pub max_request_header_size: Option<Spanned<RawSize>>,
    pub max_request_headers: Option<Spanned<i64>>,
    pub max_request_body: Option<Spanned<RawSize>>,
    pub normalize_path: Option<Spanned<bool>>,
    pub merge_slashes: Option<Spanned<bool>>,
    pub path_with_escaped_slashes: Option<Spanned<RawEscapedSlashes>>,
    pub tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub certificate: Vec<Spanned<RawCertificate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
    pub server_names: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub hosts: Option<Vec<Spanned<String>>>,
    pub path_prefix: Option<Spanned<String>>,
    pub path_exact: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: Vec<Spanned<RawHeaderMatch>>,
    pub cluster: Option<Spanned<String>>,
    pub weighted_clusters: Option<Spanned<Vec<Spanned<RawWeightedCluster>>>>,
    pub direct_response: Option<Spanned<RawDirectResponse>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub per_try_timeout: Option<Spanned<RawDuration>>,
    pub retry: Option<Spanned<RawRetry>>,
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    pub mirror: Option<Spanned<RawMirror>>,
    /// Protocols a client may switch to with `Upgrade` (`["websocket"]` when not given).
    pub upgrades: Option<Spanned<Vec<Spanned<String>>>>,
    pub upgrade_idle_timeout: Option<Spanned<RawDuration>>,
}

/// `{ name = "x-canary", exact = "1" }`; one of `exact`, `prefix`, `regex`, `present`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatch {
    pub name: Spanned<String>,
    pub exact: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub regex: Option<Spanned<String>>,
    pub present: Option<Spanned<bool>>,
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedCluster {
    pub cluster: Spanned<String>,
    pub weight: Spanned<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub retry_on: Option<Vec<Spanned<String>>>,
    pub num_retries: Option<Spanned<i64>>,
    pub retry_non_idempotent: Option<bool>,
    pub base_interval: Option<Spanned<RawDuration>>,
    pub max_interval: Option<Spanned<RawDuration>>,
    pub budget_percent: Option<Spanned<f64>>,
    pub min_retry_concurrency: Option<Spanned<i64>>,
}

/// A token bucket, as Envoy's local rate limit writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub max_tokens: Spanned<i64>,
    pub tokens_per_fill: Option<Spanned<i64>>,
    pub fill_interval: Spanned<RawDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMirror {
    pub cluster: Spanned<String>,
    pub percent: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDirectResponse {
    pub status: Spanned<i64>,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub name: Spanned<String>,
    /// `"host:port"`, with an optional `" weight=N"` after it (as nginx's `server` writes it).
    pub endpoints: Spanned<Vec<Spanned<String>>>,
    pub discovery: Option<Spanned<RawDiscovery>>,
    pub dns_refresh_rate: Option<Spanned<RawDuration>>,
    pub dns_resolvers: Option<Vec<Spanned<String>>>,
    pub dns_lookup_family: Option<Spanned<RawLookupFamily>>,
    pub connect_timeout: Option<Spanned<RawDuration>>,
    pub request_timeout: Option<Spanned<RawDuration>>,
    pub idle_timeout: Option<Spanned<RawDuration>>,
    pub max_idle_per_endpoint: Option<Spanned<i64>>,
    pub lb_policy: Option<Spanned<RawLbPolicy>>,
    pub hash_key: Option<Spanned<RawHashKey>>,
    pub panic_threshold: Option<Spanned<f64>>,
    pub health_check: Option<Spanned<RawHealthCheck>>,
    pub outlier_detection: Option<Spanned<RawOutlier>>,
    pub circuit_breakers: Option<Spanned<RawBreakers>>,
    pub protocol: Option<Spanned<RawUpstreamProtocol>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawDiscovery {
    Static,
    StrictDns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawLookupFamily {
    V4Preferred,
    V4Only,
    V6Only,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawLbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

/// What ring hash and Maglev hash: one of a header, a cookie, or the client's address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHashKey {
    pub header: Option<String>,
    pub cookie: Option<String>,
    pub source_ip: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawHealthCheckKind {
    Http,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    #[serde(rename = "type")]
    pub kind: Spanned<RawHealthCheckKind>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    /// Statuses that pass: `200`, or ranges written `"200-399"`.
    pub expected_statuses: Option<Vec<Spanned<RawStatusRange>>>,
    pub interval: Option<Spanned<RawDuration>>,
    pub timeout: Option<Spanned<RawDuration>>,
    pub healthy_threshold: Option<Spanned<i64>>,
    pub unhealthy_threshold: Option<Spanned<i64>>,
}

/// `200` or `"200-299"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawStatusRange {
    Text(String),
    Number(i64),
}

impl<'de> serde::Deserialize<'de> for RawStatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawStatusRange;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a status such as 200, or a range such as \"200-399\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawStatusRange, E> {
                Ok(RawStatusRange::Text(v.to_owned()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawStatusRange, E> {
                Ok(RawStatusRange::Number(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawStatusRange, E> {
                Ok(RawStatusRange::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_5xx: Option<Spanned<i64>>,
    pub consecutive_gateway_failure: Option<Spanned<i64>>,
    pub base_ejection_time: Option<Spanned<RawDuration>>,
    pub max_ejection_time: Option<Spanned<RawDuration>>,
    pub max_ejection_percent: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreakers {
    pub max_connections: Option<Spanned<i64>>,
    pub max_pending_requests: Option<Spanned<i64>>,
    pub max_requests: Option<Spanned<i64>>,
    pub max_retries: Option<Spanned<i64>>,
}

/// How a cluster's endpoints are spoken to: `"http1"` or `"http2"` (cleartext, prior knowledge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawUpstreamProtocol {
    Http1,
    Http2,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_level_keys_are_the_fields_serde_expects() {
        let error = toml::from_str::<RawConfig>("no_such_key = 1\n").unwrap_err();
        let expected: Vec<&str> = error
            .message()
            .split_once("expected one of ")
            .expect("serde lists the fields")
            .1
            .split('`')
            .skip(1)
            .step_by(2)
            .collect();
        assert_eq!(expected, TOP_LEVEL_KEYS);
    }
}
