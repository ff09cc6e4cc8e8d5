//! The command line of `baton-proxy`: its flags and their descriptions.
//!
//! Only clap and std here: the packaging tool (`packaging/`) includes this file to generate the
//! man page and shell completions from the same definitions, without linking the proxy.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

/// A baton proxy generation: HTTP/1.1, HTTP/2 and TCP proxying with graceful drain.
#[derive(Debug, Parser)]
#[command(name = "baton-proxy", version)]
pub struct Cli {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Worker threads, 1 to 1024 [default: `concurrency` from the config, else one per CPU core].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub concurrency: Option<u16>,
    /// Check the configuration and exit: 0 when it is valid, 1 when it is not (like `nginx -t`).
    #[arg(long)]
    pub check: bool,
    /// The restart epoch of this generation, shown by `/server_info` (the supervisor sets it).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub epoch: u64,
}

/// The command tree, for tools that render it (man pages, completions) and for tests.
pub fn command() -> clap::Command {
    Cli::command()
}
