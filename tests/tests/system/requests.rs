//! Requests as an attacker writes them, byte for byte: paths that would pass a `path_prefix`
//! route as one path and reach the backend as another, authorities that are two or none, and
//! request bodies whose chunked framing is broken.

use std::net::SocketAddr;

use baton_tests::client::{H2, Reply};
use baton_tests::config::Edit;
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use baton_tests::upstream::Origin;
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{WAIT, stat};

/// One answer read off a raw connection: its head and its (content-length) body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// Reads one answer from `stream`.
async fn read_answer(stream: &mut TcpStream) -> Answer {
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        let head_end = loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = stream.read(&mut buf).await.expect("the answer can be read");
            assert!(
                n > 0,
                "closed before an answer: {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&got[..head_end]).into_owned();
        let mut answer = Answer {
            status: head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no status in {head:?}")),
            head,
            body: String::new(),
        };
        let length: usize = answer
            .header("content-length")
            .map_or(0, |l| l.parse().expect("a content length"));
        while got.len() < head_end + length {
            let n = stream.read(&mut buf).await.expect("the body can be read");
            assert!(n > 0, "closed within the body");
            got.extend_from_slice(&buf[..n]);
        }
        answer.body = String::from_utf8_lossy(&got[head_end..head_end + length]).into_owned();
        answer
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the answer arrives")
}

/// Sends `request` as it is on a new connection and reads the answer.
async fn send_raw(addr: SocketAddr, request: &[u8]) -> (Answer, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let answer = read_answer(&mut stream).await;
    (answer, stream)
}

/// A GET of `target` with `Host: x.test`, on a new connection.
async fn get_raw(addr: SocketAddr, target: &str) -> Answer {
    let request = format!("GET {target} HTTP/1.1\r\nHost: x.test\r\n\r\n");
    send_raw(addr, request.as_bytes()).await.0
}

/// Whether the proxy closes `stream` (nothing more comes, then the end).
async fn closes(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await,
        Ok(Ok(0))
    )
}

/// An HTTP/2 GET of `uri` (absolute: its authority is the `:authority`), with a `Host` field
/// when given.
async fn h2_get(c: &mut H2, uri: &str, host: Option<&str>) -> Reply {
    let mut request = Request::get(uri);
    if let Some(host) = host {
        request = request.header("host", host);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    c.send(request).await.expect("an HTTP/2 answer")
}

/// `/public/` goes to the origin and everything else is forbidden: the route table of a site
/// whose backend also serves `/admin/`.
fn public_only(listen: SocketAddr, admin: SocketAddr, origin: SocketAddr, extra: &str) -> String {
    format!(
        r#"
concurrency = 1
[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
access_log = "access.log"
{extra}

[[listener.route]]
path_prefix = "/public/"
cluster = "origin"

[[listener.route]]
direct_response = {{ status = 403, body = "forbidden\n" }}

[[cluster]]
name = "origin"
endpoints = ["{origin}"]
"#
    )
}

/// Item: a path with `..`, `%2e%2e` or `..%2f` passed the `/public/` route and reached the
/// backend's `/admin/`. Paths are normalised before routing and the backend gets the
/// normalised path; an encoded slash or a bad percent-encoding is refused. The query is the
/// application's and is not touched; the access log keeps the target as the client sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_before_routing() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&public_only(listen, admin, origin.addr, ""));

    for target in [
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "/public/.%2E/admin/x",
        "/public/a/../../admin/x",
        "/public/./../admin/x",
    ] {
        let a = get_raw(listen, target).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (403, "forbidden\n"),
            "{target}"
        );
    }
    let a = get_raw(listen, "/public/..%2fadmin/x").await;
    assert_eq!(a.status, 400, "an encoded slash is refused by default");
    assert!(a.body.contains("path_with_escaped_slashes"), "{}", a.body);
    assert_eq!(a.header("connection"), Some("close"));
    let a = get_raw(listen, "/public/%zz").await;
    assert_eq!(a.status, 400);
    assert!(a.body.contains("invalid percent-encoding"), "{}", a.body);
    assert_eq!(origin.requests(), 0, "nothing of that reached the backend");

    let a = get_raw(listen, "/public/./a/../b%7e//c%41?q=%2e%2e/../x//y").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("x-upstream-uri"),
        Some("/public/b~/cA?q=%2e%2e/../x//y"),
        "the backend gets the normalised path and the query as it was"
    );
    let a = get_raw(listen, "/public/plain.txt?x=1").await;
    assert_eq!(a.header("x-upstream-uri"), Some("/public/plain.txt?x=1"));

    // HTTP/2: the same for `:path`.
    let mut c = H2::connect(listen).await.unwrap();
    for path in ["/public/../admin/x", "/public/%2e%2e/admin/x"] {
        let r = h2_get(&mut c, &format!("http://x.test{path}"), None).await;
        assert_eq!(r.status, 403, "HTTP/2 {path}");
    }
    let r = h2_get(&mut c, "http://x.test/public/..%2Fadmin", None).await;
    assert_eq!(r.status, 400);
    let r = h2_get(&mut c, "http://x.test/public/a/./b/%2e%2e/c", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-upstream-uri"),
        Some("/public/a/c"),
        "HTTP/2 path normalised"
    );

    // Counted as the client's: 4xx downstream, nothing upstream.
    assert_eq!(
        stat(admin, "downstream_rq_4xx{listener=public,code_class=4xx}").await,
        10
    );
    assert_eq!(stat(admin, "upstream_rq_total{cluster=origin}").await, 3);
    assert!(proxy.wait_for_log_file(
        "access.log",
        "\"GET /public/../admin/x HTTP/1.1\" 403 ",
        WAIT
    ));
    assert!(proxy.wait_for_log_file("access.log", "\"GET /public/%zz HTTP/1.1\" 400 ", WAIT));
    let log = proxy.read_file("access.log");
    let line = log.lines().find(|l| l.contains("/public/%zz")).unwrap();
    assert!(line.contains(" DPE "), "{line}");
}

/// The knobs, one listener each: an encoded slash kept (and slashes not merged), decoded and
/// forwarded, decoded and redirected; and normalisation off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalisation_follows_the_listener_settings() {
    let origin = Origin::start("origin").await;
    let admin = free_addr();
    let listeners = [
        (
            "keep",
            "path_with_escaped_slashes = \"keep\"\nmerge_slashes = false",
        ),
        (
            "forward",
            "path_with_escaped_slashes = \"unescape_and_forward\"",
        ),
        (
            "redirect",
            "path_with_escaped_slashes = \"unescape_and_redirect\"",
        ),
        ("raw", "normalize_path = false"),
    ]
    .map(|(name, settings)| (name, free_addr(), settings));
    let mut config = format!(
        "concurrency = 1\n[admin]\naddress = \"{admin}\"\n[[cluster]]\nname = \"origin\"\nendpoints = [\"{}\"]\n",
        origin.addr
    );
    for (name, addr, settings) in &listeners {
        config.push_str(&format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"{addr}\"\nprotocol = \"http\"\n{settings}\n\
             [[listener.route]]\npath_prefix = \"/public/\"\ncluster = \"origin\"\n\
             [[listener.route]]\ndirect_response = {{ status = 403, body = \"forbidden\\n\" }}\n"
        ));
    }
    let _proxy = Proxy::start(&config);
    let [keep, forward, redirect, raw] = listeners.map(|(_, addr, _)| addr);

    let a = get_raw(keep, "/public/..%2fadmin/x").await;
    assert_eq!(a.status, 200, "kept: one segment `..%2fadmin`");
    assert_eq!(a.header("x-upstream-uri"), Some("/public/..%2fadmin/x"));
    let a = get_raw(keep, "/public//x/../y").await;
    assert_eq!(a.header("x-upstream-uri"), Some("/public//y"));

    let a = get_raw(forward, "/public/..%2fadmin/x").await;
    assert_eq!(a.status, 403, "decoded, then normalised to /admin/x");
    let a = get_raw(forward, "/public/a%2Fb%5Cc").await;
    assert_eq!(a.header("x-upstream-uri"), Some("/public/a/b/c"));

    let a = get_raw(redirect, "/public/a%2Fb/../c?q=%2F").await;
    assert_eq!(a.status, 307);
    assert_eq!(a.header("location"), Some("/public/a/c?q=%2F"));
    let a = get_raw(redirect, "/public/a/../c").await;
    assert_eq!(a.header("x-upstream-uri"), Some("/public/c"));

    let a = get_raw(raw, "/public/../admin/x").await;
    assert_eq!(
        (a.status, a.header("x-upstream-uri")),
        (200, Some("/public/../admin/x")),
        "normalize_path = false forwards the path as it came"
    );
}

/// Item: two `Host` fields were routed by the first and both forwarded; userinfo of an
/// absolute-form target went into the upstream's `Host`; an invalid `Host` was forwarded. Each
/// is now 400 (RFC 9112, 3.2; RFC 9110, 4.2.4), and so, over HTTP/2, are userinfo or an invalid
/// `:authority`, and a `Host` that names another host than `:authority` (RFC 9113, 8.3.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_has_one_valid_authority() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&public_only(listen, admin, origin.addr, ""));

    for (what, request) in [
        (
            "two Host fields",
            "GET /public/x HTTP/1.1\r\nHost: good.test\r\nHost: evil.test\r\n\r\n",
        ),
        (
            "userinfo in an absolute-form target",
            "GET http://user:pw@evil.example:444/public/x HTTP/1.1\r\nHost: good.test\r\n\r\n",
        ),
        (
            "a Host that is not one",
            "GET /public/x HTTP/1.1\r\nHost: a b/c@d\r\n\r\n",
        ),
        (
            "a Host with userinfo",
            "GET /public/x HTTP/1.1\r\nHost: evil.example@good.test\r\n\r\n",
        ),
        (
            "a port that is not one",
            "GET /public/x HTTP/1.1\r\nHost: good.test:abc\r\n\r\n",
        ),
    ] {
        let (a, mut stream) = send_raw(listen, request.as_bytes()).await;
        assert_eq!(a.status, 400, "{what}: {}", a.body);
        assert!(a.body.starts_with("bad request: "), "{what}: {}", a.body);
        assert!(closes(&mut stream).await, "{what}: the connection closes");
    }
    assert_eq!(origin.requests(), 0, "none reached the backend");

    // What is valid still passes; an absolute-form target's authority wins over Host
    // (RFC 9112, 3.2.2).
    let a = get_raw(listen, "/public/x").await;
    assert_eq!(a.status, 200);
    let request = "GET http://good.test:81/public/x HTTP/1.1\r\nHost: other.test\r\n\r\n";
    let (a, _) = send_raw(listen, request.as_bytes()).await;
    assert_eq!(a.status, 200);
    let request = "GET /public/x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n";
    let (a, _) = send_raw(listen, request.as_bytes()).await;
    assert_eq!(a.status, 200);

    // HTTP/2.
    let mut c = H2::connect(listen).await.unwrap();
    let r = h2_get(&mut c, "http://user:pw@evil.example:444/public/x", None).await;
    assert_eq!(r.status, 400, "userinfo in :authority");
    let r = h2_get(&mut c, "http://good.test:abc/public/x", None).await;
    assert_eq!(r.status, 400, "an invalid :authority");
    let r = h2_get(&mut c, "http://good.test/public/x", Some("evil.test")).await;
    assert_eq!(r.status, 400, ":authority and Host disagree");
    let r = h2_get(&mut c, "http://good.test/public/x", Some("GOOD.test:80")).await;
    assert_eq!(r.status, 200, ":authority and Host agree");
    assert_eq!(origin.requests(), 4);

    assert_eq!(
        stat(admin, "downstream_rq_4xx{listener=public,code_class=4xx}").await,
        8
    );
}

/// Item: a client's malformed chunked body was answered 502 "upstream reset" and counted as
/// an upstream reset. It is the client's fault: 400, counted downstream; the upstream
/// connection the body was being written to is closed (it is mid-request), not reused, not
/// counted as a reset and not reported to outlier detection. Chunked twice is 400 before
/// anything goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_body_is_the_clients_fault() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = crate::http_config(listen, admin, origin.addr)
        .edit("concurrency = 2", "concurrency = 1")
        .edit(
            "request_timeout = \"1s\"",
            "request_timeout = \"5s\"\noutlier_detection = { consecutive_gateway_failure = 1, consecutive_5xx = 1 }",
        );
    let proxy = Proxy::start(&config);
    // A pooled connection for the first broken body to go on.
    let (a, _) = send_raw(listen, b"GET /warm HTTP/1.1\r\nHost: x.test\r\n\r\n").await;
    assert_eq!(a.status, 200);
    assert_eq!(origin.connections(), 1);

    let broken: [(&str, &[u8]); 5] = [
        (
            "a chunk size that is no number",
            b"zz\r\nhello\r\n0\r\n\r\n",
        ),
        ("a negative chunk size", b"-1\r\nhello\r\n0\r\n\r\n"),
        (
            "a chunk size of 20 hex digits",
            b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ),
        ("data longer than its chunk", b"3\r\nhello\r\n0\r\n\r\n"),
        ("a chunk without its CRLF", b"5\r\nhelloX0\r\n\r\n"),
    ];
    for (what, body) in broken {
        // `/collect` reads the whole body before answering: the proxy is writing it upstream
        // when it breaks.
        let mut request =
            b"POST /collect HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        request.extend_from_slice(body);
        let (a, mut stream) = send_raw(listen, &request).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (400, "bad request: the request body's framing is invalid\n"),
            "{what}"
        );
        assert_eq!(a.header("connection"), Some("close"), "{what}");
        assert!(closes(&mut stream).await, "{what}: the connection closes");
    }
    for (what, fields) in [
        (
            "chunked twice",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "chunked, chunked",
            "Transfer-Encoding: chunked, chunked\r\n",
        ),
    ] {
        let request = format!(
            "POST /collect HTTP/1.1\r\nHost: x.test\r\n{fields}\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let (a, mut stream) = send_raw(listen, request.as_bytes()).await;
        assert_eq!(a.status, 400, "{what}");
        assert!(
            a.body.contains("chunked more than once"),
            "{what}: {}",
            a.body
        );
        assert!(closes(&mut stream).await, "{what}: the connection closes");
    }

    // A coding beside chunked would be lost on the way (the body is framed again upstream):
    // 501, as RFC 9112 (6.1) says for a coding the server does not implement.
    let request = "POST /collect HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (a, _) = send_raw(listen, request.as_bytes()).await;
    assert_eq!(a.status, 501, "{}", a.body);
    // What hyper itself refuses (a coding that does not end in chunked, a request line that
    // is none) is counted as a 4xx too.
    for request in [
        "POST /collect HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        "GET /a b HTTP/1.1\r\nHost: x.test\r\n\r\n",
    ] {
        let (a, _) = send_raw(listen, request.as_bytes()).await;
        assert_eq!(a.status, 400, "{request:?}");
    }

    // Every broken body's upstream connection was closed: none is used again, and the next
    // request gets a new one and its answer.
    let (a, _) = send_raw(listen, b"GET /after HTTP/1.1\r\nHost: x.test\r\n\r\n").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        origin.requests(),
        1 + 5 + 1,
        "chunked twice never went upstream"
    );
    assert_eq!(origin.connections(), 1 + 4 + 1);

    let counted = baton_tests::wait_until_async(WAIT, || async {
        stat(admin, "downstream_rq_4xx{listener=public,code_class=4xx}").await == 9
    })
    .await;
    assert!(
        counted,
        "4xx: {}",
        stat(admin, "downstream_rq_4xx{listener=public,code_class=4xx}").await
    );
    assert_eq!(
        stat(admin, "downstream_rq_5xx{listener=public,code_class=5xx}").await,
        1,
        "the 501 alone"
    );
    assert_eq!(stat(admin, "upstream_rq_reset{cluster=origin}").await, 0);
    assert_eq!(
        stat(admin, "outlier_ejections_total{cluster=origin}").await,
        0
    );
    assert!(baton_tests::wait_until(WAIT, || {
        proxy
            .read_file("access.log")
            .matches("\"POST /collect HTTP/1.1\" 400 ")
            .count()
            == 7
    }));
    let log = proxy.read_file("access.log");
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("POST /collect"))
        .collect();
    assert!(
        refused.len() == 8 && refused.iter().all(|l| l.contains(" DPE ")),
        "every refused body is the client's protocol error, none an upstream reset:\n{log}"
    );
}
