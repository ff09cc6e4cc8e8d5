//! Answers the proxy makes itself: a route's direct response, its own errors with a one-line
//! body that says what happened, and the circuit breakers' 503.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, SERVER};
use http::{Response, StatusCode};

use crate::config::DirectResponse;

use super::body::{Exchange, Flag, ResponseBody};

pub fn direct_response(direct: &DirectResponse, mut exchange: Exchange) -> Response<ResponseBody> {
    exchange.set_status(direct.status.as_u16());
    let mut response = Response::new(ResponseBody::full(direct.body.clone(), exchange));
    *response.status_mut() = direct.status;
    *response.headers_mut() = direct.headers.clone();
    response
}

/// A response made by the proxy itself, with a one-line body that says what happened.
pub fn local(
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

static X_BATON_OVERLOADED: http::HeaderName = http::HeaderName::from_static("x-baton-overloaded");

/// 503 from a circuit breaker; `x-baton-overloaded` names the one that tripped.
pub fn overloaded(which: &'static str, exchange: Exchange) -> Response<ResponseBody> {
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
