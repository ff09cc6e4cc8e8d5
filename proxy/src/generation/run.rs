//! A generation's life on the main thread: get sockets and the stats region (from the supervisor,
//! or made here when running alone), start, report, drain when told, exit.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::OwnedFd;

use restart_protocol::{
    Channel, ChannelError, DrainStrategy, FEATURE_ADOPT, FEATURE_DRAIN_REQUEST, SocketKey,
    ToGeneration, ToSupervisor,
};
use shm_stats::{ReadError, Region, StatsError};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::admin;
use super::listen;
use super::running::{self, DrainOutcome, Generation};
use super::supervised::{self, Link};
use crate::cluster;
use crate::config::Config;
use crate::stats::{StatIds, ThreadStats};

/// How often a supervised generation tells the supervisor what it holds.
const LOAD_INTERVAL: Duration = Duration::from_millis(500);

/// Why the main loop ends.
enum End {
    /// Drained (or told to stop, or interrupted): exit 0.
    Done,
}

pub async fn run(
    config: Arc<Config>,
    concurrency: usize,
    epoch: u64,
    channel: Option<Channel>,
    // The config's memfd from the supervisor, handed on to one that adopts this generation.
    config_fd: Option<OwnedFd>,
) -> ExitCode {
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

    let mut link = match channel {
        Some(channel) => match Link::handshake(channel, epoch).await {
            Ok(link) => Some(link),
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // Reports a start-up failure to the supervisor, which logs it once and whose `baton reload`
    // prints it; the generation logs it itself only when the supervisor cannot hear it.
    let fail = |link: Option<&Link>, reason: String| {
        let told = link.is_some_and(|link| {
            link.send(&ToSupervisor::Failed {
                reason: reason.clone(),
            })
            .is_ok()
        });
        if !told {
            error!("{reason}");
        }
        ExitCode::FAILURE
    };

    let (region, sockets, admin_socket, keys) = match &mut link {
        Some(link) => {
            let region = match link.stats_region().await {
                Ok((file, path)) => Region::from_file(&path, file).map_err(|e| match e {
                    StatsError::Unusable(ReadError::UnknownVersion { found, known, .. })
                        if found < known =>
                    {
                        format!(
                            "the supervisor's stats region {} has layout version {found}, of an earlier baton; this baton-proxy writes version {known}: upgrade the supervisor first (`baton upgrade-supervisor`, which makes a new region), then reload",
                            path.display()
                        )
                    }
                    e => e.to_string(),
                }),
                Err(e) => Err(e),
            };
            let region = match region {
                Ok(r) => r,
                Err(e) => return fail(Some(link), e),
            };
            match supervised::sockets(link, &config).await {
                Ok((sockets, admin, keys)) => (region, sockets, admin, keys),
                Err(e) => return fail(Some(link), e),
            }
        }
        None => match standalone_setup(&config) {
            Ok((region, sockets, admin)) => (region, sockets, admin, Vec::new()),
            Err(e) => return fail(None, e),
        },
    };
    let supervised = link.is_some();
    let retire_own = |region: &Region| {
        // Under a supervisor, the supervisor retires a generation's stats when it has exited.
        if !supervised && let Err(e) = region.retire_pid(std::process::id()) {
            warn!("cannot retire this process's stats: {e}");
        }
    };
    // Copies of the listen sockets, to hand to a new supervisor that adopts this generation
    // should its own die (see `restart_protocol::rendezvous`).
    let adoptable = link
        .as_ref()
        .is_some_and(|l| l.features & FEATURE_ADOPT != 0);
    let mut held: Vec<(SocketKey, OwnedFd)> = if adoptable {
        let copies = sockets
            .iter()
            .map(|s| s.try_clone().map(OwnedFd::from))
            .chain(
                admin_socket
                    .iter()
                    .map(|s| s.try_clone().map(OwnedFd::from)),
            )
            .collect::<Result<Vec<_>, _>>();
        match copies {
            Ok(copies) => keys.iter().copied().zip(copies).collect(),
            Err(e) => {
                warn!(
                    "cannot keep copies of the listen sockets: {e}; this generation cannot be adopted if the supervisor dies"
                );
                Vec::new()
            }
        }
    } else {
        Vec::new()
    };

    // The clusters first: their first health checks and DNS answers come in before the workers
    // take a request, so that a new generation does not send its first requests to endpoints
    // the old one knew were down.
    let main_stats = match StatIds::register(&region, &config).and_then(|ids| {
        Ok(Rc::new(ThreadStats {
            shard: region.attach_shard(epoch, running::MAIN_THREAD_SHARD)?,
            ids: Arc::new(ids),
        }))
    }) {
        Ok(stats) => stats,
        Err(e) => {
            retire_own(&region);
            return fail(link.as_ref(), e.to_string());
        }
    };
    let clusters = cluster::manager::Manager::start(config.clone(), main_stats.clone());
    clusters.warmed(clusters.warm_limit()).await;

    let generation = match Generation::start(
        config.clone(),
        concurrency,
        epoch,
        region.clone(),
        sockets,
        main_stats,
        clusters.handles(),
    ) {
        Ok(g) => g,
        Err(e) => {
            retire_own(&region);
            return fail(link.as_ref(), e.to_string());
        }
    };
    // `/drain_listeners` asks the supervisor, which drains this generation as `baton drain` does.
    let drain_request = link
        .as_ref()
        .is_some_and(|l| l.features & FEATURE_DRAIN_REQUEST != 0)
        .then(|| Rc::new(tokio::sync::Notify::new()));
    let admin_task = match admin_socket
        .map(tokio::net::TcpListener::from_std)
        .transpose()
    {
        Ok(listener) => listener.map(|listener| {
            let admin = Rc::new(admin::Admin {
                config: config.clone(),
                info: generation.info.clone(),
                region: region.clone(),
                clusters: clusters.clone(),
                drain: drain_request.clone(),
                #[cfg(debug_assertions)]
                wedgers: generation.wedgers(),
            });
            tokio::task::spawn_local(admin::serve(admin, listener))
        }),
        Err(e) => {
            generation.stop();
            retire_own(&region);
            return fail(
                link.as_ref(),
                format!("admin: cannot register the socket: {e}"),
            );
        }
    };
    if let Some(link) = &link
        && let Err(e) = link.send(&ToSupervisor::Ready { sockets: keys })
    {
        generation.stop();
        return fail(None, e);
    }

    let listeners: Vec<String> = config
        .listeners
        .iter()
        .map(|l| format!("{}={}", l.name, l.describe()))
        .collect();
    info!(
        epoch,
        pid = std::process::id(),
        workers = concurrency,
        listeners = %listeners.join(","),
        admin = %config.admin.as_ref().map_or("off".to_owned(), |a| a.address.to_string()),
        stats = %region.path().display(),
        supervised,
        build = admin::BUILD_ID,
        "ready"
    );

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut guard_dog = tokio::time::interval(generation.guard_dog_every());
    guard_dog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(LOAD_INTERVAL);
    let mut drain: Option<Pin<Box<dyn Future<Output = DrainOutcome> + '_>>> = None;
    let mut supervisor_gone = !supervised;
    // The drain's accept loops have ended: told to the supervisor from the loop (the drain
    // future does not hold the link, which an adoption replaces).
    let stopped = Rc::new(tokio::sync::Notify::new());
    let mut stop_reported = false;
    let stop_signal = || {
        let stopped = stopped.clone();
        move || stopped.notify_one()
    };
    // Where a new supervisor adopts this generation if its own dies (the active generation
    // only), and whether it is waiting for one.
    let mut rendezvous: Option<AsyncFd<OwnedFd>> = None;
    let mut orphaned = false;
    let mut region_lost = false;
    let End::Done = loop {
        tokio::select! {
            _ = tick.tick() => {
                generation.tick();
                if !region_lost && region.lost() {
                    region_lost = true;
                    error!(epoch, path = %region.path().display(), "the stats region was cut short by another process: this generation serves on, but its stats are no longer recorded there");
                }
            }
            _ = guard_dog.tick() => generation.guard_dog(),
            _ = async { drain_request.as_ref().expect("guarded by is_some").notified().await },
                if drain_request.is_some() && drain.is_none() && !supervisor_gone => {
                if let Some(link) = &link
                    && let Err(e) = link.send(&ToSupervisor::DrainRequested)
                {
                    warn!(epoch, "cannot ask the supervisor for a drain: {e}");
                }
            }
            _ = report.tick(), if !supervisor_gone => {
                if let Some(link) = &link {
                    let _ = link.send(&ToSupervisor::Load(generation.load()));
                }
            }
            _ = stopped.notified(), if !stop_reported => {
                stop_reported = true;
                stopped_accepting(&link, &admin_task);
            }
            outcome = async { drain.as_mut().expect("guarded by is_some").await }, if drain.is_some() => {
                if !stop_reported {
                    stopped_accepting(&link, &admin_task);
                }
                if outcome.connections_left > 0 {
                    warn!(connections = outcome.connections_left, took = ?outcome.took, "drain timeout reached; closing the connections left");
                } else {
                    info!(took = ?outcome.took, "drained");
                }
                if let Some(link) = &link {
                    let _ = link.send(&ToSupervisor::Exiting { connections_left: outcome.connections_left as u64 });
                }
                break End::Done;
            }
            message = recv(&link), if !supervisor_gone => match message {
                Ok((ToGeneration::Drain { timeout_ms, strategy }, _)) => {
                    // A draining generation is never adopted: its copies of the listen sockets
                    // go (a socket the next generation no longer uses must close).
                    rendezvous = None;
                    held.clear();
                    let timeout = Duration::from_millis(timeout_ms);
                    if drain.is_some() {
                        info!(epoch, timeout = ?timeout, "asked to hurry the drain");
                        generation.hurry(timeout);
                    } else {
                        drain = Some(Box::pin(generation.drain(timeout, strategy, stop_signal())));
                    }
                }
                Ok((ToGeneration::Rendezvous, mut fds)) => {
                    if drain.is_none() && let Some(fd) = fds.pop() {
                        match watch(fd) {
                            Ok(fd) => rendezvous = Some(fd),
                            Err(e) => warn!(epoch, "cannot watch the rendezvous: {e}"),
                        }
                    }
                }
                Ok((ToGeneration::Stop, _)) => {
                    info!(epoch, connections = generation.open_connections(), "stopped by the supervisor");
                    break End::Done;
                }
                Ok((ToGeneration::ReopenLogs, _)) => generation.reopen_logs(),
                Ok((other, _)) => warn!(epoch, "unexpected message from the supervisor: {other:?}"),
                Err(ChannelError::Closed) if drain.is_none() && rendezvous.is_some() && !held.is_empty() => {
                    // The supervisor is gone (it crashed or was killed). The active generation
                    // serves on with its sockets, as nginx's workers do without their master,
                    // until the next `baton run` adopts it at the rendezvous.
                    error!(epoch, "the supervisor is gone; serving on, and waiting for the next `baton run` to adopt this generation");
                    supervisor_gone = true;
                    orphaned = true;
                }
                Err(ChannelError::Closed) => {
                    // The supervisor is gone and this generation is not the active one (or
                    // cannot be adopted): nobody will tell it when to stop, so it drains and
                    // leaves nothing behind.
                    error!(epoch, "the supervisor is gone; draining and exiting");
                    supervisor_gone = true;
                    rendezvous = None;
                    held.clear();
                    if drain.is_none() {
                        drain = Some(Box::pin(generation.drain(config.drain.timeout, DrainStrategy::Immediate, stop_signal())));
                    }
                }
                Err(e) => warn!(epoch, "bad message from the supervisor: {e}"),
            },
            accepted = accept(&rendezvous), if orphaned => match accepted {
                Ok(channel) => {
                    let adopted = match tokio::time::timeout(ADOPTION_TIMEOUT, Link::adopting(channel, epoch, &held, config_fd.as_ref())).await {
                        Ok(Ok(adopting)) => {
                            // Closed before the end, so that the supervisor, looking for more
                            // generations to adopt, is refused there at once; the new
                            // supervisor sends a rendezvous of its own.
                            rendezvous = None;
                            adopting.adopted(&held).map(|()| adopting)
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(format!("it did not finish within {ADOPTION_TIMEOUT:?}")),
                    };
                    match adopted {
                        Ok(adopted) => {
                            info!(epoch, "adopted by a new supervisor: it manages this generation from now on");
                            link = Some(adopted);
                            supervisor_gone = false;
                            orphaned = false;
                        }
                        Err(e) => {
                            // The supervisor that came starts a generation of its own: this one
                            // gets out of its way (its listen sockets close at once) and drains.
                            error!(epoch, "a supervisor could not adopt this generation: {e}; draining and exiting");
                            orphaned = false;
                            rendezvous = None;
                            held.clear();
                            if drain.is_none() {
                                drain = Some(Box::pin(generation.drain(config.drain.timeout, DrainStrategy::Immediate, stop_signal())));
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(epoch, "the rendezvous failed: {e}; this generation serves on but cannot be adopted");
                    rendezvous = None;
                    orphaned = false;
                }
            },
            _ = term.recv() => {
                if drain.is_some() {
                    info!(connections = generation.open_connections(), "SIGTERM: already draining (SIGINT stops now)");
                } else {
                    info!("SIGTERM: stop accepting and drain");
                    rendezvous = None;
                    held.clear();
                    orphaned = false;
                    drain = Some(Box::pin(generation.drain(config.drain.timeout, DrainStrategy::Immediate, stop_signal())));
                }
            }
            _ = int.recv() => {
                info!(connections = generation.open_connections(), "SIGINT: stopping now");
                break End::Done;
            }
            _ = usr1.recv() => {
                info!("SIGUSR1: reopening access logs");
                generation.reopen_logs();
            }
            _ = hup.recv() => {
                if supervised {
                    info!("SIGHUP ignored: send it to the supervisor (`baton reload`) to reload");
                } else {
                    warn!("SIGHUP ignored: a running baton-proxy does not reload itself; run it under the supervisor (`baton run`) to reload");
                }
            }
        }
    };
    drop(drain);
    if let Some(task) = admin_task {
        task.abort();
    }
    generation.stop();
    clusters.stop();
    retire_own(&region);
    if supervised && supervisor_gone {
        // No supervisor retires these stats: fold them in now, so that no count is lost.
        if let Err(e) = region.retire_pid(std::process::id()) {
            warn!("cannot retire this process's stats: {e}");
        }
    }
    info!(epoch, "exited");
    ExitCode::SUCCESS
}

/// A draining generation under a supervisor stops answering on the admin socket too (the new
/// generation answers there), and tells the supervisor that it no longer accepts. Run alone, the
/// admin keeps answering, so that `/ready` shows DRAINING.
fn stopped_accepting(link: &Option<Link>, admin: &Option<tokio::task::JoinHandle<()>>) {
    if let Some(link) = link {
        if let Some(admin) = admin {
            admin.abort();
        }
        let _ = link.send(&ToSupervisor::Draining);
    }
}

/// The next message from the supervisor, and the fds beside it; never resolves without one.
async fn recv(link: &Option<Link>) -> Result<(ToGeneration, Vec<OwnedFd>), ChannelError> {
    match link {
        Some(link) => link.recv().await.map(|r| (r.msg, r.fds)),
        None => std::future::pending().await,
    }
}

/// The rendezvous, registered with the event loop.
#[allow(unsafe_code)] // Registering an fd with the reactor is unsafe in tokio's API.
fn watch(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open for its whole life and always returns the
    // same number; the AsyncFd owns it, so it is deregistered before it closes.
    unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// How long a supervisor may take to adopt this generation once it connected.
const ADOPTION_TIMEOUT: Duration = Duration::from_secs(5);

/// The next supervisor to connect at the rendezvous; never resolves without one.
async fn accept(rendezvous: &Option<AsyncFd<OwnedFd>>) -> std::io::Result<Channel> {
    let Some(rendezvous) = rendezvous else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = rendezvous.readable().await?;
        match guard.try_io(
            |fd| match restart_protocol::rendezvous::accept(fd.get_ref()) {
                Ok(Some(channel)) => Ok(channel),
                Ok(None) => Err(std::io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e),
            },
        ) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

/// Run alone: the stats region and every socket are made here.
#[allow(clippy::type_complexity)]
fn standalone_setup(
    config: &Config,
) -> Result<
    (
        Arc<Region>,
        Vec<std::net::TcpListener>,
        Option<std::net::TcpListener>,
    ),
    String,
> {
    // Bind the admin socket first, so that a taken admin port fails before anything else.
    let admin = match &config.admin {
        Some(admin) => Some(listen::bind_tcp(admin.address, 128).map_err(|e| {
            format!(
                "admin: cannot listen on {}: {e}; {}",
                admin.address,
                listen::bind_advice(&e)
            )
        })?),
        None => None,
    };
    let (region, replaced) =
        Region::create_or_replace_older(&config.stats.path, config.stats.capacities)
            .map_err(|e| e.to_string())?;
    if let Some(version) = replaced {
        warn!(
            path = %region.path().display(),
            "the stats region had layout version {version}, made by an earlier baton, which this one cannot write: replaced by a new region (layout version {}), whose counters start from zero",
            shm_stats::LAYOUT_VERSION
        );
    }
    // Rows of a proxy that died without retiring them: fold their counts in, so that counters
    // carry on from where it stopped.
    match region.reclaim_dead() {
        Ok(0) => {}
        Ok(n) => {
            info!(shards = n, path = %region.path().display(), "retired the stats of processes that are gone")
        }
        Err(e) => warn!("{e}"),
    }
    // Another live proxy writing this region would mix its counts with ours.
    let others: std::collections::BTreeSet<u32> = region
        .snapshot()
        .map_err(|e| e.to_string())?
        .shards
        .iter()
        .map(|s| s.pid)
        .filter(|pid| *pid != std::process::id())
        .collect();
    if !others.is_empty() {
        let pids: Vec<String> = others.iter().map(u32::to_string).collect();
        return Err(format!(
            "stats region {} is in use by another running baton (pid {}); give this one another `instance` or `stats.path`",
            region.path().display(),
            pids.join(", ")
        ));
    }
    if let Some(mismatch) = region.capacity_mismatch(config.stats.capacities) {
        warn!("{mismatch}");
    }
    let sockets = running::bind_listeners(config).map_err(|e| e.to_string())?;
    Ok((region, sockets, admin))
}
