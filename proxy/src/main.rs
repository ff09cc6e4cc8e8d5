//! `baton-proxy`: one proxy generation. Run alone for development or behind a load balancer, or
//! launched by the `baton` supervisor, which hands it sockets and drains it on reload.
//!
//! Threads: the main thread (signals, admin, drain orchestration), one worker thread per
//! `--concurrency` with its own event loop, and one access-log flusher thread.

// Unsafe code is denied, and allowed by name only where the OS demands it: here (closing a
// descriptor this process inherited), in `generation` (`supervised`: the descriptors the
// supervisor passes; `run`: registering a descriptor with tokio's reactor) and in `worker`
// (asking mimalloc to free an idle thread's pages). Every other module forbids it.
#![deny(unsafe_code)]

#[forbid(unsafe_code)]
mod cli;
#[forbid(unsafe_code)]
mod cluster;
#[forbid(unsafe_code)]
mod downstream;
mod generation;
#[forbid(unsafe_code)]
mod runtime;
#[forbid(unsafe_code)]
mod stats;
#[forbid(unsafe_code)]
mod upstream;
mod worker;

use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;

// In the library, so that the fuzz targets can parse configs too.
use baton_proxy::config;
use baton_proxy::{dns, lb};
use clap::FromArgMatches;
use cli::Cli;
use tracing::error;

/// mimalloc instead of the system allocator: hyper allocates small buffers per request, and
/// mimalloc's per-thread free lists make that cheaper (measured in BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration the operator must fix (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// What `--version` prints after the name: the version and the build id, the same id that
/// `/server_info` and `baton status` show for a generation.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (build ",
    env!("BATON_BUILD_ID"),
    ")"
);

fn main() -> ExitCode {
    // No transparent huge pages: mimalloc asks for them on its arenas, and a generation then
    // zeroes a whole 2 MiB page at each first touch. Measured on a reload: startup 4 ms of CPU
    // instead of 5 to 30 ms, and an idle generation holds 8 MiB instead of 16 (BENCHMARKS.md).
    // Before anything else, so that little is touched before. Not fatal where the kernel has no
    // THP to disable.
    let _ = nix::sys::prctl::set_thp_disable(true);
    let cli = Cli::from_arg_matches(&cli::command().version(VERSION).get_matches())
        .unwrap_or_else(|e| e.exit());
    init_logging();

    // Started by `baton run`: the control channel is inherited.
    let channel = if cli.check {
        None
    } else {
        match generation::supervised::channel_from_env() {
            Ok(channel) => channel,
            Err(e) => {
                eprintln!("baton-proxy: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    // Under a supervisor, the config's bytes come as the supervisor read them (the file on disk
    // may have changed since: a generation replacing a crashed one runs the last good config).
    let source = if cli.check {
        Ok(None)
    } else {
        generation::supervised::config_from_env()
    };
    let mut config_fd = None;
    let loaded = match source {
        Ok(Some((source, fd))) => {
            config_fd = Some(fd);
            config::parse(&cli.config, &source)
        }
        Ok(None) => config::load(&cli.config),
        Err(e) => {
            eprintln!("baton-proxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match loaded {
        Ok(config) => Arc::new(config),
        Err(e) => {
            // Under a supervisor, it logs the reason once and shows it to whoever asked for the
            // reload; the generation says it itself only when the supervisor cannot hear it.
            let told = channel.as_ref().is_some_and(|channel| {
                channel
                    .send(
                        &restart_protocol::ToSupervisor::Failed {
                            reason: e.to_string(),
                        },
                        &[],
                    )
                    .is_ok()
            });
            if !told {
                eprintln!("baton-proxy: {e}");
            }
            return ExitCode::from(if cli.check { 1 } else { EXIT_CONFIG });
        }
    };
    if cli.check {
        println!("baton-proxy: {} is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let concurrency = cli
        .concurrency
        .and_then(|n| NonZeroUsize::new(usize::from(n)))
        .or(config.concurrency)
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    // Before the first thread starts (the workers, the access-log flusher): see the function.
    presize_descriptor_table(&config);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the main event loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(
        &runtime,
        generation::run::run(config, concurrency, cli.epoch, channel, config_fd),
    )
}

/// Descriptors to make room for when the config does not limit the connections: 8,192 proxied
/// connections (one downstream and one upstream descriptor each), with a 128 KiB table.
const DESCRIPTOR_TABLE_DEFAULT: usize = 16_384;
/// The largest table made in advance (512 KiB).
const DESCRIPTOR_TABLE_MAX: usize = 65_536;

/// Grows the process's descriptor table, while the process has one thread, to hold the
/// descriptors its connections will need (two per downstream connection: its own and an
/// upstream one), bounded by the descriptor limit.
///
/// Linux grows the table when a descriptor past its end is made, and in a process of several
/// threads every growth waits for an RCU grace period (`synchronize_rcu` in `expand_fdtable`)
/// before the `accept` or `socket` call that needed it returns. A new generation crossed 64
/// and 128 descriptors in its first milliseconds under load, and each growth blocked its
/// worker 5 to 20 ms here, with every client in the accept queue waiting: the tail latency of
/// reloads under load (BENCHMARKS.md). With one thread the growth needs no grace period, and a
/// table never shrinks. A failure only leaves the table to grow as before.
#[allow(unsafe_code)]
fn presize_descriptor_table(config: &config::Config) {
    use nix::fcntl::{FcntlArg, fcntl};
    use nix::sys::resource::{Resource, getrlimit};
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    let wanted = config
        .max_connections
        .map_or(DESCRIPTOR_TABLE_DEFAULT, |n| {
            n.saturating_mul(2).saturating_add(256)
        });
    let limit = getrlimit(Resource::RLIMIT_NOFILE)
        .map_or(0, |(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX));
    let slots = wanted.min(limit).min(DESCRIPTOR_TABLE_MAX);
    let Ok(highest) = i32::try_from(slots.saturating_sub(1)) else {
        return;
    };
    if highest < 64 {
        return;
    }
    // A copy of stderr at the highest descriptor wanted (or the first free one above it) makes
    // the kernel grow the table to hold it; closing the copy keeps the table.
    match fcntl(
        std::io::stderr().as_fd(),
        FcntlArg::F_DUPFD_CLOEXEC(highest),
    ) {
        Ok(fd) => {
            // SAFETY: `fcntl` just made `fd`, a new descriptor that nothing else owns or uses.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            tracing::debug!("descriptor table grown to hold {slots} descriptors");
        }
        Err(e) => tracing::debug!("descriptor table not grown in advance: {e}"),
    }
}

/// Logs to stderr, as text, or as JSON objects when `BATON_LOG_FORMAT=json` (set by a supervisor
/// run with `--log-format json`, so that every line of the service is JSON).
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    if std::env::var_os(restart_protocol::LOG_FORMAT_ENV).is_some_and(|f| f == "json") {
        // `target` (`baton_proxy::…`) tells a generation's lines from the supervisor's.
        builder.with_target(true).json().init();
    } else {
        builder.init();
    }
}
