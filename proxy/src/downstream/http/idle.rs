//! How a connection idles and closes: [`drive`] polls hyper's connection and closes it
//! gracefully when it has idled too long, when a request's headers are late, or when a drain
//! asks for it; an idle cleartext HTTP/1.1 connection [`hibernate`]s, holding only its socket.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::runtime::context::WorkerContext;

use super::io::{Activity, ConnIo};

/// The timeouts [`drive`] keeps.
#[derive(Clone, Copy)]
pub struct DriveSettings {
    pub idle_timeout: Duration,
    pub drain_grace: Duration,
    /// HTTP/1.1 only: how long a request's line and headers may take.
    pub header_timeout: Option<Duration>,
    pub h2: bool,
    /// Whether an idle connection ends [`drive`] with [`Ended::Idle`] to wait in [`hibernate`].
    pub hibernate: bool,
}

/// How long an HTTP/1.1 connection idles before hyper's connection state (two 8 KiB buffers)
/// is let go.
pub const HIBERNATE_AFTER: Duration = Duration::from_secs(1);

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
pub async fn hibernate<S: Hibernate>(
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
pub enum Ended {
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
pub async fn drive<C>(
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
