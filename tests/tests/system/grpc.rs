use std::net::SocketAddr;

use baton_tests::client::{H1, H2, Reply};
use baton_tests::free_addr;
use baton_tests::grpc::{self, FAIL, FAIL_MESSAGE, GrpcServer, Number, Text};
use baton_tests::proxy::Proxy;
use baton_tests::upstream::Origin;
use bytes::Bytes;
use http::{Request, Version};
use http_body_util::Full;
use tonic::Code;

use crate::{WAIT, stat};

/// One worker (so that every request shares its upstream connections), an h2c-capable HTTP
/// listener, and the cluster `up` speaking HTTP/2 to `upstream`.
fn h2_cluster_config(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"
instance = "test"
concurrency = 1

[admin]
address = "{admin}"

[[listener]]
name = "public"
address = "{listen}"
protocol = "http"

[[listener.route]]
cluster = "up"

[[cluster]]
name = "up"
endpoints = ["{upstream}"]
protocol = "http2"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_passes_through_to_an_http2_cluster() {
    let server = GrpcServer::start().await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&h2_cluster_config(listen, admin, server.addr));
    let mut client = grpc::client(listen, "grpc.test").await;

    // Unary, with metadata both ways.
    let mut request = tonic::Request::new(Text {
        text: "hello".into(),
    });
    request
        .metadata_mut()
        .insert("x-test-tag", "tag-1".parse().unwrap());
    let response = within(client.echo(request)).await.expect("Echo succeeds");
    assert_eq!(response.get_ref().text, "hello");
    assert_eq!(
        response
            .metadata()
            .get("x-seen-tag")
            .map(|v| v.to_str().unwrap()),
        Some("tag-1"),
        "the request's metadata reached the server"
    );

    // Unary error: the status and its message come through intact.
    let status = within(client.echo(Text { text: FAIL.into() }))
        .await
        .expect_err("Echo(\"fail\") fails");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), FAIL_MESSAGE);

    // Server streaming: every message in order, then an OK status with the server's trailers.
    let mut stream = within(client.count(Number { value: 100 }))
        .await
        .expect("Count starts")
        .into_inner();
    let mut numbers = Vec::new();
    while let Some(number) = within(stream.message()).await.expect("Count goes on") {
        numbers.push(number.value);
    }
    assert_eq!(numbers, (1..=100).collect::<Vec<u64>>());
    let trailers = within(stream.trailers())
        .await
        .expect("Count ends with OK")
        .expect("Count ends with trailers");
    assert_eq!(
        trailers.get("x-count-total").map(|v| v.to_str().unwrap()),
        Some("100"),
        "a response trailer reached the client: {trailers:?}"
    );

    // Client streaming.
    let numbers = (1..=10).map(|value| Number { value });
    let sum = within(client.sum(tonic::codegen::tokio_stream::iter(numbers)))
        .await
        .expect("Sum succeeds");
    assert_eq!(sum.get_ref().value, 55);

    // A second client connection: all of it went over one upstream connection.
    let mut other = grpc::client(listen, "grpc.test").await;
    let response = within(other.echo(Text {
        text: "again".into(),
    }))
    .await
    .expect("Echo on a second connection");
    assert_eq!(response.get_ref().text, "again");
    assert_eq!(
        server.connections(),
        1,
        "one upstream connection, multiplexed"
    );
    assert_eq!(stat(admin, "upstream_cx_total{cluster=up}").await, 1);
    assert_eq!(stat(admin, "upstream_cx_active{cluster=up}").await, 1);
    assert_eq!(stat(admin, "upstream_rq_total{cluster=up}").await, 5);
}

/// `f`'s output, which must come within [`WAIT`].
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .expect("an answer in time")
}

/// A request as an HTTP/1.1 client sends it, with `host` and extra headers.
fn h1_request(
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Full::new(body.into())).unwrap()
}

async fn send(h1: &mut H1, request: Request<Full<Bytes>>) -> Reply {
    tokio::time::timeout(WAIT, h1.send(request))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_reach_an_http2_cluster_over_one_connection() {
    let origin = Origin::start_h2("h2-origin").await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&h2_cluster_config(listen, admin, origin.addr));
    let mut h1 = H1::connect(listen).await.unwrap();

    let r = send(
        &mut h1,
        h1_request(
            "GET",
            "app.test:9",
            "/headers?q=1",
            &[("te", "trailers"), ("x-kept", "yes")],
            "",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.version, Version::HTTP_11);
    assert_eq!(
        r.header("via"),
        Some("2 baton"),
        "the upstream spoke HTTP/2"
    );
    let seen = r.json();
    assert_eq!(seen["version"], "HTTP/2.0");
    assert_eq!(
        seen["uri"], "http://app.test:9/headers?q=1",
        "Host became :authority"
    );
    assert!(seen["headers"].get("host").is_none(), "{seen}");
    assert_eq!(seen["headers"]["te"][0], "trailers");
    assert_eq!(seen["headers"]["x-kept"][0], "yes");
    assert_eq!(seen["headers"]["via"][0], "1.1 baton");

    // Any other TE is the client's hop only.
    let r = send(
        &mut h1,
        h1_request("GET", "app.test", "/headers", &[("te", "gzip")], ""),
    )
    .await;
    assert!(r.json()["headers"].get("te").is_none(), "{}", r.text());

    // A request body, there and back.
    let body: Vec<u8> = (0..100_000).map(baton_tests::upstream::pattern).collect();
    let r = send(
        &mut h1,
        h1_request("POST", "app.test", "/echo", &[], body.clone()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo"), Some("1"));
    assert!(r.body == body, "the body came back whole");

    // 20 requests at once, each held by the origin until all 20 are there: they are in flight
    // together, on one upstream connection.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut h1 = H1::connect(listen).await.unwrap();
        clients.push(tokio::spawn(async move {
            send(&mut h1, h1_request("GET", "app.test", "/gate/20", &[], "")).await
        }));
    }
    for client in clients {
        let r = client.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "gate open\n");
    }
    assert_eq!(origin.requests(), 23);
    assert_eq!(
        origin.connections(),
        1,
        "one upstream connection, multiplexed"
    );
    assert_eq!(stat(admin, "upstream_cx_total{cluster=up}").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_trailers_reach_http1_clients_that_accept_them() {
    let server = GrpcServer::start().await;
    let (listen, admin) = (free_addr(), free_addr());
    let _proxy = Proxy::start(&h2_cluster_config(listen, admin, server.addr));
    let mut h1 = H1::connect(listen).await.unwrap();
    let grpc_headers = [("content-type", "application/grpc"), ("te", "trailers")];
    let echo = |headers: &[(&str, &str)]| {
        h1_request(
            "POST",
            "grpc.test",
            "/baton.test.Echo/Echo",
            headers,
            grpc::frame(&Text { text: "hi".into() }),
        )
    };

    // With `te: trailers`: baton declares gRPC's trailers, and hyper sends them chunked.
    let r = send(&mut h1, echo(&grpc_headers)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("trailer"),
        Some("grpc-status, grpc-message, grpc-status-details-bin")
    );
    let texts: Vec<Text> = grpc::unframe(&r.body);
    assert_eq!(texts, [Text { text: "hi".into() }]);
    let trailers = r.trailers.expect("trailers for a client that accepts them");
    assert_eq!(trailers["grpc-status"], "0");

    // Without it, hyper sends no trailers to an HTTP/1.1 client: the body comes, the status not.
    let r = send(&mut h1, echo(&grpc_headers[..1])).await;
    assert_eq!(r.status, 200);
    assert_eq!(grpc::unframe::<Text>(&r.body).len(), 1);
    assert!(r.trailers.is_none(), "{:?}", r.trailers);

    // An error is a trailers-only answer: its status travels in the headers.
    let fail = h1_request(
        "POST",
        "grpc.test",
        "/baton.test.Echo/Echo",
        &grpc_headers,
        grpc::frame(&Text { text: FAIL.into() }),
    );
    let r = send(&mut h1, fail).await;
    assert_eq!(r.header("grpc-status"), Some("3"), "INVALID_ARGUMENT");
    assert!(r.header("grpc-message").is_some());

    // A streamed answer: the declared trailers come, the server's own (undeclared) do not, as
    // hyper sends only the trailers that `Trailer` names.
    let count = h1_request(
        "POST",
        "grpc.test",
        "/baton.test.Echo/Count",
        &grpc_headers,
        grpc::frame(&Number { value: 3 }),
    );
    let r = send(&mut h1, count).await;
    let numbers: Vec<u64> = grpc::unframe::<Number>(&r.body)
        .iter()
        .map(|n| n.value)
        .collect();
    assert_eq!(numbers, [1, 2, 3]);
    let trailers = r.trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert!(trailers.get("x-count-total").is_none(), "{trailers:?}");

    // The HTTP/2 client sees every trailer (checked in full above); here only that it works on
    // the same listener next to HTTP/1.1.
    let mut h2 = H2::connect(listen).await.unwrap();
    let request = Request::post("http://grpc.test/baton.test.Echo/Count")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc::frame(&Number { value: 2 })))
        .unwrap();
    let r = tokio::time::timeout(WAIT, h2.send(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let trailers = r.trailers.expect("trailers over HTTP/2");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-count-total"], "2");
    assert_eq!(server.connections(), 1);
}
