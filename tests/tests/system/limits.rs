use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_tests::client::{H1, get, request};
use baton_tests::config::Edit;
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use baton_tests::upstream::Origin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{WAIT, stat};

/// Sends `bytes` on a new connection and reads until the proxy closes it.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("the proxy closes the connection");
    String::from_utf8_lossy(&got).into_owned()
}

/// An origin, and a proxy in front of it with `extra` in its listener table.
async fn start(extra: &str) -> (Origin, Proxy, SocketAddr, SocketAddr) {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&listener_config(listen, admin, origin.addr, extra));
    (origin, proxy, listen, admin)
}

fn listener_config(
    listen: SocketAddr,
    admin: SocketAddr,
    origin: SocketAddr,
    extra: &str,
) -> String {
    format!(
        r#"
concurrency = 2

[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
{extra}

[[listener.route]]
path_prefix = "/direct"
direct_response = {{ status = 200, body = "direct\n" }}

[[listener.route]]
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{origin}"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_at_the_header_timeout_while_others_are_served() {
    let (_origin, _proxy, listen, admin) =
        start("request_header_timeout = \"1s\"\nidle_timeout = \"30s\"").await;

    // Starts a request, then sends one more header byte every 100 ms and never ends it.
    let slowloris = tokio::spawn(async move {
        // The clock starts before the connect: the proxy's starts when it accepts, which can
        // be before `connect` returns here.
        let started = Instant::now();
        let mut stream = TcpStream::connect(listen).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: slow.test\r\nx-slow: ")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while started.elapsed() < WAIT {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stream.write_all(b"a").await.is_err() {
                        break;
                    }
                }
            }
        }
        (
            started.elapsed(),
            String::from_utf8_lossy(&got).into_owned(),
        )
    });
    // Connects and sends nothing.
    let silent = tokio::spawn(async move {
        let started = Instant::now();
        let mut stream = TcpStream::connect(listen).await.unwrap();
        let answer = read_to_close(&mut stream).await;
        (started.elapsed(), answer)
    });

    // Meanwhile a normal client is served, and a keep-alive client that stays idle for longer
    // than the header timeout is not cut off: idle time is not header time.
    let mut busy = H1::connect(listen).await.unwrap();
    let mut idle = H1::connect(listen).await.unwrap();
    assert_eq!(idle.get("/direct").await.unwrap().status, 200);
    let idle_since = Instant::now();
    let mut served = 0;
    while !slowloris.is_finished() {
        let r = busy.send(request("GET", "x.test", "/", "")).await.unwrap();
        assert_eq!(r.status, 200);
        served += 1;
    }
    while idle_since.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = idle.get("/direct").await;
    assert_eq!(
        r.expect("an idle keep-alive connection outlives the header timeout")
            .status,
        200
    );

    let (took, answer) = slowloris.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "the slow client is answered 408, got: {answer:?}"
    );
    assert!(answer.contains("connection: close"));
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "cut off at the 1 s header timeout, not before, and not at the 30 s idle timeout: {took:?}"
    );
    assert!(served > 0, "other clients are served meanwhile");

    let (took, answer) = silent.await.unwrap();
    assert_eq!(
        answer, "",
        "a client that sent nothing is closed without an answer"
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");

    assert_eq!(
        stat(admin, "downstream_rq_header_timeout{listener=public}").await,
        2,
        "the slow client and the silent one"
    );
    assert_eq!(
        stat(admin, "downstream_rq_4xx{listener=public,code_class=4xx}").await,
        1,
        "the 408 is counted as a 4xx answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_over_the_size_or_count_limit_get_431() {
    let (origin, _proxy, listen, admin) =
        start("max_request_header_size = \"1KiB\"\nmax_request_headers = 10").await;

    let big = format!("x-big: {}\r\n", "a".repeat(2000));
    let many: String = (0..12).map(|i| format!("x-h{i}: v\r\n")).collect();
    let few: String = (0..8).map(|i| format!("x-h{i}: v\r\n")).collect();
    for (headers, status, what) in [
        (big, "431", "2 KB of headers over a 1 KiB limit"),
        (many, "431", "14 header fields over a limit of 10"),
        (few, "200", "a request within both limits is proxied"),
    ] {
        let request =
            format!("GET / HTTP/1.1\r\nhost: x.test\r\nconnection: close\r\n{headers}\r\n");
        let answer = exchange(listen, request.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {answer:?}"
        );
    }

    assert_eq!(
        stat(admin, "downstream_rq_headers_too_large{listener=public}").await,
        2
    );
    assert_eq!(
        origin.requests(),
        1,
        "refused requests never reach the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let (origin, _proxy, listen, admin) = start("max_request_body = \"1KiB\"").await;

    let mut c = H1::connect(listen).await.unwrap();
    let r = c
        .send(request("POST", "x.test", "/collect", vec![b'a'; 1024]))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "a body of exactly the limit passes");
    assert_eq!(r.text(), "received 1024 bytes\n");

    // A declared length over the limit: refused before anything goes upstream.
    let r = c
        .send(request("POST", "x.test", "/collect", vec![b'a'; 1025]))
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(origin.requests(), 1);

    // The same on a direct-response route.
    let mut c = H1::connect(listen).await.unwrap();
    let r = c
        .send(request("POST", "x.test", "/direct", vec![b'a'; 4096]))
        .await
        .unwrap();
    assert_eq!(r.status, 413);

    // A chunked body with no declared length is cut off once it passes the limit.
    let chunks: String = (0..4)
        .map(|_| format!("400\r\n{}\r\n", "b".repeat(1024)))
        .collect();
    let answer = exchange(
        listen,
        format!(
            "POST /collect HTTP/1.1\r\nhost: x.test\r\ntransfer-encoding: chunked\r\n\r\n{chunks}0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 413 "),
        "4 KiB chunked over a 1 KiB limit: {answer:?}"
    );

    // A client that sends a large body without waiting for an answer still reads the 413:
    // the proxy reads and drops what comes after it (a lingering close) instead of resetting.
    let mut stream = TcpStream::connect(listen).await.unwrap();
    stream
        .write_all(b"POST /collect HTTP/1.1\r\nhost: x.test\r\ncontent-length: 8388608\r\n\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let upload = tokio::spawn(async move {
        let chunk = vec![b'c'; 64 * 1024];
        for _ in 0..128 {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, reader.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413 "),
        "the 413 arrives whole: {read:?} {answer:?}"
    );
    upload.abort();

    assert_eq!(
        stat(admin, "downstream_rq_too_large{listener=public}").await,
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limits_are_refused_with_503_and_counted() {
    let origin = Origin::start("origin").await;
    let (listen, other, admin) = (free_addr(), free_addr(), free_addr());
    let _proxy = Proxy::start(&format!(
        r#"
concurrency = 2
max_connections = 3

[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
max_connections = 2

[[listener.route]]
cluster = "origin"

[[listener]]
name = "other"
address = "{other}"
protocol = "http"

[[listener.route]]
cluster = "origin"

[[cluster]]
name = "origin"
endpoints = ["{}"]
"#,
        origin.addr
    ));

    // Two connections fill the listener's limit (each served once, so surely accepted).
    let mut first = H1::connect(listen).await.unwrap();
    let mut second = H1::connect(listen).await.unwrap();
    for c in [&mut first, &mut second] {
        assert_eq!(
            c.send(request("GET", "x.test", "/", ""))
                .await
                .unwrap()
                .status,
            200
        );
    }
    let answer = exchange(listen, b"GET / HTTP/1.1\r\nhost: x.test\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 503 "),
        "a third connection on a listener limited to 2: {answer:?}"
    );
    assert!(answer.contains("connection limit reached"), "{answer}");
    assert_eq!(
        stat(admin, "downstream_cx_overflow{listener=public}").await,
        1
    );

    // The generation's limit of 3 counts every listener.
    let mut third = H1::connect(other).await.unwrap();
    assert_eq!(
        third
            .send(request("GET", "x.test", "/", ""))
            .await
            .unwrap()
            .status,
        200
    );
    let answer = exchange(other, b"GET / HTTP/1.1\r\nhost: x.test\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
    assert_eq!(
        stat(admin, "downstream_global_cx_overflow{listener=other}").await,
        1
    );

    // A closed connection gives its place back.
    drop(first);
    let served = baton_tests::wait_until(WAIT, || {
        baton_tests::blocking(|| {
            let mut s = std::net::TcpStream::connect(listen).unwrap();
            std::io::Write::write_all(
                &mut s,
                b"GET / HTTP/1.1\r\nhost: x.test\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
            let mut answer = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut answer);
            answer.starts_with("HTTP/1.1 200 ")
        })
    });
    assert!(
        served,
        "a place freed by a closed connection is taken again"
    );
    drop((second, third));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_a_waiting_limit_clients_queue_until_a_connection_closes() {
    let (_origin, _proxy, listen, admin) =
        start("max_connections = 1\nmax_connections_action = \"wait\"").await;

    let mut holder = H1::connect(listen).await.unwrap();
    assert_eq!(holder.get("/direct").await.unwrap().status, 200);

    // The kernel completes the handshake; the proxy does not accept while the limit is full.
    let mut waiting = TcpStream::connect(listen).await.unwrap();
    waiting
        .write_all(b"GET /direct HTTP/1.1\r\nhost: x.test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buf)).await;
    assert!(early.is_err(), "no answer while the only place is taken");

    drop(holder);
    let answer = read_to_close(&mut waiting).await;
    assert!(
        answer.starts_with("HTTP/1.1 200 "),
        "served once the place frees: {answer:?}"
    );
    assert_eq!(
        stat(admin, "downstream_cx_overflow{listener=public}").await,
        0
    );
}

/// A field of `/proc/<pid>/status` or a column of `/proc/<pid>/limits`, as a number.
fn proc_number(pid: u32, file: &str, label: &str, column: usize) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label} in /proc/{pid}/{file}:\n{text}"));
    let value = line[label.len()..].split_whitespace().nth(column).unwrap();
    value.parse().unwrap_or_else(|_| panic!("{label}: {value}"))
}

/// A generation makes room for its connections' descriptors before its workers start: growing
/// the table later, with several threads, blocks the thread that needs the room for an RCU
/// grace period (5 to 20 ms), and a new generation under load hit it several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_sizes_its_descriptor_table_before_its_workers_start() {
    for (limit, wanted) in [("max_connections = 1000", 2 * 1000 + 256), ("", 16_384)] {
        let origin = Origin::start("origin").await;
        let (listen, admin) = (free_addr(), free_addr());
        let config = listener_config(listen, admin, origin.addr, "")
            .edit("concurrency = 2", &format!("concurrency = 2\n{limit}"));
        let proxy = Proxy::start(&config);
        let open_files = proc_number(proxy.pid(), "limits", "Max open files", 0);
        let slots = proc_number(proxy.pid(), "status", "FDSize:", 0);
        let expected = open_files.min(wanted);
        assert!(
            expected > 64 && slots >= expected,
            "[{limit}] descriptor table of {slots} slots, expected at least {expected} \
             (descriptor limit {open_files})"
        );
        // The table's size alone could come from this test process, whose descriptors (other
        // tests hold thousands) a child's table is sized to: the proxy says it grew it.
        assert!(
            proxy.wait_for_log("descriptor table grown to hold", WAIT),
            "[{limit}] no word of the descriptor table in the log:\n{}",
            proxy.log()
        );
        assert_eq!(get(listen, "/direct").await.text(), "direct\n");
    }
}
