//! A client's request made ready for its upstream: hop-by-hop fields out, forwarding fields and
//! a request id in, the form of an HTTP/1.1 or HTTP/2 upstream, a mirror's copy; and the checks
//! of its transfer codings and `TE`.

use std::net::IpAddr;

use http::header::{
    COOKIE, EXPECT, HOST, HeaderMap, HeaderName, HeaderValue, TE, TRANSFER_ENCODING, VIA,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Uri, Version, request};

use super::{remove_hop_by_hop, via};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied request id that is passed on; a longer one is replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// What the proxy knows about the downstream side of a request.
#[derive(Debug, Clone, Copy)]
pub struct Downstream<'a> {
    /// The client's address as a header value ([`peer_value`]), made once per connection.
    pub peer: &'a HeaderValue,
    pub tls: bool,
}

/// A client's address as it goes into `x-forwarded-for`.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = peer else {
        return HeaderValue::from_str(&peer.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("-"));
    };
    // Written digit by digit: `Ipv4Addr`'s `Display` goes through the formatting machinery
    // (with padding) into a growing `String`, about 1,500 instructions, once per connection:
    // 3 % of a connection-per-request exchange (`bench/instructions`).
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        for (at_least, divisor) in [(100, 100), (10, 10), (0, 1)] {
            if octet >= at_least {
                text[len] = b'0' + octet / divisor % 10;
                len += 1;
            }
        }
    }
    HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Rewrites a client's request for an HTTP/1.1 upstream (see [`for_http2_upstream`] for HTTP/2)
/// and returns its request id.
///
/// Hop-by-hop headers go; `Host` stays as the client sent it (or comes from the `:authority` of
/// an HTTP/2 request); `x-forwarded-for` gets the client's address appended; `x-forwarded-proto`
/// says how the client reached us; `x-request-id` is kept when sane, generated otherwise; `via`
/// gets our hop. `Expect` goes too: the proxy answers `100 Continue` itself when it reads the body.
pub fn prepare_request(parts: &mut request::Parts, downstream: Downstream<'_>) -> HeaderValue {
    let headers = &mut parts.headers;
    remove_hop_by_hop(headers);
    headers.remove(EXPECT);
    // Room for the fields added below at once: a client's map is sized to what it sent, and
    // growing it field by field rehashed it twice per connection.
    headers.reserve(5);
    if parts.version == Version::HTTP_2 && headers.get_all(COOKIE).iter().nth(1).is_some() {
        // HTTP/2 may split cookies over several fields; HTTP/1.1 wants one (RFC 9113, 8.2.3).
        let joined: Vec<&[u8]> = headers
            .get_all(COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
            headers.insert(COOKIE, value);
        }
    }

    if let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(HOST, host);
    }

    let forwarded_for = match joined(headers, &X_FORWARDED_FOR) {
        Some(previous) => {
            let peer = downstream.peer.to_str().unwrap_or("-");
            HeaderValue::from_str(&format!("{previous}, {peer}")).ok()
        }
        None => Some(downstream.peer.clone()),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if downstream.tls { "https" } else { "http" }),
    );

    let request_id = match headers.get(&X_REQUEST_ID) {
        Some(id) if is_sane_request_id(id) => id.clone(),
        _ => {
            let id = generate_request_id();
            headers.insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    };

    headers.append(VIA, via(parts.version));
    parts.uri = origin_form(&parts.uri);
    parts.version = Version::HTTP_11;
    request_id
}

/// Whether a request's `TE` accepts trailers (`te: trailers`, which gRPC clients send and gRPC
/// servers require). Read before [`prepare_request`], which removes `TE` with the other
/// hop-by-hop headers.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let name = coding.split(';').next().unwrap_or("");
            name.trim().eq_ignore_ascii_case("trailers")
        })
}

/// What is wrong with an HTTP/1.1 request's `Transfer-Encoding`, when something is. hyper
/// frames the body by it (chunked must come last, or hyper answers 400 itself) and the proxy
/// sends the body on with framing of its own, so a coding beside chunked would be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTransferCoding {
    /// `chunked` applied more than once (RFC 9112, section 6.1: a sender must not): 400.
    ChunkedTwice,
    /// A coding other than `chunked` (`gzip, chunked`): 501 (RFC 9112, section 6.1).
    Unsupported,
}

/// Checks a request's transfer codings: `chunked` once, and nothing else.
pub fn check_transfer_coding(headers: &HeaderMap) -> Result<(), BadTransferCoding> {
    let mut chunked = 0;
    for value in headers.get_all(TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return Err(BadTransferCoding::Unsupported);
        };
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case("chunked") {
                return Err(BadTransferCoding::Unsupported);
            }
            chunked += 1;
        }
    }
    if chunked > 1 {
        return Err(BadTransferCoding::ChunkedTwice);
    }
    Ok(())
}

/// Turns a request made by [`prepare_request`] into one for an HTTP/2 upstream: HTTP/2, its URI
/// absolute (`http`, and the authority from `Host`, else `fallback`, the cluster's name), no `Host`
/// field (it travels as `:authority`), and `te: trailers` when the client accepts trailers (the
/// only `TE` HTTP/2 allows). Connection-specific fields are gone already.
pub fn for_http2_upstream(parts: &mut request::Parts, trailers: bool, fallback: &str) {
    let headers = &mut parts.headers;
    let authority = headers
        .remove(HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .unwrap_or_else(|| {
            Authority::try_from(fallback).unwrap_or_else(|_| Authority::from_static("localhost"))
        });
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    let path = path_of(&parts.uri);
    if let Some(uri) = absolute(authority, path) {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_2;
}

/// A URI's path and query (`/` when it has none).
fn path_of(uri: &Uri) -> PathAndQuery {
    uri.path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

/// `http://<authority><path>`, as an HTTP/2 request's URI.
fn absolute(authority: Authority, path: PathAndQuery) -> Option<Uri> {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(path);
    Uri::from_parts(uri).ok()
}

/// Makes a copy of a request (already prepared for its own cluster) fit for the mirror
/// cluster: `-shadow` appended to its host (as Envoy does, so that the shadow service can tell),
/// and the form of its cluster's protocol: `Host` and an origin-form URI for HTTP/1.1, an
/// absolute URI for HTTP/2.
pub fn for_mirror<B>(request: &mut http::Request<B>, http2: bool, cluster: &str) {
    let host = request
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
    let shadow = host.map(|h| {
        if h.starts_with('[') {
            // An IPv6 literal names no service to tell apart.
            return h;
        }
        match h.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                format!("{name}-shadow:{port}")
            }
            _ => format!("{h}-shadow"),
        }
    });
    let path = path_of(request.uri());
    if http2 {
        request.headers_mut().remove(HOST);
        let authority = shadow
            .and_then(|s| Authority::try_from(s.as_str()).ok())
            .or_else(|| Authority::try_from(cluster).ok())
            .unwrap_or_else(|| Authority::from_static("localhost"));
        if let Some(uri) = absolute(authority, path) {
            *request.uri_mut() = uri;
        }
        *request.version_mut() = Version::HTTP_2;
    } else {
        if let Some(value) = shadow.and_then(|s| HeaderValue::from_str(&s).ok()) {
            request.headers_mut().insert(HOST, value);
        }
        *request.uri_mut() = Uri::from(path);
        *request.version_mut() = Version::HTTP_11;
    }
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = values.next()?;
    let mut out = first.to_owned();
    for v in values {
        out.push_str(", ");
        out.push_str(v);
    }
    Some(out)
}

fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(_) if uri.scheme().is_none() && uri.authority().is_none() => uri.clone(),
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

fn is_sane_request_id(id: &HeaderValue) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
        && id.as_bytes().iter().all(|b| b.is_ascii_graphic())
}

/// A random (version 4) UUID, as Envoy generates for `x-request-id`.
pub fn generate_request_id() -> HeaderValue {
    let bytes = fastrand::u128(..).to_le_bytes();
    let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(uuid.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}
