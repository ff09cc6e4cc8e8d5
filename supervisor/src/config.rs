//! The parts of the config file the supervisor reads: the instance, the drain settings, the
//! stats region, and its own `[supervisor]` table. Everything else is the proxy's to check.

use std::path::{Path, PathBuf};
use std::time::Duration;

use restart_protocol::DrainStrategy;
use serde::Deserialize;
use serde_spanned::Spanned;
use shm_stats::Capacities;

/// What the supervisor needs from the config.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The config file, as given: every generation is started with it.
    pub path: PathBuf,
    pub instance: String,
    pub drain_timeout: Duration,
    pub drain_strategy: DrainStrategy,
    pub stats_path: PathBuf,
    pub capacities: Capacities,
    /// `supervisor.proxy_binary`, when set.
    pub proxy_binary: Option<PathBuf>,
    pub control_socket: PathBuf,
    pub readiness_timeout: Duration,
    pub max_draining: usize,
    /// Push listen sockets to systemd's fd store even if `FDSTORE` is not set (systemd 252).
    pub fd_store: bool,
    /// `supervisor.user` / `supervisor.group`: whom generations run as, when set.
    pub run_as: Option<RunAs>,
}

/// The unprivileged user (and group) a root supervisor starts its generations as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// A duration as the config writes it: `"5s"`, `"250ms"`, or a number of seconds (the proxy's
/// syntax, so that one file has one syntax).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Text(String),
    Seconds(i64),
    Fraction(f64),
}

#[derive(Debug, Deserialize)]
struct Raw {
    instance: Option<String>,
    drain_timeout: Option<Spanned<RawDuration>>,
    drain_strategy: Option<Spanned<String>>,
    stats: Option<RawStats>,
    supervisor: Option<RawSupervisor>,
    // The rest is the proxy's: it checks it, the supervisor ignores it.
    #[serde(flatten)]
    _rest: toml::Table,
}

#[derive(Debug, Deserialize)]
struct RawStats {
    path: Option<String>,
    max_stats: Option<u32>,
    max_shards: Option<u32>,
    cells_per_shard: Option<u32>,
    histogram_buckets: Option<Spanned<Vec<Spanned<f64>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSupervisor {
    proxy_binary: Option<String>,
    control_socket: Option<String>,
    readiness_timeout: Option<Spanned<RawDuration>>,
    max_draining: Option<Spanned<i64>>,
    fd_store: Option<bool>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

/// Reads the supervisor's part of the config at `path`. Errors are one line:
/// `file:line:column: what is wrong`.
pub fn load(path: &Path) -> Result<SupervisorConfig, String> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the config file: {e}", path.display()))?;
    parse(path, &source)
}

use config_errors::at;

pub fn parse(path: &Path, source: &str) -> Result<SupervisorConfig, String> {
    // The proxy words its parse errors the same way, so that a misspelt field reads alike
    // whichever checker finds it.
    let raw: Raw = toml::from_str(source).map_err(|e| {
        let (offset, message) = config_errors::parse_error(source, &e);
        at(path, source, offset, message)
    })?;
    // A timeout of zero would mean "give up at once": a drain that cuts every connection, a
    // generation that can never become ready.
    let duration = |field: &str, value: Option<Spanned<RawDuration>>, default: Duration| {
        let Some(v) = value else {
            return Ok(default);
        };
        let parsed = match v.get_ref() {
            RawDuration::Text(text) => humantime::parse_duration(text).map_err(|e| {
                format!(
                    "{field}: `{text}` is not a duration ({e}); write it like \"5s\" or \"250ms\""
                )
            }),
            RawDuration::Seconds(s) => u64::try_from(*s)
                .map(Duration::from_secs)
                .map_err(|_| format!("{field}: a duration cannot be negative")),
            RawDuration::Fraction(f) => Duration::try_from_secs_f64(*f)
                .map_err(|_| format!("{field}: a duration is a number of seconds from 0, not {f}")),
        };
        parsed
            .and_then(|d| {
                if d.is_zero() {
                    Err(format!("{field}: must be more than zero"))
                } else if d > Duration::from_secs(365 * 24 * 3600) {
                    Err(format!("{field}: at most a year (365d)"))
                } else {
                    Ok(d)
                }
            })
            .map_err(|message| at(path, source, v.span().start, message))
    };
    let instance = raw.instance.unwrap_or_else(|| "baton".to_owned());
    let drain_timeout = duration("drain_timeout", raw.drain_timeout, Duration::from_secs(30))?;
    let drain_strategy = match raw.drain_strategy {
        None => DrainStrategy::Gradual,
        Some(s) if s.get_ref() == "gradual" => DrainStrategy::Gradual,
        Some(s) if s.get_ref() == "immediate" => DrainStrategy::Immediate,
        Some(s) => {
            return Err(at(
                path,
                source,
                s.span().start,
                format!(
                    "drain_strategy: `{}` is not a strategy; use \"gradual\" or \"immediate\"",
                    s.get_ref()
                ),
            ));
        }
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let relative = |p: &str| match dir {
        Some(dir) if Path::new(p).is_relative() => dir.join(p),
        _ => PathBuf::from(p),
    };
    let defaults = Capacities::default();
    let stats = raw.stats.unwrap_or(RawStats {
        path: None,
        max_stats: None,
        max_shards: None,
        cells_per_shard: None,
        histogram_buckets: None,
    });
    let supervisor = raw.supervisor.unwrap_or(RawSupervisor {
        proxy_binary: None,
        control_socket: None,
        readiness_timeout: None,
        max_draining: None,
        fd_store: None,
        user: None,
        group: None,
    });
    let max_draining = match supervisor.max_draining {
        None => 2,
        Some(n) => usize::try_from(*n.get_ref())
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                at(
                    path,
                    source,
                    n.span().start,
                    "supervisor.max_draining: expected a number from 1 to 64",
                )
            })?,
    };
    let run_as = match (supervisor.user, supervisor.group) {
        (None, None) => None,
        (None, Some(group)) => {
            return Err(at(
                path,
                source,
                group.span().start,
                "supervisor.group needs supervisor.user: name the user generations run as",
            ));
        }
        (Some(user), group) => Some(
            run_as(&user, group.as_ref()).map_err(|e| at(path, source, user.span().start, e))?,
        ),
    };
    Ok(SupervisorConfig {
        run_as,
        path: path.to_owned(),
        drain_timeout,
        drain_strategy,
        stats_path: stats
            .path
            .map_or_else(|| shm_stats::default_path(&instance), |p| relative(&p)),
        capacities: Capacities {
            max_stats: stats.max_stats.unwrap_or(defaults.max_stats),
            max_shards: stats.max_shards.unwrap_or(defaults.max_shards),
            cells_per_shard: stats.cells_per_shard.unwrap_or(defaults.cells_per_shard),
            bounds: match stats.histogram_buckets {
                None => defaults.bounds,
                Some(list) => histogram_buckets(list).map_err(|(offset, e)| {
                    at(
                        path,
                        source,
                        offset,
                        format!("stats.histogram_buckets: {e}"),
                    )
                })?,
            },
        },
        proxy_binary: supervisor.proxy_binary.map(|p| relative(&p)),
        control_socket: supervisor
            .control_socket
            .map_or_else(|| default_control_socket(&instance), |p| relative(&p)),
        readiness_timeout: duration(
            "supervisor.readiness_timeout",
            supervisor.readiness_timeout,
            Duration::from_secs(30),
        )?,
        max_draining,
        fd_store: supervisor.fd_store.unwrap_or(false),
        instance,
    })
}

/// `stats.histogram_buckets` (milliseconds) as the region's bounds, or where and why not: the
/// checks of the proxy's config, from `shm_stats`.
fn histogram_buckets(
    list: Spanned<Vec<Spanned<f64>>>,
) -> Result<shm_stats::Bounds, (usize, String)> {
    let start = list.span().start;
    let list = list.into_inner();
    let us = list
        .iter()
        .map(|ms| {
            shm_stats::histogram::bound_from_millis(*ms.get_ref()).map_err(|e| (ms.span().start, e))
        })
        .collect::<Result<Vec<u64>, _>>()?;
    shm_stats::Bounds::new(&us).map_err(|e| {
        let at = e
            .index()
            .and_then(|i| list.get(i))
            .map_or(start, |ms| ms.span().start);
        (at, e.to_string())
    })
}

/// Whether a reload can apply `new` to a supervisor running with `running`: the instance, the
/// stats region (its path and its histograms' buckets), the control socket and the generations'
/// user are fixed when the supervisor starts (a reload that changed them would be ignored, and
/// the next start would differ).
pub fn reloadable(running: &SupervisorConfig, new: &SupervisorConfig) -> Result<(), String> {
    let file = new.path.display();
    let refuse = |what: &str, old: &dyn std::fmt::Display, now: &dyn std::fmt::Display| {
        Err(format!(
            "{file}: {what} changed from {old} to {now}; a reload cannot apply that (the supervisor sets it up when it starts): put it back, or restart baton to apply it (the active generation serves on meanwhile)"
        ))
    };
    if new.instance != running.instance {
        return refuse("instance", &running.instance, &new.instance);
    }
    if new.stats_path != running.stats_path {
        return refuse(
            "stats.path",
            &running.stats_path.display(),
            &new.stats_path.display(),
        );
    }
    if new.capacities.bounds != running.capacities.bounds {
        // Every generation writing the region counts into the buckets it was made with.
        return refuse(
            "stats.histogram_buckets",
            &running.capacities.bounds,
            &new.capacities.bounds,
        );
    }
    if new.control_socket != running.control_socket {
        return refuse(
            "supervisor.control_socket",
            &running.control_socket.display(),
            &new.control_socket.display(),
        );
    }
    if new.fd_store != running.fd_store {
        return refuse("supervisor.fd_store", &running.fd_store, &new.fd_store);
    }
    if new.run_as != running.run_as {
        let name = |r: &Option<RunAs>| {
            r.as_ref().map_or("(none)".to_owned(), |r| {
                format!("{} (uid {}, gid {})", r.user, r.uid, r.gid)
            })
        };
        return refuse(
            "supervisor.user/group",
            &name(&running.run_as),
            &name(&new.run_as),
        );
    }
    Ok(())
}

/// Looks `user` (and `group`, else the user's own group) up in the system's user database.
fn run_as(user: &Spanned<String>, group: Option<&Spanned<String>>) -> Result<RunAs, String> {
    use nix::unistd::{Group, User};
    let name = user.get_ref();
    let found = User::from_name(name)
        .map_err(|e| format!("supervisor.user: cannot look up user `{name}`: {e}"))?
        .ok_or_else(|| {
            format!("supervisor.user: no user `{name}` on this system; create it (useradd --system {name}) or fix the name")
        })?;
    if found.uid.is_root() {
        return Err(format!(
            "supervisor.user: `{name}` is root; name an unprivileged user, or leave supervisor.user out"
        ));
    }
    let gid = match group {
        None => found.gid,
        Some(group) => {
            let group = group.get_ref();
            Group::from_name(group)
                .map_err(|e| format!("supervisor.group: cannot look up group `{group}`: {e}"))?
                .ok_or_else(|| format!("supervisor.group: no group `{group}` on this system"))?
                .gid
        }
    };
    Ok(RunAs {
        user: name.clone(),
        uid: found.uid.as_raw(),
        gid: gid.as_raw(),
    })
}

/// Where the control socket of `instance` is unless the config says: under systemd
/// (`RuntimeDirectory=baton`) `$RUNTIME_DIRECTORY/<instance>.sock`; for root
/// `/run/baton/<instance>.sock`; for other users `$XDG_RUNTIME_DIR/baton/<instance>.sock`, else
/// `/tmp/baton-<uid>/<instance>.sock`. The `baton` commands find it the same way, run by the
/// same user.
pub fn default_control_socket(instance: &str) -> PathBuf {
    let first = |var: &str| {
        std::env::var_os(var).and_then(|dirs| {
            dirs.to_str()
                .and_then(|d| d.split(':').next())
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
        })
    };
    let uid = nix::unistd::geteuid();
    let dir = first("RUNTIME_DIRECTORY").unwrap_or_else(|| {
        if uid.is_root() {
            PathBuf::from("/run/baton")
        } else {
            first("XDG_RUNTIME_DIR")
                .map(|d| d.join("baton"))
                .unwrap_or_else(|| PathBuf::from(format!("/tmp/baton-{uid}")))
        }
    });
    dir.join(format!("{instance}.sock"))
}

/// The addresses the config at `path` listens on (`listener.address`, `admin.address`): what
/// the supervisor agrees to bind for a generation that asks (`BindSocket`), so that a
/// generation can have it bind nothing the operator did not configure. Read again at every
/// request, since a reload may add a listener.
pub fn listen_addresses(path: &Path) -> Result<Vec<std::net::SocketAddr>, String> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read the config file: {e}", path.display()))?;
    listen_addresses_in(path, &source)
}

/// [`listen_addresses`] of a config's text (read from `path`).
pub fn listen_addresses_in(path: &Path, source: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    let table: toml::Table = toml::from_str(source)
        .map_err(|e| format!("{}: {}", path.display(), e.message().trim_end()))?;
    let address = |t: &toml::Table| {
        t.get("address")
            .and_then(toml::Value::as_str)
            .and_then(|a| a.parse().ok())
    };
    let listeners = table
        .get("listener")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(toml::Value::as_table)
        .filter_map(address);
    let admin = table
        .get("admin")
        .and_then(toml::Value::as_table)
        .and_then(address);
    Ok(listeners.chain(admin).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_part_and_leaves_the_rest() {
        let c = parse(
            Path::new("conf/baton.toml"),
            r#"
instance = "edge"
drain_timeout = "5s"
drain_strategy = "immediate"
concurrency = 4

[[listener]]
name = "x"

[stats]
path = "stats.shm"

[supervisor]
proxy_binary = "/opt/baton/baton-proxy"
control_socket = "run/edge.sock"
readiness_timeout = "10s"
max_draining = 3
"#,
        )
        .unwrap();
        assert_eq!(c.instance, "edge");
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
        assert_eq!(c.drain_strategy, DrainStrategy::Immediate);
        assert_eq!(c.stats_path, Path::new("conf/stats.shm"));
        assert_eq!(
            c.proxy_binary.as_deref(),
            Some(Path::new("/opt/baton/baton-proxy"))
        );
        assert_eq!(c.control_socket, Path::new("conf/run/edge.sock"));
        assert_eq!(c.readiness_timeout, Duration::from_secs(10));
        assert_eq!(c.max_draining, 3);
    }

    #[test]
    fn mistakes_in_the_supervisor_table_name_their_line() {
        let e = parse(
            Path::new("b.toml"),
            "[supervisor]\nreadyness_timeout = \"1s\"\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("b.toml:2:1: unknown field `readyness_timeout`"),
            "{e}"
        );
        let e = parse(Path::new("b.toml"), "drain_timeout = \"soon\"\n").unwrap_err();
        assert!(
            e.starts_with("b.toml:1:17: drain_timeout: `soon` is not a duration"),
            "{e}"
        );
        let e = parse(Path::new("b.toml"), "[supervisor]\nmax_draining = 0\n").unwrap_err();
        assert!(e.contains("b.toml:2:16: supervisor.max_draining"), "{e}");
    }
}
