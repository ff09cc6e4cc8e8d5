//! HTTP listeners: one downstream connection from accept to close.
//!
//! The protocol is HTTP/2 when TLS negotiated `h2` or a cleartext client opens with the HTTP/2
//! preface (prior knowledge), HTTP/1.1 otherwise. A connection is closed by the proxy only when
//! it is idle: past the listener's idle timeout, or, during a drain, past the drain's idle grace.
//! HTTP/2 connections get a graceful two-step GOAWAY when the drain begins.

mod body;
mod headers;
mod io;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use self::io::{Activity, ByteStats, ConnIo};
use self::service::ConnCtx;
use crate::config::ListenerKind;
use crate::worker::ConnectionGuard;

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted connection of an HTTP listener until it closes.
pub async fn serve(guard: ConnectionGuard, stream: TcpStream, peer: SocketAddr) {
    let worker = guard.worker.clone();
    let listener = guard.listener;
    let ListenerKind::Http(config) = &worker.config.listeners[listener].kind else {
        return;
    };
    let idle_timeout = config.idle_timeout;
    let activity = Rc::new(Activity::new());
    let ctx = |tls, h2| {
        Rc::new(ConnCtx {
            worker: worker.clone(),
            listener,
            peer,
            tls,
            h2,
            activity: activity.clone(),
        })
    };

    let ids = &worker.stats.ids.listeners[listener];
    let bytes = ByteStats {
        worker: worker.clone(),
        rx: ids.downstream_cx_rx_bytes_total,
        tx: ids.downstream_cx_tx_bytes_total,
    };
    match worker.tls[listener].clone() {
        Some(acceptor) => {
            // Under TLS, so that activity and byte counts see the bytes on the wire.
            let io = ConnIo::new(stream, Bytes::new(), activity.clone(), bytes);
            // Boxed, as the connections below: a task is as large as its largest state, and
            // every idle connection would otherwise pay for the TLS handshake's and HTTP/2's.
            let handshake = tokio::time::timeout(
                TLS_HANDSHAKE_TIMEOUT.min(idle_timeout),
                Box::pin(acceptor.accept(io)),
            );
            let handshake = tokio::select! {
                result = handshake => result,
                _ = drained_while_silent(&worker) => return,
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(worker = worker.id, %peer, "TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(worker = worker.id, %peer, "TLS handshake timed out");
                    return;
                }
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Box::pin(run(ctx(true, h2), tls, idle_timeout)).await;
        }
        None => {
            let mut stream = stream;
            let sniffed = tokio::select! {
                result = tokio::time::timeout(idle_timeout, sniff(&mut stream)) => result,
                _ = drained_while_silent(&worker) => return,
            };
            let Ok(Some((prefix, h2))) = sniffed else {
                return;
            };
            // The sniffed bytes are replayed by ConnIo, which does not count them again.
            worker.stats.shard.add(bytes.rx, prefix.len() as u64);
            let io = ConnIo::new(stream, prefix, activity.clone(), bytes);
            Box::pin(run(ctx(false, h2), io, idle_timeout)).await;
        }
    }
    drop(guard);
}

/// Resolves once a drain has begun and the idle grace has passed: a connection that has not
/// sent a request by then is closed like an idle keep-alive connection.
async fn drained_while_silent(worker: &crate::worker::Worker) {
    while !worker.drain.is_draining() {
        worker.drain.started().await;
    }
    tokio::time::sleep(worker.config.drain.idle_grace).await;
}

/// Reads the first bytes of a cleartext connection and tells whether they open HTTP/2. Returns
/// the bytes read, to be served again; `None` if the client closed without sending anything.
async fn sniff(stream: &mut TcpStream) -> Option<(Bytes, bool)> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return None,
            Ok(0) | Err(_) => return Some((buf.freeze(), false)),
            Ok(_) => {}
        }
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Some((buf.freeze(), false));
        }
        if n == H2_PREFACE.len() {
            return Some((buf.freeze(), true));
        }
    }
}

/// Runs hyper's HTTP/1.1 or HTTP/2 server on the connection.
async fn run<S>(ctx: Rc<ConnCtx>, io: S, idle_timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let h2 = ctx.h2;
    let activity = ctx.activity.clone();
    let worker = ctx.worker.clone();
    let service = service_fn(move |request| service::handle(ctx.clone(), request));
    let io = TokioIo::new(io);
    let drain_grace = worker.config.drain.idle_grace;
    if h2 {
        let connection = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        Box::pin(drive(
            connection,
            &worker,
            &activity,
            idle_timeout,
            drain_grace,
            true,
        ))
        .await;
    } else {
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            // The proxy closes idle connections itself (see `drive`); this only bounds how
            // long a client may take to send one request's headers.
            .header_read_timeout(idle_timeout)
            .serve_connection(io, service);
        Box::pin(drive(
            connection,
            &worker,
            &activity,
            idle_timeout,
            drain_grace,
            false,
        ))
        .await;
    }
}

/// Polls the connection to completion, closing it gracefully when it has been idle too long or
/// when a drain asks for it.
async fn drive<C>(
    connection: C,
    worker: &crate::worker::Worker,
    activity: &Activity,
    idle_timeout: Duration,
    drain_grace: Duration,
    h2: bool,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut connection = pin!(connection);
    let mut drain_seen = false;
    let mut closing = false;
    // HTTP/2: when to send the graceful GOAWAY once a drain began.
    let mut goaway_at: Option<Instant> = None;
    let mut check = pin!(tokio::time::sleep(idle_timeout));
    loop {
        if worker.drain.is_draining() && !closing {
            let now = Instant::now();
            if h2 {
                // A later drain (a hurry) can only bring the GOAWAY forward.
                let at = now + worker.drain.goaway_delay();
                let at = goaway_at.map_or(at, |earlier| earlier.min(at));
                goaway_at = Some(at);
                let current = check.deadline();
                check.as_mut().reset(at.min(current));
            } else if !drain_seen {
                check.as_mut().reset(now);
            }
            drain_seen = true;
        }
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    debug!(worker = worker.id, "connection ended: {e}");
                }
                return;
            }
            // Wakes at every drain command, the first and any hurry after it.
            _ = worker.drain.started(), if !closing => {}
            _ = check.as_mut(), if !closing => {
                let now = Instant::now();
                if goaway_at.is_some_and(|at| now >= at) {
                    // GOAWAY with the highest stream id, a PING, then the real last stream id:
                    // no request in flight is refused.
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    continue;
                }
                let limit = if drain_seen { drain_grace } else { idle_timeout };
                let idle_since = Instant::from_std(activity.idle_since());
                if activity.in_flight() == 0 && now.saturating_duration_since(idle_since) >= limit {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                } else {
                    let next = if activity.in_flight() == 0 {
                        (idle_since + limit).max(now + Duration::from_millis(10))
                    } else {
                        now + limit
                    };
                    check.as_mut().reset(goaway_at.map_or(next, |at| at.min(next)));
                }
            }
        }
    }
}

/// Runs HTTP/2 stream tasks on the worker's own thread.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}
