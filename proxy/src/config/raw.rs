//! The configuration file as written: serde structs that mirror the TOML and reject unknown fields.
//!
//! Every value that is checked after parsing keeps its span, so that an error found during
//! validation can name the line it came from. Nothing here is used past [`super::validate`].

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

/// A duration as written: `"250ms"`, `"5s"`, `"1m 30s"`, or a bare number of seconds (as in
/// nginx's `keepalive_timeout 75;`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawDuration {
    Text(String),
    Seconds(i64),
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
        }
        deserializer.deserialize_any(Visitor)
    }
}

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
    pub cluster: Option<Spanned<String>>,
    pub direct_response: Option<Spanned<RawDirectResponse>>,
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
    pub endpoints: Spanned<Vec<Spanned<String>>>,
    pub connect_timeout: Option<Spanned<RawDuration>>,
    pub request_timeout: Option<Spanned<RawDuration>>,
    pub idle_timeout: Option<Spanned<RawDuration>>,
    pub max_idle_per_endpoint: Option<Spanned<i64>>,
    pub protocol: Option<Spanned<RawUpstreamProtocol>>,
}

/// How a cluster's endpoints are spoken to: `"http1"` or `"http2"` (cleartext, prior knowledge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawUpstreamProtocol {
    Http1,
    Http2,
}
