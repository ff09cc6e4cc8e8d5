//! From [`RawConfig`] to [`Config`]: every check, each error naming its line.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::Path;

use serde_spanned::Spanned;

use super::raw::{RawConfig, RawGuardDog, RawStats, TOP_LEVEL_KEYS};
use super::*;

mod cluster;
mod listener;
mod route;
mod scalar;
mod url;

use url::Url;

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
    let v = Validator { path, source };
    // The supervisor words its parse errors the same way (a misspelt field reads alike whichever
    // checker finds it): the line quoted, and the nearest expected name.
    let raw: RawConfig = toml::from_str(source).map_err(|e| {
        // A misspelt top-level key first: what serde trips on may only be its consequence.
        let (offset, message) = config_errors::unknown_top_level_key(source, TOP_LEVEL_KEYS)
            .unwrap_or_else(|| config_errors::parse_error(source, &e));
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
}

/// Whether two listen addresses take the same port: equal, or one is the wildcard of the
/// other's family.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
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
}
