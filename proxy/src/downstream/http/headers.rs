//! What a proxy does to headers on the way through: hop-by-hop headers out, forwarding headers in.
//! Pure functions over `http` types, tested without sockets.

use std::net::IpAddr;

use http::header::{
    CONNECTION, CONTENT_TYPE, COOKIE, EXPECT, HOST, HeaderMap, HeaderName, HeaderValue, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE, VIA,
};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Uri, Version, request, response};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

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

/// Declares a gRPC response's trailers (`grpc-status`, `grpc-message`,
/// `grpc-status-details-bin`) in a `Trailer` field when the upstream did not, for an HTTP/1.1
/// client that accepts trailers: hyper sends HTTP/1.1 trailers only when the request had
/// `te: trailers`, the body is chunked, and `Trailer` names them. gRPC servers speak HTTP/2,
/// where trailers need no declaration, so they do not make one.
pub fn declare_grpc_trailers(headers: &mut HeaderMap) {
    let grpc = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t == "application/grpc"
                || t.starts_with("application/grpc+")
                || t.starts_with("application/grpc;")
        });
    if grpc && !headers.contains_key(TRAILER) {
        headers.insert(
            TRAILER,
            HeaderValue::from_static("grpc-status, grpc-message, grpc-status-details-bin"),
        );
    }
}

/// Rewrites an upstream's response for the client.
pub fn prepare_response(parts: &mut response::Parts, upstream_version: Version) {
    remove_hop_by_hop(&mut parts.headers);
    parts.headers.append(VIA, via(upstream_version));
    parts.version = Version::default();
}

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

fn via(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_10 => "1.0 baton",
        Version::HTTP_2 => "2 baton",
        Version::HTTP_3 => "3 baton",
        _ => "1.1 baton",
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    static PEER: HeaderValue = HeaderValue::from_static("192.0.2.7");

    #[test]
    fn chunked_goes_once_and_alone() {
        let te = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            check_transfer_coding(&headers)
        };
        assert_eq!(te(&[]), Ok(()));
        assert_eq!(te(&["chunked"]), Ok(()));
        assert_eq!(te(&["Chunked"]), Ok(()));
        assert_eq!(
            te(&["chunked", "chunked"]),
            Err(BadTransferCoding::ChunkedTwice)
        );
        assert_eq!(
            te(&["chunked, chunked"]),
            Err(BadTransferCoding::ChunkedTwice)
        );
        assert_eq!(te(&["gzip, chunked"]), Err(BadTransferCoding::Unsupported));
        assert_eq!(
            te(&["gzip", "chunked"]),
            Err(BadTransferCoding::Unsupported)
        );
    }

    fn downstream() -> Downstream<'static> {
        Downstream {
            peer: &PEER,
            tls: false,
        }
    }

    fn prepared(builder: request::Builder) -> (request::Parts, HeaderValue) {
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        let id = prepare_request(&mut parts, downstream());
        (parts, id)
    }

    #[test]
    fn peer_values_are_the_addresses_as_text() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "192.0.2.7",
            "255.255.255.255",
            "10.200.3.45",
            "::1",
            "2001:db8::7",
            "::ffff:192.0.2.1",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(peer_value(parsed), parsed.to_string().as_str(), "{ip}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_host_stays() {
        let (parts, _) = prepared(
            Request::get("/a?b=c")
                .header("host", "example.com")
                .header("connection", "keep-alive, x-secret, host")
                .header("keep-alive", "timeout=5")
                .header("x-secret", "1")
                .header("te", "trailers")
                .header("upgrade", "websocket")
                .header("expect", "100-continue")
                .header("x-kept", "yes"),
        );
        let h = &parts.headers;
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "upgrade",
            "expect",
        ] {
            assert!(!h.contains_key(gone), "{gone} should be removed");
        }
        assert_eq!(h["host"], "example.com");
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(parts.uri, "/a?b=c");
    }

    #[test]
    fn forwarding_headers_are_added() {
        let (parts, id) = prepared(
            Request::get("/")
                .header("x-forwarded-for", "203.0.113.1")
                .header("x-forwarded-for", "198.51.100.2")
                .header("x-forwarded-proto", "https")
                .header("via", "1.1 edge"),
        );
        let h = &parts.headers;
        assert_eq!(h["x-forwarded-for"], "203.0.113.1, 198.51.100.2, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        let via: Vec<_> = h.get_all("via").iter().collect();
        assert_eq!(via, ["1.1 edge", "1.1 baton"]);
        assert_eq!(h["x-request-id"], id);
        assert_eq!(id.len(), 36, "a generated id is a UUID: {id:?}");
    }

    #[test]
    fn request_ids_are_kept_when_sane() {
        let (_, id) = prepared(Request::get("/").header("x-request-id", "abc-123"));
        assert_eq!(id, "abc-123");
        let (parts, id) = prepared(Request::get("/").header("x-request-id", "has space"));
        assert_ne!(id, "has space");
        assert_eq!(parts.headers["x-request-id"], id);
        assert_ne!(generate_request_id(), generate_request_id());
    }

    #[test]
    fn http2_requests_get_host_from_authority_and_origin_form() {
        let (parts, _) =
            prepared(Request::get("https://example.com:8443/p?q").version(Version::HTTP_2));
        assert_eq!(parts.headers["host"], "example.com:8443");
        assert_eq!(parts.uri, "/p?q");
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers["via"], "2 baton");
    }

    #[test]
    fn http2_cookies_are_joined_for_http1() {
        let (parts, _) = prepared(
            Request::get("http://a.test/")
                .version(Version::HTTP_2)
                .header("cookie", "a=1")
                .header("cookie", "b=2"),
        );
        let cookies: Vec<_> = parts.headers.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2"]);
    }

    #[test]
    fn mirrored_requests_name_the_shadow_in_their_cluster_protocol() {
        let mut r = Request::get("/a?b")
            .header("host", "app.test:8080")
            .body(())
            .unwrap();
        for_mirror(&mut r, false, "c");
        assert_eq!(r.headers()["host"], "app.test-shadow:8080");
        assert_eq!(r.uri(), "/a?b");
        // From an HTTP/2 cluster's form to an HTTP/1.1 mirror and back.
        let mut r = Request::get("http://app.test/x").body(()).unwrap();
        for_mirror(&mut r, false, "c");
        assert_eq!(r.headers()["host"], "app.test-shadow");
        assert_eq!(r.uri(), "/x");
        for_mirror(&mut r, true, "c");
        assert_eq!(r.uri(), "http://app.test-shadow-shadow/x");
        assert!(!r.headers().contains_key("host"));
        assert_eq!(r.version(), Version::HTTP_2);
    }

    #[test]
    fn http2_upstreams_get_an_absolute_uri_and_keep_te_trailers() {
        let endpoint = "grpc-cluster";
        let builder = Request::post("/pkg.Svc/Call?x=1")
            .header("host", "grpc.test:8080")
            .header("te", "trailers")
            .header("connection", "keep-alive")
            .header("keep-alive", "timeout=5")
            .header("x-kept", "yes");
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        let trailers = accepts_trailers(&parts.headers);
        prepare_request(&mut parts, downstream());
        for_http2_upstream(&mut parts, trailers, endpoint);
        assert_eq!(parts.uri, "http://grpc.test:8080/pkg.Svc/Call?x=1");
        assert_eq!(parts.version, Version::HTTP_2);
        let h = &parts.headers;
        assert!(!h.contains_key("host"), "Host travels as :authority");
        assert!(!h.contains_key("connection") && !h.contains_key("keep-alive"));
        assert_eq!(h.get_all("te").iter().collect::<Vec<_>>(), ["trailers"]);
        assert_eq!(h["x-kept"], "yes");
        assert_eq!(h["via"], "1.1 baton");

        // Any other TE goes; without Host, the cluster's name is the authority.
        let (mut parts, ()) = Request::get("/")
            .version(Version::HTTP_10)
            .header("te", "gzip")
            .body(())
            .unwrap()
            .into_parts();
        let trailers = accepts_trailers(&parts.headers);
        assert!(!trailers);
        prepare_request(&mut parts, downstream());
        for_http2_upstream(&mut parts, trailers, endpoint);
        assert!(!parts.headers.contains_key("te"));
        assert_eq!(parts.uri, "http://grpc-cluster/");
    }

    #[test]
    fn te_trailers_is_found_among_other_codings() {
        let mut h = HeaderMap::new();
        assert!(!accepts_trailers(&h));
        h.append(TE, HeaderValue::from_static("gzip;q=0.5"));
        assert!(!accepts_trailers(&h));
        h.append(TE, HeaderValue::from_static("deflate, Trailers"));
        assert!(accepts_trailers(&h));
    }

    #[test]
    fn grpc_responses_declare_their_trailers() {
        let mut h = HeaderMap::new();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        declare_grpc_trailers(&mut h);
        assert_eq!(
            h["trailer"],
            "grpc-status, grpc-message, grpc-status-details-bin"
        );
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        h.insert(TRAILER, HeaderValue::from_static("x-own"));
        declare_grpc_trailers(&mut h);
        assert_eq!(h["trailer"], "x-own", "an upstream's own declaration stays");
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc-web"),
        );
        declare_grpc_trailers(&mut h);
        assert!(!h.contains_key("trailer"));
    }

    #[test]
    fn responses_lose_hop_by_hop_headers() {
        let (mut parts, ()) = http::Response::builder()
            .header("connection", "close")
            .header("transfer-encoding", "chunked")
            .header("content-type", "text/plain")
            .body(())
            .unwrap()
            .into_parts();
        prepare_response(&mut parts, Version::HTTP_11);
        assert!(!parts.headers.contains_key("connection"));
        assert!(!parts.headers.contains_key("transfer-encoding"));
        assert_eq!(parts.headers["content-type"], "text/plain");
        assert_eq!(parts.headers["via"], "1.1 baton");
    }
}
