//! One HTTP request: route it, then answer it directly or proxy it to a cluster.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderValue, LOCATION, SERVER, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tracing::debug;

use super::authority;
use super::body::{self, Exchange, Flag, LogRecord, Release, ResponseBody, Upstream, UpstreamBody};
use super::headers::{self, BadTransferCoding, Downstream, X_REQUEST_ID};
use super::io::Activity;
use super::path::{self, Normalized};
use super::upgrade;
use crate::cluster::{self, ActiveRetry, ClusterRequest, HostRequest, Outcome, PendingRequest};
use crate::config::{
    ClusterId, ClusterRoute, DirectResponse, ListenerKind, RetryPolicy, RouteAction,
    UpstreamProtocol,
};
use crate::stats;
use crate::upstream::{
    BodyProgress, Checkout, ClusterPool, ConnectError, ConnectionSlot, RequestBody, RequestTimeout,
    TrackedBody,
};
use crate::upstream_h1::{self, Outgoing};
use crate::upstream_h2;
use crate::worker::Worker;

static X_BATON_EPOCH: http::HeaderName = http::HeaderName::from_static("x-baton-epoch");

/// What a request handler knows about its connection.
pub struct ConnCtx {
    pub worker: Rc<Worker>,
    pub listener: usize,
    pub peer: SocketAddr,
    /// `peer`'s address as it goes into `x-forwarded-for`.
    pub peer_value: HeaderValue,
    pub tls: bool,
    pub h2: bool,
    pub activity: Rc<Activity>,
    /// Where an upgraded request leaves its tunnel for the connection.
    pub handoff: upgrade::Handoff,
}

pub async fn handle(
    ctx: Rc<ConnCtx>,
    mut request: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let worker = &ctx.worker;
    let stats = &worker.stats;
    let listener_stats = &stats.ids.listeners[ctx.listener];
    stats.shard.inc(listener_stats.downstream_rq_total);
    let log = worker.access_logs[ctx.listener]
        .is_some()
        .then(|| log_record(&ctx, &request));
    let exchange = Exchange::new(ctx.activity.clone(), worker.clone(), ctx.listener, log);
    let bodyless = request.method() == Method::HEAD;

    if let Err(refused) = check(&ctx, &mut request) {
        return Ok(refuse(&ctx, refused, exchange, bodyless));
    }

    let max_body = match &worker.config.listeners[ctx.listener].kind {
        ListenerKind::Http(http) => http.limits.max_body,
        ListenerKind::Tcp { .. } => None,
    };
    if let Some(max) = max_body
        && request.body().size_hint().lower() > max
    {
        // A declared length over the limit: refused before anything is sent upstream.
        return Ok(too_large(&ctx, exchange, bodyless));
    }

    let route = match &worker.config.listeners[ctx.listener].kind {
        ListenerKind::Http(http) => {
            let host = request_host(&request);
            let path = request.uri().path();
            http.routes
                .iter()
                .find(|r| r.matches(host, path, request.headers()))
        }
        ListenerKind::Tcp { .. } => None,
    };
    // When refused: how long until the bucket has a token again.
    let limited = route
        .and_then(|r| r.rate_limit.as_ref())
        .and_then(|limit| limit.take().err());
    let mut response = match route.map(|r| &r.action) {
        None => local(
            StatusCode::NOT_FOUND,
            "no route matches this request\n",
            exchange,
            Flag::NoRoute,
        ),
        Some(_) if limited.is_some() => {
            stats.shard.inc(listener_stats.downstream_rq_rate_limited);
            let mut response = local(
                StatusCode::TOO_MANY_REQUESTS,
                "rate limited: this route's rate_limit is reached; try again later\n",
                exchange,
                Flag::RateLimited,
            );
            // Whole seconds (RFC 9110, 10.2.3), rounded up, at least one.
            let wait = limited.unwrap_or_default();
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            response
        }
        Some(RouteAction::Direct(direct)) => direct_response(direct, exchange),
        // Boxed: hyper keeps room for this future for the connection's whole life, and an idle
        // connection should not hold the upstream exchange's state.
        Some(RouteAction::Cluster(cluster_route)) => {
            match Box::pin(proxy(&ctx, cluster_route, request, exchange, max_body)).await {
                Ok(response) => response,
                Err(TooLarge(exchange)) => return Ok(too_large(&ctx, exchange, bodyless)),
            }
        }
    };

    if let Some(class) = stats::class_index(response.status().as_u16()) {
        stats.shard.inc(listener_stats.downstream_rq_class[class]);
    }
    let status = response.status();
    // Answers that carry no body, whatever the body object holds: hyper sends none.
    response.body_mut().bodyless_if(
        bodyless || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED,
    );
    if !ctx.h2
        && status != StatusCode::SWITCHING_PROTOCOLS
        && worker.drain.is_draining()
        && worker.drain.close_this_answer()
    {
        // Ask the client to reconnect (to the next generation) instead of closing the connection
        // under it: the only way to drain HTTP/1.1 without losing a request.
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(epoch) = &worker.epoch_header {
        response
            .headers_mut()
            .insert(X_BATON_EPOCH.clone(), epoch.clone());
    }
    Ok(response)
}

/// The answer to a request whose body is over `max_request_body`: 413, and the connection
/// closes (the rest of the body is not read).
fn too_large(ctx: &ConnCtx, exchange: Exchange, bodyless: bool) -> Response<ResponseBody> {
    let stats = &ctx.worker.stats;
    let ids = &stats.ids.listeners[ctx.listener];
    stats.shard.inc(ids.downstream_rq_too_large);
    ctx.activity.linger.set(true);
    stats.shard.inc(ids.downstream_rq_class[3]);
    let mut response = local(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large: it is over the listener's max_request_body\n",
        exchange,
        Flag::None,
    );
    response.body_mut().bodyless_if(bodyless);
    if !ctx.h2 {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(epoch) = &ctx.worker.epoch_header {
        response
            .headers_mut()
            .insert(X_BATON_EPOCH.clone(), epoch.clone());
    }
    response
}

/// A request body went past `max_request_body` before the upstream answered.
struct TooLarge(Exchange);

/// A request answered before routing: refused, or redirected to its normal path.
enum Refused {
    Status(StatusCode, &'static str),
    /// `path_with_escaped_slashes = "unescape_and_redirect"`: 307 to this path and query.
    Redirect(String),
}

/// What a request must be before it is routed: one valid authority (and a `Host` in HTTP/1.1,
/// RFC 9112, section 3.2), chunked applied once
/// (HTTP/1.1), and a normal path, which then replaces the client's (see `authority.rs` and
/// `path.rs`). A path that needs nothing costs a scan of its bytes.
fn check(ctx: &ConnCtx, request: &mut Request<Incoming>) -> Result<(), Refused> {
    authority::check(request)
        .map_err(|bad| Refused::Status(StatusCode::BAD_REQUEST, bad.answer()))?;
    // Only a body of unknown length can be chunked: most requests skip the header lookup.
    if request.version() == Version::HTTP_11 && request.body().size_hint().exact().is_none() {
        match headers::check_transfer_coding(request.headers()) {
            Ok(()) => {}
            Err(BadTransferCoding::ChunkedTwice) => {
                return Err(Refused::Status(
                    StatusCode::BAD_REQUEST,
                    "bad request: Transfer-Encoding applies chunked more than once\n",
                ));
            }
            Err(BadTransferCoding::Unsupported) => {
                return Err(Refused::Status(
                    StatusCode::NOT_IMPLEMENTED,
                    "not implemented: a transfer coding other than chunked\n",
                ));
            }
        }
    }
    let ListenerKind::Http(http) = &ctx.worker.config.listeners[ctx.listener].kind else {
        return Ok(());
    };
    let normalized = path::normalize(request.uri().path(), &http.path)
        .map_err(|bad| Refused::Status(StatusCode::BAD_REQUEST, bad.answer()))?;
    let (redirect, mut target) = match normalized {
        Normalized::Unchanged => return Ok(()),
        Normalized::Changed(path) => (false, path),
        Normalized::Redirect(path) => (true, path),
    };
    if let Some(query) = request.uri().query() {
        target.push('?');
        target.push_str(query);
    }
    if redirect {
        return Err(Refused::Redirect(target));
    }
    // The normalised path holds only what the client's did, less escapes of unreserved
    // characters: it is a valid path (the unit tests check it), and these errors do not happen.
    let invalid = || {
        Refused::Status(
            StatusCode::BAD_REQUEST,
            "bad request: invalid request target\n",
        )
    };
    let path_and_query = PathAndQuery::try_from(target).map_err(|_| invalid())?;
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.path_and_query = Some(path_and_query);
    *request.uri_mut() = Uri::from_parts(parts).map_err(|_| invalid())?;
    Ok(())
}

/// The answer to a request refused before routing. Its intent or its framing is in doubt, so an
/// HTTP/1.1 connection closes after it (reading what the client still sends, so that the
/// answer is not lost to a reset).
fn refuse(
    ctx: &ConnCtx,
    refused: Refused,
    exchange: Exchange,
    bodyless: bool,
) -> Response<ResponseBody> {
    let stats = &ctx.worker.stats;
    let ids = &stats.ids.listeners[ctx.listener];
    let mut response = match refused {
        Refused::Status(status, message) => {
            local(status, message, exchange, Flag::DownstreamProtocolError)
        }
        Refused::Redirect(target) => {
            let mut response = local(
                StatusCode::TEMPORARY_REDIRECT,
                "redirected to the normalised path\n",
                exchange,
                Flag::None,
            );
            if let Ok(location) = HeaderValue::try_from(target) {
                response.headers_mut().insert(LOCATION, location);
            }
            response
        }
    };
    if let Some(class) = stats::class_index(response.status().as_u16()) {
        stats.shard.inc(ids.downstream_rq_class[class]);
    }
    response.body_mut().bodyless_if(bodyless);
    if !ctx.h2 && response.status() != StatusCode::TEMPORARY_REDIRECT {
        ctx.activity.linger.set(true);
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(epoch) = &ctx.worker.epoch_header {
        response
            .headers_mut()
            .insert(X_BATON_EPOCH.clone(), epoch.clone());
    }
    response
}

fn log_record(ctx: &ConnCtx, request: &Request<Incoming>) -> Box<LogRecord> {
    Box::new(LogRecord {
        peer: ctx.peer,
        method: request.method().clone(),
        target: request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().to_string(), |pq| pq.as_str().to_owned()),
        version: request.version(),
        user_agent: request.headers().get(USER_AGENT).cloned(),
        request_id: request.headers().get(&X_REQUEST_ID).cloned(),
        upstream: None,
        flag: Flag::None,
    })
}

/// The host a request is for, without port: the URI's (HTTP/2 `:authority`, absolute-form
/// HTTP/1.1) or the `Host` header's.
fn request_host<B>(request: &Request<B>) -> &str {
    if let Some(host) = request.uri().host() {
        return host.trim_start_matches('[').trim_end_matches(']');
    }
    let Some(host) = request.headers().get(HOST).and_then(|h| h.to_str().ok()) else {
        return "";
    };
    strip_port(host)
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn direct_response(direct: &DirectResponse, mut exchange: Exchange) -> Response<ResponseBody> {
    exchange.set_status(direct.status.as_u16());
    let mut response = Response::new(ResponseBody::full(direct.body.clone(), exchange));
    *response.status_mut() = direct.status;
    *response.headers_mut() = direct.headers.clone();
    response
}

/// A response made by the proxy itself, with a one-line body that says what happened.
pub(super) fn local(
    status: StatusCode,
    message: &'static str,
    mut exchange: Exchange,
    flag: Flag,
) -> Response<ResponseBody> {
    exchange.set_status(status.as_u16());
    let mut body = ResponseBody::full(Bytes::from_static(message.as_bytes()), exchange);
    body.flag(flag);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(SERVER, HeaderValue::from_static("baton"));
    response
}

/// Why a request could not be sent upstream.
enum SendError {
    Connect(ConnectError),
    /// An HTTP/2 stream failed.
    Reset(hyper::Error),
    /// An HTTP/1.1 exchange failed.
    Http1(upstream_h1::Error),
    /// The route's `per_try_timeout` passed.
    PerTryTimeout,
    /// A circuit breaker refused it; names which.
    Overflow(&'static str),
    /// The cluster has no endpoint to send to.
    NoHost,
}

/// A try that got an answer.
struct Sent {
    response: Response<UpstreamBody>,
    upstream: Upstream,
    host: HostRequest,
}

/// How the tries of one request ended, and the last endpoint tried.
type Tried = (Result<Sent, SendError>, Option<SocketAddr>);

async fn proxy(
    ctx: &ConnCtx,
    route: &ClusterRoute,
    request: Request<Incoming>,
    mut exchange: Exchange,
    max_body: Option<u64>,
) -> Result<Response<ResponseBody>, TooLarge> {
    let worker = &ctx.worker;
    let cluster_id = route.target.pick(fastrand::u64(..));
    let cluster = worker.config.cluster(cluster_id);
    let handle = &worker.clusters[cluster_id.0].handle;
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let hash = cluster::request_hash(cluster.hash_key.as_ref(), request.headers(), ctx.peer.ip());
    let (mut parts, body) = request.into_parts();
    let h2_upstream = cluster.protocol == UpstreamProtocol::Http2;
    // Read before the hop-by-hop fields go: the protocols to ask the upstream to switch to.
    let upgrade = match upgrade::offer(&mut parts, route, h2_upstream) {
        Ok(upgrade) => upgrade,
        Err(refusal) => return Ok(upgrade::refuse(refusal, exchange)),
    };
    let trailers = headers::accepts_trailers(&parts.headers);
    let request_id = headers::prepare_request(
        &mut parts,
        Downstream {
            peer: &ctx.peer_value,
            tls: ctx.tls,
        },
    );
    if h2_upstream {
        headers::for_http2_upstream(&mut parts, trailers, &cluster.name);
    }
    if let Some(protocols) = &upgrade {
        upgrade::forward(&mut parts.headers, protocols.clone());
    }
    if let Some(log) = exchange.log_mut() {
        log.request_id = Some(request_id);
    }
    let Some(in_flight) = ClusterRequest::take(handle, cluster.breakers.max_requests) else {
        stats.shard.inc(cluster_stats.upstream_rq_overflow);
        return Ok(overloaded("max_requests", exchange));
    };
    let bodyless = body.is_end_stream();
    let idempotent = is_idempotent(&parts.method);
    let retry = route
        .retry
        .filter(|r| r.num_retries > 0 && (idempotent || r.retry_non_idempotent));
    // An upgrade is not copied: a shadow would open a tunnel nobody uses.
    let mirror = route
        .mirror
        .filter(|m| upgrade.is_none() && fastrand::f64() * 100.0 < m.percent);
    // A body can be sent again (or copied) only if it is kept: one of a declared size up to
    // RETRY_BUFFER_LIMIT is read whole first, as Envoy buffers a request it may retry; a larger
    // one streams through and goes once.
    let buffered = !bodyless
        && (retry.is_some() || mirror.is_some())
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= RETRY_BUFFER_LIMIT);
    let retry = retry.filter(|_| bodyless || buffered);
    let mirror = mirror.filter(|_| bodyless || buffered);
    let progress = BodyProgress::new(bodyless);
    let started = std::time::Instant::now();
    let idle_timeout = match &worker.config.listeners[ctx.listener].kind {
        ListenerKind::Http(http) => http.idle_timeout,
        ListenerKind::Tcp { .. } => cluster.request_timeout,
    };
    let timeout = route.timeout.unwrap_or(cluster.request_timeout);
    let body = TrackedBody::new(body, progress.clone(), max_body);
    // The body kept in memory, or the body to stream.
    let body: Result<Bytes, TrackedBody> = if buffered {
        let read = tokio::select! {
            read = body.collect() => Ok(read),
            timeout = progress.timed_out(timeout, idle_timeout) => Err(timeout),
        };
        match read {
            Ok(Ok(read)) => Ok(read.to_bytes()),
            Ok(Err(_)) if progress.too_large() => return Err(TooLarge(exchange)),
            Ok(Err(_)) => {
                return Ok(local(
                    StatusCode::BAD_REQUEST,
                    "request body incomplete: the client stopped sending it\n",
                    exchange,
                    Flag::DownstreamClosed,
                ));
            }
            Err(_) => {
                return Ok(local(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body timeout: the client stopped sending\n",
                    exchange,
                    Flag::DownstreamTimeout,
                ));
            }
        }
    } else {
        Err(body)
    };
    // Kept only when the request may be sent again or copied: headers are not cloned for nothing.
    let template = (retry.is_some() || mirror.is_some()).then(|| Template {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body: body.as_ref().map_or_else(|_| Bytes::new(), Bytes::clone),
    });
    if let (Some(mirror), Some(template)) = (mirror, &template) {
        tokio::task::spawn_local(shadow(worker.clone(), mirror.cluster, template.clone()));
    }
    let request = Request::from_parts(
        parts,
        match body {
            Ok(kept) => Either::Right(Full::new(kept)),
            Err(streamed) => Either::Left(streamed),
        },
    );
    let tries = Tries {
        ctx,
        route,
        cluster_id,
        hash,
        retry,
        template: template.as_ref(),
        // A request to an idempotent method whose body is kept (or has none) may be sent again
        // if a pooled connection turns out to have been closed by the upstream under it
        // (RFC 9110, 9.2.2).
        replayable: idempotent && (bodyless || buffered),
        progress: &progress,
        current: std::cell::RefCell::new(None),
    };
    let sent = tokio::select! {
        sent = tries.run(request) => Ok(sent),
        timeout = progress.timed_out(timeout, idle_timeout) => Err(timeout),
    };
    if let Err(RequestTimeout::Response) = sent
        && let Some(host) = tries.current.borrow_mut().take()
    {
        // The try in flight ran out the request's time: a host that never answers is a
        // failing host for outlier detection too.
        handle.report(host.host(), Outcome::LocalFailure, cluster.outlier.as_ref());
    }
    if progress.too_large() && !matches!(sent, Ok((Ok(_), _))) {
        return Err(TooLarge(exchange));
    }
    if let Ok((_, Some(addr))) = &sent
        && let Some(log) = exchange.log_mut()
    {
        log.upstream = Some(*addr);
    }
    Ok(match sent {
        // Only a request that asked for an upgrade can have a 101 (`http1_wire`).
        Ok((Ok(sent), _)) if sent.response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let switch = upgrade::Switch {
                offered: upgrade.as_ref(),
                in_flight: (in_flight, sent.host),
                idle_timeout: route.upgrade_idle_timeout.unwrap_or(idle_timeout),
            };
            upgrade::switched(ctx, sent.response, switch, exchange)
        }
        Ok((Ok(sent), _)) => {
            let (mut parts, body) = sent.response.into_parts();
            let version = if h2_upstream {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            headers::prepare_response(&mut parts, version);
            if trailers && !ctx.h2 {
                headers::declare_grpc_trailers(&mut parts.headers);
            }
            exchange.set_status(parts.status.as_u16());
            let release = Release {
                upstream: sent.upstream,
                in_flight: (in_flight, sent.host),
                cluster: cluster_id.0,
                started,
            };
            Response::from_parts(parts, ResponseBody::upstream(body, release, exchange))
        }
        Ok((Err(e), addr)) => failed(ctx, cluster_id, e, addr, exchange),
        Err(RequestTimeout::Response) => {
            stats.shard.inc(cluster_stats.upstream_rq_timeout);
            local(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout\n",
                exchange,
                Flag::UpstreamTimeout,
            )
        }
        Err(RequestTimeout::Body) => local(
            StatusCode::REQUEST_TIMEOUT,
            "request body timeout: the client stopped sending\n",
            exchange,
            Flag::DownstreamTimeout,
        ),
    })
}

/// The answer to a request whose last try failed without a response.
fn failed(
    ctx: &ConnCtx,
    cluster_id: ClusterId,
    error: SendError,
    addr: Option<SocketAddr>,
    exchange: Exchange,
) -> Response<ResponseBody> {
    let worker = &ctx.worker;
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let addr = addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
    match error {
        SendError::Connect(e) => {
            debug!(worker = worker.id, upstream = %addr, "{e}");
            match e {
                ConnectError::TimedOut { .. } => local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream connect timeout\n",
                    exchange,
                    Flag::UpstreamConnectFailure,
                ),
                _ => local(
                    StatusCode::BAD_GATEWAY,
                    "upstream connect error\n",
                    exchange,
                    Flag::UpstreamConnectFailure,
                ),
            }
        }
        SendError::Http1(upstream_h1::Error::RequestBody(e)) => {
            body_failed(ctx, e.as_ref(), exchange)
        }
        SendError::Reset(e) if e.is_user() => body_failed(ctx, &e, exchange),
        SendError::Reset(_) | SendError::Http1(_) => {
            let (invalid, what): (bool, &dyn std::fmt::Display) = match &error {
                SendError::Reset(e) => (e.is_parse() || e.is_parse_status(), e),
                SendError::Http1(upstream_h1::Error::Invalid(why)) => (true, why),
                SendError::Http1(e) => (false, e),
                _ => unreachable!("matched above"),
            };
            if invalid {
                debug!(worker = worker.id, upstream = %addr, "upstream answered with invalid HTTP: {what}");
                return local(
                    StatusCode::BAD_GATEWAY,
                    "upstream sent an invalid response\n",
                    exchange,
                    Flag::UpstreamProtocolError,
                );
            }
            debug!(worker = worker.id, upstream = %addr, "upstream request failed: {what}");
            stats.shard.inc(cluster_stats.upstream_rq_reset);
            local(
                StatusCode::BAD_GATEWAY,
                "upstream reset before response\n",
                exchange,
                Flag::UpstreamReset,
            )
        }
        SendError::PerTryTimeout => {
            stats.shard.inc(cluster_stats.upstream_rq_timeout);
            local(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout (per try)\n",
                exchange,
                Flag::UpstreamTimeout,
            )
        }
        SendError::Overflow(which) => overloaded(which, exchange),
        SendError::NoHost => {
            stats.shard.inc(cluster_stats.upstream_cx_none_healthy);
            local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                exchange,
                Flag::NoHealthyUpstream,
            )
        }
    }
}

/// The answer to a request whose body broke on its way in (malformed chunked framing, or the
/// client stopped sending it): the client's doing, so 400, counted downstream and not as an
/// upstream reset. The upstream connection it was going on is mid-request: it is closed, and
/// neither retried nor reported to outlier detection (see `Tries::run`).
fn body_failed(
    ctx: &ConnCtx,
    error: &(dyn std::error::Error + 'static),
    exchange: Exchange,
) -> Response<ResponseBody> {
    debug!(worker = ctx.worker.id, "request body failed: {error}");
    let flag = body::client_body_flag(error);
    let message = if flag == Flag::DownstreamProtocolError {
        "bad request: the request body's framing is invalid\n"
    } else {
        "request body incomplete: the client stopped sending it\n"
    };
    let mut response = local(StatusCode::BAD_REQUEST, message, exchange, flag);
    if !ctx.h2 {
        // hyper reads no more of this connection: what the client still sends is read and
        // dropped, so that closing does not reset the connection under the answer.
        ctx.activity.linger.set(true);
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

static X_BATON_OVERLOADED: http::HeaderName = http::HeaderName::from_static("x-baton-overloaded");

/// 503 from a circuit breaker; `x-baton-overloaded` names the one that tripped.
fn overloaded(which: &'static str, exchange: Exchange) -> Response<ResponseBody> {
    let message: &'static str = match which {
        "max_requests" => {
            "upstream overloaded: the cluster's circuit_breakers.max_requests is reached\n"
        }
        "max_pending_requests" => {
            "upstream overloaded: the cluster's circuit_breakers.max_pending_requests is reached\n"
        }
        _ => "upstream overloaded\n",
    };
    let mut response = local(
        StatusCode::SERVICE_UNAVAILABLE,
        message,
        exchange,
        Flag::UpstreamOverflow,
    );
    response
        .headers_mut()
        .insert(X_BATON_OVERLOADED.clone(), HeaderValue::from_static(which));
    response
}

/// Bodies of requests that may be retried or mirrored are kept up to this size (a declared one).
const RETRY_BUFFER_LIMIT: u64 = 64 * 1024;

/// What a request needs to be sent again: its head, and its body when it was kept.
#[derive(Clone)]
struct Template {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Template {
    fn request(&self) -> Request<RequestBody> {
        let mut request = Request::new(Either::Right(Full::new(self.body.clone())));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// The tries of one request: a host from the balancer, a send, and, under the route's retry
/// policy, more tries on other hosts.
struct Tries<'a> {
    ctx: &'a ConnCtx,
    route: &'a ClusterRoute,
    cluster_id: ClusterId,
    hash: Option<u64>,
    retry: Option<RetryPolicy>,
    template: Option<&'a Template>,
    replayable: bool,
    progress: &'a BodyProgress,
    /// The host of the try in flight, for outlier detection when the request times out.
    current: std::cell::RefCell<Option<HostRequest>>,
}

impl Tries<'_> {
    async fn run(&self, first: Request<RequestBody>) -> Tried {
        let worker = &self.ctx.worker;
        let cluster = worker.config.cluster(self.cluster_id);
        let wc = &worker.clusters[self.cluster_id.0];
        let stats = &worker.stats;
        let cluster_stats = &stats.ids.clusters[self.cluster_id.0];
        let mut request = Some(first);
        // Endpoints tried before, for a retry to go elsewhere (allocated only for a retry).
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = None;
        let mut retries = 0;
        let mut _retrying: Option<ActiveRetry> = None;
        loop {
            let Some(pick) = wc.handle.pick(cluster.lb_policy, &wc.lb, self.hash, &tried) else {
                return (Err(SendError::NoHost), last);
            };
            if pick.panic {
                stats.shard.inc(cluster_stats.lb_healthy_panic);
            }
            let addr = pick.host.address;
            last = Some(addr);
            // Held here while the try runs, so that a request timeout can still name its host.
            *self.current.borrow_mut() = Some(HostRequest::new(pick.host));
            stats.shard.inc(cluster_stats.upstream_rq_total);
            let Some(this) = request
                .take()
                .or_else(|| self.template.map(Template::request))
            else {
                unreachable!("a retried request has a template");
            };
            let attempt = send(worker, self.cluster_id, addr, this, self.replayable);
            let started = std::time::Instant::now();
            let result = match self.route.per_try_timeout {
                // Each try's time starts when the client's body is all sent (a slow upload is
                // not a slow upstream), as the request's own timeout does.
                Some(limit) => tokio::select! {
                    result = attempt => result,
                    _ = async {
                        let ended = self.progress.ended().await;
                        tokio::time::sleep_until((ended.max(started) + limit).into()).await;
                    } => {
                        stats.shard.inc(cluster_stats.upstream_rq_per_try_timeout);
                        Err(SendError::PerTryTimeout)
                    }
                },
                None => attempt.await,
            };
            let Some(host) = self.current.borrow_mut().take() else {
                unreachable!("the try's host is set before it runs");
            };
            // The client's own failures (its body broke off, or went past max_request_body)
            // say nothing of the upstream, and are not tried again.
            let clients_fault = self.progress.too_large()
                || matches!(&result, Err(SendError::Reset(e)) if e.is_user())
                || matches!(
                    &result,
                    Err(SendError::Http1(upstream_h1::Error::RequestBody(_)))
                );
            if let Ok((response, _)) = &result
                && let Some(class) = stats::class_index(response.status().as_u16())
            {
                stats.shard.inc(cluster_stats.upstream_rq_class[class]);
            }
            let outcome = match &result {
                _ if clients_fault => None,
                Ok((response, _)) => Some(Outcome::Status(response.status().as_u16())),
                Err(SendError::Overflow(_) | SendError::NoHost) => None,
                Err(_) => Some(Outcome::LocalFailure),
            };
            if let Some(outcome) = outcome {
                wc.handle
                    .report(host.host(), outcome, cluster.outlier.as_ref());
            }
            if let Some(policy) = self.retry
                && retries < policy.num_retries
                && !clients_fault
                && should_retry(&policy, &result)
            {
                match ActiveRetry::take(
                    &wc.handle,
                    cluster.breakers.max_retries,
                    policy.budget_percent,
                    policy.min_retry_concurrency,
                ) {
                    Some(active) => {
                        retries += 1;
                        _retrying = Some(active);
                        tried.push(addr);
                        stats.shard.inc(cluster_stats.upstream_rq_retry);
                        debug!(worker = worker.id, upstream = %addr, retry = retries, "retrying");
                        drop(result);
                        drop(host);
                        tokio::time::sleep(backoff(&policy, retries)).await;
                        continue;
                    }
                    None => stats.shard.inc(cluster_stats.upstream_rq_retry_overflow),
                }
            }
            if retries > 0 && matches!(&result, Ok((r, _)) if r.status().as_u16() < 500) {
                stats.shard.inc(cluster_stats.upstream_rq_retry_success);
            }
            return (
                result.map(|(response, upstream)| Sent {
                    response,
                    upstream,
                    host,
                }),
                Some(addr),
            );
        }
    }
}

/// Whether a try's end is one the policy retries.
fn should_retry(
    policy: &RetryPolicy,
    result: &Result<(Response<UpstreamBody>, Upstream), SendError>,
) -> bool {
    let on = &policy.on;
    match result {
        Ok((response, _)) => {
            let s = response.status().as_u16();
            (on.server_error && s >= 500)
                || (on.gateway_error && matches!(s, 502..=504))
                || on.statuses.contains(&s)
        }
        Err(SendError::Connect(_)) => on.connect_failure || on.server_error || on.gateway_error,
        Err(SendError::Reset(_) | SendError::Http1(_) | SendError::PerTryTimeout) => {
            on.reset || on.server_error || on.gateway_error
        }
        Err(SendError::Overflow(_) | SendError::NoHost) => false,
    }
}

/// Exponential backoff with full jitter (as Envoy's): a random time up to
/// `base * 2^(n-1)`, capped at `max_interval`.
fn backoff(policy: &RetryPolicy, retry: u32) -> Duration {
    let ceiling = policy
        .base_interval
        .saturating_mul(1 << (retry - 1).min(16))
        .min(policy.max_interval);
    let ms = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(fastrand::u64(0..=ms))
}

/// Sends a copy of a request to the mirror cluster and drops the answer; the client never waits
/// for it. The host gets `-shadow` appended, as Envoy does, so that the shadow service can tell.
async fn shadow(worker: Rc<Worker>, cluster_id: ClusterId, template: Template) {
    let cluster = worker.config.cluster(cluster_id);
    let wc = &worker.clusters[cluster_id.0];
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let Some(in_flight) = ClusterRequest::take(&wc.handle, cluster.breakers.max_requests) else {
        stats.shard.inc(cluster_stats.upstream_rq_overflow);
        return;
    };
    let Some(pick) = wc.handle.pick(cluster.lb_policy, &wc.lb, None, &[]) else {
        stats.shard.inc(cluster_stats.upstream_cx_none_healthy);
        return;
    };
    stats.shard.inc(cluster_stats.upstream_rq_total);
    stats.shard.inc(cluster_stats.upstream_rq_mirror);
    let mut request = template.request();
    headers::for_mirror(
        &mut request,
        cluster.protocol == UpstreamProtocol::Http2,
        &cluster.name,
    );
    let host = HostRequest::new(pick.host);
    let addr = host.host().address;
    // Everything, the answer's body included, within the cluster's request timeout: a shadow
    // that stalls must not hold the mirror cluster's counts.
    let deadline = tokio::time::Instant::now() + cluster.request_timeout;
    // A copy that a closed pooled connection did not carry is sent again only if it is safe to.
    let replayable = is_idempotent(request.method());
    let sent = tokio::time::timeout_at(
        deadline,
        send(&worker, cluster_id, addr, request, replayable),
    )
    .await;
    match sent {
        Ok(Ok((response, upstream))) => {
            wc.handle.report(
                host.host(),
                Outcome::Status(response.status().as_u16()),
                cluster.outlier.as_ref(),
            );
            // Read the answer to its end so that the connection can be used again.
            let (_, mut body) = response.into_parts();
            let drained = tokio::time::timeout_at(deadline, async {
                use http_body_util::BodyExt;
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        return false;
                    }
                }
                true
            })
            .await;
            if let (Ok(true), Upstream::Http1 { pool, endpoint }, UpstreamBody::Http1(body)) =
                (drained, upstream, &mut body)
                && let Some(conn) = body.reusable()
            {
                pool.release(endpoint, conn);
            }
        }
        Ok(Err(SendError::Overflow(_) | SendError::NoHost)) => {}
        Ok(Err(_)) | Err(_) => {
            wc.handle
                .report(host.host(), Outcome::LocalFailure, cluster.outlier.as_ref());
        }
    }
    drop(host);
    drop(in_flight);
}

/// Sends on a pooled connection to `addr` when one is usable, else on a new one (waiting for one
/// when the cluster is at `max_connections`). A request that a pooled connection could not
/// carry (it closed under the request, before any answer) goes once more on another connection:
/// a `replayable` one (idempotent, its body kept) in any case, others only when not even their
/// head could be written. An `http2` cluster's requests go as streams of the worker's connection
/// to the endpoint (`upstream_h2`).
async fn send(
    worker: &Rc<Worker>,
    cluster_id: ClusterId,
    addr: SocketAddr,
    request: Request<RequestBody>,
    replayable: bool,
) -> Result<(Response<UpstreamBody>, Upstream), SendError> {
    let cluster = worker.config.cluster(cluster_id);
    if cluster.protocol == UpstreamProtocol::Http2 {
        // Boxed: the HTTP/1.1 path below, the common one, should not carry (and copy) the size
        // of HTTP/2's state in every request's future.
        return match Box::pin(worker.h2.send(worker, cluster_id, addr, request)).await {
            Ok((response, stream)) => {
                Ok((response.map(UpstreamBody::Http2), Upstream::Http2(stream)))
            }
            Err(upstream_h2::SendError::Connect(e)) => Err(SendError::Connect(e)),
            Err(upstream_h2::SendError::Request(e)) => Err(SendError::Reset(e)),
        };
    }
    let wc = &worker.clusters[cluster_id.0];
    let pool = &wc.pool;
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let max = cluster.breakers.max_connections;
    let (parts, body) = request.into_parts();
    let mut outgoing = match body {
        Either::Left(streamed) if !streamed.is_end_stream() => Outgoing::streamed(&parts, streamed),
        Either::Left(_) => Outgoing::kept(&parts, Bytes::new()),
        Either::Right(kept) => {
            let kept = kept.collect().await.map(|b| b.to_bytes());
            Outgoing::kept(&parts, kept.unwrap_or_default())
        }
    };
    let mut sent_again = false;
    loop {
        let connection = match pool.checkout(addr) {
            Some(pooled) => Connection::Pooled(pooled),
            None => match ConnectionSlot::take(&wc.handle, max) {
                Some(slot) => Connection::New(slot),
                None => wait_for_connection(worker, cluster_id, addr).await?,
            },
        };
        let (mut conn, idle_for) = match connection {
            Connection::Pooled(pooled) => (pooled.conn, pooled.idle_for),
            Connection::New(slot) => (
                upstream_h1::Conn::connect(addr, cluster, worker, cluster_id.0, slot)
                    .await
                    .map_err(SendError::Connect)?,
                None,
            ),
        };
        match conn.send(&mut outgoing).await {
            Ok(head) => {
                let body = upstream_h1::Body::new(conn, &head, outgoing);
                let mut response = Response::new(UpstreamBody::Http1(body));
                *response.status_mut() = head.status;
                *response.version_mut() = head.version;
                *response.headers_mut() = head.headers;
                let upstream = Upstream::Http1 {
                    pool: pool.clone(),
                    endpoint: addr,
                };
                return Ok((response, upstream));
            }
            Err(failure) => {
                let again = idle_for.is_some()
                    && !sent_again
                    && !failure.answered
                    && !failure.body_taken
                    && (replayable || !failure.head_sent);
                if !again {
                    return Err(SendError::Http1(failure.error));
                }
                sent_again = true;
                debug!(
                    worker = worker.id,
                    idle_for = ?idle_for.unwrap_or(Duration::ZERO),
                    "pooled upstream connection closed under a request; sending it again: {}",
                    failure.error
                );
                stats.shard.inc(cluster_stats.upstream_rq_retry);
            }
        }
    }
}

/// A connection to send on: a pooled one, or a place for a new one.
enum Connection {
    Pooled(Checkout),
    New(ConnectionSlot),
}

/// At `max_connections`: waits, as a pending request, for a connection of this worker to
/// `addr` to come back to the pool or for a place for a new one. An idle connection of this
/// worker to another endpoint is closed to make that place.
async fn wait_for_connection(
    worker: &Rc<Worker>,
    cluster_id: ClusterId,
    addr: SocketAddr,
) -> Result<Connection, SendError> {
    let cluster = worker.config.cluster(cluster_id);
    let wc = &worker.clusters[cluster_id.0];
    let pool = &wc.pool;
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    stats.shard.inc(cluster_stats.upstream_cx_overflow);
    let Some(_pending) = PendingRequest::take(&wc.handle, cluster.breakers.max_pending_requests)
    else {
        stats.shard.inc(cluster_stats.upstream_rq_pending_overflow);
        return Err(SendError::Overflow("max_pending_requests"));
    };
    let _waiting = Waiting::new(pool, addr);
    loop {
        let freed_here = pool.freed.notified();
        let freed_anywhere = wc.handle.cx_freed.notified();
        if let Some(pooled) = pool.checkout(addr) {
            return Ok(Connection::Pooled(pooled));
        }
        if let Some(slot) = ConnectionSlot::take(&wc.handle, cluster.breakers.max_connections) {
            return Ok(Connection::New(slot));
        }
        pool.close_idle_except(addr);
        tokio::select! {
            _ = freed_here => {}
            _ = freed_anywhere => {}
        }
    }
}

/// Counts a request of this worker waiting for a connection to an endpoint, while it waits.
struct Waiting<'a>(&'a ClusterPool, SocketAddr);

impl<'a> Waiting<'a> {
    fn new(pool: &'a ClusterPool, addr: SocketAddr) -> Self {
        pool.wait(addr, true);
        Waiting(pool, addr)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.wait(self.1, false);
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_ports() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
        let request = Request::get("http://a.test:81/x").body(()).unwrap();
        assert_eq!(request_host(&request), "a.test");
        let request = Request::get("/x")
            .header("host", "b.test:82")
            .body(())
            .unwrap();
        assert_eq!(request_host(&request), "b.test");
    }
}
