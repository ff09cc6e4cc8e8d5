//! What a proxy does to headers on the way through: hop-by-hop headers out, forwarding headers in.
//! Pure functions over `http` types, tested without sockets.

mod request;
mod response;
#[cfg(test)]
mod tests;

use http::Version;
use http::header::{
    CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, UPGRADE,
};

pub use request::{
    BadTransferCoding, Downstream, X_REQUEST_ID, accepts_trailers, check_transfer_coding,
    for_http2_upstream, for_mirror, peer_value, prepare_request,
};
pub use response::{declare_grpc_trailers, prepare_response};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the headers that concern one connection only (RFC 9110, section 7.6.1): the fixed
/// set, and every header that `Connection` names except `Host`, which a client must not be able
/// to strip this way.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds the hop-by-hop fields present (standard names compare as
    // integers); most messages have none, or only `connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name) {
            present[i] = true;
        }
    }
    if present[0] {
        // `Connection: keep-alive` / `close`, the usual values, name nothing more to remove.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|token| {
                !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .filter(|name| *name != HOST)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(*name);
        }
    }
}

/// Fields that concern one connection only (RFC 9110, 7.6.1); `connection` first.
static HOP_BY_HOP: [&HeaderName; 6] = [
    &CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &TE,
    &TRANSFER_ENCODING,
    &UPGRADE,
];

/// Our hop in a `Via` field, named with the version of the message as it reached us.
fn via(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_10 => "1.0 baton",
        Version::HTTP_2 => "2 baton",
        Version::HTTP_3 => "3 baton",
        _ => "1.1 baton",
    })
}
