//! `baton-stats`: reads a baton stats region straight from shared memory and prints it as text,
//! JSON or Prometheus exposition, once or every few seconds.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::FromArgMatches;
use regex::Regex;
use shm_stats::{Reader, format};

use cli::{Cli, Format};

// Beside this file, not in `src/bin/` (where cargo would take it for a binary of its own).
#[path = "baton-stats/cli.rs"]
mod cli;

/// What `--version` prints after the name: the version and the build id.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (build ",
    env!("BATON_BUILD_ID"),
    ")"
);

fn main() -> ExitCode {
    let cli = Cli::from_arg_matches(&cli::command().version(VERSION).get_matches())
        .unwrap_or_else(|e| e.exit());
    let pattern = match cli.pattern.as_deref().map(Regex::new).transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("baton-stats: PATTERN is not a valid regular expression: {e}");
            return ExitCode::from(2);
        }
    };
    let interval = match cli.watch {
        Some(secs) if !(secs.is_finite() && secs > 0.0) => {
            eprintln!("baton-stats: --watch takes a number of seconds above zero");
            return ExitCode::from(2);
        }
        Some(secs) => match Duration::try_from_secs_f64(secs) {
            Ok(d) => Some(d),
            Err(_) => {
                eprintln!("baton-stats: --watch {secs} is more seconds than a clock can hold");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let path = cli
        .path
        .clone()
        .unwrap_or_else(|| shm_stats::default_path(&cli.instance));
    let reader = match Reader::open(&path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("baton-stats: {e}");
            return ExitCode::FAILURE;
        }
    };

    let mut printed = 0u64;
    // With --watch: what each counter and histogram had counted at the last print, and when,
    // so that the next print shows a rate per second beside each total.
    let mut last: Option<(Instant, HashMap<String, u64>)> = None;
    loop {
        let snapshot = match reader.snapshot() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("baton-stats: {e}");
                return ExitCode::FAILURE;
            }
        };
        if printed == 0 {
            warn_if_stale(&snapshot);
        }
        let stats: Vec<_> = snapshot
            .stats
            .iter()
            .filter(|s| {
                pattern
                    .as_ref()
                    .is_none_or(|p| p.is_match(&format::display_name(s)))
            })
            .collect();
        let now = Instant::now();
        let out = match cli.format {
            Format::Text if interval.is_some() => {
                let rate = |s: &shm_stats::Stat| {
                    let (at, totals) = last.as_ref()?;
                    let before = *totals.get(&format::display_name(s))?;
                    let secs = now.duration_since(*at).as_secs_f64();
                    // A total below the last one belongs to a region made anew: no rate.
                    let delta = format::total(s)?.checked_sub(before)?;
                    (secs > 0.0).then(|| delta as f64 / secs)
                };
                let out = format::plain_with_rates(&stats, rate);
                let totals = stats
                    .iter()
                    .filter_map(|s| Some((format::display_name(s), format::total(s)?)))
                    .collect();
                last = Some((now, totals));
                out
            }
            Format::Text => format::plain(&stats),
            Format::Json => format::json(&snapshot, &path.display().to_string(), &stats),
            Format::Prometheus => format::prometheus(&stats),
        };
        let mut stdout = std::io::stdout().lock();
        if interval.is_some() && cli.format == Format::Text {
            let _ = writeln!(
                stdout,
                "--- {} epoch {} ---",
                path.display(),
                snapshot.current_epoch
            );
        }
        if stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush())
            .is_err()
        {
            // The reader of our output went away (`| head`): nothing more to say.
            return ExitCode::SUCCESS;
        }
        drop(stdout);
        printed += 1;
        match interval {
            Some(every) if cli.count.is_none_or(|n| printed < n) => {
                // A command-line tool between two prints, not an event loop.
                #[allow(clippy::disallowed_methods)]
                std::thread::sleep(every)
            }
            _ => return ExitCode::SUCCESS,
        }
    }
}

/// Values nobody writes any more are worth a word on stderr: dashboards would show them as live.
fn warn_if_stale(snapshot: &shm_stats::Snapshot) {
    if snapshot.shards.is_empty() {
        eprintln!(
            "baton-stats: note: no process writes this region now; these are the values its last writers left"
        );
        return;
    }
    let mut gone: Vec<u32> = snapshot
        .shards
        .iter()
        .map(|s| s.pid)
        .filter(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    gone.dedup();
    if !gone.is_empty() {
        let pids: Vec<String> = gone.iter().map(u32::to_string).collect();
        eprintln!(
            "baton-stats: note: process(es) {} that write this region are not running here (or run in another pid namespace): their values may be stale",
            pids.join(", ")
        );
    }
}
