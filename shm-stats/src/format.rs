//! Rendering a snapshot as text (for people), JSON (for scripts) or the Prometheus text exposition
//! format (for scrapers). Shared by `baton-stats` and the proxy's admin endpoints.

#![forbid(unsafe_code)]

use std::fmt::Write;

use serde_json::{Map, Value as Json, json};

use crate::histogram::Summary;
use crate::layout::{Kind, Unit};
use crate::snapshot::{Snapshot, Stat, Value};

/// `name{k=v,...}`, how a stat is named in text output and matched by filters.
pub fn display_name(stat: &Stat) -> String {
    if stat.tags_str().is_empty() {
        return stat.name().to_owned();
    }
    format!("{}{{{}}}", stat.name(), stat.tags_str())
}

fn human(value: u64, unit: Unit) -> String {
    match unit {
        Unit::Microseconds if value >= 1_000_000 => format!("{:.2}s", value as f64 / 1e6),
        Unit::Microseconds if value >= 1_000 => format!("{:.2}ms", value as f64 / 1e3),
        Unit::Microseconds => format!("{value}us"),
        Unit::Seconds => format!("{value}s"),
        Unit::Bytes | Unit::None => value.to_string(),
    }
}

fn histogram_text(h: &Summary, unit: Unit) -> String {
    format!(
        "count={} p50={} p90={} p99={} max={}",
        h.count(),
        human(h.quantile(0.5), unit),
        human(h.quantile(0.9), unit),
        human(h.quantile(0.99), unit),
        human(h.max, unit),
    )
}

/// `name{tags}: value` lines, sorted, as Envoy's plain `/stats`; histograms as
/// `count= p50= p90= p99= max=`. The admin's `/stats` and `baton-stats` both print this.
pub fn plain(stats: &[&Stat]) -> String {
    plain_with_rates(stats, |_| None)
}

/// [`plain`], with a per-second rate after the values `rate` gives one for (`baton-stats
/// --watch` gives counters and histogram counts theirs): `name{tags}: value (2.5/s)`.
pub fn plain_with_rates(stats: &[&Stat], rate: impl Fn(&Stat) -> Option<f64>) -> String {
    let mut rows: Vec<String> = stats
        .iter()
        .map(|s| {
            let value = match &s.value {
                Value::Counter(v) => v.to_string(),
                Value::Gauge(v) => v.to_string(),
                Value::Histogram(h) => histogram_text(h, s.unit),
            };
            match rate(s) {
                Some(r) => format!("{}: {value} ({r:.1}/s)", display_name(s)),
                None => format!("{}: {value}", display_name(s)),
            }
        })
        .collect();
    rows.sort();
    let mut out = String::new();
    for row in rows {
        out.push_str(&row);
        out.push('\n');
    }
    out
}

/// What a counter or a histogram has counted so far (the values a rate is taken of); `None` for
/// gauges, which go up and down.
pub fn total(stat: &Stat) -> Option<u64> {
    match &stat.value {
        Value::Counter(v) => Some(*v),
        Value::Histogram(h) => Some(h.count()),
        Value::Gauge(_) => None,
    }
}

/// Which thread writes a shard: `worker-N`, a generation's `main` thread, or the `supervisor`.
pub fn thread_name(shard: &crate::ShardInfo) -> String {
    match (shard.epoch, shard.worker) {
        (u64::MAX, _) => "supervisor".to_owned(),
        (_, u32::MAX) => "main".to_owned(),
        (_, w) => format!("worker-{w}"),
    }
}

/// The region's facts and every stat, as one JSON document.
pub fn json(snapshot: &Snapshot, path: &str, stats: &[&Stat]) -> String {
    let stats: Vec<Json> = stats
        .iter()
        .map(|s| {
            let tags: Map<String, Json> = s
                .tags()
                .map(|(k, v)| (k.to_owned(), Json::from(v)))
                .collect();
            let mut o = json!({
                "name": s.name(),
                "tags": tags,
                "kind": s.kind.name(),
                "unit": s.unit.name(),
                "help": s.help(),
            });
            match &s.value {
                Value::Counter(v) => o["value"] = json!(v),
                Value::Gauge(v) => o["value"] = json!(v),
                Value::Histogram(h) => {
                    o["count"] = json!(h.count());
                    o["sum"] = json!(h.sum);
                    o["max"] = json!(h.max);
                    o["p50"] = json!(h.quantile(0.5));
                    o["p90"] = json!(h.quantile(0.9));
                    o["p99"] = json!(h.quantile(0.99));
                    let buckets: Vec<Json> = h
                        .buckets
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| **n > 0)
                        .map(|(i, n)| json!([h.bounds.upper(i), n]))
                        .collect();
                    o["buckets"] = Json::from(buckets);
                }
            }
            o
        })
        .collect();
    let shards: Vec<Json> = snapshot
        .shards
        .iter()
        .map(|s| json!({"epoch": s.epoch, "thread": thread_name(s), "pid": s.pid}))
        .collect();
    let doc = json!({
        "region": {
            "path": path,
            "layout_version": snapshot.header.version,
            "created_unix_ms": snapshot.header.created_unix_ms,
            "supervisor_pid": snapshot.supervisor_pid,
            "current_epoch": snapshot.current_epoch,
            "histogram_bounds": snapshot.header.capacities.bounds.as_slice(),
            "shards": shards,
        },
        "stats": stats,
    });
    format!("{doc:#}\n")
}

/// The Prometheus text exposition format (version 0.0.4): one family per stat name, prefixed
/// `baton_`, tags as labels; microsecond histograms in seconds, with a `_seconds` suffix.
pub fn prometheus(stats: &[&Stat]) -> String {
    // Families must be contiguous: group by name, keeping the order names first appear in.
    let mut order: Vec<&str> = Vec::new();
    let mut families: std::collections::HashMap<&str, Vec<&Stat>> = Default::default();
    for s in stats {
        let family = families.entry(s.name()).or_default();
        if family.is_empty() {
            order.push(s.name());
        }
        family.push(s);
    }
    let mut out = String::new();
    for name in order {
        let family = &families[name];
        let first = family[0];
        let seconds = first.kind == Kind::Histogram && first.unit == Unit::Microseconds;
        let metric = format!(
            "baton_{}{}",
            name.replace('.', "_"),
            if seconds { "_seconds" } else { "" }
        );
        let help = first.help().replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} {}", first.kind.name());
        for s in family {
            // Tag values cannot hold `"`, `\` or line breaks (the writer refuses them).
            let labels: Vec<String> = s.tags().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let with = |extra: Option<String>| -> String {
                let mut all = labels.clone();
                all.extend(extra);
                if all.is_empty() {
                    String::new()
                } else {
                    format!("{{{}}}", all.join(","))
                }
            };
            match &s.value {
                Value::Counter(v) => {
                    let _ = writeln!(out, "{metric}{} {v}", with(None));
                }
                Value::Gauge(v) => {
                    let _ = writeln!(out, "{metric}{} {v}", with(None));
                }
                Value::Histogram(h) => {
                    let scale = |v: u64| {
                        if seconds {
                            format!("{}", v as f64 / 1e6)
                        } else {
                            v.to_string()
                        }
                    };
                    for (le, count) in h.cumulative() {
                        let le = if le == u64::MAX {
                            "+Inf".to_owned()
                        } else {
                            scale(le)
                        };
                        let _ = writeln!(
                            out,
                            "{metric}_bucket{} {count}",
                            with(Some(format!("le=\"{le}\"")))
                        );
                    }
                    let _ = writeln!(out, "{metric}_sum{} {}", with(None), scale(h.sum));
                    let _ = writeln!(out, "{metric}_count{} {}", with(None), h.count());
                }
            }
        }
    }
    out
}
