use std::net::IpAddr;

use http::header::{CONTENT_TYPE, TRAILER};
use http::{Request, request};

use super::request::generate_request_id;
use super::*;

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
