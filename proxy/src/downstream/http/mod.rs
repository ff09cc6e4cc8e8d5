//! HTTP listeners: one downstream connection from accept to close.
//!
//! The protocol is HTTP/2 when TLS negotiated `h2` or a cleartext client opens with the HTTP/2
//! preface (prior knowledge), HTTP/1.1 otherwise. A connection is closed by the proxy only when
//! it is idle: past the listener's idle timeout, or, during a drain, past the drain's idle grace.
//! HTTP/2 connections get a graceful two-step GOAWAY when the drain begins.
//!
//! Limits: an HTTP/1.1 client that takes longer than `request_header_timeout` to send a
//! request's line and headers is answered 408 and cut off (slowloris); hyper answers 431 to
//! headers over `max_request_header_size` or `max_request_headers`.

mod authority;
mod body;
mod ctx;
mod headers;
mod idle;
mod io;
mod local;
mod mirror;
mod path;
mod proxy;
mod retry;
mod service;
mod tunnel;
mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, SERVER};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use self::ctx::ConnCtx;
use self::idle::{DriveSettings, Ended, Hibernate, drive, hibernate};
use self::io::{Activity, ByteStats, ConnIo};
use crate::config::{ListenerKind, RequestLimits};
use crate::downstream::conn::ConnectionGuard;
use crate::runtime::LocalExec;
use crate::runtime::context::WorkerContext;

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The answer to a client that took too long to send its request's headers. Written as bytes
/// because hyper has given the connection up by then (it has no request to answer).
const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nserver: baton\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 59\r\nconnection: close\r\n\r\nrequest timeout: the request headers took too long to come\n";
/// How long a connection refused for a connection limit may take to send its request before it
/// is closed without the 503.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A lingering close (after a 413) reads what the client still sends for at most this long,
/// and gives up after a pause of [`LINGER_PAUSE`] (nginx's `lingering_time`/`_timeout` idea).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_PAUSE: Duration = Duration::from_secs(1);

/// Serves one accepted connection of an HTTP listener until it closes.
///
/// This future is the connection's task, and a task is as large as its largest state for as
/// long as it lives: so it holds little itself. The work is done in boxed futures that are
/// dropped whenever the connection idles ([`Sleeping`]): an idle HTTP/1.1 connection then
/// holds its socket, its context and this small future: about 3 KB in all.
pub async fn serve(guard: ConnectionGuard, stream: TcpStream, peer: SocketAddr) {
    let mut sleeping = Box::pin(start(&guard, stream, peer)).await;
    while let Some(idle) = sleeping.take() {
        if idle.io.has_prefix() {
            // Part of a next request came with the last one and hyper held it: it goes back
            // to hyper at once, and its headers are due as any request's (a client must not
            // keep a connection for the idle timeout with half a request).
            idle.ctx.activity.next_request_begun();
        } else if !hibernate(
            &idle.io,
            &guard.worker,
            guard.listener,
            &idle.ctx.activity,
            idle.idle_timeout,
        )
        .await
        {
            let mut io = idle.io;
            let _ = tokio::time::timeout(Duration::from_secs(1), Box::pin(io.shutdown())).await;
            break;
        }
        let Sleeping {
            ctx,
            io,
            idle_timeout,
            limits,
        } = idle;
        sleeping = Box::pin(run(ctx, io, idle_timeout, limits)).await;
    }
    drop(guard);
}

/// An idle cleartext HTTP/1.1 connection between two requests: hyper's connection and its
/// buffers are gone; the socket waits for the client's next bytes.
struct Sleeping {
    ctx: Rc<ConnCtx>,
    io: ConnIo<TcpStream>,
    idle_timeout: Duration,
    limits: RequestLimits,
}

/// The connection from accept to its first idle moment (or its end): TLS handshake or
/// protocol sniffing, then hyper's server.
async fn start(guard: &ConnectionGuard, stream: TcpStream, peer: SocketAddr) -> Option<Sleeping> {
    let worker = guard.worker.clone();
    let listener = guard.listener;
    let ListenerKind::Http(config) = &worker.config.listeners[listener].kind else {
        return None;
    };
    let idle_timeout = config.idle_timeout;
    let limits = config.limits;
    let tls_acceptor = worker.tls[listener].clone();
    // A cleartext connection is served once its first bytes came (see `sniff`).
    let activity = Rc::new(Activity::new(tls_acceptor.is_none()));
    let ctx = |tls, h2| {
        Rc::new(ConnCtx {
            worker: worker.clone(),
            upstreams: guard.upstreams.clone(),
            listener,
            peer,
            peer_value: headers::peer_value(peer.ip()),
            tls,
            h2,
            activity: activity.clone(),
            handoff: tunnel::Handoff::default(),
        })
    };

    let ids = &worker.stats.ids.listeners[listener];
    let bytes = ByteStats {
        worker: worker.clone(),
        rx: ids.downstream_cx_rx_bytes_total,
        tx: ids.downstream_cx_tx_bytes_total,
    };
    match tls_acceptor {
        Some(acceptor) => {
            // Under TLS, so that activity and byte counts see the bytes on the wire.
            let io = ConnIo::new(stream, Bytes::new(), activity.clone(), bytes);
            // Boxed, as the connections below: a task is as large as its largest state, and
            // every idle connection would otherwise pay for the TLS handshake's and HTTP/2's.
            let handshake = tokio::time::timeout(
                TLS_HANDSHAKE_TIMEOUT
                    .min(limits.header_timeout)
                    .min(idle_timeout),
                Box::pin(acceptor.accept(io)),
            );
            let handshake = tokio::select! {
                result = handshake => result,
                _ = drained_while_silent(&worker) => return None,
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(worker = worker.id, %peer, "TLS handshake failed: {e}");
                    return None;
                }
                Err(_) => {
                    debug!(worker = worker.id, %peer, "TLS handshake timed out");
                    return None;
                }
            };
            activity.handshake_done();
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Box::pin(run(ctx(true, h2), tls, idle_timeout, limits)).await
        }
        None => {
            let mut stream = stream;
            // A client that sends nothing is closed, without an answer, when its request's
            // headers are due.
            let first_bytes = idle_timeout.min(limits.header_timeout);
            let sniffed = tokio::select! {
                result = tokio::time::timeout(first_bytes, sniff(&mut stream)) => result,
                _ = drained_while_silent(&worker) => return None,
            };
            let (prefix, h2) = match sniffed {
                Ok(Some(sniffed)) => sniffed,
                Ok(None) => return None,
                Err(_elapsed) => {
                    let ids = &worker.stats.ids.listeners[listener];
                    let counter = if limits.header_timeout <= idle_timeout {
                        ids.downstream_rq_header_timeout
                    } else {
                        ids.downstream_cx_idle_timeout
                    };
                    worker.stats.shard.inc(counter);
                    return None;
                }
            };
            // The sniffed bytes are replayed by ConnIo, which does not count them again.
            worker.stats.shard.add(bytes.rx, prefix.len() as u64);
            let io = ConnIo::new(stream, prefix, activity.clone(), bytes);
            Box::pin(run(ctx(false, h2), io, idle_timeout, limits)).await
        }
    }
}

/// Resolves once a drain has begun and the idle grace has passed: a connection that has not
/// sent a request by then is closed like an idle keep-alive connection.
async fn drained_while_silent(worker: &WorkerContext) {
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

/// Runs hyper's HTTP/1.1 or HTTP/2 server on the connection, until it closes or, HTTP/1.1 in
/// cleartext, until it idles: then the connection is given back to sleep.
async fn run<S>(
    ctx: Rc<ConnCtx>,
    io: S,
    idle_timeout: Duration,
    limits: RequestLimits,
) -> Option<Sleeping>
where
    S: AsyncRead + AsyncWrite + Hibernate + upgrade::Downstream + Unpin + 'static,
{
    let h2 = ctx.h2;
    let activity = ctx.activity.clone();
    let worker = ctx.worker.clone();
    let listener = ctx.listener;
    let kept = ctx.clone();
    let service = service_fn(move |request| service::handle(ctx.clone(), request));
    let io = TokioIo::new(io);
    let settings = DriveSettings {
        idle_timeout,
        drain_grace: worker.config.drain.idle_grace,
        // HTTP/2 clients send headers in one frame; their streams end with the connection's
        // idle timeout.
        header_timeout: (!h2).then_some(limits.header_timeout),
        h2,
        hibernate: !h2 && S::CAN,
    };
    if h2 {
        let connection = http2::Builder::new(LocalExec)
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
            .serve_connection(io, service);
        let mut connection = Box::pin(connection);
        drive(connection.as_mut(), &worker, listener, &activity, settings).await;
        None
    } else {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            // The proxy times out idle connections and slow request headers itself (see
            // `drive`): hyper's timer would count a keep-alive wait as header time.
            .header_read_timeout(None)
            .max_header_size(limits.max_header_size);
        if limits.max_headers != crate::config::DEFAULT_MAX_REQUEST_HEADERS {
            // hyper's default; setting any value moves the parsed headers to the heap.
            builder.max_headers(limits.max_headers);
        }
        let mut connection = Box::new(builder.serve_connection(io, service));
        let ended = drive(
            Pin::new(&mut *connection),
            &worker,
            listener,
            &activity,
            settings,
        )
        .await;
        if let Some(tunnel) = kept.handoff.take() {
            // hyper has sent the 101 and let the connection go: it is a tunnel now. Boxed: a
            // connection's task should not carry the tunnel's state when it never upgrades.
            let parts = connection.into_parts();
            Box::pin(upgrade::run(tunnel, parts.io.into_inner(), parts.read_buf)).await;
            return None;
        }
        if ended == Ended::Idle {
            // Idle, all answers flushed, no byte of a next request: hyper's buffers go, and
            // only the socket waits for the client (nginx does the same with a keep-alive
            // connection's buffers).
            let parts = connection.into_parts();
            let mut stream = parts.io.into_inner();
            stream.replay(parts.read_buf);
            return stream.into_sleeping().map(|io| Sleeping {
                ctx: kept,
                io,
                idle_timeout,
                limits,
            });
        }
        if ended == Ended::HeaderTimeout {
            let ids = &worker.stats.ids.listeners[listener];
            worker.stats.shard.inc(ids.downstream_rq_header_timeout);
            // Not to a client that does not read: hyper may still hold part of the last
            // answer, and the 408 would follow a cut-off response.
            if activity.head().1 && !activity.write_blocked() {
                worker.stats.shard.inc(ids.downstream_rq_class[3]);
                // Nothing is being written: hyper waits for a request head.
                let mut io = connection.into_parts().io.into_inner();
                let answer = async {
                    io.write_all(REQUEST_TIMEOUT_RESPONSE).await?;
                    io.shutdown().await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
            }
        } else if activity.linger.get() {
            // hyper has sent the answer and shut down its side; read what the client still
            // sends so that closing does not reset the connection under the answer.
            let mut io = connection.into_parts().io.into_inner();
            let linger = async {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(Ok(n)) = tokio::time::timeout(LINGER_PAUSE, io.read(&mut buf)).await
                    && n > 0
                {}
            };
            let _ = tokio::time::timeout(LINGER_TIME, linger).await;
        }
        None
    }
}

/// Answers 503 to the first request of a connection that found no place under the connection
/// limits, then closes it; a client that does not send a request soon is closed without one.
pub async fn refuse(worker: &WorkerContext, stream: TcpStream) {
    let service = service_fn(|_request| async {
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"connection limit reached: the proxy holds as many connections as it is allowed; try again later\n",
        )));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(SERVER, HeaderValue::from_static("baton"));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        Ok::<_, Infallible>(response)
    });
    let connection = http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    if let Ok(Err(e)) = tokio::time::timeout(REFUSE_TIMEOUT * 2, connection).await {
        debug!(worker = worker.id, "refused connection ended: {e}");
    }
}
