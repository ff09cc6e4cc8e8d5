//! `baton-proxy`: one proxy generation. Run alone for development or behind a load balancer, or
//! launched by the `baton` supervisor, which hands it sockets and drains it on reload.
//!
//! Threads: the main thread (signals, admin, drain orchestration), one worker thread per
//! `--concurrency` with its own event loop, and one access-log flusher thread.

#![forbid(unsafe_code)]

mod access_log;
mod admin;
mod config;
mod generation;
mod http;
mod listen;
mod stats;
mod tcp_proxy;
mod upstream;
mod worker;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::generation::Generation;

/// Exit status for a configuration the operator must fix (sysexits' EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// A baton proxy generation: HTTP/1.1, HTTP/2 and TCP proxying with graceful drain.
#[derive(Debug, Parser)]
#[command(name = "baton-proxy", version)]
struct Cli {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Worker threads [default: `concurrency` from the config, else one per CPU core].
    #[arg(long, value_name = "N")]
    concurrency: Option<NonZeroUsize>,
    /// Check the configuration and exit: 0 when it is valid, 1 when it is not (like `nginx -t`).
    #[arg(long)]
    check: bool,
    /// The restart epoch of this generation, shown by `/server_info` (the supervisor sets it).
    #[arg(long, value_name = "N", default_value_t = 0)]
    epoch: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();

    let config = match config::load(&cli.config) {
        Ok(config) => Arc::new(config),
        Err(e) => {
            eprintln!("baton-proxy: {e}");
            return ExitCode::from(if cli.check { 1 } else { EXIT_CONFIG });
        }
    };
    if cli.check {
        println!("baton-proxy: {} is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let concurrency = cli
        .concurrency
        .or(config.concurrency)
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);

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
    local.block_on(&runtime, run(config, concurrency, cli.epoch))
}

fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

async fn run(config: Arc<config::Config>, concurrency: usize, epoch: u64) -> ExitCode {
    let signals = (|| {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
            signal(SignalKind::user_defined1())?,
        ))
    })();
    let (mut term, mut int, mut hup, mut usr1) = match signals {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };

    // Bind the admin socket before starting workers, so that a taken admin port fails early.
    let admin_listener = match &config.admin {
        Some(admin) => {
            match listen::bind_tcp(admin.address, 128).and_then(tokio::net::TcpListener::from_std) {
                Ok(l) => Some(l),
                Err(e) => {
                    error!(
                        "admin: cannot listen on {}: {e}; {}",
                        admin.address,
                        listen::bind_advice(&e)
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };

    // Run alone, the proxy keeps its own stats region (the supervisor will hand one over).
    let region =
        match shm_stats::Region::create_or_open(&config.stats.path, config.stats.capacities) {
            Ok(region) => region,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
    // Rows of a proxy that died without retiring them: fold their counts in, so that counters
    // carry on from where it stopped.
    match region.reclaim_dead() {
        Ok(0) => {}
        Ok(n) => {
            info!(shards = n, path = %region.path().display(), "retired the stats of processes that are gone")
        }
        Err(e) => warn!("{e}"),
    }
    let retire_own = |region: &shm_stats::Region| {
        if let Err(e) = region.retire_pid(std::process::id()) {
            warn!("cannot retire this process's stats: {e}");
        }
    };

    let generation = match Generation::start(config.clone(), concurrency, epoch, region.clone()) {
        Ok(g) => g,
        Err(e) => {
            error!("{e}");
            retire_own(&region);
            return ExitCode::FAILURE;
        }
    };
    let admin_task = admin_listener.map(|listener| {
        let admin = Rc::new(admin::Admin {
            config: config.clone(),
            info: generation.info.clone(),
            region: region.clone(),
        });
        tokio::task::spawn_local(admin::serve(admin, listener))
    });

    let listeners: Vec<String> = config
        .listeners
        .iter()
        .map(|l| format!("{}={}", l.name, l.address))
        .collect();
    info!(
        epoch,
        pid = std::process::id(),
        workers = concurrency,
        listeners = %listeners.join(","),
        admin = %config.admin.as_ref().map_or("off".to_owned(), |a| a.address.to_string()),
        stats = %config.stats.path.display(),
        build = admin::BUILD_ID,
        "ready"
    );

    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => generation.tick(),
            _ = term.recv() => {
                info!("SIGTERM: stop accepting and drain");
                tokio::select! {
                    outcome = generation.drain(config.drain.timeout) => {
                        if outcome.connections_left > 0 {
                            warn!(
                                connections = outcome.connections_left,
                                took = ?outcome.took,
                                "drain timeout reached; closing the connections left"
                            );
                        } else {
                            info!(took = ?outcome.took, "drained");
                        }
                    }
                    _ = int.recv() => info!("SIGINT during drain: stopping now"),
                }
                break;
            }
            _ = int.recv() => {
                info!(connections = generation.open_connections(), "SIGINT: stopping now");
                break;
            }
            _ = usr1.recv() => {
                info!("SIGUSR1: reopening access logs");
                generation.reopen_logs();
            }
            _ = hup.recv() => {
                warn!("SIGHUP ignored: a running baton-proxy does not reload itself; run it under the supervisor (`baton run`) to reload");
            }
        }
    }
    if let Some(task) = admin_task {
        task.abort();
    }
    generation.stop();
    retire_own(&region);
    info!(epoch, "exited");
    ExitCode::SUCCESS
}
