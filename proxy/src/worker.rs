//! Worker threads. Each runs its own single-threaded event loop (a tokio current-thread runtime
//! with a `LocalSet`), accepts on its own copy of every listen socket, and keeps every connection
//! it accepted until that connection ends: per-worker state needs no lock.

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use restart_protocol::DrainStrategy;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::LocalSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, warn};

use crate::cluster::ClusterHandle;
use crate::config::{Config, ListenerKind, Overflow};
use crate::downstream::conn::ConnectionGuard;
use crate::downstream::{http, tcp};
use crate::runtime::access_log::LogTarget;
use crate::runtime::context::WorkerContext;
use crate::runtime::drain::{Connections, DrainState};
use crate::runtime::limits::{ConnectionLimits, Full};
use crate::stats::ThreadStats;
use crate::upstream::state::Upstreams;

/// What the main thread asks of a worker.
pub enum Command {
    /// Stop accepting and drain over `timeout`; `done` fires once the worker's last connection
    /// has closed. A second drain (to hurry a draining worker) changes strategy and timeout.
    Drain {
        timeout: Duration,
        strategy: DrainStrategy,
        /// Fires once the worker no longer accepts (its accept loops have ended).
        stopped_accepting: oneshot::Sender<()>,
        done: oneshot::Sender<()>,
    },
    /// Close every connection now and end the thread.
    Stop,
    /// Debug builds: block the worker's thread for this long, as a bug would (to test the
    /// guard dog).
    #[cfg(debug_assertions)]
    Wedge(Duration),
}

/// The main thread's handle on a worker thread.
pub struct WorkerHandle {
    pub id: usize,
    /// Connections the worker has open; only the worker writes it.
    pub open: Arc<AtomicUsize>,
    /// Requests the worker is answering; only the worker writes it.
    pub requests: Arc<AtomicUsize>,
    /// When the worker's event loop last ran its heartbeat, in milliseconds since the
    /// generation's clock started.
    pub heartbeat: Arc<AtomicU64>,
    commands: mpsc::UnboundedSender<Command>,
    thread: JoinHandle<()>,
}

/// Everything a worker thread needs, handed over when it is spawned.
pub struct WorkerSetup {
    pub id: usize,
    pub config: Arc<Config>,
    /// One per listener of the config, in order: this worker's copy of the listen socket.
    pub listeners: Vec<std::net::TcpListener>,
    /// One per listener of the config.
    pub access_logs: Vec<Option<LogTarget>>,
    /// This worker's shard of the stats region.
    pub stats: ThreadStats,
    /// Where the worker counts its open connections for the main thread.
    pub open: Arc<AtomicUsize>,
    /// Where the worker counts the requests it is answering.
    pub requests: Arc<AtomicUsize>,
    /// The value of `x-baton-epoch`, when the config asks for it.
    pub epoch_header: Option<::http::HeaderValue>,
    /// The generation's connection limits, shared by its workers.
    pub limits: Arc<ConnectionLimits>,
    /// Where the worker's event loop beats, for the guard dog.
    pub heartbeat: Arc<AtomicU64>,
    /// The generation's clock: heartbeats are milliseconds since it.
    pub clock: Instant,
    /// How often the event loop beats.
    pub beat_every: Duration,
    /// One per cluster of the config, published by the main thread's cluster manager.
    pub clusters: Vec<Arc<ClusterHandle>>,
}

impl WorkerHandle {
    pub fn spawn(setup: WorkerSetup) -> io::Result<WorkerHandle> {
        let id = setup.id;
        let open = setup.open.clone();
        let requests = setup.requests.clone();
        let heartbeat = setup.heartbeat.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (commands, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name(format!("worker-{id}"))
            .spawn(move || {
                let local = LocalSet::new();
                local.block_on(&runtime, run(setup, rx));
                // Dropping the LocalSet here drops every connection task, closing its sockets.
            })?;
        Ok(WorkerHandle {
            id,
            open,
            requests,
            heartbeat,
            commands,
            thread,
        })
    }

    /// Whether the worker's thread still runs (a drained worker ends it).
    pub fn running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Debug builds: a handle that can wedge this worker.
    #[cfg(debug_assertions)]
    pub fn wedger(&self) -> mpsc::UnboundedSender<Command> {
        self.commands.clone()
    }

    /// Asks the worker to drain; the first receiver fires when it no longer accepts, the
    /// second when its last connection has closed.
    pub fn drain(
        &self,
        timeout: Duration,
        strategy: DrainStrategy,
    ) -> (oneshot::Receiver<()>, oneshot::Receiver<()>) {
        let (stopped_accepting, stopped) = oneshot::channel();
        let (done, rx) = oneshot::channel();
        // A worker that already ended neither accepts nor holds connections: its dropped
        // senders fire both receivers at once.
        let _ = self.commands.send(Command::Drain {
            timeout,
            strategy,
            stopped_accepting,
            done,
        });
        (stopped, rx)
    }

    /// Ends the worker, closing whatever it still holds, and waits for its thread.
    pub fn stop(self) {
        let _ = self.commands.send(Command::Stop);
        if self.thread.join().is_err() {
            error!(worker = self.id, "worker thread panicked");
        }
    }
}

/// A worker's state: its context, shared with every task on its thread, and its upstreams,
/// lent to each connection it accepts.
struct Worker {
    ctx: Rc<WorkerContext>,
    upstreams: Rc<Upstreams>,
}

/// Connections past a limit that a worker answers 503 at once; past this, it closes them
/// without an answer, so that refusing cannot itself exhaust the worker.
const MAX_REFUSING: usize = 64;

async fn run(setup: WorkerSetup, mut commands: mpsc::UnboundedReceiver<Command>) {
    let config = setup.config;
    let upstreams = Rc::new(Upstreams::new(&config, setup.id, setup.clusters));
    let ctx = Rc::new(WorkerContext {
        id: setup.id,
        tls: config
            .listeners
            .iter()
            .map(|l| match &l.kind {
                ListenerKind::Http(h) => h.tls.clone().map(TlsAcceptor::from),
                ListenerKind::Tcp { .. } => None,
            })
            .collect(),
        access_logs: setup.access_logs,
        stats: setup.stats,
        config: config.clone(),
        drain: DrainState::default(),
        connections: Connections::new(setup.open),
        requests: setup.requests,
        epoch_header: setup.epoch_header,
        limits: setup.limits,
        refusing: Cell::new(0),
        stopping: Cell::new(false),
    });
    let worker = Rc::new(Worker { ctx, upstreams });
    let mut accepting = Vec::new();
    for (index, listener) in setup.listeners.into_iter().enumerate() {
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                accepting.push(tokio::task::spawn_local(accept_loop(
                    worker.clone(),
                    index,
                    listener,
                )));
            }
            Err(e) => {
                error!(worker = worker.ctx.id, listener = %config.listeners[index].name, "cannot register listen socket: {e}")
            }
        }
    }
    tokio::task::spawn_local(sweep_pools(worker.clone()));
    tokio::task::spawn_local(return_memory());
    tokio::task::spawn_local(beat(setup.heartbeat, setup.clock, setup.beat_every));

    while let Some(command) = commands.recv().await {
        match command {
            Command::Drain {
                timeout,
                strategy,
                stopped_accepting,
                done,
            } => {
                worker.ctx.drain.begin(timeout, strategy);
                // The accept loops see the drain at once, take what waits in the queue, and end.
                for accept in accepting.drain(..) {
                    let _ = accept.await;
                }
                let _ = stopped_accepting.send(());
                let w = worker.ctx.clone();
                tokio::task::spawn_local(async move {
                    w.connections.all_closed().await;
                    let _ = done.send(());
                });
            }
            Command::Stop => break,
            #[cfg(debug_assertions)]
            Command::Wedge(time) => {
                warn!(
                    worker = worker.ctx.id,
                    ?time,
                    "wedging this worker, as asked (debug build)"
                );
                #[allow(clippy::disallowed_methods)] // Blocking the loop is the point here.
                std::thread::sleep(time);
            }
        }
    }
    // What is still open is closed as the LocalSet drops its tasks; say why in their logs.
    worker.ctx.stopping.set(true);
}

async fn accept_loop(worker: Rc<Worker>, index: usize, listener: TcpListener) {
    let ctx = &worker.ctx;
    let http = matches!(ctx.config.listeners[index].kind, ListenerKind::Http(_));
    let wait_for_room =
        ctx.limits.limited(index) && ctx.config.listeners[index].overflow == Overflow::Wait;
    loop {
        if ctx.drain.is_draining() {
            // The socket may close with this accept loop (run alone; or on a stop, when the
            // supervisor has let its copy go): clients already in the accept queue finished
            // their handshake and may have sent a request, so take them (they are answered
            // with `Connection: close`) rather than let the close reset them. On a reload the
            // few taken here would have been the next generation's; this one serves them.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            while let std::task::Poll::Ready(Ok((stream, peer))) = listener.poll_accept(&mut cx) {
                admit(&worker, index, http, stream, peer);
            }
            return;
        }
        if wait_for_room {
            // At the limit, clients wait in the accept queue until a connection closes.
            tokio::select! {
                biased;
                _ = ctx.drain.started() => continue,
                _ = ctx.limits.room(index) => {}
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = ctx.drain.started() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => admit(&worker, index, http, stream, peer),
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of file descriptors or memory: accepting again at once would spin. Back off
                // so that closing connections can free some; the accept queue keeps the clients.
                warn!(worker = ctx.id, "accept failed: {e}; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => debug!(worker = ctx.id, "accept failed: {e}"),
        }
    }
}

/// Serves an accepted connection if the connection limits leave it a place; otherwise closes
/// it (an HTTP/1.1 client is first answered 503) or, with `max_connections_action = "wait"`,
/// holds it unserved until a place frees: it was accepted by an accept loop that was already
/// waiting in `accept` when another worker took the last place.
fn admit(worker: &Worker, index: usize, http: bool, stream: TcpStream, peer: SocketAddr) {
    let ctx = &worker.ctx;
    let limited = ctx.limits.limited(index);
    if limited && let Err(full) = ctx.limits.try_take(index) {
        let listener = &ctx.config.listeners[index];
        if listener.overflow == Overflow::Wait {
            // Counted as open, so that a drain waits for it; it holds no place yet.
            let mut guard =
                ConnectionGuard::new(ctx.clone(), worker.upstreams.clone(), index, false);
            tokio::task::spawn_local(async move {
                let ctx = guard.worker.clone();
                loop {
                    if ctx.drain.is_draining() {
                        // A draining generation serves what it accepted, past the limit.
                        ctx.limits.force_take(index);
                        break;
                    }
                    tokio::select! {
                        _ = ctx.drain.started() => continue,
                        _ = ctx.limits.room(index) => {}
                    }
                    if ctx.limits.try_take(index).is_ok() {
                        break;
                    }
                }
                guard.limited = true;
                let _ = stream.set_nodelay(true);
                if http {
                    http::serve(guard, stream, peer).await;
                } else {
                    tcp::serve(guard, stream, peer).await;
                }
            });
            return;
        } else {
            let ids = &ctx.stats.ids.listeners[index];
            let counter = match full {
                Full::Listener => ids.downstream_cx_overflow,
                Full::Total => ids.downstream_global_cx_overflow,
            };
            ctx.stats.shard.inc(counter);
            debug!(worker = ctx.id, listener = %listener.name, %peer, "connection limit reached ({full:?}); closing");
            if http && ctx.tls[index].is_none() && ctx.refusing.get() < MAX_REFUSING {
                ctx.refusing.set(ctx.refusing.get() + 1);
                let ctx = ctx.clone();
                tokio::task::spawn_local(async move {
                    http::refuse(&ctx, stream).await;
                    ctx.refusing.set(ctx.refusing.get() - 1);
                });
            }
            return;
        }
    }
    let _ = stream.set_nodelay(true);
    let guard = ConnectionGuard::new(ctx.clone(), worker.upstreams.clone(), index, limited);
    // Spawned as they are, so that a connection's task is no larger than its protocol needs.
    if http {
        tokio::task::spawn_local(http::serve(guard, stream, peer));
    } else {
        tokio::task::spawn_local(tcp::serve(guard, stream, peer));
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Gives the memory this worker freed back to the system, every second, busy or not: mimalloc
/// returns freed pages only now and then as its thread allocates, and not all of them (9,000
/// connections gone idle at once kept 147 MiB resident through three more seconds of load;
/// with this, 39 MiB). A worker whose connections all went idle may not allocate for hours.
async fn return_memory() {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        // About 20 µs under load; up to half a millisecond when many pages go back at once.
        collect_freed_memory();
    }
}

/// Frees mimalloc's empty pages of this thread and returns expired ones to the system.
#[allow(unsafe_code)]
fn collect_freed_memory() {
    // SAFETY: `mi_collect` takes no pointer and has no precondition. It works on the calling
    // thread's mimalloc heap (baton-proxy's global allocator, see main.rs; where mimalloc is
    // not the allocator, that heap is empty) and on the process's shared arenas, which
    // mimalloc synchronises itself: any thread may call it at any time.
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// Tells the guard dog that the event loop runs: a task that can only run when the loop gets
/// around to it, so a loop stalled by a blocking call or an endless poll stops beating.
async fn beat(heartbeat: Arc<AtomicU64>, clock: Instant, every: Duration) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        heartbeat.store(now, Ordering::Relaxed);
    }
}

async fn sweep_pools(worker: Rc<Worker>) {
    let Some(period) = worker
        .ctx
        .config
        .clusters
        .iter()
        .map(|c| c.idle_timeout / 2)
        .min()
    else {
        return;
    };
    // At least every second: a connection the upstream closed while it idled holds its place
    // under `max_connections` until it is swept.
    let period = period.min(Duration::from_secs(1));
    let mut interval = tokio::time::interval(period.max(Duration::from_millis(100)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        worker.upstreams.sweep(&worker.ctx.config);
    }
}
