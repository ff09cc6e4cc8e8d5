//! `baton`, the supervisor of proxy generations, and the commands that talk to it.
//!
//! `baton run` starts the supervisor: a small, single-threaded process that launches
//! `baton-proxy` generations, keeps their listen sockets in a store of its own, and hands them
//! from one generation to the next on reload (SIGHUP or `baton reload`) over a `SOCK_SEQPACKET`
//! channel per generation, so that no connection is refused or dropped. It creates the
//! shared-memory stats region and folds each generation's counts into it when the generation
//! exits, so counters never go back. A generation that fails to start changes nothing: the
//! active one keeps serving, and the requester of the reload is told why. A generation that
//! crashes is replaced, while the kernel holds new connections in the listen sockets' queues.
//!
//! The supervisor never touches traffic and reads only its own part of the config, which is
//! what keeps it small enough to almost never need an upgrade.
//!
//! The other subcommands are clients of the control socket (`control.rs`).

// Unsafe code is denied, and allowed item by item (each block with its `// SAFETY:` note) only
// in the modules where the OS demands it: `spawn` (placing descriptors between fork and exec),
// `activation` (taking the descriptors systemd passes) and `upgrade` (the descriptors handed
// over across an exec). Every other module forbids it.
#![deny(unsafe_code)]

mod activation;
mod spawn;
mod upgrade;

#[forbid(unsafe_code)]
mod adopt;
#[forbid(unsafe_code)]
mod cli;
#[forbid(unsafe_code)]
mod config;
#[forbid(unsafe_code)]
mod control;
#[forbid(unsafe_code)]
mod env;
#[forbid(unsafe_code)]
mod launch;
#[forbid(unsafe_code)]
mod lifecycle;
#[forbid(unsafe_code)]
mod locate;
#[forbid(unsafe_code)]
mod notify;
#[forbid(unsafe_code)]
mod server;
#[forbid(unsafe_code)]
mod store;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::FromArgMatches;

use crate::cli::{Cli, Command, Internal, LogFormat, Target};
use crate::control::{Request, Response};
use crate::env::{EXIT_USAGE, LOG_JSON};

/// What `--version` prints after the name: the version and the build id, the same id that
/// `baton status` shows for the supervisor.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (build ",
    env!("BATON_BUILD_ID"),
    ")"
);

fn main() -> ExitCode {
    let matches = cli::command().version(VERSION).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Run { config, log_format } => {
            init_logging(log_format);
            if upgrade::trial_requested() {
                // A supervisor checking this binary before it executes it (see upgrade.rs).
                return match upgrade::trial(&config) {
                    Ok(answer) => {
                        println!("{answer}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("baton: {e}");
                        ExitCode::FAILURE
                    }
                };
            }
            ExitCode::from(server::main(&config))
        }
        Command::Reload(target) => client(&target, Sure::Always, Request::Reload, |r| {
            println!("baton: reloaded: {}", r.message);
        }),
        Command::Drain(target) => client(&target, Sure::WhenGuessed, Request::Drain, |r| {
            println!("baton: {}", r.message)
        }),
        Command::Stop {
            target,
            no_wait: true,
        } => client(&target, Sure::WhenGuessed, Request::Stop, |r| {
            println!("baton: {}", r.message)
        }),
        Command::Stop {
            target,
            no_wait: false,
        } => stop(&target),
        Command::ReopenLogs(target) => {
            client(&target, Sure::WhenGuessed, Request::ReopenLogs, |r| {
                println!("baton: {}", r.message)
            })
        }
        Command::Status { target, json } => client(&target, Sure::Never, Request::Status, |r| {
            let Some(status) = &r.status else { return };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(status).unwrap_or_default()
                );
            } else {
                print!("{}", status_table(status));
            }
        }),
        Command::Check { config } => check(&config),
        Command::UpgradeSupervisor(target) => upgrade_supervisor(&target),
        Command::Internal {
            command: Internal::UpgradeCheck,
        } => {
            println!("{}", upgrade::check_answer());
            ExitCode::SUCCESS
        }
    }
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => {
            LOG_JSON.store(true, std::sync::atomic::Ordering::Relaxed);
            // `target` (`baton::…`) tells the supervisor's lines from a generation's.
            builder.with_target(true).json().init()
        }
    }
}

/// Runs one control request and prints its answer; exit 1 when it failed.
fn client(
    target: &Target,
    sure: Sure,
    request: Request,
    print: impl FnOnce(&Response),
) -> ExitCode {
    let socket = match socket_of(target, sure) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match control::call(&socket, request) {
        Ok(response) if response.ok => {
            print(&response);
            ExitCode::SUCCESS
        }
        Ok(response) => {
            eprintln!("baton: {}", response.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("baton: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Asks for a stop and waits until the supervisor has exited: exit 0 once it did, 1 if it
/// refused or went away before saying so.
fn stop(target: &Target) -> ExitCode {
    let socket = match socket_of(target, Sure::WhenGuessed) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match control::stop_and_wait(&socket, |r| println!("baton: {}", r.message)) {
        Ok(r) if r.ok => {
            println!("baton: {}", r.message);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprintln!("baton: {}", r.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("baton: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Asks for the upgrade, then waits for the supervisor to answer again and tells whether it
/// took over: exit 0 only when the new binary runs (the supervisor counts its upgrades), 1 with
/// the reason when the upgrade was refused or failed (the supervisor serves on as it was).
fn upgrade_supervisor(target: &Target) -> ExitCode {
    let socket = match socket_of(target, Sure::WhenGuessed) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let before = match control::call(&socket, Request::Status) {
        Ok(r) => r.status,
        Err(e) => {
            eprintln!("baton: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(before) = before else {
        eprintln!("baton: the supervisor did not say its status");
        return ExitCode::FAILURE;
    };
    match control::call(&socket, Request::UpgradeSupervisor) {
        Ok(r) if r.ok => println!("baton: {}", r.message),
        Ok(r) => {
            eprintln!(
                "baton: {}; supervisor pid {} runs build {} as before",
                r.message, before.supervisor_pid, before.supervisor_build
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("baton: {e}");
            return ExitCode::FAILURE;
        }
    }
    // The new program answers on the same socket once it has taken over (or the previous one,
    // executed again, if it could not).
    let after = control::call(&socket, Request::Status)
        .ok()
        .and_then(|r| r.status);
    let Some(after) = after else {
        eprintln!("baton: the supervisor did not come back after the upgrade; see its log");
        return ExitCode::FAILURE;
    };
    if after.supervisor_pid != before.supervisor_pid {
        eprintln!(
            "baton: another supervisor (pid {}) answers now, not pid {}; see the log",
            after.supervisor_pid, before.supervisor_pid
        );
        return ExitCode::FAILURE;
    }
    if after.supervisor_upgrades <= before.supervisor_upgrades {
        eprintln!(
            "baton: not upgraded: {}; supervisor pid {} runs build {} as before",
            after
                .last_upgrade
                .as_deref()
                .unwrap_or("the new binary did not take over"),
            after.supervisor_pid,
            after.supervisor_build
        );
        return ExitCode::FAILURE;
    }
    if after.supervisor_build != before.supervisor_build {
        println!(
            "baton: supervisor pid {} now runs build {} (was {})",
            after.supervisor_pid, after.supervisor_build, before.supervisor_build
        );
    } else {
        println!(
            "baton: supervisor pid {} runs build {} again (the binary on disk is the same build)",
            after.supervisor_pid, after.supervisor_build
        );
    }
    ExitCode::SUCCESS
}

/// How sure a command must be, before it acts, that the supervisor it reaches runs the config
/// file it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sure {
    /// A reload reads the file the supervisor was started with: a `--config` naming another
    /// file (which would otherwise be silently ignored) is refused.
    Always,
    /// When the socket had to be guessed (the file did not load), a command that changes
    /// something checks that it reaches the supervisor of that file, not another instance's.
    WhenGuessed,
    /// `baton status` only reads, and shows the config the supervisor runs.
    Never,
}

/// The control socket a command talks to: `--socket`, or the one the `--config` file names. A
/// file that does not load (a syntax error half-way through an edit) still leads to its
/// supervisor: what can be read of it, else the default socket, with a note on stderr.
fn socket_of(target: &Target, sure: Sure) -> Result<PathBuf, ExitCode> {
    let config = match (&target.socket, &target.config) {
        (Some(socket), _) => return Ok(socket.clone()),
        (None, Some(config)) => config,
        (None, None) => {
            eprintln!("baton: give --config FILE or --socket PATH");
            return Err(ExitCode::from(EXIT_USAGE));
        }
    };
    let located = locate::control_socket(config);
    if let Some(note) = &located.guessed {
        eprintln!("baton: {note}");
    }
    let check = match sure {
        Sure::Always => true,
        Sure::WhenGuessed => located.guessed.is_some(),
        Sure::Never => false,
    };
    if check {
        same_config(config, &located.socket, sure)?;
    }
    Ok(located.socket)
}

/// Refuses (exit 64) when the supervisor on `socket` runs another config file than `given`.
fn same_config(given: &Path, socket: &Path, sure: Sure) -> Result<(), ExitCode> {
    let Ok(Some(status)) = control::call(socket, Request::Status).map(|r| r.status) else {
        // Not answering: the command itself will say so.
        return Ok(());
    };
    let given_abs = std::fs::canonicalize(given).unwrap_or_else(|_| given.to_owned());
    if given_abs == Path::new(&status.config) {
        return Ok(());
    }
    if sure == Sure::Always {
        eprintln!(
            "baton: the running supervisor (pid {}) reloads {}, the file it was started with, not {}; edit that file (or copy this one over it) and reload, or stop baton and start it with --config {}",
            status.supervisor_pid,
            status.config,
            given.display(),
            given.display()
        );
    } else {
        eprintln!(
            "baton: the supervisor on {} (pid {}) runs {}, not {}; nothing was done (give --socket {} to control it)",
            socket.display(),
            status.supervisor_pid,
            status.config,
            given.display(),
            socket.display()
        );
    }
    Err(ExitCode::from(EXIT_USAGE))
}

fn status_table(status: &control::Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "supervisor pid {} (build {}), instance {}, config {}",
        status.supervisor_pid, status.supervisor_build, status.instance, status.config
    );
    let _ = writeln!(
        out,
        "listen sockets {}, reloads {}, failed {}, crashes {}{}",
        status.sockets,
        status.reloads,
        status.reload_failures,
        status.crashes,
        status
            .last_reload
            .as_ref()
            .map_or(String::new(), |r| format!("; last reload: {r}"))
    );
    if status.drained {
        let _ = writeln!(
            out,
            "DRAINED: no generation accepts new connections; `baton reload` starts one"
        );
    }
    let _ = writeln!(
        out,
        "{:>6}  {:>8}  {:<9}  {:>8}  {:>11}  {:>8}  BUILD",
        "EPOCH", "PID", "STATE", "UPTIME", "CONNECTIONS", "REQUESTS"
    );
    for g in &status.generations {
        let _ = writeln!(
            out,
            "{:>6}  {:>8}  {:<9}  {:>8}  {:>11}  {:>8}  {}",
            g.epoch,
            g.pid,
            g.state,
            humantime::format_duration(std::time::Duration::from_secs(g.uptime_seconds))
                .to_string(),
            g.connections,
            g.requests,
            g.build
        );
    }
    out
}

/// Checks the supervisor's part of the config, then lets `baton-proxy --check` check the rest.
fn check(path: &std::path::Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("baton: {e}");
            return ExitCode::FAILURE;
        }
    };
    let binary = match launch::proxy_binary(config.proxy_binary.as_deref()) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("baton: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The proxy checks its part (listeners, routes, clusters); its errors reach stderr as they
    // are, and its own "is valid" line gives way to this command's.
    match std::process::Command::new(&binary)
        .arg("--config")
        .arg(path)
        .arg("--check")
        .stdout(std::process::Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {
            println!("baton: {} is valid", path.display());
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("baton: cannot run {}: {e}", binary.display());
            ExitCode::FAILURE
        }
    }
}
