//! HTTP/1.1 as upstreams speak it, byte for byte: every body framing, interim answers,
//! connections that close, and answers that are broken. The upstream here writes its answers as
//! raw bytes, so that each case is exactly what a real server sends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use baton_tests::client::{H1, request};
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{WAIT, http_config, stat};

/// An upstream that answers each request with the bytes its path names, and keeps every request
/// it received (head and body, as they came).
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<String>>>,
}

/// The answer to a path, and whether the upstream closes the connection after it.
fn answer(path: &str) -> (&'static [u8], bool) {
    match path {
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 1\r\n\r\n",
            false,
        ),
        "/interim" => (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
        ),
        "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/to-close" => (
            b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nread until the close",
            true,
        ),
        "/says-close" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbye",
            true,
        ),
        "/conflicting" => (
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
            true,
        ),
        "/cut" => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", true),
        // Closed after the answer without a word, as an upstream's idle timeout would.
        "/closes-idle" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true),
        _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes", false),
    }
}

impl Scripted {
    async fn start() -> Scripted {
        let listener = TcpListener::bind(free_addr()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (count, log) = (connections.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, log.clone()));
            }
        });
        Scripted {
            addr,
            connections,
            received,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// The last request received, head and body.
    fn last(&self) -> String {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

async fn serve(mut stream: TcpStream, log: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    for served in 0.. {
        let Some(head_end) = read_until(&mut stream, &mut buf, 0, b"\r\n\r\n").await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let body_end = if head.contains("transfer-encoding: chunked") {
            match read_until(&mut stream, &mut buf, head_end, b"0\r\n\r\n").await {
                Some(end) => end,
                None => return,
            }
        } else {
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.trim().parse().unwrap());
            while buf.len() < head_end + length {
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            }
            head_end + length
        };
        log.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&buf[..body_end]).into_owned());
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        buf.drain(..body_end);
        if path.starts_with("/once") && served > 0 {
            // Takes a second request on its connection, then closes without an answer: the
            // race of a request sent just as an upstream's keep-alive timeout closes.
            return;
        }
        let (bytes, close) = answer(&path);
        if stream.write_all(bytes).await.is_err() || close {
            return;
        }
    }
}

/// Reads until `end` appears after `from`; the offset just past it.
async fn read_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    from: usize,
    end: &[u8],
) -> Option<usize> {
    loop {
        if let Some(at) = buf[from..].windows(end.len()).position(|w| w == end) {
            return Some(from + at + end.len());
        }
        if !read_more(stream, buf).await {
            return None;
        }
    }
}

/// Appends what the stream brings next; `false` at its end.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut more = [0u8; 4096];
    match stream.read(&mut more).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&more[..n]);
            true
        }
    }
}

/// A scripted upstream and a proxy in front of it: the upstream, the proxy, its listen and
/// admin addresses.
async fn start() -> (Scripted, Proxy, SocketAddr, SocketAddr) {
    let upstream = Scripted::start().await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&http_config(listen, admin, upstream.addr));
    (upstream, proxy, listen, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_framing_an_upstream_uses_reaches_the_client() {
    let (upstream, _proxy, listen, _) = start().await;
    let mut c = H1::connect(listen).await.unwrap();

    let r = c.get("/chunked").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "hello world"));
    let r = c.get("/interim").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "ok"),
        "interim answers are passed over"
    );
    let r = c.get("/empty").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (204, ""));
    let r = c.get("/chunked").await.unwrap();
    assert_eq!(r.text(), "hello world");
    assert_eq!(
        upstream.connections(),
        1,
        "one upstream connection carried every keep-alive answer"
    );

    let r = c.get("/to-close").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "read until the close"),
        "an HTTP/1.0 body that runs to the close"
    );
    let r = c.get("/says-close").await.unwrap();
    assert_eq!(r.text(), "bye");
    assert_eq!(
        r.header("connection"),
        None,
        "the upstream's close is its own"
    );
    let r = c.get("/chunked").await.unwrap();
    assert_eq!(r.text(), "hello world");
    assert_eq!(
        upstream.connections(),
        3,
        "connections that ended with their answer were not used again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_answers_are_502_or_cut_off() {
    let (_upstream, proxy, listen, _) = start().await;
    let mut c = H1::connect(listen).await.unwrap();
    let r = c.get("/conflicting").await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (502, "upstream sent an invalid response\n")
    );
    assert!(proxy.wait_for_log_file("access.log", "\"GET /conflicting HTTP/1.1\" 502 ", WAIT));

    // A body that stops short: the client must not take it for complete.
    let mut c = H1::connect(listen).await.unwrap();
    assert!(
        c.get("/cut").await.is_err(),
        "a body cut off upstream is cut off for the client"
    );
    assert!(proxy.wait_for_log_file("access.log", "\"GET /cut HTTP/1.1\" 200 ", WAIT));
    let line = proxy
        .read_file("access.log")
        .lines()
        .find(|l| l.contains("/cut"))
        .unwrap()
        .to_owned();
    assert!(line.contains(" UR "), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_in_the_pool_costs_no_request() {
    let (upstream, _proxy, listen, _) = start().await;
    let mut c = H1::connect(listen).await.unwrap();
    // Each answer's connection is closed by the upstream right after it, without notice: the
    // next request must not be lost to it.
    for i in 0..20 {
        let r = c.get("/closes-idle").await.unwrap();
        assert_eq!(
            (r.status.as_u16(), r.text().as_str()),
            (200, "ok"),
            "request {i}"
        );
    }
    assert_eq!(upstream.connections(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_upstream_framed_as_http1_1() {
    let (upstream, _proxy, listen, _) = start().await;
    let mut c = H1::connect(listen).await.unwrap();

    c.get("/get").await.unwrap();
    let sent = upstream.last().to_lowercase();
    assert!(sent.starts_with("get /get http/1.1\r\n"), "{sent}");
    assert!(
        !sent.contains("content-length") && !sent.contains("transfer-encoding"),
        "{sent}"
    );

    c.send(request("POST", "test.local", "/post", ""))
        .await
        .unwrap();
    let sent = upstream.last().to_lowercase();
    assert!(sent.contains("\r\ncontent-length: 0\r\n"), "{sent}");

    c.send(request("PUT", "test.local", "/put", "hello"))
        .await
        .unwrap();
    let sent = upstream.last().to_lowercase();
    assert!(
        sent.contains("\r\ncontent-length: 5\r\n") && sent.ends_with("\r\n\r\nhello"),
        "{sent}"
    );

    // A body of unknown size (the client's chunked upload) goes chunked.
    let mut raw = TcpStream::connect(listen).await.unwrap();
    raw.write_all(
        b"POST /upload HTTP/1.1\r\nhost: test.local\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"yes") {
        let n = tokio::time::timeout(WAIT, raw.read(&mut buf))
            .await
            .expect("the answer arrives")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let sent = upstream.last().to_lowercase();
    assert!(
        sent.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{sent}"
    );
    assert!(!sent.contains("content-length"), "{sent}");
    let body = &sent[sent.find("\r\n\r\n").unwrap() + 4..];
    let decoded: String = body
        .split("\r\n")
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, data)| data)
        .collect();
    assert_eq!(decoded, "abcde", "{body:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_pooled_connection_dropped_unanswered_is_sent_again_only_if_idempotent() {
    let (upstream, _proxy, listen, admin) = start().await;
    let mut c = H1::connect(listen).await.unwrap();
    assert_eq!(c.get("/once").await.unwrap().status, 200);
    // The pooled connection takes this GET and closes unanswered: it goes again on a new one.
    let r = c.get("/once-more").await.unwrap();
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "yes"));
    assert_eq!(upstream.connections(), 2);
    assert_eq!(stat(admin, "upstream_rq_retry{cluster=origin}").await, 1);
    // A POST may have been acted on: it is not sent twice.
    let r = c
        .send(request("POST", "test.local", "/once-posted", "data"))
        .await
        .unwrap();
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (502, "upstream reset before response\n")
    );
    assert_eq!(upstream.connections(), 2, "the POST was not sent again");
    assert_eq!(stat(admin, "upstream_rq_retry{cluster=origin}").await, 1);
}
