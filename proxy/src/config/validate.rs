//! From [`RawConfig`] to [`Config`]: every check, each error naming its line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use serde_spanned::Spanned;

use super::raw::{
    RawConfig, RawDirectResponse, RawDuration, RawEscapedSlashes, RawGuardDog, RawListener,
    RawOverflow, RawProtocol, RawRoute, RawSize, RawStats, RawTls,
};
use super::tls::{self, LoadedCertificate};
use super::*;

mod cluster;
mod route;
mod url;

use url::Url;

/// The longest duration a config may give: times are added to instants, and a year is more
/// than any timeout or interval needs.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub fn validate(path: &Path, source: &str) -> Result<Config, ConfigError> {
    let v = Validator { path, source };
    // The supervisor words its parse errors the same way (a misspelt field reads alike whichever
    // checker finds it): the line quoted, and the nearest expected name.
    let raw: RawConfig = toml::from_str(source).map_err(|e| {
        let (offset, message) = config_errors::parse_error(source, &e);
        v.error(offset..offset, message)
    })?;
    v.config(raw)
}

struct Validator<'a> {
    path: &'a Path,
    source: &'a str,
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Validator<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.path, self.source, span, message.into())
    }

    fn config(&self, raw: RawConfig) -> Result<Config> {
        let instance = match raw.instance {
            Some(name) => self.instance_name(name)?,
            None => "baton".to_owned(),
        };
        let concurrency = raw
            .concurrency
            .map(|n| {
                usize::try_from(*n.get_ref())
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .filter(|n| n.get() <= 1024)
                    .ok_or_else(|| {
                        self.error(
                            n.span(),
                            "concurrency: expected a number of workers from 1 to 1024",
                        )
                    })
            })
            .transpose()?;
        let drain = DrainSettings {
            // Zero would close every connection the moment a drain starts, cutting requests in flight.
            timeout: self.timeout_or("drain_timeout", raw.drain_timeout, DEFAULT_DRAIN_TIMEOUT)?,
            idle_grace: self.duration_or(
                "drain_idle_grace",
                raw.drain_idle_grace,
                DEFAULT_DRAIN_IDLE_GRACE,
            )?,
        };
        let admin_span = raw.admin.as_ref().map(|a| a.get_ref().address.span());
        let admin = raw
            .admin
            .map(|admin| -> Result<Admin> {
                Ok(Admin {
                    address: self.address("admin.address", &admin.get_ref().address)?,
                })
            })
            .transpose()?;

        let mut clusters = Vec::with_capacity(raw.cluster.len());
        let mut cluster_ids: HashMap<String, ClusterId> = HashMap::new();
        for raw_cluster in raw.cluster {
            let span = raw_cluster.span();
            let cluster = self.cluster(raw_cluster.into_inner())?;
            if cluster_ids
                .insert(cluster.name.clone(), ClusterId(clusters.len()))
                .is_some()
            {
                return Err(self.error(
                    span,
                    format!(
                        "cluster `{}` is defined twice; cluster names must be unique",
                        cluster.name
                    ),
                ));
            }
            clusters.push(cluster);
        }

        if raw.listener.is_empty() {
            return Err(self.error(
                0..0,
                "no listener is configured: add a [[listener]] table with name, address and protocol",
            ));
        }
        let mut listeners: Vec<Listener> = Vec::with_capacity(raw.listener.len());
        for raw_listener in raw.listener {
            let raw_listener = raw_listener.into_inner();
            let name_span = raw_listener.name.span();
            let address_span = raw_listener
                .address
                .as_ref()
                .map_or(name_span.clone(), |a| a.span());
            let cluster_span = raw_listener.cluster.as_ref().map(|c| c.span());
            let listener = self.listener(raw_listener, &cluster_ids)?;
            if let ListenerKind::Tcp { cluster } = &listener.kind
                && clusters[cluster.0].protocol == UpstreamProtocol::Http2
            {
                return Err(self.error(
                    cluster_span.unwrap_or(name_span),
                    format!(
                        "listener `{}`: cluster `{}` has protocol = \"http2\", but a tcp listener forwards bytes, not HTTP requests; point the listener at a cluster that speaks http1 (the default)",
                        listener.name, clusters[cluster.0].name
                    ),
                ));
            }
            if let Some(other) = listeners.iter().find(|l| l.name == listener.name) {
                return Err(self.error(
                    name_span,
                    format!(
                        "listener `{}` is defined twice; listener names must be unique",
                        other.name
                    ),
                ));
            }
            if let Some(address) = listener.address
                && let Some((other, other_address)) = listeners
                    .iter()
                    .filter_map(|l| Some((l, l.address?)))
                    .find(|(_, a)| overlap(*a, address))
            {
                let message = if other_address == address {
                    format!(
                        "listener `{}` uses address {address} that listener `{}` already uses",
                        listener.name, other.name
                    )
                } else {
                    format!(
                        "listener `{}` on {address} overlaps listener `{}` on {other_address}: a wildcard address takes the port on every address",
                        listener.name, other.name
                    )
                };
                return Err(self.error(address_span, message));
            }
            if let Some(fd_name) = &listener.fd_name
                && let Some(other) = listeners
                    .iter()
                    .find(|l| l.fd_name.as_ref() == Some(fd_name))
            {
                return Err(self.error(
                    name_span,
                    format!(
                        "listener `{}` uses fd_name `{fd_name}` that listener `{}` already uses",
                        listener.name, other.name
                    ),
                ));
            }
            listeners.push(listener);
        }
        if let Some(admin) = &admin
            && let Some(other) = listeners
                .iter()
                .find(|l| l.address.is_some_and(|a| overlap(a, admin.address)))
        {
            return Err(self.error(
                admin_span.unwrap_or(0..0),
                format!(
                    "admin.address {} is also the address of listener `{}`",
                    admin.address, other.name
                ),
            ));
        }

        let max_connections = raw
            .max_connections
            .map(|n| self.count("max_connections", &n, 1_000_000_000))
            .transpose()?;
        let stats = self.stats(&instance, raw.stats)?;
        let guard_dog = self.guard_dog(raw.guard_dog)?;
        Ok(Config {
            guard_dog,
            max_connections,
            path: self.path.to_owned(),
            stats,
            epoch_header: raw.epoch_header.is_some_and(|b| *b.get_ref()),
            instance,
            concurrency,
            drain,
            admin,
            listeners,
            clusters,
        })
    }

    fn stats(&self, instance: &str, raw: Option<Spanned<RawStats>>) -> Result<StatsSettings> {
        let defaults = shm_stats::Capacities::default();
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return Ok(StatsSettings {
                path: shm_stats::default_path(instance),
                capacities: defaults,
            });
        };
        let capacity = |field: &str, value: Option<Spanned<i64>>, default: u32, max: u32| {
            let Some(v) = value else { return Ok(default) };
            u32::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| {
                    self.error(
                        v.span(),
                        format!("stats.{field}: expected a number from 1 to {max}"),
                    )
                })
        };
        Ok(StatsSettings {
            path: raw.path.map_or_else(
                || shm_stats::default_path(instance),
                |p| self.relative_path(p.get_ref()),
            ),
            capacities: shm_stats::Capacities {
                max_stats: capacity("max_stats", raw.max_stats, defaults.max_stats, 1 << 20)?,
                max_shards: capacity("max_shards", raw.max_shards, defaults.max_shards, 1 << 16)?,
                cells_per_shard: capacity(
                    "cells_per_shard",
                    raw.cells_per_shard,
                    defaults.cells_per_shard,
                    1 << 24,
                )?,
                bounds: match raw.histogram_buckets {
                    None => defaults.bounds,
                    Some(list) => self.histogram_buckets(list)?,
                },
            },
        })
    }

    /// `stats.histogram_buckets`: bounds in milliseconds, each a whole number of microseconds,
    /// increasing. The supervisor reads the same list (with the same checks, in `shm_stats`).
    fn histogram_buckets(&self, list: Spanned<Vec<Spanned<f64>>>) -> Result<shm_stats::Bounds> {
        let span = list.span();
        let list = list.into_inner();
        let us = list
            .iter()
            .map(|ms| {
                shm_stats::histogram::bound_from_millis(*ms.get_ref())
                    .map_err(|e| self.error(ms.span(), format!("stats.histogram_buckets: {e}")))
            })
            .collect::<Result<Vec<u64>>>()?;
        shm_stats::Bounds::new(&us).map_err(|e| {
            let at = e
                .index()
                .and_then(|i| list.get(i))
                .map_or(span, |ms| ms.span());
            self.error(at, format!("stats.histogram_buckets: {e}"))
        })
    }

    fn guard_dog(&self, raw: Option<Spanned<RawGuardDog>>) -> Result<GuardDogSettings> {
        let Some(raw) = raw else {
            return Ok(GuardDogSettings {
                miss: DEFAULT_GUARD_DOG_MISS,
                mega_miss: DEFAULT_GUARD_DOG_MEGA_MISS,
                kill: Some(DEFAULT_GUARD_DOG_KILL),
            });
        };
        let span = raw.span();
        let raw = raw.into_inner();
        let miss = self.timeout_or(
            "guard_dog.miss_timeout",
            raw.miss_timeout,
            DEFAULT_GUARD_DOG_MISS,
        )?;
        let mega_miss = self.timeout_or(
            "guard_dog.mega_miss_timeout",
            raw.mega_miss_timeout,
            DEFAULT_GUARD_DOG_MEGA_MISS.max(miss),
        )?;
        let kill = self.duration_or(
            "guard_dog.kill_timeout",
            raw.kill_timeout,
            DEFAULT_GUARD_DOG_KILL.max(mega_miss),
        )?;
        let kill = (!kill.is_zero()).then_some(kill);
        if miss > mega_miss || kill.is_some_and(|k| k < mega_miss) {
            return Err(self.error(
                span,
                "guard_dog: the timeouts must grow: miss_timeout <= mega_miss_timeout <= kill_timeout (kill_timeout = \"0s\" turns the kill off)",
            ));
        }
        Ok(GuardDogSettings {
            miss,
            mega_miss,
            kill,
        })
    }

    fn instance_name(&self, name: Spanned<String>) -> Result<String> {
        let ok = !name.get_ref().is_empty()
            && name.get_ref().len() <= 64
            && name
                .get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !name.get_ref().starts_with('.');
        if !ok {
            return Err(self.error(
                name.span(),
                format!(
                    "instance: `{}` is not a valid instance name; use 1 to 64 letters, digits, `-`, `_` or `.` (it names files such as /dev/shm/baton.<instance>)",
                    name.get_ref()
                ),
            ));
        }
        Ok(name.into_inner())
    }

    fn duration(&self, field: &str, value: &Spanned<RawDuration>) -> Result<Duration> {
        let d = self.any_duration(field, value)?;
        if d > MAX_DURATION {
            return Err(self.error(
                value.span(),
                format!("{field}: at most a year (365d); no timeout needs to be longer"),
            ));
        }
        Ok(d)
    }

    fn any_duration(&self, field: &str, value: &Spanned<RawDuration>) -> Result<Duration> {
        match value.get_ref() {
            RawDuration::Fraction(f) => Duration::try_from_secs_f64(*f).map_err(|_| {
                self.error(
                    value.span(),
                    format!("{field}: a duration is a number of seconds from 0, not {f}"),
                )
            }),
            RawDuration::Seconds(s) => u64::try_from(*s).map(Duration::from_secs).map_err(|_| {
                self.error(value.span(), format!("{field}: a duration cannot be negative"))
            }),
            RawDuration::Text(text) => humantime::parse_duration(text).map_err(|e| {
                self.error(
                    value.span(),
                    format!(
                        "{field}: `{text}` is not a duration ({e}); write it like \"250ms\", \"5s\" or \"2m\""
                    ),
                )
            }),
        }
    }

    fn duration_or(
        &self,
        field: &str,
        value: Option<Spanned<RawDuration>>,
        default: Duration,
    ) -> Result<Duration> {
        value.map_or(Ok(default), |v| self.duration(field, &v))
    }

    /// A positive duration, for timeouts where zero would mean "fail at once".
    fn timeout_or(
        &self,
        field: &str,
        value: Option<Spanned<RawDuration>>,
        default: Duration,
    ) -> Result<Duration> {
        let Some(value) = value else {
            return Ok(default);
        };
        let d = self.duration(field, &value)?;
        if d.is_zero() {
            return Err(self.error(value.span(), format!("{field}: must be more than zero")));
        }
        Ok(d)
    }

    /// A whole number from 1 to `max`.
    fn count(&self, field: &str, value: &Spanned<i64>, max: usize) -> Result<usize> {
        usize::try_from(*value.get_ref())
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                self.error(
                    value.span(),
                    format!("{field}: expected a number from 1 to {max}"),
                )
            })
    }

    /// A size in bytes from 1 to `max`: a number of bytes, or a number with a unit (`k`, `KiB`,
    /// `m`, `MiB`, `g`, `GiB`; every unit counts in 1024s, as nginx's sizes do).
    fn size(&self, field: &str, value: &Spanned<RawSize>, max: u64) -> Result<u64> {
        let bytes = match value.get_ref() {
            RawSize::Bytes(n) => u64::try_from(*n).ok(),
            RawSize::Text(text) => parse_size(text),
        };
        bytes.filter(|n| (1..=max).contains(n)).ok_or_else(|| {
            let range = if max == u64::MAX {
                "more than zero".to_owned()
            } else {
                format!("from 1 byte to {max} bytes")
            };
            self.error(
                value.span(),
                format!(
                    "{field}: expected a size {range}, written like 65536, \"64KiB\" or \"10MiB\""
                ),
            )
        })
    }

    /// A listen address (a listener's or the admin's): an IP address and a port other than 0.
    fn address(&self, field: &str, value: &Spanned<String>) -> Result<SocketAddr> {
        if let Some(url) = Url::of(value.get_ref(), field == "listener.address") {
            let tls = if field == "listener.address" {
                "for TLS, add [[listener.tls.certificate]] to the listener"
            } else {
                "the admin listener speaks cleartext HTTP only"
            };
            return Err(self.error(
                value.span(),
                format!("{field}: {}", url.message("an address is `IP:PORT`", tls)),
            ));
        }
        let address: SocketAddr = value.get_ref().parse().map_err(|_| {
            self.error(
                value.span(),
                format!(
                    "{field}: `{}` is not an IP address and port; write it like \"127.0.0.1:8080\" or \"[::1]:8080\"",
                    value.get_ref()
                ),
            )
        })?;
        if address.port() == 0 {
            // The system would pick a free port, another one at every reload, and no client
            // could know it.
            return Err(self.error(
                value.span(),
                format!(
                    "{field}: port 0 would make the system pick a port, another one at every reload; give the port clients connect to"
                ),
            ));
        }
        Ok(address)
    }

    fn listener(
        &self,
        raw: RawListener,
        clusters: &HashMap<String, ClusterId>,
    ) -> Result<Listener> {
        let name = self.name("listener.name", &raw.name)?;
        let address = raw
            .address
            .as_ref()
            .map(|a| self.address("listener.address", a))
            .transpose()?;
        let fd_name = match &raw.fd_name {
            Some(n) if n.get_ref().is_empty() || n.get_ref().contains(':') => {
                return Err(self.error(
                    n.span(),
                    format!("listener `{name}`: fd_name `{}` is not a FileDescriptorName (non-empty, no `:`)", n.get_ref()),
                ));
            }
            Some(n) => Some(n.get_ref().clone()),
            None => None,
        };
        if address.is_none() && fd_name.is_none() {
            return Err(self.error(
                raw.name.span(),
                format!(
                    "listener `{name}` needs an `address` (or, under systemd socket activation, an `fd_name`)"
                ),
            ));
        }
        let backlog = match raw.backlog {
            None => DEFAULT_BACKLOG,
            Some(b) => u32::try_from(*b.get_ref())
                .ok()
                .filter(|b| (1..=65535).contains(b))
                .ok_or_else(|| {
                    self.error(
                        b.span(),
                        "listener.backlog: expected a number from 1 to 65535",
                    )
                })?,
        };
        let access_log = match raw.access_log {
            None => None,
            Some(p) => {
                let path = self.relative_path(p.get_ref());
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                    && !dir.is_dir()
                {
                    return Err(self.error(
                        p.span(),
                        format!(
                            "listener `{name}`: access_log folder {} does not exist; create it or fix the path",
                            dir.display()
                        ),
                    ));
                }
                Some(path)
            }
        };
        let max_connections = raw
            .max_connections
            .as_ref()
            .map(|n| self.count("listener.max_connections", n, 1_000_000_000))
            .transpose()?;
        let overflow = match raw.max_connections_action.as_ref().map(|a| *a.get_ref()) {
            None | Some(RawOverflow::Close) => Overflow::Close,
            Some(RawOverflow::Wait) => Overflow::Wait,
        };
        let kind = match *raw.protocol.get_ref() {
            RawProtocol::Tcp => {
                for (field, present) in [
                    ("route", raw.route.first().map(|r| r.span())),
                    ("tls", raw.tls.as_ref().map(|t| t.span())),
                    ("idle_timeout", raw.idle_timeout.as_ref().map(|t| t.span())),
                    (
                        "request_header_timeout",
                        raw.request_header_timeout.as_ref().map(|t| t.span()),
                    ),
                    (
                        "max_request_header_size",
                        raw.max_request_header_size.as_ref().map(|t| t.span()),
                    ),
                    (
                        "max_request_headers",
                        raw.max_request_headers.as_ref().map(|t| t.span()),
                    ),
                    (
                        "max_request_body",
                        raw.max_request_body.as_ref().map(|t| t.span()),
                    ),
                    (
                        "normalize_path",
                        raw.normalize_path.as_ref().map(|t| t.span()),
                    ),
                    (
                        "merge_slashes",
                        raw.merge_slashes.as_ref().map(|t| t.span()),
                    ),
                    (
                        "path_with_escaped_slashes",
                        raw.path_with_escaped_slashes.as_ref().map(|t| t.span()),
                    ),
                ] {
                    if let Some(span) = present {
                        return Err(self.error(
                            span,
                            format!(
                                "listener `{name}`: `{field}` applies to http listeners only; a tcp listener takes just a `cluster`"
                            ),
                        ));
                    }
                }
                let Some(cluster) = raw.cluster else {
                    return Err(self.error(
                        raw.protocol.span(),
                        format!("listener `{name}`: a tcp listener needs `cluster = \"...\"` naming where connections go"),
                    ));
                };
                ListenerKind::Tcp {
                    cluster: self.cluster_ref(&name, &cluster, clusters)?,
                }
            }
            RawProtocol::Http => {
                if let Some(cluster) = &raw.cluster {
                    return Err(self.error(
                        cluster.span(),
                        format!(
                            "listener `{name}`: an http listener sends requests to clusters through `[[listener.route]]` tables, not a `cluster` field"
                        ),
                    ));
                }
                if raw.route.is_empty() {
                    return Err(self.error(
                        raw.protocol.span(),
                        format!(
                            "listener `{name}`: an http listener needs at least one [[listener.route]] with a `cluster` or a `direct_response`"
                        ),
                    ));
                }
                let routes = raw
                    .route
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| self.route(&name, i + 1, r, clusters))
                    .collect::<Result<Vec<_>>>()?;
                let tls = raw.tls.map(|t| self.tls(&name, t)).transpose()?;
                let limits = RequestLimits {
                    header_timeout: self.timeout_or(
                        "listener.request_header_timeout",
                        raw.request_header_timeout,
                        DEFAULT_REQUEST_HEADER_TIMEOUT,
                    )?,
                    max_header_size: raw.max_request_header_size.as_ref().map_or(
                        Ok(DEFAULT_MAX_REQUEST_HEADER_SIZE),
                        |s| {
                            self.size("listener.max_request_header_size", s, 16 << 20)
                                .map(|n| n as usize)
                        },
                    )?,
                    max_headers: raw
                        .max_request_headers
                        .as_ref()
                        .map_or(Ok(DEFAULT_MAX_REQUEST_HEADERS), |n| {
                            self.count("listener.max_request_headers", n, 10_000)
                        })?,
                    max_body: raw
                        .max_request_body
                        .as_ref()
                        .map(|s| self.size("listener.max_request_body", s, u64::MAX))
                        .transpose()?,
                };
                let defaults = PathNormalization::default();
                let path = PathNormalization {
                    normalize: raw
                        .normalize_path
                        .map_or(defaults.normalize, |b| b.into_inner()),
                    merge_slashes: raw
                        .merge_slashes
                        .map_or(defaults.merge_slashes, |b| b.into_inner()),
                    escaped_slashes: match raw.path_with_escaped_slashes.map(|a| a.into_inner()) {
                        None => defaults.escaped_slashes,
                        Some(RawEscapedSlashes::Keep) => EscapedSlashes::Keep,
                        Some(RawEscapedSlashes::Reject) => EscapedSlashes::Reject,
                        Some(RawEscapedSlashes::UnescapeAndForward) => {
                            EscapedSlashes::UnescapeAndForward
                        }
                        Some(RawEscapedSlashes::UnescapeAndRedirect) => {
                            EscapedSlashes::UnescapeAndRedirect
                        }
                    },
                };
                HttpListener {
                    routes,
                    tls,
                    idle_timeout: self.timeout_or(
                        "listener.idle_timeout",
                        raw.idle_timeout,
                        DEFAULT_LISTENER_IDLE_TIMEOUT,
                    )?,
                    limits,
                    path,
                }
                .into()
            }
        };
        Ok(Listener {
            name,
            address,
            fd_name,
            backlog,
            access_log,
            max_connections,
            overflow,
            kind,
        })
    }

    fn name(&self, field: &str, value: &Spanned<String>) -> Result<String> {
        let name = value.get_ref();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(self.error(
                value.span(),
                format!(
                    "{field}: `{name}` is not a valid name; use letters, digits, `-`, `_` or `.`"
                ),
            ));
        }
        Ok(name.clone())
    }

    fn cluster_ref(
        &self,
        listener: &str,
        name: &Spanned<String>,
        clusters: &HashMap<String, ClusterId>,
    ) -> Result<ClusterId> {
        self.cluster_ref_in(&format!("listener `{listener}`"), name, clusters)
    }

    /// A cluster named by `what` (a listener, or a route of one).
    fn cluster_ref_in(
        &self,
        what: &str,
        name: &Spanned<String>,
        clusters: &HashMap<String, ClusterId>,
    ) -> Result<ClusterId> {
        clusters.get(name.get_ref()).copied().ok_or_else(|| {
            let mut known: Vec<&str> = clusters.keys().map(String::as_str).collect();
            known.sort_unstable();
            let known = if known.is_empty() {
                "no cluster is defined; add a [[cluster]] table".to_owned()
            } else {
                format!("defined clusters: {}", known.join(", "))
            };
            self.error(
                name.span(),
                format!(
                    "{what}: cluster `{}` is not defined ({known})",
                    name.get_ref()
                ),
            )
        })
    }

    fn host_pattern(
        &self,
        listener: &str,
        number: usize,
        host: &Spanned<String>,
    ) -> Result<HostPattern> {
        let h = host.get_ref().to_ascii_lowercase();
        let valid_label = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        };
        if h == "*" {
            Ok(HostPattern::Any)
        } else if let Some(rest) = h.strip_prefix("*.")
            && valid_label(rest)
        {
            Ok(HostPattern::Suffix(format!(".{rest}")))
        } else if valid_label(&h) {
            Ok(HostPattern::Exact(h))
        } else {
            Err(self.error(
                host.span(),
                format!(
                    "listener `{listener}` route {number}: host `{}` is not a host name; write \"example.com\", \"*.example.com\" or \"*\" (without port)",
                    host.get_ref()
                ),
            ))
        }
    }

    fn direct_response(
        &self,
        listener: &str,
        number: usize,
        raw: Spanned<RawDirectResponse>,
    ) -> Result<DirectResponse> {
        let span = raw.span();
        let raw = raw.into_inner();
        let status = u16::try_from(*raw.status.get_ref())
            .ok()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| {
                self.error(
                    raw.status.span(),
                    format!(
                        "listener `{listener}` route {number}: direct_response.status {} is not an HTTP status from 200 to 599",
                        raw.status.get_ref()
                    ),
                )
            })?;
        let mut headers = HeaderMap::new();
        for (name, value) in &raw.headers {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                self.error(
                    span.clone(),
                    format!(
                        "listener `{listener}` route {number}: `{name}` is not a valid header name"
                    ),
                )
            })?;
            let value_parsed = HeaderValue::from_str(value.get_ref()).map_err(|_| {
                self.error(
                    value.span(),
                    format!(
                        "listener `{listener}` route {number}: the value of header `{name}` holds characters a header cannot carry"
                    ),
                )
            })?;
            headers.append(header, value_parsed);
        }
        if !raw.body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        Ok(DirectResponse {
            status,
            headers,
            body: Bytes::from(raw.body),
        })
    }

    fn tls(&self, listener: &str, raw: Spanned<RawTls>) -> Result<Arc<rustls::ServerConfig>> {
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.certificate.is_empty() {
            return Err(self.error(
                span,
                format!(
                    "listener `{listener}`: tls needs at least one [[listener.tls.certificate]] with `cert` and `key`"
                ),
            ));
        }
        let provider = tls::provider();
        let mut loaded = Vec::with_capacity(raw.certificate.len());
        for cert in raw.certificate {
            let cert_span = cert.span();
            let cert = cert.into_inner();
            let cert_path = self.relative_path(cert.cert.get_ref());
            let key_path = self.relative_path(cert.key.get_ref());
            let (key, san_names) = tls::load_certificate(&provider, &cert_path, &key_path)
                .map_err(|e| {
                    self.error(cert_span.clone(), format!("listener `{listener}`: {e}"))
                })?;
            let names = match cert.server_names {
                Some(names) => names
                    .into_iter()
                    .map(|n| n.into_inner().to_ascii_lowercase())
                    .collect(),
                None => san_names,
            };
            loaded.push(LoadedCertificate { key, names });
        }
        tls::server_config(provider, loaded)
            .map(Arc::new)
            .map_err(|e| self.error(span, format!("listener `{listener}`: {e}")))
    }

    /// Relative paths in the file start from the file's own folder, so that a config and the
    /// certificates beside it can move together.
    fn relative_path(&self, value: &str) -> PathBuf {
        let path = Path::new(value);
        if path.is_absolute() {
            return path.to_owned();
        }
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(path),
            _ => path.to_owned(),
        }
    }
}

impl From<HttpListener> for ListenerKind {
    fn from(http: HttpListener) -> Self {
        ListenerKind::Http(http)
    }
}

/// Whether two listen addresses take the same port: equal, or one is the wildcard of the
/// other's family.
/// `"64KiB"`, `"10m"`, `"1 GiB"`, `"512"`: a number of bytes with an optional unit, every
/// unit a power of 1024. `None` if it is not such a size or does not fit in 64 bits.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::parse_size;
    use crate::config::{UpstreamProtocol, parse};

    const LISTENER: &str = "[[listener]]\nname = \"l\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\n[[listener.route]]\ncluster = \"c\"\n";

    fn cluster(protocol: &str) -> String {
        format!("{LISTENER}[[cluster]]\nname = \"c\"\nendpoints = [\"127.0.0.1:2\"]\n{protocol}\n")
    }

    #[test]
    fn clusters_speak_http1_unless_told_http2() {
        let path = std::path::Path::new("t.toml");
        let config = parse(path, &cluster("")).unwrap();
        assert_eq!(config.clusters[0].protocol, UpstreamProtocol::Http1);
        let config = parse(path, &cluster("protocol = \"http1\"")).unwrap();
        assert_eq!(config.clusters[0].protocol, UpstreamProtocol::Http1);
        let config = parse(path, &cluster("protocol = \"http2\"")).unwrap();
        assert_eq!(config.clusters[0].protocol, UpstreamProtocol::Http2);

        let e = parse(path, &cluster("protocol = \"h2c\""))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:10:"), "{e}");
        assert!(e.contains("`http1`") && e.contains("`http2`"), "{e}");
        assert!(e.contains("protocol = \"h2c\""), "{e}");
    }

    #[test]
    fn tcp_listeners_refuse_http2_clusters() {
        let source = "[[listener]]\nname = \"t\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"c\"\n[[cluster]]\nname = \"c\"\nendpoints = [\"127.0.0.1:2\"]\nprotocol = \"http2\"\n";
        let e = parse(std::path::Path::new("t.toml"), source)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml:5:"), "{e}");
        assert!(e.contains("tcp listener"), "{e}");
    }

    #[test]
    fn sizes_count_in_1024s() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64KiB"), Some(64 * 1024));
        assert_eq!(parse_size("64k"), Some(64 * 1024));
        assert_eq!(parse_size("10 MiB"), Some(10 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1.5m"), None);
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("99999999999999999999k"), None);
        assert_eq!(parse_size("20000000000000g"), None);
    }
}
