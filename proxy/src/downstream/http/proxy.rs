//! A request proxied to a cluster: its headers prepared for the upstream, its body kept when it
//! may be sent again, the tries (`retry`) within the request's timeout, a copy to the mirror
//! (`mirror`), and the response or the error answered to the client.

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{CONNECTION, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use tracing::debug;

use crate::cluster::{self, ClusterRequest, Outcome};
use crate::config::{ClusterId, ClusterRoute, ListenerKind, UpstreamProtocol};
use crate::upstream::connect::ConnectError;
use crate::upstream::h1;
use crate::upstream::request::{BodyProgress, RequestTimeout, TrackedBody};
use crate::upstream::send::SendError;

use super::body::{self, Exchange, Flag, Release, ResponseBody};
use super::ctx::ConnCtx;
use super::headers::{self, Downstream};
use super::local::{local, overloaded};
use super::mirror::shadow;
use super::retry::{RETRY_BUFFER_LIMIT, Template, Tries, TryError, is_idempotent};
use super::upgrade;

/// A request body went past `max_request_body` before the upstream answered.
pub struct TooLarge(pub Exchange);

/// Sends `request` to the route's cluster (its tries, its timeout, a copy to the mirror) and
/// makes the client's answer from what came back. A body that goes past `max_body` comes back
/// as [`TooLarge`], for the service to answer.
pub async fn proxy(
    ctx: &ConnCtx,
    route: &ClusterRoute,
    request: Request<Incoming>,
    mut exchange: Exchange,
    max_body: Option<u64>,
) -> Result<Response<ResponseBody>, TooLarge> {
    let worker = &ctx.worker;
    let cluster_id = route.target.pick(fastrand::u64(..));
    let cluster = worker.config.cluster(cluster_id);
    let handle = &ctx.upstreams.clusters[cluster_id.0].handle;
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
        tokio::task::spawn_local(shadow(
            worker.clone(),
            ctx.upstreams.clone(),
            mirror.cluster,
            template.clone(),
        ));
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
        // failing host for outlier detection too, and the access log names it.
        handle.report(host.host(), Outcome::LocalFailure, cluster.outlier.as_ref());
        if let Some(log) = exchange.log_mut() {
            log.upstream = Some(host.host().address);
        }
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
    error: TryError,
    addr: Option<SocketAddr>,
    exchange: Exchange,
) -> Response<ResponseBody> {
    let worker = &ctx.worker;
    let stats = &worker.stats;
    let cluster_stats = &stats.ids.clusters[cluster_id.0];
    let addr = addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let error = match error {
        TryError::PerTryTimeout => {
            stats.shard.inc(cluster_stats.upstream_rq_timeout);
            return local(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout (per try)\n",
                exchange,
                Flag::UpstreamTimeout,
            );
        }
        TryError::NoHost => {
            stats.shard.inc(cluster_stats.upstream_cx_none_healthy);
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                exchange,
                Flag::NoHealthyUpstream,
            );
        }
        TryError::Send(error) => error,
    };
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
        SendError::Http1(h1::Error::RequestBody(e)) => body_failed(ctx, e.as_ref(), exchange),
        SendError::Reset(e) if e.is_user() => body_failed(ctx, &e, exchange),
        SendError::Reset(_) | SendError::Http1(_) => {
            let (invalid, what): (bool, &dyn std::fmt::Display) = match &error {
                SendError::Reset(e) => (e.is_parse() || e.is_parse_status(), e),
                SendError::Http1(h1::Error::Invalid(why)) => (true, why),
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
        SendError::Overflow(which) => overloaded(which, exchange),
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
