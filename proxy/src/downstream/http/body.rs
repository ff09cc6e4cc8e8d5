//! The body of every response the proxy sends, and the bookkeeping that ends with it: the request
//! stops counting as in flight, the upstream connection goes back to its pool (an HTTP/2 stream
//! ends), the access log line
//! is written. Tying these to the body (not to the handler) is what makes them happen exactly when
//! the last byte is handed to the client, or when the client goes away.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Version};
use http_body::{Body, Frame, SizeHint};

use crate::cluster::{ClusterRequest, HostRequest};
use crate::runtime::context::WorkerContext;
use crate::upstream::h1;
use crate::upstream::response::{BoxError, Upstream, UpstreamBody};

use super::io::Activity;

/// Short codes in the access log that say why a response is what it is, after Envoy's
/// response flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// Nothing to report.
    None,
    /// No route matched (`NR`).
    NoRoute,
    /// The upstream could not be connected (`UF`).
    UpstreamConnectFailure,
    /// The upstream did not answer in time (`UT`).
    UpstreamTimeout,
    /// The upstream reset or closed the connection (`UR`).
    UpstreamReset,
    /// The client went away before the response was complete (`DC`).
    DownstreamClosed,
    /// The client stopped sending its request (`DT`).
    DownstreamTimeout,
    /// The proxy closed the connection: the drain deadline came, or it was stopped (`SC`).
    ProxyClosed,
    /// The upstream's answer was not valid HTTP (`UPE`).
    UpstreamProtocolError,
    /// A circuit breaker refused the request (`UO`).
    UpstreamOverflow,
    /// The cluster had no endpoint to send to (`UH`).
    NoHealthyUpstream,
    /// A route's rate limit refused the request (`RL`).
    RateLimited,
    /// The client's request was not valid HTTP: a bad path, authority or body framing (`DPE`).
    DownstreamProtocolError,
    /// A tunnel (an upgraded connection) carried no byte for its idle timeout (`SI`).
    StreamIdleTimeout,
}

/// How a client's request body failed: its framing was invalid (`DPE`: a chunk size that is
/// none, data longer than its chunk, a missing CRLF, which hyper reports as invalid input or
/// data), or it stopped short (`DC`).
pub fn client_body_flag(error: &(dyn std::error::Error + 'static)) -> Flag {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                    Flag::DownstreamProtocolError
                }
                _ => Flag::DownstreamClosed,
            };
        }
        cause = e.source();
    }
    Flag::DownstreamClosed
}

impl Flag {
    fn code(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::NoRoute => "NR",
            Flag::UpstreamConnectFailure => "UF",
            Flag::UpstreamTimeout => "UT",
            Flag::UpstreamReset => "UR",
            Flag::DownstreamClosed => "DC",
            Flag::DownstreamTimeout => "DT",
            Flag::ProxyClosed => "SC",
            Flag::UpstreamProtocolError => "UPE",
            Flag::UpstreamOverflow => "UO",
            Flag::NoHealthyUpstream => "UH",
            Flag::RateLimited => "RL",
            Flag::DownstreamProtocolError => "DPE",
            Flag::StreamIdleTimeout => "SI",
        }
    }
}

/// One request and its response, from the moment the request arrives until the response body is
/// done or dropped.
pub struct Exchange {
    activity: Rc<Activity>,
    worker: Rc<WorkerContext>,
    listener: usize,
    start: Instant,
    /// Present only when the listener has an access log.
    log: Option<Box<LogRecord>>,
    status: u16,
    bytes: u64,
    complete: bool,
}

/// The parts of the request an access log line needs.
pub struct LogRecord {
    pub peer: SocketAddr,
    pub method: Method,
    pub target: String,
    pub version: Version,
    pub user_agent: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    pub upstream: Option<SocketAddr>,
    pub flag: Flag,
}

impl Exchange {
    pub fn new(
        activity: Rc<Activity>,
        worker: Rc<WorkerContext>,
        listener: usize,
        log: Option<Box<LogRecord>>,
    ) -> Self {
        activity.request_started();
        let requests = &worker.requests;
        requests.store(requests.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Exchange {
            activity,
            worker,
            listener,
            start: Instant::now(),
            log,
            status: 0,
            bytes: 0,
            complete: false,
        }
    }

    pub fn log_mut(&mut self) -> Option<&mut LogRecord> {
        self.log.as_deref_mut()
    }

    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// Takes the access log record away, with the request's arrival, for what outlives the
    /// response and writes the line itself: the tunnel of an upgraded connection.
    pub fn take_log(&mut self) -> (Option<Box<LogRecord>>, Instant) {
        (self.log.take(), self.start)
    }

    fn set_flag(&mut self, flag: Flag) {
        if let Some(log) = &mut self.log
            && log.flag == Flag::None
        {
            log.flag = flag;
        }
    }
}

/// A duration in whole microseconds, saturating.
fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.activity.request_finished();
        let requests = &self.worker.requests;
        requests.store(
            requests.load(Ordering::Relaxed).saturating_sub(1),
            Ordering::Relaxed,
        );
        let stats = &self.worker.stats;
        stats.shard.record(
            stats.ids.listeners[self.listener].downstream_rq_time,
            micros(self.start.elapsed()),
        );
        if !self.complete {
            self.set_flag(if self.worker.stopping.get() {
                Flag::ProxyClosed
            } else {
                Flag::DownstreamClosed
            });
        }
        let Some(log) = self.log.take() else { return };
        let Some(target) = &self.worker.access_logs[self.listener] else {
            return;
        };
        let line = format_line(
            &self.worker.config.listeners[self.listener].name,
            &log,
            self.status,
            self.bytes,
            self.start.elapsed().as_secs_f64(),
        );
        if !target.sender.send(target.file, line) {
            let stats = &self.worker.stats;
            stats.shard.inc(stats.ids.server.access_log_dropped);
        }
    }
}

/// `time listener client "METHOD target VERSION" status bytes seconds upstream flag request-id "user-agent"`
pub(super) fn format_line(
    listener: &str,
    log: &LogRecord,
    status: u16,
    bytes: u64,
    seconds: f64,
) -> String {
    let mut line = String::with_capacity(192);
    let _ = write!(
        line,
        "{} {listener} {} \"{} {} {:?}\" {status} {bytes} {seconds:.3} ",
        humantime::format_rfc3339_millis(SystemTime::now()),
        log.peer,
        log.method,
        log.target.escape_debug(),
        log.version,
    );
    match log.upstream {
        Some(addr) => {
            let _ = write!(line, "{addr}");
        }
        None => line.push('-'),
    }
    let _ = write!(
        line,
        " {} {} \"{}\"",
        log.flag.code(),
        log.request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        log.user_agent
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .escape_debug(),
    );
    line
}

/// What ends with an upstream response body: its connection goes back to its pool, and
/// `upstream_rq_time` is recorded.
pub struct Release {
    pub upstream: Upstream,
    /// The request's places in the cluster's and the host's counts, given back at the end.
    pub in_flight: (ClusterRequest, HostRequest),
    /// For `upstream_rq_time`: the cluster, and when the request was sent.
    pub cluster: usize,
    pub started: Instant,
}

/// The body of a response to the client.
pub struct ResponseBody {
    kind: Kind,
    exchange: Exchange,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream {
        body: UpstreamBody,
        release: Option<Release>,
    },
}

impl ResponseBody {
    /// A body made here (direct responses, errors).
    pub fn full(bytes: Bytes, mut exchange: Exchange) -> Self {
        exchange.bytes = bytes.len() as u64;
        let body = (!bytes.is_empty()).then_some(bytes);
        if body.is_none() {
            exchange.complete = true;
        }
        ResponseBody {
            kind: Kind::Full(body),
            exchange,
        }
    }

    /// A body streamed from an upstream connection, which goes back to its pool at the end.
    pub fn upstream(body: UpstreamBody, release: Release, exchange: Exchange) -> Self {
        let mut this = ResponseBody {
            kind: Kind::Upstream {
                body,
                release: Some(release),
            },
            exchange,
        };
        if this.is_end_stream() {
            this.finish_upstream();
        }
        this
    }

    pub fn flag(&mut self, flag: Flag) {
        self.exchange.set_flag(flag);
    }

    /// For answers that carry no body on the wire (HEAD, 204, 304): hyper never reads the body,
    /// so the exchange is complete as it stands, with no byte sent.
    pub fn bodyless_if(&mut self, bodyless: bool) {
        if bodyless {
            self.exchange.complete = true;
            self.exchange.bytes = 0;
        }
    }

    fn finish_upstream(&mut self) {
        self.exchange.complete = true;
        if let Kind::Upstream { release, body } = &mut self.kind
            && let Some(r) = release.take()
        {
            let stats = &self.exchange.worker.stats;
            stats.shard.record(
                stats.ids.clusters[r.cluster].upstream_rq_time,
                micros(r.started.elapsed()),
            );
            r.upstream.release(body);
            drop(r.in_flight);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.kind {
            Kind::Full(bytes) => {
                let frame = bytes.take().map(|b| Ok(Frame::data(b)));
                this.exchange.complete = true;
                Poll::Ready(frame)
            }
            Kind::Upstream { body, release } => {
                match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            this.exchange.bytes += data.len() as u64;
                        }
                        if body.is_end_stream() {
                            this.finish_upstream();
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => {
                        // The upstream connection broke mid-body: it must not be reused. It
                        // broke under the client's request body, or on the upstream's side.
                        release.take();
                        let flag = match e.downcast_ref::<h1::Error>() {
                            Some(h1::Error::RequestBody(cause)) => client_body_flag(cause.as_ref()),
                            _ => Flag::UpstreamReset,
                        };
                        this.exchange.set_flag(flag);
                        Poll::Ready(Some(Err(e)))
                    }
                    None => {
                        this.finish_upstream();
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_quote_what_clients_control() {
        let record = LogRecord {
            peer: "127.0.0.1:5000".parse().unwrap(),
            method: Method::GET,
            target: "/a\"b".into(),
            version: Version::HTTP_11,
            user_agent: Some(HeaderValue::from_static("curl/8 \"x\"")),
            request_id: None,
            upstream: Some("127.0.0.1:8081".parse().unwrap()),
            flag: Flag::None,
        };
        let line = format_line("public", &record, 200, 12, 0.0015);
        let (_time, rest) = line.split_once(' ').unwrap();
        assert_eq!(
            rest,
            r#"public 127.0.0.1:5000 "GET /a\"b HTTP/1.1" 200 12 0.002 127.0.0.1:8081 - - "curl/8 \"x\"""#
        );
    }
}
