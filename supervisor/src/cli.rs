//! The command line of `baton`: its subcommands, flags and their descriptions.
//!
//! Only clap and std here: the packaging tool (`packaging/`) includes this file to generate the
//! man pages and shell completions from the same definitions, without linking the supervisor.

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

/// baton: a hot-restartable proxy. `baton run` supervises `baton-proxy` generations; the other
/// commands control a running supervisor.
#[derive(Debug, Parser)]
#[command(name = "baton", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `baton run --help` (and its man page) adds after the flags.
const RUN_DETAILS: &str = "\
Signals:
  SIGHUP    reload (as `baton reload`)
  SIGTERM   drain every generation, then exit 0 (as `baton stop`)
  SIGINT    stop every generation now
  SIGUSR1   every generation reopens its access logs (as `baton reopen-logs`)
  SIGUSR2   execute the `baton` binary on disk in place (as `baton upgrade-supervisor`)
  SIGWINCH  drain without a successor until the next reload (as `baton drain`)

Exit status:
  0   stopped
  64  the configuration is invalid (`baton check --config FILE` says why)
  1   the first generation could not start otherwise (a port in use, say), or the control
      socket or the stats region could not be made

Environment:
  BATON_LOG  the log filter (default `info`), e.g. `debug` or `info,baton=debug`";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the supervisor in the foreground (under systemd, runit, or a terminal).
    #[command(after_long_help = RUN_DETAILS)]
    Run {
        /// The configuration file (TOML), the same one every generation reads.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
        /// Log lines as text or as JSON objects.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Start a new generation and drain the old one; waits for the outcome (exit 1 if it failed).
    Reload(Target),
    /// Take this host out of rotation without stopping: the active generation stops accepting
    /// and finishes its connections, and none replaces it until `baton reload` (like SIGWINCH).
    /// New connections wait in the accept queue meanwhile; none is refused.
    Drain(Target),
    /// Drain every generation, then stop the supervisor; waits until it has exited.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Return once the stop has begun, without waiting for the drain and the exit.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make every generation reopen its access logs (after log rotation).
    ReopenLogs(Target),
    /// Show the generations: epoch, pid, state, uptime, connections.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration without running it (like `nginx -t`): exit 0 if valid, 1 if not.
    Check {
        /// The configuration file (TOML) to check: the supervisor's part, then the proxy's.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Execute the `baton` binary on disk in the running supervisor's place (same pid, same
    /// generations and sockets), like SIGUSR2.
    UpgradeSupervisor(Target),
    /// Between `baton` binaries, not for people.
    #[command(hide = true)]
    Internal {
        #[command(subcommand)]
        command: Internal,
    },
}

#[derive(Debug, Subcommand)]
pub enum Internal {
    /// Prints the versions of handed-over state this binary reads.
    UpgradeCheck,
}

/// Which supervisor to talk to.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// The config file the supervisor runs with (its control socket is found from it).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The supervisor's control socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// The command tree, for tools that render it (man pages, completions) and for tests.
pub fn command() -> clap::Command {
    Cli::command()
}
