use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_tests::client::{self, H1, H2};
use baton_tests::config::Edit;
use baton_tests::free_addr;
use baton_tests::proxy::Proxy;
use baton_tests::upstream::{Origin, TcpEcho};
use baton_tests::wait_until;
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{WAIT, http_config};

/// Whether a new connection to `addr` is refused.
fn refused(addr: SocketAddr) -> bool {
    matches!(
        std::net::TcpStream::connect(addr),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_and_refuses_new_connections() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut proxy = Proxy::start(&slow_ok(http_config(listen, admin, origin.addr)));
    let mut slow = H1::connect(listen).await.unwrap();
    let in_flight = tokio::spawn(async move { slow.get("/slow/1500").await });
    assert!(
        wait_until(WAIT, || origin.requests() == 1),
        "the slow request reached the origin"
    );

    proxy.signal(Signal::SIGTERM);
    assert!(
        wait_until(WAIT, || refused(listen)),
        "new connections are refused once the drain began"
    );
    let r = client::get(admin, "/ready").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (503, "DRAINING\n"));

    let r = in_flight
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow done\n");
    assert_eq!(
        r.header("connection"),
        Some("close"),
        "the client is told to reconnect"
    );
    let status = proxy
        .wait_exit(WAIT)
        .expect("the proxy exits after the drain");
    assert!(status.success(), "{status:?}");
    assert!(proxy.log().contains("drained"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_http1_connections_without_losing_a_request() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut proxy = Proxy::start(&slow_ok(http_config(listen, admin, origin.addr)));
    let mut idle = H1::connect(listen).await.unwrap();
    assert_eq!(idle.get("/a").await.unwrap().status, 200);
    let mut busy = H1::connect(listen).await.unwrap();
    assert_eq!(busy.get("/b").await.unwrap().status, 200);

    let started = Instant::now();
    proxy.signal(Signal::SIGTERM);
    assert!(
        wait_until(WAIT, || refused(listen)),
        "every worker is draining"
    );

    // A keep-alive connection in use is not closed under its client: its next answer says close.
    let r = busy
        .get("/c")
        .await
        .expect("a request on a draining connection is answered");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(wait_until(WAIT, || busy.is_closed()));
    // An idle one is closed once it has been idle for the grace period.
    assert!(
        wait_until(WAIT, || idle.is_closed()),
        "the idle connection is closed"
    );

    let status = proxy
        .wait_exit(WAIT)
        .expect("the proxy exits once its connections closed");
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "well before the 10s drain timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_http2_streams_after_goaway() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut proxy = Proxy::start(&slow_ok(http_config(listen, admin, origin.addr)));
    let h2 = H2::connect(listen).await.unwrap();
    let mut stream = h2.clone();
    let in_flight = tokio::spawn(async move { stream.get("app.test", "/slow/1500").await });
    assert!(wait_until(WAIT, || origin.requests() == 1));

    proxy.signal(Signal::SIGTERM);
    let r = in_flight
        .await
        .unwrap()
        .expect("the stream in flight completes");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow done\n");
    assert!(
        wait_until(WAIT, || h2.is_closed()),
        "the connection closes after GOAWAY"
    );
    let status = proxy.wait_exit(WAIT).expect("the proxy exits");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_sessions_run_until_the_drain_timeout() {
    let echo = TcpEcho::start().await;
    let listen = free_addr();
    let mut proxy = Proxy::start(&format!(
        r#"
drain_timeout = "1s"

[[listener]]
name = "l4"
address = "{listen}"
protocol = "tcp"
cluster = "echo"

[[cluster]]
name = "echo"
endpoints = ["{}"]
"#,
        echo.addr
    ));
    let mut session = TcpStream::connect(listen).await.unwrap();
    let mut buf = [0u8; 4];
    session.write_all(b"ping").await.unwrap();
    session.read_exact(&mut buf).await.unwrap();

    let started = Instant::now();
    proxy.signal(Signal::SIGTERM);
    assert!(wait_until(WAIT, || refused(listen)));
    // The session keeps flowing while the generation drains.
    session.write_all(b"pong").await.unwrap();
    session.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");

    let status = proxy
        .wait_exit(WAIT)
        .expect("the proxy exits at the drain timeout");
    assert!(status.success());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the drain timeout"
    );
    assert!(
        proxy.log().contains("drain timeout reached"),
        "{}",
        proxy.log()
    );
    let mut rest = Vec::new();
    let end = tokio::time::timeout(WAIT, session.read_to_end(&mut rest)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the session was closed: {end:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_at_once() {
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let mut proxy = Proxy::start(&slow_ok(http_config(listen, admin, origin.addr)));
    let mut slow = H1::connect(listen).await.unwrap();
    let in_flight = tokio::spawn(async move { slow.get("/slow/5000").await });
    assert!(wait_until(WAIT, || origin.requests() == 1));

    let started = Instant::now();
    proxy.signal(Signal::SIGINT);
    let status = proxy.wait_exit(WAIT).expect("the proxy exits");
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "SIGINT does not drain"
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the request in flight was cut"
    );
}

/// The test config with a request timeout that lets slow requests finish.
fn slow_ok(config: String) -> String {
    config.edit("request_timeout = \"1s\"", "request_timeout = \"10s\"")
}
