//! The command line of `baton-stats`: its flags and their descriptions.
//!
//! Only clap and std here: the packaging tool (`packaging/`) includes this file to generate the
//! man page and shell completions from the same definitions.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

/// Print the stats of a running baton, read from its shared-memory region.
#[derive(Debug, Parser)]
#[command(name = "baton-stats", version)]
pub struct Cli {
    /// The instance whose region to read (/dev/shm/baton.<NAME>).
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "path",
        default_value = "baton"
    )]
    pub instance: String,
    /// Read the region at FILE instead (a region placed with `stats.path`).
    #[arg(long, value_name = "FILE")]
    pub path: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Print again every SECS seconds, until interrupted (or --count times); text output then
    /// shows each counter's rate per second since the print before, as `value (R/s)`.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
    /// With --watch, stop after printing N times.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
    /// Only stats whose `name{tags}` matches this regular expression.
    pub pattern: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One line per stat, sorted by name: `name{tags}: value`, as the admin's `/stats`.
    Text,
    /// The region's facts and every stat, as one JSON document.
    Json,
    /// The Prometheus text exposition format, names prefixed `baton_`.
    Prometheus,
}

/// The command tree, for tools that render it (man pages, completions) and for tests.
pub fn command() -> clap::Command {
    Cli::command()
}
