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
use std::future::Future;
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
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use self::ctx::ConnCtx;
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

/// The timeouts [`drive`] keeps.
#[derive(Clone, Copy)]
struct DriveSettings {
    idle_timeout: Duration,
    drain_grace: Duration,
    /// HTTP/1.1 only: how long a request's line and headers may take.
    header_timeout: Option<Duration>,
    h2: bool,
    /// Whether an idle connection ends [`drive`] with [`Ended::Idle`] to wait in [`hibernate`].
    hibernate: bool,
}

/// How long an HTTP/1.1 connection idles before hyper's connection state (two 8 KiB buffers)
/// is let go.
const HIBERNATE_AFTER: Duration = Duration::from_secs(1);

/// A client's stream that can wait for its next bytes without a reader's buffers: cleartext
/// TCP can, TLS cannot (rustls keeps its own buffers).
pub trait Hibernate {
    const CAN: bool;
    /// Resolves when the client sent something (or closed).
    fn readable(&self) -> impl Future<Output = ()>;
    /// Bytes read but not used, to be read again first.
    fn replay(&mut self, bytes: Bytes);
    /// The stream, as an idle connection keeps it.
    fn into_sleeping(self) -> Option<ConnIo<TcpStream>>;
}

impl Hibernate for ConnIo<TcpStream> {
    const CAN: bool = true;

    async fn readable(&self) {
        let _ = self.get_ref().readable().await;
    }

    fn replay(&mut self, bytes: Bytes) {
        // hyper's unread bytes are a view of its whole read buffer: kept as they are, even
        // empty, they would hold that buffer for as long as the connection sleeps.
        self.set_prefix(if bytes.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&bytes)
        });
    }

    fn into_sleeping(self) -> Option<ConnIo<TcpStream>> {
        Some(self)
    }
}

impl Hibernate for tokio_rustls::server::TlsStream<ConnIo<TcpStream>> {
    const CAN: bool = false;

    async fn readable(&self) {
        std::future::pending().await
    }

    fn replay(&mut self, _bytes: Bytes) {
        unreachable!("a TLS connection does not hibernate");
    }

    fn into_sleeping(self) -> Option<ConnIo<TcpStream>> {
        unreachable!("a TLS connection does not hibernate");
    }
}

/// Waits, holding only the socket, until the client of an idle HTTP/1.1 connection sends
/// again: `true`. `false` when the connection is to close: idle past its timeout, or a drain
/// began and the idle grace passed.
async fn hibernate<S: Hibernate>(
    stream: &S,
    worker: &WorkerContext,
    listener: usize,
    activity: &Activity,
    idle_timeout: Duration,
) -> bool {
    let idle_since = Instant::from_std(activity.idle_since());
    let drained = async {
        while !worker.drain.is_draining() {
            worker.drain.started().await;
        }
        tokio::time::sleep_until(idle_since + worker.config.drain.idle_grace).await;
    };
    tokio::select! {
        biased;
        () = stream.readable() => true,
        () = tokio::time::sleep_until(idle_since + idle_timeout) => {
            let ids = &worker.stats.ids.listeners[listener];
            worker.stats.shard.inc(ids.downstream_cx_idle_timeout);
            false
        }
        () = drained => false,
    }
}

/// How [`drive`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The connection closed (or failed); nothing is left to do.
    Closed,
    /// A client took longer than the header timeout to send a request's headers: the
    /// connection is left for the caller to answer 408 and close.
    HeaderTimeout,
    /// An HTTP/1.1 connection has idled for [`HIBERNATE_AFTER`] with nothing pending: the
    /// caller may take the socket back from hyper.
    Idle,
}

/// Polls the connection to completion, closing it gracefully when it has been idle too long or
/// when a drain asks for it.
async fn drive<C>(
    mut connection: Pin<&mut C>,
    worker: &WorkerContext,
    listener: usize,
    activity: &Activity,
    settings: DriveSettings,
) -> Ended
where
    C: GracefulConnection<Error = hyper::Error>,
{
    let DriveSettings {
        idle_timeout,
        drain_grace,
        header_timeout,
        h2,
        hibernate,
    } = settings;
    let ids = &worker.stats.ids.listeners[listener];
    let mut drain_seen = false;
    let mut closing = false;
    // HTTP/2: when to send the graceful GOAWAY once a drain began.
    let mut goaway_at: Option<Instant> = None;
    let mut first_check = header_timeout.map_or(idle_timeout, |h| h.min(idle_timeout));
    if hibernate {
        first_check = first_check.min(HIBERNATE_AFTER);
    }
    let mut check = std::pin::pin!(tokio::time::sleep(first_check));
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
                    if e.is_parse_too_large() {
                        // hyper answered 431.
                        worker.stats.shard.inc(ids.downstream_rq_headers_too_large);
                        worker.stats.shard.inc(ids.downstream_rq_class[3]);
                    } else if e.is_parse() {
                        // hyper answered 400 to bytes that are no request (a bad request
                        // line or header, a transfer coding that does not end in chunked):
                        // the client's error, counted with the other 4xx.
                        worker.stats.shard.inc(ids.downstream_rq_class[3]);
                    }
                    debug!(worker = worker.id, "connection ended: {e}");
                }
                return Ended::Closed;
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
                let idle = activity.in_flight() == 0;
                // The request whose headers are awaited, and when they are due. Without one,
                // look again within the header timeout: a request that begins meanwhile is
                // then still seen before its headers are due.
                let (head_due, head_check) = match (header_timeout, activity.head().0) {
                    (Some(timeout), Some(since)) if idle => {
                        let due = Instant::from_std(since) + timeout;
                        (Some(due), due)
                    }
                    (Some(timeout), _) => (None, now + timeout),
                    (None, _) => (None, now + idle_timeout),
                };
                if head_due.is_some_and(|due| now >= due) {
                    return Ended::HeaderTimeout;
                }
                let limit = if drain_seen { drain_grace } else { idle_timeout };
                let idle_since = Instant::from_std(activity.idle_since());
                if idle && now.saturating_duration_since(idle_since) >= limit {
                    if !drain_seen {
                        worker.stats.shard.inc(ids.downstream_cx_idle_timeout);
                    }
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                } else if hibernate
                    && idle
                    && !drain_seen
                    && activity.head() == (None, false)
                    // hyper may still hold the end of the last answer for a client that does
                    // not read: taking the socket back would cut that answer off.
                    && !activity.write_blocked()
                    && now.saturating_duration_since(idle_since) >= HIBERNATE_AFTER
                {
                    return Ended::Idle;
                } else {
                    let next = if idle {
                        // Only a connection that could sleep wakes for it: one awaiting the
                        // rest of a request's headers is looked at again when they are due.
                        let could_sleep =
                            hibernate && !drain_seen && activity.head() == (None, false);
                        let wake = if could_sleep && !activity.write_blocked() {
                            (idle_since + HIBERNATE_AFTER).min(idle_since + limit)
                        } else if could_sleep {
                            // Its last answer is still going out: look again in a while.
                            (now + HIBERNATE_AFTER).min(idle_since + limit)
                        } else {
                            idle_since + limit
                        };
                        wake.min(head_check).max(now + Duration::from_millis(10))
                    } else if hibernate {
                        // Busy now: look again soon enough to let the state go once it idles.
                        (now + limit).min(head_check).min(now + HIBERNATE_AFTER)
                    } else {
                        (now + limit).min(head_check)
                    };
                    check.as_mut().reset(goaway_at.map_or(next, |at| at.min(next)));
                }
            }
        }
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
