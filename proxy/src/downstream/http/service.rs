//! One HTTP request: checked, routed, then answered here (a direct response, a refusal, a rate
//! limit) or proxied to a cluster (`proxy`).

use std::convert::Infallible;
use std::rc::Rc;

use http::header::{CONNECTION, HOST, HeaderValue, LOCATION, USER_AGENT};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;

use crate::config::{ListenerKind, RouteAction};
use crate::stats;

use super::authority;
use super::body::{Exchange, Flag, LogRecord, ResponseBody};
use super::ctx::ConnCtx;
use super::headers::{self, BadTransferCoding, X_REQUEST_ID};
use super::local::{direct_response, local};
use super::path::{self, Normalized};
use super::proxy::{TooLarge, proxy};

static X_BATON_EPOCH: http::HeaderName = http::HeaderName::from_static("x-baton-epoch");

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
    // While draining, ask the client to reconnect (to the next generation) instead of closing
    // the connection under it: the only way to drain HTTP/1.1 without losing a request.
    let close = !ctx.h2
        && status != StatusCode::SWITCHING_PROTOCOLS
        && worker.drain.is_draining()
        && worker.drain.close_this_answer();
    last_fields(&ctx, &mut response, close);
    Ok(response)
}

/// The fields every answer ends with: `Connection: close` when `close` (the caller has
/// checked the connection is HTTP/1.1), and the epoch header when the config asks for it.
#[inline]
fn last_fields(ctx: &ConnCtx, response: &mut Response<ResponseBody>, close: bool) {
    if close {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(epoch) = &ctx.worker.epoch_header {
        response
            .headers_mut()
            .insert(X_BATON_EPOCH.clone(), epoch.clone());
    }
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
    last_fields(ctx, &mut response, !ctx.h2);
    response
}

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
    let close = !ctx.h2 && response.status() != StatusCode::TEMPORARY_REDIRECT;
    if close {
        ctx.activity.linger.set(true);
    }
    last_fields(ctx, &mut response, close);
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
