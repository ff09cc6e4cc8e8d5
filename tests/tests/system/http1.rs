use std::time::{Duration, Instant};

use baton_tests::client::{self, H1, request};
use baton_tests::config::Edit;
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use baton_tests::upstream::{Origin, pattern};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{WAIT, http_config, stat};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_prefix() {
    let api = Origin::start("api").await;
    let web = Origin::start("web").await;
    let listen = free_addr();
    let _proxy = Proxy::start(&format!(
        r#"
[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
hosts = ["api.test", "*.api.test"]
cluster = "api"

[[listener.route]]
path_prefix = "/static/"
direct_response = {{ status = 200, body = "static\n", headers = {{ "cache-control" = "max-age=60" }} }}

[[listener.route]]
path_prefix = "/web"
cluster = "web"

[[cluster]]
name = "api"
endpoints = ["{}"]

[[cluster]]
name = "web"
endpoints = ["{}"]
"#,
        api.addr, web.addr
    ));
    let mut c = H1::connect(listen).await.unwrap();

    let r = c
        .send(request("GET", "api.test", "/web/x", ""))
        .await
        .unwrap();
    assert_eq!(r.text(), "upstream api\n", "the host route comes first");
    let r = c
        .send(request("GET", "v2.API.test:8080", "/", ""))
        .await
        .unwrap();
    assert_eq!(
        r.text(),
        "upstream api\n",
        "wildcard hosts match, ignoring case and port"
    );

    let r = c
        .send(request("GET", "other.test", "/static/app.js", ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "static\n");
    assert_eq!(r.header("cache-control"), Some("max-age=60"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));

    let r = c
        .send(request("GET", "other.test", "/web/page", ""))
        .await
        .unwrap();
    assert_eq!(r.text(), "upstream web\n");
    assert_eq!(r.header("x-upstream-name"), Some("web"));

    let r = c
        .send(request("GET", "other.test", "/nothing", ""))
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "no route matches this request\n");
    assert_eq!(r.header("server"), Some("baton"));

    let r = c
        .send(request("HEAD", "other.test", "/static/app.js", ""))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "HEAD gets no body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_bodies_of_every_size() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let mut c = H1::connect(listen).await.unwrap();

    for size in [0usize, 1, 1 << 20] {
        let body: Vec<u8> = (0..size).map(pattern).collect();
        let r = c
            .send(request("POST", "x.test", "/echo", body.clone()))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "POST of {size} bytes");
        assert_eq!(r.body.len(), size);
        assert!(r.body == body, "the {size}-byte body comes back intact");
    }

    let r = c.get("/bytes/1048576").await.unwrap();
    assert_eq!(r.header("content-length"), Some("1048576"));
    assert!(r.body.iter().enumerate().all(|(i, b)| *b == pattern(i)));

    let r = c.get("/chunked/200").await.unwrap();
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("content-length"), None);
    let expected: String = (0..200).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(r.text(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_chunked_request_body() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    // The second chunk goes only after the proxy has had the first: the body is streamed.
    stream.flush().await.unwrap();
    stream.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let reply = read_until(&mut stream, b"0\r\n\r\n").await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{reply}"
    );
    let body: String = reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .split("\r\n")
        .skip(1)
        .step_by(2)
        .collect();
    assert_eq!(body, "hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuses_connections_on_both_sides() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(
        &http_config(listen, admin, origin.addr).edit("concurrency = 2", "concurrency = 1"),
    );
    let mut c = H1::connect(listen).await.unwrap();
    for i in 0..20 {
        let r = c.get(&format!("/n{i}")).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None, "keep-alive stays on");
    }
    assert_eq!(origin.requests(), 20);
    assert_eq!(
        origin.connections(),
        1,
        "one pooled upstream connection served every request"
    );
    assert_eq!(stat(admin, "downstream_cx_total{listener=public}").await, 1);
    assert_eq!(
        stat(admin, "downstream_rq_2xx{listener=public,code_class=2xx}").await,
        20
    );
    assert_eq!(stat(admin, "upstream_cx_total{cluster=origin}").await, 1);
    assert_eq!(stat(admin, "upstream_rq_total{cluster=origin}").await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_pipelined_requests_in_order() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let mut stream = TcpStream::connect(listen).await.unwrap();
    // Three requests in one write; the first is the slowest, yet answers keep request order.
    stream
        .write_all(
            b"GET /slow/300 HTTP/1.1\r\nHost: x.test\r\n\r\n\
              GET /first HTTP/1.1\r\nHost: x.test\r\n\r\n\
              GET /second HTTP/1.1\r\nHost: direct.test\r\n\r\n",
        )
        .await
        .unwrap();
    let reply = read_until(&mut stream, b"direct\n").await;
    let reply = String::from_utf8_lossy(&reply);
    let slow = reply.find("slow done").expect("the slow answer");
    let first = reply.find("upstream origin").expect("the second answer");
    let direct = reply.find("HTTP/1.1 201").expect("the third answer");
    assert!(
        slow < first && first < direct,
        "answers out of order:\n{reply}"
    );
    assert_eq!(reply.matches("HTTP/1.1 ").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_forwarding_headers_and_drops_hop_by_hop_ones() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let mut c = H1::connect(listen).await.unwrap();

    let mut req = request("GET", "app.test:8443", "/headers", "");
    let h = req.headers_mut();
    h.insert("x-request-id", "req-42".parse().unwrap());
    h.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    h.insert("connection", "x-hop".parse().unwrap());
    h.insert("x-hop", "secret".parse().unwrap());
    h.insert("x-app", "kept".parse().unwrap());
    let r = c.send(req).await.unwrap();
    assert_eq!(
        r.header("via"),
        Some("1.1 baton"),
        "the response names the proxy too"
    );
    let seen = r.json();
    let header = |name: &str| {
        seen["headers"][name]
            .as_array()
            .map(|v| v[0].as_str().unwrap().to_owned())
    };
    assert_eq!(
        header("host").as_deref(),
        Some("app.test:8443"),
        "Host is preserved"
    );
    assert_eq!(
        header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("x-request-id").as_deref(), Some("req-42"));
    assert_eq!(header("via").as_deref(), Some("1.1 baton"));
    assert_eq!(header("x-app").as_deref(), Some("kept"));
    assert_eq!(
        header("x-hop"),
        None,
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(seen["version"], "HTTP/1.1");

    let r = c.get("/headers").await.unwrap();
    let generated = r.json()["headers"]["x-request-id"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        generated.len(),
        36,
        "a generated request id is a UUID: {generated}"
    );
    // The same id is in the access log line of that request.
    assert!(
        proxy.wait_for_log_file("access.log", &generated, WAIT),
        "the access log names the request id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_502_when_the_upstream_is_down() {
    let dead = free_addr();
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, dead));
    let started = Instant::now();
    let r = client::get(listen, "/").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), "upstream connect error\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refused connect fails fast"
    );
    assert_eq!(
        stat(admin, "upstream_cx_connect_fail{cluster=origin}").await,
        1
    );
    assert_eq!(
        stat(admin, "downstream_rq_5xx{listener=public,code_class=5xx}").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_504_when_the_upstream_is_slow() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let started = Instant::now();
    let r = client::get(listen, "/slow/5000").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout\n");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "took {took:?} with a 1s timeout"
    );
    assert_eq!(stat(admin, "upstream_rq_timeout{cluster=origin}").await, 1);
    // The access log names the endpoint that did not answer in time.
    assert!(proxy.wait_for_log_file("access.log", "\"GET /slow/5000 HTTP/1.1\" 504 ", WAIT));
    let log = proxy.read_file("access.log");
    let line = log.lines().find(|l| l.contains("/slow/5000")).unwrap();
    assert!(
        line.contains(&format!(" {} UT ", origin.addr)),
        "upstream and flag: {line}"
    );
    // The connection still works after a timeout.
    let r = client::get(listen, "/fine").await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_the_access_log_and_reopens_it_on_sigusr1() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let mut c = H1::connect(listen).await.unwrap();
    let mut req = request("GET", "x.test", "/logged?q=1", "");
    req.headers_mut()
        .insert("user-agent", "baton-test/1".parse().unwrap());
    c.send(req).await.unwrap();
    c.send(request("GET", "direct.test", "/", ""))
        .await
        .unwrap();

    let expected = "\"GET /logged?q=1 HTTP/1.1\" 200 16 ";
    assert!(proxy.wait_for_log_file("access.log", expected, WAIT));
    let log = proxy.read_file("access.log");
    let line = log.lines().find(|l| l.contains("/logged")).unwrap();
    assert!(line.contains(" public 127.0.0.1:"), "{line}");
    assert!(
        line.contains(&format!(" {} - ", origin.addr)),
        "upstream and flag: {line}"
    );
    assert!(line.ends_with("\"baton-test/1\""), "{line}");
    assert!(proxy.wait_for_log_file("access.log", "\"GET / HTTP/1.1\" 201 7 ", WAIT));

    // Log rotation: move the file away, signal, and the next line goes to a new file.
    std::fs::rename(
        proxy.dir().join("access.log"),
        proxy.dir().join("access.log.1"),
    )
    .unwrap();
    proxy.signal(nix::sys::signal::Signal::SIGUSR1);
    assert!(proxy.wait_for_log("access logs reopened", WAIT));
    c.get("/after-rotation").await.unwrap();
    assert!(proxy.wait_for_log_file("access.log", "/after-rotation", WAIT));
    assert!(!proxy.read_file("access.log.1").contains("/after-rotation"));
}

/// Reads from `stream` until `end` has been seen (or the stream ends).
async fn read_until(stream: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read = async {
        while !out.windows(end.len()).any(|w| w == end) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the answer arrives");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_a_slow_upstream() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&http_config(listen, admin, origin.addr));
    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x.test\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    // Longer than the 1s request timeout: the timeout starts when the upload is done.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(b"world").await.unwrap();
    let reply = String::from_utf8_lossy(&read_until(&mut stream, b"helloworld").await).into_owned();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_idle_from_the_end_of_its_last_answer() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = http_config(listen, admin, origin.addr)
        .edit(
            "access_log = \"access.log\"",
            "access_log = \"access.log\"\nidle_timeout = \"1s\"",
        )
        .edit("request_timeout = \"1s\"", "request_timeout = \"5s\"");
    let _proxy = Proxy::start(&config);
    let mut c = H1::connect(listen).await.unwrap();
    // The answer takes longer than the idle timeout; the connection is not idle meanwhile, and
    // the client may reuse it right after.
    assert_eq!(c.get("/slow/1500").await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c
        .get("/again")
        .await
        .expect("the connection was kept after the slow answer");
    assert_eq!(r.status, 200);
    assert!(
        baton_tests::wait_until(WAIT, || c.is_closed()),
        "and closed once idle for 1s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_host_and_bad_upstream_answers_get_clear_errors() {
    // An upstream that does not speak HTTP.
    let junk = tokio::net::TcpListener::bind(free_addr()).await.unwrap();
    let junk_addr = junk.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = junk.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await;
        }
    });
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, junk_addr));
    let r = client::get(listen, "/").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (502, "upstream sent an invalid response\n")
    );
    assert!(proxy.wait_for_log_file("access.log", "\"GET / HTTP/1.1\" 502 34 ", WAIT));
    assert!(proxy.read_file("access.log").contains(" UPE "));

    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let reply =
        String::from_utf8_lossy(&read_until(&mut stream, b"Host header\n").await).into_owned();
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");

    // HEAD sends no body, and the log says so.
    let mut c = H1::connect(listen).await.unwrap();
    let r = c
        .send(request("HEAD", "direct.test", "/", ""))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert!(proxy.wait_for_log_file("access.log", "\"HEAD / HTTP/1.1\" 201 0 ", WAIT));
    let head_line = proxy
        .read_file("access.log")
        .lines()
        .find(|l| l.contains("\"HEAD"))
        .unwrap()
        .to_owned();
    assert!(!head_line.contains(" DC "), "{head_line}");
}

/// An idle keep-alive connection gives its HTTP state back after a second (only its socket
/// waits for the client): it still serves the client's next request, and still closes at its
/// idle timeout and when a drain begins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_idle_past_a_second_still_serve_and_still_close() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = http_config(listen, admin, origin.addr)
        .edit(
            "access_log = \"access.log\"",
            "access_log = \"access.log\"\nidle_timeout = \"3s\"",
        )
        .edit("drain_idle_grace = \"500ms\"", "drain_idle_grace = \"2s\"");
    let mut proxy = Proxy::start(&config);

    // The client's own pause, longer than the second after which the state goes.
    let mut c = H1::connect(listen).await.unwrap();
    assert_eq!(c.get("/first").await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = c
        .get("/after-a-pause")
        .await
        .expect("the idle connection serves again");
    assert_eq!(r.text(), "upstream origin\n");
    // Pipelined bytes that arrive together with the wake-up are all served.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut raw = TcpStream::connect(listen).await.unwrap();
    raw.write_all(b"GET /a HTTP/1.1\r\nHost: x.test\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut raw, b"upstream origin\n").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    raw.write_all(
        b"GET /b HTTP/1.1\r\nHost: x.test\r\n\r\nGET /c HTTP/1.1\r\nHost: x.test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut both = String::new();
    while both.matches("upstream origin\n").count() < 2 {
        let more = read_until(&mut raw, b"upstream origin\n").await;
        assert!(!more.is_empty(), "closed after {both:?}");
        both.push_str(&String::from_utf8_lossy(&more));
    }
    assert_eq!(both.matches("HTTP/1.1 200 OK").count(), 2, "{both}");

    // A client that reads its answer slowly keeps all of it, however long it takes.
    // A small receive window, so that the end of the answer waits in the proxy.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(listen).await.unwrap();
    slow.write_all(b"GET /bytes/6000000 HTTP/1.1\r\nHost: x.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = tokio::time::timeout(WAIT, slow.read(&mut buf))
            .await
            .expect("the answer keeps coming")
            .unwrap();
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let end = end + 4;
            if got.len() - end >= 6_000_000 {
                break end;
            }
        }
    };
    assert_eq!(got.len() - head_end, 6_000_000);
    assert!(
        got[head_end..]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(i))
    );

    // Closed at the idle timeout, counted as such.
    drop(c);
    let mut c = H1::connect(listen).await.unwrap();
    assert_eq!(c.get("/last").await.unwrap().status, 200);
    let idle_from = Instant::now();
    assert!(
        baton_tests::wait_until(WAIT, || c.is_closed()),
        "closed once idle for 3s"
    );
    assert!(
        idle_from.elapsed() >= Duration::from_millis(2500),
        "closed after {:?}",
        idle_from.elapsed()
    );
    assert!(stat(admin, "downstream_cx_idle_timeout{listener=public}").await >= 1);

    // A drain closes an idle connection once the grace has passed since its last answer.
    let mut idle = H1::connect(listen).await.unwrap();
    assert_eq!(idle.get("/d").await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        baton_tests::wait_until(WAIT, || idle.is_closed()),
        "the idle connection is closed by the drain"
    );
    let status = proxy
        .wait_exit(WAIT)
        .expect("the proxy exits after the drain");
    assert!(status.success(), "{status:?}");
}

/// What an operator reads in `top` with many idle keep-alive connections: once they have been
/// idle for a second, each holds its socket and little else (hyper's state and buffers go, and
/// the worker gives the freed memory back), a few KB as with nginx rather than the ~20 KB of a
/// connection in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hold_little_memory() {
    const CONNECTIONS: usize = 1500;
    // This process holds the client side of every connection, beside the other tests'.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    let (listen, admin) = (free_addr(), free_addr());
    // One worker, warmed up below: the memory that grows is the connections', not a cold
    // worker's first allocations.
    let proxy = Proxy::start(&format!(
        r#"
concurrency = 1
[admin]
address = "{admin}"
[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
[[listener.route]]
direct_response = {{ status = 200, body = "ok\n" }}
"#
    ));
    let rss_kib = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    async fn get(c: &mut TcpStream) {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x.test\r\n\r\n")
            .await
            .unwrap();
        let answer = read_until(c, b"ok\n").await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
            "{answer:?}"
        );
    }
    let mut warm = TcpStream::connect(listen).await.unwrap();
    for _ in 0..100 {
        get(&mut warm).await;
    }
    drop(warm);
    let before = rss_kib();

    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = TcpStream::connect(listen).await.unwrap();
        get(&mut c).await;
        held.push(c);
    }
    let busy = rss_kib();
    // Under 8 KiB each once idle (about 3 KiB here; 15 to 20 KiB before the state went).
    let limit = before + 8 * CONNECTIONS as u64;
    let idle = baton_tests::wait_until(WAIT, || rss_kib() < limit);
    assert!(
        idle,
        "{CONNECTIONS} idle connections: RSS {before} KiB before, {busy} KiB just after, {} KiB \
         now (limit {limit} KiB)",
        rss_kib()
    );

    // Asleep, not gone: all still open, and they serve.
    assert_eq!(
        stat(admin, "downstream_cx_active{listener=public}").await,
        CONNECTIONS as i64
    );
    for c in held.iter_mut().step_by(50) {
        get(c).await;
    }
}

/// Half of a next request sent together with a complete one (pipelined) is held to the header
/// timeout like any request's headers: answered 408 and closed, not kept for the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_pipelined_request_is_held_to_the_header_timeout() {
    let listen = free_addr();
    let _proxy = Proxy::start(&format!(
        r#"
[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
idle_timeout = "60s"
request_header_timeout = "2s"
[[listener.route]]
direct_response = {{ status = 200, body = "ok\n" }}
"#
    ));
    let mut c = TcpStream::connect(listen).await.unwrap();
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x.test\r\n\r\nGET /b HTTP/1.1\r\nHost: x.te")
        .await
        .unwrap();
    let first = read_until(&mut c, b"ok\n").await;
    assert!(
        String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"),
        "{first:?}"
    );
    let answered = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut rest))
        .await
        .expect("closed before the idle timeout")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest:?}");
    // Due 2 s after the answer: not at once, and long before the idle timeout.
    let after = answered.elapsed();
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(10),
        "408 after {after:?}"
    );
}
