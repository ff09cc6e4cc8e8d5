//! One HTTP request: route it, then answer it directly or proxy it to a cluster.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderValue, SERVER, USER_AGENT};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use tracing::debug;

use super::body::{Exchange, Flag, LogRecord, Release, ResponseBody, Upstream};
use super::headers::{self, Downstream, X_REQUEST_ID};
use super::io::Activity;
use crate::config::{ClusterId, DirectResponse, ListenerKind, RouteAction, UpstreamProtocol};
use crate::stats;
use crate::upstream::{self, BodyProgress, ConnectError, RequestBody, RequestTimeout, TrackedBody};
use crate::upstream_h2;
use crate::worker::Worker;

static X_BATON_EPOCH: http::HeaderName = http::HeaderName::from_static("x-baton-epoch");

/// What a request handler knows about its connection.
pub struct ConnCtx {
    pub worker: Rc<Worker>,
    pub listener: usize,
    pub peer: SocketAddr,
    pub tls: bool,
    pub h2: bool,
    pub activity: Rc<Activity>,
}

pub async fn handle(
    ctx: Rc<ConnCtx>,
    request: Request<Incoming>,
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

    if request.version() == Version::HTTP_11
        && request.uri().authority().is_none()
        && !request.headers().contains_key(HOST)
    {
        // RFC 9112, section 3.2: an HTTP/1.1 request without Host is answered 400.
        let mut response = local(
            StatusCode::BAD_REQUEST,
            "bad request: an HTTP/1.1 request needs a Host header\n",
            exchange,
            Flag::None,
        );
        stats.shard.inc(listener_stats.downstream_rq_class[3]);
        response.body_mut().bodyless_if(bodyless);
        return Ok(response);
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
            http.routes.iter().find(|r| r.matches(host, path))
        }
        ListenerKind::Tcp { .. } => None,
    };
    let mut response = match route.map(|r| &r.action) {
        None => local(
            StatusCode::NOT_FOUND,
            "no route matches this request\n",
            exchange,
            Flag::NoRoute,
        ),
        Some(RouteAction::Direct(direct)) => direct_response(direct, exchange),
        // Boxed: hyper keeps room for this future for the connection's whole life, and an idle
        // connection should not hold the upstream exchange's state.
        Some(RouteAction::Cluster(cluster)) => {
            match Box::pin(proxy(&ctx, *cluster, request, exchange, max_body)).await {
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
    if !ctx.h2 && worker.drain.is_draining() && worker.drain.close_this_answer() {
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
fn local(
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
    Reset(hyper::Error),
}

async fn proxy(
    ctx: &ConnCtx,
    cluster_id: ClusterId,
    request: Request<Incoming>,
    mut exchange: Exchange,
    max_body: Option<u64>,
) -> Result<Response<ResponseBody>, TooLarge> {
    let worker = &ctx.worker;
    let cluster = worker.config.cluster(cluster_id);
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let pool = &worker.pools[cluster_id.0];
    stats.shard.inc(cluster_stats.upstream_rq_total);

    let endpoint = pool.pick();
    let addr = cluster.endpoints[endpoint];
    let (mut parts, body) = request.into_parts();
    let h2_upstream = cluster.protocol == UpstreamProtocol::Http2;
    let trailers = headers::accepts_trailers(&parts.headers);
    let request_id = headers::prepare_request(
        &mut parts,
        Downstream {
            peer: ctx.peer.ip(),
            tls: ctx.tls,
        },
    );
    if h2_upstream {
        headers::for_http2_upstream(&mut parts, trailers, addr);
    }
    if let Some(log) = exchange.log_mut() {
        log.upstream = Some(addr);
        log.request_id = Some(request_id);
    }
    // A request without a body to an idempotent method may be sent again if a pooled connection
    // turns out to have been closed by the upstream under it (RFC 9110, section 9.2.2).
    let replayable = body.is_end_stream() && is_idempotent(&parts.method);
    let progress = BodyProgress::new(body.is_end_stream());
    let request = Request::from_parts(
        parts,
        Either::Left(TrackedBody::new(body, progress.clone(), max_body)),
    );

    let started = std::time::Instant::now();
    let idle_timeout = match &worker.config.listeners[ctx.listener].kind {
        ListenerKind::Http(http) => http.idle_timeout,
        ListenerKind::Tcp { .. } => cluster.request_timeout,
    };
    let sent = tokio::select! {
        sent = send(ctx, cluster_id, endpoint, request, replayable) => Ok(sent),
        timeout = progress.timed_out(cluster.request_timeout, idle_timeout) => Err(timeout),
    };
    if progress.too_large() && !matches!(sent, Ok(Ok(_))) {
        return Err(TooLarge(exchange));
    }
    Ok(match sent {
        Ok(Ok((response, upstream))) => {
            let (mut parts, body) = response.into_parts();
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
                upstream,
                cluster: cluster_id.0,
                started,
            };
            Response::from_parts(parts, ResponseBody::upstream(body, release, exchange))
        }
        Ok(Err(SendError::Connect(e))) => {
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
        Ok(Err(SendError::Reset(e))) if e.is_parse() || e.is_parse_status() => {
            debug!(worker = worker.id, upstream = %addr, "upstream answered with invalid HTTP: {e}");
            local(
                StatusCode::BAD_GATEWAY,
                "upstream sent an invalid response\n",
                exchange,
                Flag::UpstreamProtocolError,
            )
        }
        Ok(Err(SendError::Reset(e))) => {
            debug!(worker = worker.id, upstream = %addr, "upstream request failed: {e}");
            stats.shard.inc(cluster_stats.upstream_rq_reset);
            local(
                StatusCode::BAD_GATEWAY,
                "upstream reset before response\n",
                exchange,
                Flag::UpstreamReset,
            )
        }
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

/// Sends on a pooled connection when one is ready, else on a new one. A request that a pooled
/// connection could not carry (it closed first) goes once more on a new connection. An `http2`
/// cluster's requests go as streams of the worker's connection to the endpoint (`upstream_h2`).
async fn send(
    ctx: &ConnCtx,
    cluster_id: ClusterId,
    endpoint: usize,
    mut request: Request<RequestBody>,
    replayable: bool,
) -> Result<(Response<Incoming>, Upstream), SendError> {
    let worker = &ctx.worker;
    let cluster = worker.config.cluster(cluster_id);
    if cluster.protocol == UpstreamProtocol::Http2 {
        let addr = cluster.endpoints[endpoint];
        return match worker.h2.send(worker, cluster_id, addr, request).await {
            Ok((response, stream)) => Ok((response, Upstream::Http2(stream))),
            Err(upstream_h2::SendError::Connect(e)) => Err(SendError::Connect(e)),
            Err(upstream_h2::SendError::Request(e)) => Err(SendError::Reset(e)),
        };
    }
    let pool = &worker.pools[cluster_id.0];
    let http1 = |sender| Upstream::Http1 {
        pool: pool.clone(),
        endpoint,
        sender,
    };
    if let Some(mut pooled) = pool.checkout(endpoint) {
        // Kept only for a pooled connection, the one case where a request may need sending again.
        let replay: Option<(Method, Uri, HeaderMap)> = replayable.then(|| {
            (
                request.method().clone(),
                request.uri().clone(),
                request.headers().clone(),
            )
        });
        match pooled.sender.try_send_request(request).await {
            Ok(response) => return Ok((response, http1(pooled.sender))),
            Err(mut e) => {
                request = match (e.take_message(), replay) {
                    (Some(unsent), _) => unsent,
                    (None, Some((method, uri, headers))) => {
                        let mut again = Request::new(Either::Right(Empty::new()));
                        *again.method_mut() = method;
                        *again.uri_mut() = uri;
                        *again.headers_mut() = headers;
                        again
                    }
                    (None, None) => return Err(SendError::Reset(e.into_error())),
                };
                debug!(
                    worker = worker.id,
                    idle_for = ?pooled.idle_for.unwrap_or(Duration::ZERO),
                    "pooled upstream connection closed under a request; sending it again: {}",
                    e.error()
                );
                let stats = &worker.stats;
                stats
                    .shard
                    .inc(stats.ids.clusters[cluster_id.0].upstream_rq_retry);
            }
        }
    }
    let mut sender =
        upstream::connect_http1(cluster.endpoints[endpoint], cluster, worker, cluster_id.0)
            .await
            .map_err(SendError::Connect)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(SendError::Reset)?;
    Ok((response, http1(sender)))
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
