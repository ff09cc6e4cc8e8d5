//! HTTP/1.1 upgrades: a real WebSocket client and server (tokio-tungstenite) talking through
//! baton, over cleartext and TLS; upgrades refused by the upstream or by the route; `h2c`; a
//! tunnel that idles; a tunnel open across a reload.

use std::net::SocketAddr;
use std::time::Duration;

use baton_tests::client::{H1, request};
use baton_tests::config::Edit;
use baton_tests::proxy::Proxy;
use baton_tests::supervisor::Supervisor;
use baton_tests::tls::{self, TestCa};
use baton_tests::upstream::{Origin, pattern};
use baton_tests::websocket::{self, WsEcho, next_message, round_trip};
use baton_tests::{free_addr, wait_until, wait_until_async};
use futures_util::StreamExt;
use http::{StatusCode, Version};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};

use crate::{WAIT, stat};

/// A listener whose `/plain` and `/headers` go to an HTTP origin, `/closed` to the WebSocket
/// server with no upgrade allowed, and everything else to the WebSocket server (`route_extra`
/// added to that route).
fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    ws: SocketAddr,
    origin: SocketAddr,
    route_extra: &str,
) -> String {
    format!(
        r#"
instance = "ws"
concurrency = 2
epoch_header = true
drain_timeout = "30s"
drain_idle_grace = "500ms"

[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"
access_log = "access.log"

[[listener.route]]
path_prefix = "/plain"
cluster = "origin"

[[listener.route]]
path_exact = "/headers"
cluster = "origin"

[[listener.route]]
path_prefix = "/closed"
cluster = "ws"
upgrades = []

[[listener.route]]
path_prefix = "/"
cluster = "ws"
{route_extra}

[[cluster]]
name = "ws"
endpoints = ["{ws}"]

[[cluster]]
name = "origin"
endpoints = ["{origin}"]
"#
    )
}

fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

/// Waits until the admin's stat `name` reads `value`.
async fn stat_becomes(admin: SocketAddr, name: &str, value: i64) {
    let reached = wait_until_async(WAIT, || async { stat(admin, name).await == value }).await;
    assert!(
        reached,
        "{name} is {}, not {value}",
        stat(admin, name).await
    );
}

const TOTAL: &str = "downstream_cx_upgrades_total{listener=public}";
const ACTIVE: &str = "downstream_cx_upgrades_active{listener=public}";
const IDLE: &str = "downstream_cx_upgrades_idle_timeout{listener=public}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_messages_flow_both_ways_through_baton() {
    let echo = WsEcho::start().await;
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&config(listen, admin, echo.addr, origin.addr, ""));

    let (mut ws, response) = websocket::connect(listen, "/chat").await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["upgrade"], "websocket");
    assert_eq!(response.headers()["via"], "1.1 baton");
    // The upgrade went upstream on purpose, with the client's WebSocket fields.
    let seen = echo.last_handshake();
    assert_eq!(seen["connection"], "upgrade");
    assert_eq!(seen["upgrade"], "websocket");
    assert!(seen.contains_key("sec-websocket-key"), "{seen:?}");
    assert_eq!(seen["sec-websocket-version"], "13");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["via"], "1.1 baton");

    let text = Message::text("hello through baton");
    assert_eq!(round_trip(&mut ws, text.clone()).await, text);
    // Large enough to take many chunks each way.
    let binary = Message::binary(bytes(300_000));
    assert_eq!(round_trip(&mut ws, binary.clone()).await, binary);
    let ping = Message::Ping(b"are you there"[..].into());
    assert_eq!(
        round_trip(&mut ws, ping).await,
        Message::Pong(b"are you there"[..].into())
    );
    assert_eq!(stat(admin, TOTAL).await, 1);
    assert_eq!(stat(admin, ACTIVE).await, 1);

    // The close handshake, then the server closes the connection (RFC 6455, 7.1.1).
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    ws.close(Some(bye.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::Close(Some(bye)));
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("the connection ends after the close handshake");
    assert!(end.is_none(), "{end:?}");
    // The server's half-close reached the client; the tunnel ends when the client closes too.
    assert_eq!(stat(admin, ACTIVE).await, 1);
    drop(ws);
    stat_becomes(admin, ACTIVE, 0).await;

    // One line for the whole tunnel, with its bytes each way.
    let line = "\"GET /chat HTTP/1.1\" 101 ";
    assert!(proxy.wait_for_log_file("access.log", line, WAIT));
    let log = proxy.read_file("access.log");
    let entry = log.lines().find(|l| l.contains(line)).unwrap();
    let fields: Vec<&str> = entry.split(' ').collect();
    let at = fields.iter().position(|f| *f == "101").unwrap();
    let to_client: u64 = fields[at + 1].parse().unwrap();
    let from_client: u64 = entry
        .rsplit_once(" sent=")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no sent= in {entry}"));
    assert!(to_client > 300_000 && from_client > 300_000, "{entry}");
    assert_eq!(fields[at + 3], echo.addr.to_string(), "{entry}");
    assert_eq!(fields[at + 4], "-", "{entry}");

    // A server that speaks first: its bytes may come with the 101.
    let (mut ws, _) = websocket::connect(listen, "/greet").await;
    assert_eq!(next_message(&mut ws).await, Message::text("hello"));
    assert_eq!(round_trip(&mut ws, text.clone()).await, text);
    assert_eq!(stat(admin, TOTAL).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls_flows_both_ways() {
    let echo = WsEcho::start().await;
    let ca = TestCa::new();
    let leaf = ca.leaf(&["app.test"]);
    let listen = free_addr();
    let config = format!(
        r#"
[[listener]]
name = "tls"
address = "{listen}"
protocol = "http"
access_log = "access.log"

[[listener.tls.certificate]]
cert = "app.pem"
key = "app.key"

[[listener.route]]
cluster = "ws"

[[cluster]]
name = "ws"
endpoints = ["{}"]
"#,
        echo.addr
    );
    let proxy = Proxy::start_with_files(
        &config,
        &[("app.pem", &leaf.cert_pem), ("app.key", &leaf.key_pem)],
    );
    let stream = tls::connect(listen, ca.client_config(&[b"http/1.1"]), "app.test")
        .await
        .unwrap();
    let (mut ws, response) = websocket::handshake(stream, "app.test", "/secure")
        .await
        .expect("a WebSocket over TLS");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(echo.last_handshake()["x-forwarded-proto"], "https");
    let text = Message::text("wss");
    assert_eq!(round_trip(&mut ws, text.clone()).await, text);
    let binary = Message::binary(bytes(200_000));
    assert_eq!(round_trip(&mut ws, binary.clone()).await, binary);
    ws.close(None).await.unwrap();
    assert!(matches!(next_message(&mut ws).await, Message::Close(_)));
    let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
    drop(ws);
    assert!(proxy.wait_for_log_file("access.log", "\"GET /secure HTTP/1.1\" 101 ", WAIT));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_idle_past_its_timeout_is_closed_and_counted() {
    let echo = WsEcho::start().await;
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let proxy = Proxy::start(&config(
        listen,
        admin,
        echo.addr,
        origin.addr,
        "upgrade_idle_timeout = \"2s\"",
    ));
    let (mut ws, _) = websocket::connect(listen, "/quiet").await;
    // Busy for longer than the timeout: traffic keeps the tunnel open.
    for i in 0..15 {
        let text = Message::text(format!("tick {i}"));
        assert_eq!(round_trip(&mut ws, text.clone()).await, text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stat(admin, IDLE).await, 0);
    assert_eq!(stat(admin, ACTIVE).await, 1);

    // Then nothing either way: closed, without a close handshake.
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("the idle tunnel is closed");
    assert!(
        matches!(
            end,
            None | Some(Err(Error::Protocol(_)
                | Error::Io(_)
                | Error::ConnectionClosed))
        ),
        "{end:?}"
    );
    stat_becomes(admin, IDLE, 1).await;
    stat_becomes(admin, ACTIVE, 0).await;
    assert_eq!(
        stat(admin, "downstream_cx_active{listener=public}").await,
        0
    );
    assert!(proxy.wait_for_log_file("access.log", " SI ", WAIT));
    assert!(
        proxy
            .read_file("access.log")
            .contains("\"GET /quiet HTTP/1.1\" 101 "),
        "{}",
        proxy.read_file("access.log")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_are_ordinary_answers() {
    let echo = WsEcho::start().await;
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&config(listen, admin, echo.addr, origin.addr, ""));

    // The upstream refuses the handshake: its answer reaches the client as it is.
    let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
    match websocket::handshake(stream, "app.test", "/refuse").await {
        Err(Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            // tungstenite reads the body as it comes, here chunked: the upstream sent it to
            // the close, and baton passed it on with a framing of its own.
            let body = response.body().clone().unwrap_or_default();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("no WebSocket here\n"), "{body}");
        }
        other => panic!("expected the upstream's 403, got {other:?}"),
    }

    // An upstream that ignores the upgrade answers as usual; the client's connection carries
    // on, and the upstream's is not used again.
    let mut h1 = H1::connect(listen).await.unwrap();
    let mut upgrade = request("GET", "app.test", "/headers", "");
    upgrade
        .headers_mut()
        .insert("connection", "Upgrade".parse().unwrap());
    upgrade
        .headers_mut()
        .insert("upgrade", "websocket".parse().unwrap());
    let r = h1.send(upgrade).await.unwrap();
    assert_eq!((r.status, r.version), (StatusCode::OK, Version::HTTP_11));
    let seen = r.json();
    assert_eq!(seen["headers"]["connection"][0], "upgrade");
    assert_eq!(seen["headers"]["upgrade"][0], "websocket");
    let r = h1.get("/plain/next").await.unwrap();
    assert_eq!(r.text(), "upstream origin\n");
    assert_eq!(
        origin.connections(),
        2,
        "the connection that carried an upgrade request is not pooled"
    );

    // A protocol the route does not allow, and a route that allows none: 403 from baton,
    // nothing upstream.
    let before = echo.connections();
    for (path, protocol) in [("/chat", "foo/1"), ("/closed", "websocket")] {
        let mut offer = request("GET", "app.test", path, "");
        offer
            .headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        offer
            .headers_mut()
            .insert("upgrade", protocol.parse().unwrap());
        let r = h1.send(offer).await.unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text());
        assert!(r.text().starts_with("upgrade refused: "), "{}", r.text());
    }
    let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
    match websocket::handshake(stream, "app.test", "/closed").await {
        Err(Error::Http(response)) => assert_eq!(response.status(), StatusCode::FORBIDDEN),
        other => panic!("expected 403, got {other:?}"),
    }
    assert_eq!(echo.connections(), before);
    assert_eq!(stat(admin, TOTAL).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_ignored_and_served_as_http1() {
    let echo = WsEcho::start().await;
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&config(listen, admin, echo.addr, origin.addr, ""));
    let mut h1 = H1::connect(listen).await.unwrap();
    // As curl --http2 offers it, and with HTTP2-Settings not named by Connection.
    for connection in ["Upgrade, HTTP2-Settings", "Upgrade"] {
        let mut offer = request("GET", "app.test", "/headers", "");
        let headers = offer.headers_mut();
        headers.insert("connection", connection.parse().unwrap());
        headers.insert("upgrade", "h2c".parse().unwrap());
        headers.insert(
            "http2-settings",
            "AAMAAABkAAQCAAAAAAIAAAAA".parse().unwrap(),
        );
        let r = h1.send(offer).await.unwrap();
        assert_eq!((r.status, r.version), (StatusCode::OK, Version::HTTP_11));
        let seen = r.json();
        for field in ["upgrade", "http2-settings", "connection"] {
            assert!(
                seen["headers"].get(field).is_none(),
                "{connection}: the upstream saw {field}: {seen}"
            );
        }
    }
    // The connection is still HTTP/1.1.
    let r = h1.get("/plain/after").await.unwrap();
    assert_eq!((r.status, r.version), (StatusCode::OK, Version::HTTP_11));
    assert_eq!(stat(admin, TOTAL).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_open_across_a_reload_keeps_working_until_it_ends() {
    let echo = WsEcho::start().await;
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let supervisor = Supervisor::start(&config(listen, admin, echo.addr, origin.addr, ""));
    let (mut ws, response) = websocket::connect(listen, "/long").await;
    assert_eq!(response.headers()["x-baton-epoch"], "0");
    let text = Message::text("before the reload");
    assert_eq!(round_trip(&mut ws, text.clone()).await, text);

    let out = supervisor.reload();
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    // The old generation drains with the tunnel open, and it carries on.
    for i in 0..5 {
        let text = Message::text(format!("after the reload {i}"));
        assert_eq!(round_trip(&mut ws, text.clone()).await, text);
    }
    let binary = Message::binary(bytes(100_000));
    assert_eq!(round_trip(&mut ws, binary.clone()).await, binary);
    let states: Vec<String> = supervisor
        .generations()
        .into_iter()
        .map(|(epoch, _, state)| format!("{epoch} {state}"))
        .collect();
    assert_eq!(states, ["0 draining", "1 active"]);
    // New WebSockets go to the new generation.
    let (mut fresh, response) = websocket::connect(listen, "/new").await;
    assert_eq!(response.headers()["x-baton-epoch"], "1");
    assert_eq!(round_trip(&mut fresh, text.clone()).await, text);

    // When the old tunnel ends, so does the old generation.
    ws.close(None).await.unwrap();
    assert!(matches!(next_message(&mut ws).await, Message::Close(_)));
    drop(ws);
    assert!(
        wait_until(WAIT, || supervisor.generations().len() == 1),
        "{:?}",
        supervisor.generations()
    );
    let text = Message::text("still there");
    assert_eq!(round_trip(&mut fresh, text.clone()).await, text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_generation_keeps_a_tunnel_until_the_drain_deadline() {
    let echo = WsEcho::start().await;
    let origin = Origin::start("origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = config(listen, admin, echo.addr, origin.addr, "")
        .edit("drain_timeout = \"30s\"", "drain_timeout = \"2s\"");
    let mut proxy = Proxy::start(&config);
    let (mut ws, _) = websocket::connect(listen, "/late").await;
    let text = Message::text("before the drain");
    assert_eq!(round_trip(&mut ws, text.clone()).await, text);

    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    // The drain began: the listen socket is closed (run alone, the proxy holds it itself).
    let refused = || {
        matches!(
            std::net::TcpStream::connect(listen),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    };
    assert!(wait_until(WAIT, refused), "{}", proxy.log());
    let text = Message::text("while draining");
    assert_eq!(round_trip(&mut ws, text.clone()).await, text);
    // At the deadline the tunnel is closed, as a tcp session is, and the proxy exits.
    let end = tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("the tunnel is closed at the drain deadline");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    let status = proxy.wait_exit(WAIT).expect("the proxy exits");
    assert!(status.success(), "{status:?}");
    let log = proxy.read_file("access.log");
    let line = log
        .lines()
        .find(|l| l.contains("\"GET /late HTTP/1.1\" 101 "))
        .unwrap_or_else(|| panic!("no line for the tunnel in:\n{log}"));
    assert!(line.contains(" SC "), "{line}");
}
